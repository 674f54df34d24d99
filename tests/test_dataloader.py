"""Behaviour of dataloader.py: reader, label map, sub-word alignment, images, dataset/batches, feature cache."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import struct
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataloader as dl
import images
from conftest import TINY_COUNTS, make_conll, real_split
from dataloader import LabelMap
from readers import DataError, ReadReport, read_conll

CLEAN = "IMGID:1\nNew\tB-LOC\nYork\tI-LOC\nrocks\tO\n\nIMGID:2\nHi\tO\nBob\tB-PER\n\n"
CLEAN_POSTS = [(["New", "York", "rocks"], ["B-LOC", "I-LOC", "O"], "1"), (["Hi", "Bob"], ["O", "B-PER"], "2")]


def write(tmp_path, content, name="split.txt") -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def as_tuples(posts):
    return [(p.tokens, p.tags, p.imgid) for p in posts]


def raises_at(path, line, **kw) -> str:
    with pytest.raises(DataError) as e:
        read_conll(path, **kw)
    msg = str(e.value)
    assert f"{path}:{line}:" in msg, msg
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- reader

def test_clean_file(tmp_path):
    posts = read_conll(write(tmp_path, CLEAN))
    assert as_tuples(posts) == CLEAN_POSTS
    assert posts[0].source.endswith("split.txt:1") and posts[1].source.endswith("split.txt:6")


@pytest.mark.parametrize("variant", [
    CLEAN.replace("\n", "\r\n"),
    CLEAN.replace("\n", "\r"),
    "\ufeff" + CLEAN,
    CLEAN.replace("\tO\n", "\tO  \n").replace("IMGID:2\n", "IMGID:2 \n"),
    CLEAN.rstrip("\n"),
    CLEAN.replace("\n\n", "\n\n\n") + "\n\n",
], ids=["crlf", "cr_only", "bom", "trailing_spaces", "no_final_newline", "extra_blank_lines"])
def test_messy_but_valid_reads_same(tmp_path, variant):
    assert as_tuples(read_conll(write(tmp_path, variant))) == CLEAN_POSTS


def test_unicode_line_separators_stay_inside_tokens(tmp_path):
    # str.splitlines() breaks at these too, which would split tokens and shift every later line number
    seps = ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c"]
    body = "".join(f"a{c}b\tO\n" for c in seps)
    p = write(tmp_path, f"IMGID:1\n{body}\nIMGID:2\nx\tO\n")
    assert read_conll(p)[0].tokens == [f"a{c}b" for c in seps]
    p = write(tmp_path, f"IMGID:1\n{body}\nIMGID:2\nx\tZZ\n")
    raises_at(p, len(seps) + 4)


def test_other_maps_to_misc_unless_raw(tmp_path):
    p = write(tmp_path, "IMGID:1\nFoo\tB-OTHER\nBar\tI-OTHER\n")
    assert read_conll(p)[0].tags == ["B-MISC", "I-MISC"]
    assert read_conll(p, keep_raw_types=True)[0].tags == ["B-OTHER", "I-OTHER"]


def test_line_without_tab(tmp_path):
    p = write(tmp_path, "IMGID:1\nNew\tB-LOC\nYork I-LOC\n")
    assert "no tab" in raises_at(p, 3)


def test_three_columns(tmp_path):
    p = write(tmp_path, "IMGID:1\nNew\tB-LOC\n\nIMGID:2\nYork\tx\tO\n")
    assert "3 tab-separated columns" in raises_at(p, 5)


@pytest.mark.parametrize("tag", ["B-", "PER", "b-PER", "X-LOC", "B-LOC-", "0", "B-2X", "B-_X"])
def test_unknown_tag(tmp_path, tag):
    p = write(tmp_path, f"IMGID:1\nNew\tO\nYork\t{tag}\n")
    assert "unknown tag" in raises_at(p, 3)


def test_type_names_beyond_letters(tmp_path):
    tags = ["B-creative-work", "I-creative-work", "B-GPE2", "B-WORK_OF_ART", "B-org.sub", "B-Ort", "B-PER_"]
    p = write(tmp_path, "IMGID:1\n" + "".join(f"w{k}\t{t}\n" for k, t in enumerate(tags)))
    assert read_conll(p)[0].tags == tags


def test_post_without_imgid(tmp_path):
    p = write(tmp_path, "IMGID:1\nNew\tO\n\nHi\tO\nBob\tB-PER\n")
    assert "no IMGID" in raises_at(p, 4)


def test_imgid_without_tokens(tmp_path):
    p = write(tmp_path, "IMGID:1\nNew\tO\n\nIMGID:2\n\nIMGID:3\nHi\tO\n")
    assert "IMGID:2 has no tokens" in raises_at(p, 4)


def test_imgid_inside_post(tmp_path):
    p = write(tmp_path, "IMGID:1\nNew\tO\nIMGID:2\nHi\tO\n")
    raises_at(p, 3)


def test_invalid_utf8(tmp_path):
    p = write(tmp_path, b"IMGID:1\nNew\tO\ncaf\xe9\tO\n")
    assert "UTF-8" in raises_at(p, 3)
    raises_at(p, 3, lenient=True)  # an encoding error is not a line to repair


def test_nul_byte(tmp_path):
    p = write(tmp_path, b"IMGID:1\nNew\tO\n\nIMGID:2\nx\x00\tO\n")
    assert "NUL" in raises_at(p, 5)


@pytest.mark.parametrize("content", ["", "\n\n \n", "\ufeff"], ids=["empty", "blank", "bom_only"])
def test_empty_file(tmp_path, content):
    assert "no posts" in raises_at(write(tmp_path, content), 1)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_conll(tmp_path / "nope.txt")


def test_lenient_repairs_and_counts(tmp_path):
    text = ("IMGID:1\nNew\tB-LOC\nYork I-LOC\nrocks\tX\n\n"   # no tab (space-split), unknown tag
            "IMGID:2\n\n"                                       # IMGID without tokens
            "Hi\tO\nBob\tB-PER\n\n"                             # post without IMGID
            "IMGID:4\na\tb\tO\n")                               # three columns
    p = write(tmp_path, text)
    report = ReadReport(str(p))
    posts = read_conll(p, lenient=True, report=report)
    assert len(report.problems) == 5
    assert all(str(p) + ":" in m for m in report.problems)
    assert as_tuples(posts) == [(["New", "York", "rocks"], ["B-LOC", "I-LOC", "O"], "1"),
                                (["Hi", "Bob"], ["O", "B-PER"], None),
                                (["a"], ["O"], "4")]
    # every token line of the file is still a token: nothing dropped silently
    n_token_lines = sum(1 for l in text.splitlines() if l.strip() and not l.startswith("IMGID:"))
    assert report.tokens == sum(len(p.tokens) for p in posts) == n_token_lines
    assert report.posts == 3 and "5 problem(s)" in report.summary()


def test_lenient_keeps_the_tag_of_a_line_with_a_trailing_tab(tmp_path):
    p = write(tmp_path, "IMGID:1\nObama\tB-PER\t\nvisits\tO\t\n\n")
    with pytest.raises(DataError, match=r":2: expected `token<TAB>tag`, found 3 tab-separated columns"):
        read_conll(p)
    report = ReadReport(str(p))
    assert as_tuples(read_conll(p, lenient=True, report=report)) == [(["Obama", "visits"], ["B-PER", "O"], "1")]
    assert len(report.problems) == 2


def test_lenient_clean_file_has_no_problems(tmp_path):
    report = ReadReport("x")
    read_conll(write(tmp_path, CLEAN), lenient=True, report=report)
    assert report.problems == [] and report.posts == 2 and report.tokens == 5


@pytest.mark.parametrize("name,counts", [("twitter2015", (4000, 1000, 3257)), ("twitter2017", (3373, 723, 723))])
def test_real_twitter_splits(name, counts):
    for split, n in zip(("train", "valid", "test"), counts):
        posts = read_conll(real_split(name, split))
        assert len(posts) == n
        assert all(p.imgid and len(p.tokens) == len(p.tags) > 0 for p in posts)


# ----------------------------------------------------------------------------- label map

def test_label_map_order_and_round_trip(tmp_path):
    lm = LabelMap.from_posts(read_conll(real_split("twitter2015", "train")))
    assert lm.labels == ["<PAD>", "O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert lm.types == ["LOC", "MISC", "ORG", "PER"] and len(lm) == 10
    raw = LabelMap.from_posts(read_conll(real_split("twitter2015", "train"), keep_raw_types=True))
    assert raw.types == ["LOC", "ORG", "OTHER", "PER"]
    lm.save(tmp_path / "label_map.json")
    back = LabelMap.load(tmp_path / "label_map.json")
    assert back.labels == lm.labels and back.ids == lm.ids
    tags = ["O", "B-PER", "I-PER", "B-MISC"]
    assert lm.decode(lm.encode(tags)) == tags
    assert lm.decode([0, 1]) == ["O", "O"]  # padding decodes as O


def test_label_map_must_start_with_pad_o():
    with pytest.raises(ValueError):
        LabelMap(["O", "<PAD>", "B-PER", "I-PER"])


def test_label_map_built_from_train_only(tmp_path, minilm_tok):
    train = read_conll(make_conll(tmp_path / "train.txt", [(["Bob"], ["B-PER"], "1"), (["Rome"], ["B-LOC"], "2")]))
    test = read_conll(make_conll(tmp_path / "test.txt", [(["Bob"], ["B-PER"], "3"), (["x"], ["O"], "4"),
                                                        (["Acme", "Inc"], ["B-ORG", "I-ORG"], "5")]))
    lm = LabelMap.from_posts(train)
    assert lm.types == ["LOC", "PER"]
    with pytest.raises(DataError) as e:
        lm.encode(test[2].tags, test[2].source)
    assert f"{tmp_path / 'test.txt'}:7:" in str(e.value) and "B-ORG" in str(e.value)
    with pytest.raises(DataError, match=r"test\.txt:7:"):
        dl.MNERDataset(test, minilm_tok, lm, max_len=32)


# ----------------------------------------------------------------------------- alignment

def _bert_word_start_ok(tok, word, token):
    if token == tok.unk_token:
        return True
    norm = tok.backend_tokenizer.normalizer.normalize_str(word).replace(" ", "")
    return not token.startswith("##") and norm.startswith(token)


def _check_alignment(tok, words, enc):
    ids = enc.input_ids
    assert len(enc.word_index) == enc.n_kept
    assert all(a < b for a, b in zip(enc.word_index, enc.word_index[1:]))
    toks = tok.convert_ids_to_tokens(ids)
    bounds = list(enc.word_index) + [len(ids) - 1]  # the last word runs up to the closing special
    for k in range(enc.n_kept):
        w, pos = words[k], enc.word_index[k]
        if tok.unk_token.startswith("["):  # BERT WordPiece
            assert _bert_word_start_ok(tok, w, toks[pos]), (w, toks[pos])
        elif toks[pos] != tok.unk_token:  # byte-level BPE: the word's sub-words decode back to it exactly
            span = tok.decode(ids[bounds[k]:bounds[k + 1]], clean_up_tokenization_spaces=False)
            assert span.strip() == w.strip(), (w, span)


@pytest.fixture(params=["minilm", "roberta"])
def tok(request):
    return request.getfixturevalue("minilm_tok" if request.param == "minilm" else "tiny_roberta_tok")


def test_alignment_on_real_posts(tok):
    for p in read_conll(real_split("twitter2017", "test"))[:150]:
        enc = dl.encode_words(tok, p.tokens, 512)
        assert enc.n_kept == len(p.tokens) and len(enc.word_index) == len(p.tokens)
        _check_alignment(tok, p.tokens, enc)
        ids = tok(p.tokens, is_split_into_words=True)["input_ids"]
        if len(enc.empty) == 0:
            assert enc.input_ids == ids  # same ids and specials as the tokenizer's own call


def test_specials_framed(minilm_tok, tiny_roberta_tok):
    e = dl.encode_words(minilm_tok, ["Hello", "world"], 16)
    assert e.input_ids[0] == minilm_tok.cls_token_id and e.input_ids[-1] == minilm_tok.sep_token_id
    assert e.word_index == [1, 2]
    e = dl.encode_words(tiny_roberta_tok, ["Hello", "world"], 16)
    assert e.input_ids[0] == tiny_roberta_tok.bos_token_id and e.input_ids[-1] == tiny_roberta_tok.eos_token_id
    assert e.word_index[0] == 1


@pytest.mark.parametrize("empty", ["\ufe0f", "\u200b", "\u0301", ""], ids=["vs16", "zwsp", "combining", "blank"])
def test_words_without_subtokens_do_not_shift_labels(tok, empty):
    words = ["Obama", empty, "visits", "Paris", empty, "today"]
    enc = dl.encode_words(tok, words, 64)
    assert len(enc.word_index) == len(words) == enc.n_kept
    ref = dl.encode_words(tok, ["Obama", "visits", "Paris", "today"], 64)
    toks = tok.convert_ids_to_tokens(enc.input_ids)
    ref_toks = tok.convert_ids_to_tokens(ref.input_ids)
    for k, rk in ((0, 0), (2, 1), (3, 2), (5, 3)):  # later words point at the same sub-words as without the empties
        assert toks[enc.word_index[k]] == ref_toks[ref.word_index[rk]]
    _check_alignment(tok, words, enc)
    assert len(enc.empty) == sum(1 for w in words if not tok(w, add_special_tokens=False)["input_ids"])


def test_words_that_look_like_special_tokens(tok):
    words = ["a", "[UNK]", "<unk>", "[SEP]", "<s>", "</s>", "<pad>", "[CLS]", "b"]
    enc = dl.encode_words(tok, words, 64)
    assert len(enc.word_index) == len(words) == enc.n_kept
    assert tok.convert_ids_to_tokens(enc.input_ids)[enc.word_index[-1]] in ("b", "\u0120b")


def test_truncation_keeps_prefix(tok):
    words = read_conll(real_split("twitter2017", "test"))[0].tokens * 4
    full = dl.encode_words(tok, words, 1024)
    for max_len in (8, 13, 20):
        enc = dl.encode_words(tok, words, max_len)
        assert len(enc.input_ids) <= max_len
        assert 0 < enc.n_kept < len(words)
        assert enc.word_index == full.word_index[: enc.n_kept]
        assert enc.input_ids[:-1] == full.input_ids[: len(enc.input_ids) - 1]
        assert enc.input_ids[-1] == full.input_ids[-1]  # closing special kept
        assert max(enc.word_index) < len(enc.input_ids) - 1


# ----------------------------------------------------------------------------- images

def _save(im, path, **kw):
    im.save(path, **kw)
    return path


def _rgb(size=(40, 30), colour=(200, 30, 60)):
    return Image.new("RGB", size, colour)


def _png_claiming(w, h) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_image_missing_zero_dir(tmp_path):
    assert dl.load_image(None) == (None, "no image id")
    assert dl.load_image(tmp_path / "nope.jpg") == (None, "missing")
    (tmp_path / "zero.jpg").write_bytes(b"")
    assert dl.load_image(tmp_path / "zero.jpg") == (None, "zero bytes")
    (tmp_path / "dir.jpg").mkdir()
    assert dl.load_image(tmp_path / "dir.jpg") == (None, "not a file")


def test_image_truncated_and_garbage(tmp_path):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    im, why = dl.load_image(tmp_path / "trunc.jpg")
    assert im is None and why.startswith("unreadable")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all" * 10)
    im, why = dl.load_image(tmp_path / "junk.jpg")
    assert im is None and why.startswith("unreadable")


def test_image_decompression_bomb_header(tmp_path):
    for w, h in ((30000, 30000), (10000, 10000)):  # above Pillow's hard limit / above its warning limit
        p = tmp_path / f"bomb{w}.png"
        p.write_bytes(_png_claiming(w, h))
        assert p.stat().st_size < 200
        im, why = dl.load_image(p)
        assert im is None and ("bomb" in why or "too large" in why), why


def test_image_over_project_limit(tmp_path, monkeypatch):
    (tmp_path / "big.png").write_bytes(_png_claiming(8500, 8500))  # under Pillow's limits, over the project's
    assert dl.load_image(tmp_path / "big.png") == (None, "too large (8500x8500)")
    p = _save(_rgb((40, 30)), tmp_path / "a.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    assert dl.load_image(p) == (None, "too large (40x30)")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 40 * 30)
    assert dl.load_image(p)[1] == "ok"


def _check_rgb(res, size=(40, 30)):
    im, why = res
    assert why == "ok" and im.mode == "RGB" and im.size == size
    return np.asarray(im)


def test_image_cmyk_jpeg(tmp_path):
    p = _save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    px = _check_rgb(dl.load_image(p))[15, 20].astype(int)
    assert px[0] > 200 and px[1] < 60 and px[2] < 60  # pure red


def test_image_palette_with_transparency(tmp_path):
    im = Image.new("P", (40, 30), 0)
    im.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    im.paste(1, (0, 0, 20, 30))
    p = _save(im, tmp_path / "pal.png", transparency=0)
    a = _check_rgb(dl.load_image(p))
    assert tuple(a[5, 5]) == (10, 200, 10) and tuple(a[5, 30]) == (255, 255, 255)  # transparent -> white


def test_image_rgba(tmp_path):
    im = Image.new("RGBA", (40, 30), (0, 0, 255, 0))
    im.paste((0, 0, 255, 255), (0, 0, 20, 30))
    a = _check_rgb(dl.load_image(_save(im, tmp_path / "rgba.png")))
    assert tuple(a[5, 5]) == (0, 0, 255) and tuple(a[5, 30]) == (255, 255, 255)


def test_image_grayscale(tmp_path):
    a = _check_rgb(dl.load_image(_save(Image.new("L", (40, 30), 77), tmp_path / "gray.png")))
    assert (a == 77).all()


def test_image_16bit(tmp_path):
    arr = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))
    p = _save(Image.fromarray(arr), tmp_path / "deep.png")
    assert Image.open(p).mode.startswith("I")
    a = _check_rgb(dl.load_image(p))
    assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255 and (np.diff(a[0, :, 0].astype(int)) >= 0).all()


def test_image_16bit_keeps_its_brightness(tmp_path):
    """A 16-bit picture is read on the 0-65535 scale of its bit depth, not stretched to its own brightest pixel."""
    p = _save(Image.fromarray(np.full((30, 40), 40000, np.uint16)), tmp_path / "grey16.png")
    assert (_check_rgb(dl.load_image(p)) == round(40000 / 65535 * 255 - 0.5)).all()


def test_image_rgb_with_a_transparent_colour(tmp_path):
    im = _rgb(colour=(10, 200, 10))
    im.paste((0, 0, 0), (0, 0, 20, 30))
    a = _check_rgb(dl.load_image(_save(im, tmp_path / "trns.png", transparency=(0, 0, 0))))
    assert tuple(a[5, 5]) == (255, 255, 255) and tuple(a[5, 30]) == (10, 200, 10)


def test_image_phone_jpeg_is_turned_upright(tmp_path):
    """Pillow opens many phone cameras' JPEGs as MPO: their EXIF orientation applies as a plain JPEG's does."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    im = Image.new("RGB", (80, 40), (50, 60, 70))
    p = _save(im, tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[im], exif=exif)
    assert Image.open(p).format == "MPO" and dl.load_image(p)[0].size == (40, 80)


def test_image_prep_of_a_very_long_strip_resizes_only_what_it_keeps():
    """A picture so long that resizing all of it would make millions of pixels: only the part the centre crop keeps
    is resized (a 60000 x 2 strip), and it is that part: red, green and blue thirds give the green middle."""
    prep = dl.ImagePrep(32)
    assert prep(Image.new("RGB", (60000, 2), (200, 30, 60))).shape == (3, 32, 32)
    im = Image.new("RGB", (3000, 20), (255, 0, 0))  # 5550 x 37 after the resize: the region path
    im.paste((0, 255, 0), (1000, 0, 2000, 20))
    im.paste((0, 0, 255), (2000, 0, 3000, 20))
    x = prep(im) * 0.5 + 0.5  # back to [0, 1]
    assert x.shape == (3, 32, 32) and (x[1] > 0.95).all() and (x[0] < 0.05).all() and (x[2] < 0.05).all()


def test_image_animated_gif_first_frame(tmp_path):
    frames = [_rgb(colour=c).convert("P") for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    p = _save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(p).n_frames == 3
    px = _check_rgb(dl.load_image(p))[10, 10].astype(int)
    assert px[0] > 200 and px[1] < 50 and px[2] < 50


def test_image_png_with_jpg_extension(tmp_path):
    p = _save(_rgb(), tmp_path / "fake.jpg", format="PNG")
    assert tuple(_check_rgb(dl.load_image(p))[0, 0]) == (200, 30, 60)


def test_image_prep_shape_and_normalisation():
    prep = dl.ImagePrep(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    for size in ((100, 50), (50, 100), (32, 32), (7, 9)):
        x = prep(_rgb(size, (200, 30, 60)))
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        want = (torch.tensor([200, 30, 60]) / 255.0 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.5])
        assert torch.allclose(x.mean(dim=(1, 2)), want, atol=2 / 255 / 0.2)


def test_image_prep_deterministic():
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8))
    prep = dl.ImagePrep(32)
    assert torch.equal(prep(im), prep(im))
    assert torch.equal(prep(im, random.Random(3)), prep(im, random.Random(3)))
    augs = [prep(im, random.Random(s)) for s in range(8)]
    assert any(not torch.equal(augs[0], a) for a in augs[1:])  # augmentation does vary
    assert prep.key() != dl.ImagePrep(64).key()


def test_image_prep_pad_keeps_the_whole_picture():
    """A wide picture with a marker at its left edge: the centre crop cuts the marker off, the padded fit keeps it
    where image_to_view says it lies; the canvas around the picture normalises to about 0."""
    from explain import image_to_view
    im = _rgb((120, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 40))  # the left 10 columns red
    crop, pad = dl.ImagePrep(32), dl.ImagePrep(32, fit="pad")
    red = lambda x: (x[0] > 0.5) & (x[2] < -0.5)  # noqa: E731
    assert not red(crop(im)).any()
    x = pad(im)
    assert x.shape == (3, 32, 32) and red(x).any()
    (x0, y0), (x1, y1) = image_to_view(0, 0, im.size, pad), image_to_view(120, 40, im.size, pad)
    assert (x0, x1) == (0, 32) and 0 < y0 < y1 < 32
    assert red(x)[round(y0) + 1:int(y1) - 1, :2].all()
    assert x[:, :int(y0) - 1].abs().max() < 0.01 and x[:, round(y1) + 1:].abs().max() < 0.01
    assert pad.key() != crop.key() and pad(im, random.Random(1)).shape == (3, 32, 32)
    assert dl.ImagePrep(**json.loads(json.dumps(dataclasses.asdict(pad)))) == pad  # the bundle's meta round trip


def test_image_prep_for_clip_dir(tiny_clip_dir):
    import config
    c = config.get_config(["--image_encoder", tiny_clip_dir])
    prep = dl.image_prep_for(c)
    assert prep.size == 64 and prep.mean == (0.48145466, 0.4578275, 0.40821073)


def test_find_image_extension_order(tmp_path):
    assert dl.find_image(tmp_path, None) is None and dl.find_image(None, "1") is None
    for ext in (".png", ".jpeg", ".jpg"):
        _save(_rgb(), tmp_path / f"a{ext}")
        assert dl.find_image(tmp_path, "a") == tmp_path / f"a{ext}"  # .jpg beats .jpeg beats .png
    _save(_rgb(), tmp_path / "b.png")
    assert dl.find_image(tmp_path, "b") == tmp_path / "b.png"
    assert dl.find_image(tmp_path, "b.png") == tmp_path / "b.png"
    assert dl.find_image(tmp_path, "zzz") == tmp_path / "zzz.jpg"  # missing: the README's default name
    (tmp_path / "b.png").rename(tmp_path / "C.JPG")  # a camera's upper-case extension, named with or without it
    assert dl.find_image(tmp_path, "C") == dl.find_image(tmp_path, "C.jpg") == tmp_path / "C.JPG"
    _save(_rgb(), tmp_path / "noext", format="PNG")  # a file named by the IMGID alone
    assert dl.find_image(tmp_path, "noext") == tmp_path / "noext"


# ----------------------------------------------------------------------------- dataset / batches

@pytest.fixture(scope="module")
def tiny(tiny_data_dir):
    d = tiny_data_dir / "tiny"
    posts = {s: read_conll(d / dl.SPLIT_FILES[s]) for s in TINY_COUNTS}
    return d, posts, LabelMap.from_posts(posts["train"])


def test_tiny_data_layout(tiny):
    d, posts, _ = tiny
    assert {s: len(p) for s, p in posts.items()} == TINY_COUNTS
    n_img = sum(dl.find_image(d / "tiny_images", p.imgid).exists() for p in posts["train"])
    assert 0 < n_img < len(posts["train"])


class CountingEncoder:
    """Fake frozen backbone: [B, 3, S, S] -> [B, R=3, D=5]."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, x):
        self.calls += 1
        self.images += x.shape[0]
        return x.flatten(2)[:, :, :5] + x.mean()


def _dataset(tiny, tok, mode, cache_dir=None, **kw):
    d, posts, lm = tiny
    extra = {}
    if mode == "pixels":
        extra = dict(prep=dl.ImagePrep(32))
    elif mode == "features":
        prep = dl.ImagePrep(32)
        paths = [dl.find_image(d / "tiny_images", p.imgid) for p in posts["train"]]
        feats = dl.FeatureCache(cache_dir, "fake", None, prep).get(paths, CountingEncoder(), batch_size=4)
        extra = dict(prep=prep, features=feats, feat_shape=(3, 5))
    return dl.MNERDataset(posts["train"], tok, lm, max_len=kw.pop("max_len", 64), img_root=d / "tiny_images",
                          image_mode=mode, name="train", **extra, **kw)


@pytest.mark.parametrize("mode", [None, "pixels", "features"])
def test_dataset_batch_contract(tiny, minilm_tok, tmp_path, mode):
    ds = _dataset(tiny, minilm_tok, mode, tmp_path)
    n = TINY_COUNTS["train"]
    assert len(ds) == n
    expect_img = (n + 1) // 2 if mode else 0
    assert sum(ds.has_image) == expect_img
    if mode:
        assert f"images {expect_img}/{n} usable ({n - expect_img} missing/unusable" in ds.describe()
    else:
        assert "images" not in ds.describe()
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=partial(dl.collate, pad_id=ds.pad_id))
    seen = []
    for b in loader:
        B, T = b["input_ids"].shape
        W = b["word_index"].shape[1]
        assert b["input_ids"].dtype == b["attention_mask"].dtype == b["word_index"].dtype == torch.long
        assert b["labels"].dtype == b["index"].dtype == torch.long
        assert b["word_mask"].dtype == b["has_image"].dtype == torch.bool
        assert b["attention_mask"].shape == (B, T) and b["labels"].shape == b["word_mask"].shape == (B, W)
        assert b["has_image"].shape == b["index"].shape == (B,)
        assert (b["word_index"] < b["attention_mask"].sum(1, keepdim=True)).all()
        assert (b["labels"][~b["word_mask"]] == 0).all() and (b["labels"][b["word_mask"]] >= 1).all()
        if mode == "pixels":
            assert b["pixel_values"].shape == (B, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
            assert (b["pixel_values"][~b["has_image"]] == 0).all()
            assert (b["pixel_values"][b["has_image"]].flatten(1).abs().sum(1) > 0).all()
        elif mode == "features":
            assert b["image_feats"].shape == (B, 3, 5) and b["image_feats"].dtype == torch.float32
            assert (b["image_feats"][~b["has_image"]] == 0).all()
        else:
            assert "pixel_values" not in b and "image_feats" not in b and not b["has_image"].any()
        seen += b["index"].tolist()
    assert seen == list(range(n))
    # labels line up with the gold tags of each post
    for i in (0, 7, n - 1):
        item = ds[i]
        assert ds.label_map.decode(item["labels"]) == ds.posts[i].tags
        assert bool(item["has_image"]) == (mode is not None and i % 2 == 0)


def test_corrupt_image_falls_back_to_text_only(tiny, minilm_tok, tmp_path, capsys):
    """Read as pixels, a picture that does not decode is text-only from the start (so --image_control never pairs
    it), counted by describe(); one that breaks after the dataset was built falls back when read, warned once."""
    d, posts, lm = tiny
    path = tmp_path / f"{posts['train'][0].imgid}.jpg"
    path.write_bytes(b"\xff\xd8\xff garbage")
    make = lambda: dl.MNERDataset(posts["train"][:2], minilm_tok, lm, 64, img_root=tmp_path,  # noqa: E731
                                  image_mode="pixels", prep=dl.ImagePrep(16))
    ds = make()
    assert ds.has_image == [False, False] and ds.image_status[0].startswith("unreadable")
    assert "unreadable 1" in ds.describe()
    _save(_rgb(), path, format="JPEG")
    ds = make()
    assert ds.has_image == [True, False] and ds[0]["has_image"] is True
    path.write_bytes(b"\xff\xd8\xff garbage")
    item = ds[0]
    assert item["has_image"] is False and (item["pixel_values"] == 0).all()
    ds[0]
    assert capsys.readouterr().out.count("runs text-only") == 1  # warned once per file


def test_collate_padding(tiny, tiny_roberta_tok):
    ds = _dataset(tiny, tiny_roberta_tok, None, max_len=12)
    assert ds.pad_id == tiny_roberta_tok.pad_token_id == 1
    assert ds.n_windowed > 0 and "overlapping windows" in ds.describe()
    items = [ds[i] for i in range(6)]
    b = dl.collate(items, pad_id=ds.pad_id)
    for k, it in enumerate(items):
        n, w = len(it["input_ids"]), len(it["word_index"])
        assert b["input_ids"][k, :n].tolist() == it["input_ids"] and (b["input_ids"][k, n:] == 1).all()
        assert b["attention_mask"][k].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
        assert b["word_index"][k, :w].tolist() == it["word_index"] and (b["word_index"][k, w:] == 0).all()
        assert b["word_mask"][k].sum() == w == len(it["labels"]) <= len(ds.posts[ds.windows[it["index"]].post].tokens)
        assert b["input_ids"].shape[1] <= 12


def _flat(batches):
    return [i for b in batches for i in b]


def test_length_bucket_sampler_epoch_cover_and_determinism():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(203)]
    s = dl.LengthBucketSampler(lengths, batch_size=8, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(_flat(e0)) == list(range(203)) and len(e0) == len(s) == 26
    assert all(len(b) <= 8 for b in e0)
    again = dl.LengthBucketSampler(lengths, batch_size=8, seed=3)
    again.set_epoch(0)
    assert list(again) == e0
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(_flat(e1)) == list(range(203)) and e1 != e0
    other = dl.LengthBucketSampler(lengths, batch_size=8, seed=4)
    assert list(other) != e0
    # buckets cut padding compared with plain shuffling
    plain = dl.LengthBucketSampler(lengths, batch_size=8, seed=3, bucket=False)
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    assert pad(e0) < pad(list(plain)) / 2
    ordered = dl.LengthBucketSampler(lengths, batch_size=8, shuffle=False, bucket=False)
    assert _flat(list(ordered)) == list(range(203))


# ----------------------------------------------------------------------------- feature cache

def test_feature_cache_reuse_and_keys(tmp_path):
    imgs = []
    for i in range(5):
        imgs.append(_save(_rgb((30 + i, 20), (40 * i, 10, 90)), tmp_path / f"{i}.png"))
    paths = imgs + [tmp_path / "missing.jpg", None]
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    cache = tmp_path / "cache"

    def run(backbone="clip-a", size=16):
        enc = CountingEncoder()
        feats = dl.FeatureCache(cache, backbone, weights, dl.ImagePrep(size)).get(paths, enc, batch_size=2)
        return enc, feats

    enc, feats = run()
    assert enc.calls == 3 and enc.images == 5
    assert set(feats) == {str(p) for p in imgs}
    assert all(f.dtype == torch.float16 and f.shape == (3, 5) for f in feats.values())
    enc2, feats2 = run()
    assert enc2.calls == 0 and all(torch.equal(feats[k], feats2[k]) for k in feats)
    assert run(size=24)[0].calls > 0
    assert run(backbone="clip-b")[0].calls > 0
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert run()[0].calls > 0
    assert run()[0].calls == 0
    keys = {dl.FeatureCache(cache, b, weights, dl.ImagePrep(s)).key for b in ("x", "y") for s in (16, 24)}
    assert len(keys) == 4


def test_feature_cache_follows_image_content(tmp_path):
    """An image overwritten in place gets new features; an unreadable image is not cached and is used once fixed."""
    img = _save(_rgb((30, 20), (255, 0, 0)), tmp_path / "a.png")
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png")
    cache = tmp_path / "cache"

    def run():
        enc = CountingEncoder()
        return enc, dl.FeatureCache(cache, "fake", None, dl.ImagePrep(16)).get([img, bad], enc)

    enc, red = run()
    assert enc.images == 1 and set(red) == {str(img)}
    _save(_rgb((30, 20), (0, 0, 255)), img)  # same name, other picture
    enc, blue = run()
    assert enc.images == 1 and not torch.equal(red[str(img)], blue[str(img)])
    _save(_rgb((30, 20), (0, 255, 0)), bad)  # the broken file is fixed
    enc, fixed = run()
    assert enc.images == 1 and set(fixed) == {str(img), str(bad)}
    assert run()[0].images == 0
    assert not list(cache.rglob("*.tmp"))


def test_feature_cache_rebuilds_a_damaged_entry(tmp_path, capsys):
    img = _save(_rgb((30, 20), (10, 200, 30)), tmp_path / "a.png")
    cache = dl.FeatureCache(tmp_path / "cache", "fake", None, dl.ImagePrep(16))
    first = cache.get([img], CountingEncoder())
    entry = cache.entry(dl.file_digest(img))
    entry.write_bytes(b"garbage")
    enc = CountingEncoder()
    again = cache.get([img], enc)
    assert enc.images == 1 and torch.equal(first[str(img)], again[str(img)])
    assert "unreadable feature cache entry" in capsys.readouterr().out


_FILL = """
import sys, torch
sys.path.insert(0, {root!r})
import dataloader as dl
paths = sorted(__import__("pathlib").Path({imgs!r}).glob("*.png"))
enc = lambda x: x.flatten(2)[:, :, :64] * 1.0
feats = dl.FeatureCache({cache!r}, "fake", None, dl.ImagePrep(16)).get(paths, enc, batch_size=2)
print(len(feats))
"""


def test_two_processes_fill_one_cache_then_a_third_reads_it(tmp_path):
    import subprocess
    import sys
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(24):
        _save(_rgb((40, 30), (i * 10, 255 - i * 10, 7 * i)), imgs / f"{i}.png")
    code = _FILL.format(root=str(dl.ROOT), imgs=str(imgs), cache=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["24", "24"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    enc = CountingEncoder()
    feats = dl.FeatureCache(tmp_path / "cache", "fake", None, dl.ImagePrep(16)).get(sorted(imgs.glob("*.png")), enc)
    assert enc.images == 0 and len(feats) == 24  # every entry read back whole


# ----------------------------------------------------------------------------- image controls

def test_shuffle_control_is_a_seeded_derangement():
    has = [True, False, True, True, True, False, True]
    src = dl.image_sources(has, "shuffle", seed=3)
    have = [i for i, h in enumerate(has) if h]
    assert sorted(src[i] for i in have) == have                      # a permutation of the posts with images
    assert all(src[i] != i for i in have)                            # nobody keeps its own image
    assert all(src[i] == i for i, h in enumerate(has) if not h)      # posts without an image stay text-only
    assert src == dl.image_sources(has, "shuffle", seed=3)
    many = [True] * 30
    assert dl.image_sources(many, "shuffle", seed=3) != dl.image_sources(many, "shuffle", seed=4)
    assert dl.image_sources([True, False], "shuffle", 0) == [0, 1]   # one image: nothing to swap with
    assert dl.image_sources(has, "none", 3) == list(range(len(has)))
    assert dl.image_sources(has, "blank", 3) == [-1 if h else i for i, h in enumerate(has)]


@pytest.mark.parametrize("mode", ["pixels", "features"])
def test_blank_control_gives_every_post_the_same_image(tiny, minilm_tok, tmp_path, mode):
    kw = {"blank": torch.full((3, 5), 0.25)} if mode == "features" else {}
    ds = _dataset(tiny, minilm_tok, mode, tmp_path, control="blank", **kw)
    key = "pixel_values" if mode == "pixels" else "image_feats"
    items = [ds[i] for i in range(len(ds)) if ds.has_image[i]]
    assert len(items) >= 2 and all(it["has_image"] for it in items)
    assert all(torch.equal(it[key], items[0][key]) for it in items)
    plain = _dataset(tiny, minilm_tok, mode, tmp_path)
    assert [bool(plain[i]["has_image"]) for i in range(len(ds))] == [bool(ds[i]["has_image"]) for i in range(len(ds))]


def test_shuffle_control_shows_another_posts_image(tiny, minilm_tok, tmp_path):
    plain = _dataset(tiny, minilm_tok, "features", tmp_path)
    shuf = _dataset(tiny, minilm_tok, "features", tmp_path, control="shuffle")
    for i in range(len(shuf)):
        if shuf.has_image[i]:
            assert torch.equal(shuf[i]["image_feats"], plain[shuf.source[i]]["image_feats"])


def test_clip_prep_matches_clip_image_processor(tmp_path):
    """image_prep_for on a CLIP directory with --image_fit crop = transformers' CLIPImageProcessor on its saved
    processor config: shortest-edge resize (not the 256/224 ImageNet zoom), centre crop, mean/std. Both resize with
    PIL bicubic at the same output size, so the uint8 pixels agree exactly; what remains is float rounding of the
    rescale and normalise steps (x / 255 here, x * (1 / 255) there), ~1e-6 in normalised units: atol 1e-5."""
    import config
    try:  # transformers >= 5 names the PIL backend; 4.x has only this one
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    Processor(size={"shortest_edge": 32}, crop_size=28, image_mean=list(mean),
              image_std=list(std)).save_pretrained(tmp_path)
    ref = Processor.from_pretrained(tmp_path)
    prep = dl.image_prep_for(config.get_config(["--image_encoder", str(tmp_path), "--image_fit", "crop"]))
    assert (prep.size, prep.short, prep.mean, prep.std) == (28, 32, mean, std)
    rng = np.random.default_rng(0)
    for w, h in ((70, 40), (40, 70), (33, 97), (32, 32), (100, 100), (47, 29), (29, 300)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = ref(im, return_tensors="pt")["pixel_values"][0]
        got = prep(im)
        assert got.shape == want.shape == (3, 28, 28), (w, h)
        assert torch.allclose(got, want, atol=1e-5), (w, h, (got - want).abs().max())
    # EfficientNet-Lite0 keeps its ImageNet-style zoom: short side 256 for a 224 crop, long side rounded
    eff = dl.image_prep_for(config.get_config(["--image_fit", "crop", "--vision_img_size", "224"]))
    assert (eff.size, eff.short, eff.truncate) == (224, 256, False)
    assert eff.key() == "size=224,short=256,mean=(0.5, 0.5, 0.5),std=(0.5, 0.5, 0.5),bicubic"  # feature caches stay valid
    padded = dl.image_prep_for(config.get_config(["--vision_img_size", "224"]))
    assert padded.key() == eff.key() + ",pad"  # the default fit: its own entries
    assert dl.image_prep_for(config.get_config([])).key() == padded.key().replace("224", "288").replace("256", "329")


def test_clip_prep_refuses_fixed_size_resize(tmp_path):
    import config
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"height": 32, "width": 32}, "crop_size": 32}')
    with pytest.raises(dl.DataError, match="not a shortest_edge resize"):
        dl.image_prep_for(config.get_config(["--image_encoder", str(tmp_path)]))


def test_iob2_relabels_chunks_that_open_with_i():
    tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "B-PER", "I-PER"]
    assert dl.iob2(tags) == (["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG", "B-PER", "I-PER"], 3)
    assert dl.iob2(["O", "B-MISC", "I-MISC"]) == (["O", "B-MISC", "I-MISC"], 0)


def test_bio_constraints_fix_training_targets_only(tiny_bert_dir):
    """--bio_constraints: a CRF scored by conlleval trains on IOB2 targets (the count is in describe()); a dev split,
    the posts' own tags (what the scorer reads), --no-bio_constraints, --eval_mode strict and a softmax head keep the
    file's tags."""
    import config as C
    import model as M
    posts = [dl.Post(["Hi", "Bob", "Ray", "in", "Rome"], ["O", "I-PER", "I-PER", "O", "B-LOC"], "1", "f:1")]
    lm = dl.LabelMap.from_posts(posts)
    tok = M.load_tokenizer(C.get_config(["--text_encoder", tiny_bert_dir]))
    def labels(argv, train=True):
        c = C.get_config(["--text_encoder", tiny_bert_dir, "--model", "roberta_crf", *argv])
        iob2 = train and M.build_model(c, len(lm)).iob2_targets
        ds = dl.make_dataset(c, "train" if train else "valid", posts, tok, lm, train=train, iob2_labels=iob2)
        return lm.decode(ds.labels[0]), ds.describe()
    fixed, line = labels([])
    assert fixed == ["O", "B-PER", "I-PER", "O", "B-LOC"] and "1 chunk opening with I-" in line
    for argv, train in (([], False), (["--no-bio_constraints"], True), (["--eval_mode", "strict"], True),
                        (["--model", "bert"], True)):
        assert labels(argv, train)[0] == ["O", "I-PER", "I-PER", "O", "B-LOC"], argv
    assert posts[0].tags[1] == "I-PER"


def test_label_map_layout_is_checked():
    """model.bio_bans reads B-/I- ids from LabelMap's layout, so a map out of that layout is refused."""
    with pytest.raises(ValueError, match="B-X, I-X pairs"):
        dl.LabelMap(["<PAD>", "O", "I-PER", "B-PER"])
    with pytest.raises(ValueError, match="B-X, I-X pairs"):
        dl.LabelMap(["<PAD>", "O", "B-PER"])
    assert dl.LabelMap(["<PAD>", "O", "B-LOC", "I-LOC", "B-PER", "I-PER"]).types == ["LOC", "PER"]


def test_a_byte_level_tokenizer_reads_a_lone_word_as_inside_a_sentence(tiny_roberta_dir, tmp_path):
    """A byte-level BPE tokenizer saved without add_prefix_space (any model type: the pre-tokenizer tells) is loaded
    with it, so a pre-split word gets the sub-words it has after a space in running text."""
    from transformers import RobertaTokenizer
    RobertaTokenizer(vocab=f"{tiny_roberta_dir}/vocab.json", merges=f"{tiny_roberta_dir}/merges.txt").save_pretrained(
        tmp_path)
    tok = dl.fast_tokenizer(tmp_path)
    words = ["Kevin", "Durant", "enters", "Oracle", "Arena"]
    lone = tok(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    assert lone == tok(" " + " ".join(words), add_special_tokens=False)["input_ids"]
    bert = dl.fast_tokenizer(__import__("config").resolve_text_encoder("minilm"))
    assert bert(words, is_split_into_words=True)["input_ids"] == bert(" ".join(words))["input_ids"]
