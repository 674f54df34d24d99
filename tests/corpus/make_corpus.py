#!/usr/bin/env python
"""MANGO's bad-input corpus: every broken file is generated here, deterministically; nothing binary is committed.

    python tests/corpus/make_corpus.py OUT_DIR    # write the corpus (a few hundred KB) to OUT_DIR
    python tests/corpus/make_corpus.py --table    # print CASES as the Markdown table kept in tests/corpus/CASES.md

OUT_DIR/data/<case>/{train,valid,test}.txt and <case>_images/  one tiny CoNLL+IMGID dataset per data/image case
                                                               (4 train, 2 valid, 2 test posts, all four types)
OUT_DIR/files/                                                 loose inputs of predict.py (images, JSON lines)
Run cases (a broken run directory) are made by `prepare_run` from two trained runs (see tests/test_corpus.py).

CASES is the declarative table that tests/test_corpus.py runs through the real entry points (train.py, test.py,
predict.py main() under config.cli, exactly what `python <entry>.py ...` runs). Each case expects one of:
  error      exit status 2 and exactly one stderr line `error: ...` matching `expect` (it names the file:line, the
             flag or the run file, and the fix); no traceback
  recovered  exit status 0; stdout matches `expect`: what was repaired, skipped or sent text-only, with its count
  accepted   exit status 0; a valid variant (CRLF, BOM, CMYK, ...) read as is or converted; stdout matches `expect`
Placeholders in args: {data} the corpus data dir, {files} OUT_DIR/files, {save} the save dir, {run} the trained
MNER run's name.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- clean posts

TRAIN = [("p1", [("Kevin", "B-PER"), ("Durant", "I-PER"), ("joins", "O"), ("the", "O"), ("Warriors", "B-ORG"),
                 ("today", "O")]),
         ("p2", [("Sunset", "O"), ("over", "O"), ("Oakland", "B-LOC"), ("bay", "O")]),
         ("p3", [("Watching", "O"), ("Star", "B-MISC"), ("Wars", "I-MISC"), ("with", "O"), ("Anna", "B-PER")]),
         ("p4", [("Apple", "B-ORG"), ("opens", "O"), ("a", "O"), ("store", "O"), ("in", "O"), ("Paris", "B-LOC")])]
VALID = [("v1", [("Anna", "B-PER"), ("visits", "O"), ("Paris", "B-LOC")]),
         ("v2", [("Warriors", "B-ORG"), ("win", "O"), ("again", "O")])]
TEST = [("t1", [("Kevin", "B-PER"), ("loves", "O"), ("Oakland", "B-LOC")]),
        ("t2", [("Star", "B-MISC"), ("Wars", "I-MISC"), ("is", "O"), ("on", "O")])]


def conll_lines(posts) -> list[str]:
    out = []
    for imgid, words in posts:
        out.append(f"IMGID:{imgid}")
        out += [f"{w}\t{t}" for w, t in words]
        out.append("")
    return out


def line_of(lines: list[str], text: str) -> int:
    """1-based number of the first line equal to text."""
    return lines.index(text) + 1


# ----------------------------------------------------------------------------- images

def png_claiming(w: int, h: int) -> bytes:
    """A 100-byte PNG whose header claims w x h RGB pixels: a decompression bomb that never allocates them."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def picture(seed: int, size=(40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = rng.integers(0, 255, 3, dtype=np.uint8)
    a[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = rng.integers(0, 255, 3, dtype=np.uint8)
    return Image.fromarray(a)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    rng = np.random.default_rng(1)
    b = _encode(Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)), "JPEG", quality=95)
    return b[: len(b) // 2]


def _palette_transparent() -> bytes:
    im = Image.new("P", (40, 32), 0)
    im.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    im.paste(1, (0, 0, 20, 32))
    return _encode(im, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [picture(k).convert("P") for k in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _sixteen_bit() -> bytes:
    return _encode(Image.fromarray(np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (32, 1))), "PNG")


# name -> (file name of post p1's image, bytes or "dir"); p1's IMGID is the file's stem unless the suffix is kept
IMAGES = {
    "img_missing": (None, None),
    "img_zero_bytes": ("p1.jpg", b""),
    "img_truncated_jpeg": ("p1.jpg", _truncated_jpeg),
    "img_not_an_image": ("p1.jpg", b"<html>403 Forbidden</html>\n"),
    "img_png_named_jpg": ("p1.jpg", lambda: _encode(picture(2), "PNG")),
    "img_cmyk_jpeg": ("p1.jpg", lambda: _encode(Image.new("CMYK", (40, 32), (0, 255, 255, 0)), "JPEG")),
    "img_16bit_png": ("p1.png", _sixteen_bit),
    "img_palette_transparency": ("p1.png", _palette_transparent),
    "img_animated_gif": ("p1.gif", _animated_gif),
    "img_webp": ("p1.webp", lambda: _encode(picture(3), "WEBP")),
    "img_1x1": ("p1.png", lambda: _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")),
    "img_bomb_20000": ("p1.png", lambda: png_claiming(20000, 20000)),
    "img_directory": ("p1.jpg", "dir"),
}


def write_image(path: Path, content):
    if content == "dir":
        path.mkdir(parents=True, exist_ok=True)
        (path / "inside.jpg").write_bytes(_encode(picture(9), "JPEG"))
        return
    path.write_bytes(content() if callable(content) else content)


# ----------------------------------------------------------------------------- CoNLL variants

def _lines_with(post_k: int, word_k: int, line: str) -> tuple[list[str], int]:
    """Train lines with word word_k of post post_k replaced by `line`; returns (lines, its line number)."""
    lines = conll_lines(TRAIN)
    w, t = TRAIN[post_k][1][word_k]
    n = line_of(lines, f"{w}\t{t}")
    lines[n - 1] = line
    return lines, n


def _text(lines) -> str:
    return "\n".join(lines) + "\n"


def conll_variants() -> dict[str, tuple[bytes, dict]]:
    """case -> (train.txt bytes, facts for the case table: line numbers, counts)."""
    v: dict[str, tuple[bytes, dict]] = {}
    clean = _text(conll_lines(TRAIN))
    lines, n = _lines_with(1, 2, "Oakland B-LOC")
    v["conll_no_tab"] = (_text(lines).encode(), {"line": n})
    lines, n = _lines_with(1, 2, "Oakland\tNNP\tB-LOC")
    v["conll_three_columns"] = (_text(lines).encode(), {"line": n})
    lines, n = _lines_with(1, 2, "Oakland\tLOC")
    v["conll_unknown_tag"] = (_text(lines).encode(), {"line": n})
    lines, n = _lines_with(1, 2, "Oakland\tI-LOC")
    v["conll_i_after_o"] = (_text(lines).encode(), {"line": n})
    lines, n = _lines_with(0, 1, "Durant\tI-ORG")
    v["conll_type_change_in_chunk"] = (_text(lines).encode(), {"line": n})
    v["conll_crlf"] = (clean.replace("\n", "\r\n").encode(), {})
    v["conll_cr_only"] = (clean.replace("\n", "\r").encode(), {})
    v["conll_bom"] = (b"\xef\xbb\xbf" + clean.encode(), {})
    v["conll_no_final_newline"] = (clean.rstrip("\n").encode(), {})
    lines, n = _lines_with(2, 3, "wi\x00th\tO")
    v["conll_nul_bytes"] = (_text(lines).encode(), {"line": n})
    lines, n = _lines_with(2, 3, "with\tO")
    raw = _text(lines).encode().replace(b"with\tO", b"w\xffth\tO")
    v["conll_invalid_utf8"] = (raw, {"line": n})
    v["conll_latin1"] = (_text(conll_lines(TRAIN[:1]) + ["IMGID:p9", "Caf\xe9\tB-LOC", ""]).encode("latin-1"),
                         {"line": len(conll_lines(TRAIN[:1])) + 2})
    v["conll_empty"] = (b"", {})
    v["conll_whitespace_only"] = (b"\n  \n\t\n\n", {})
    v["conll_only_imgid"] = (b"IMGID:p1\n\nIMGID:p2\n\nIMGID:p3\n", {"line": 1})
    lines = conll_lines(TRAIN)
    del lines[0]
    v["conll_post_without_imgid"] = (_text(lines).encode(), {"line": 1})
    lines = conll_lines(TRAIN)
    n = line_of(lines, "IMGID:p2")
    del lines[n - 2]  # the blank line before it: p2's IMGID now sits inside p1
    v["conll_imgid_inside_post"] = (_text(lines).encode(), {"line": n - 1})
    words = "the fans of the city cheer for their team at the game tonight and".split()
    long_post = [("p5", [(words[i % len(words)], "O") for i in range(600)])]
    v["conll_600_tokens"] = (_text(conll_lines(TRAIN + long_post)).encode(), {})
    vanish = [("p5", [("Kevin", "B-PER"), ("\u200b", "O"), ("loves", "O"), ("\ufe0f", "O"), ("\u0301", "O"),
                      ("Paris", "B-LOC")])]
    v["conll_vanishing_tokens"] = (_text(conll_lines(TRAIN + vanish)).encode("utf-8"), {"vanish": 3})
    dup = [("p1", [("Durant", "B-PER"), ("scores", "O")]), ("p2", TRAIN[1][1])]
    v["conll_duplicate_imgids"] = (_text(conll_lines(TRAIN + dup)).encode(), {"dups": 2})
    return v


# ----------------------------------------------------------------------------- the case table

@dataclass(frozen=True)
class Case:
    name: str
    category: str          # conll | image | predict | run
    entry: str             # train | test | predict
    args: tuple            # entry-point flags ({data} {files} {save} {run} are filled in by the runner)
    outcome: str           # error | recovered | accepted
    expect: str            # regex: the error line (stderr) or the recovery / acceptance line (stdout)
    what: str              # the input, in words
    setup: str = ""        # run cases: what prepare_run does to a copy of the trained run
    not_as_root: bool = False  # relies on file permissions, which root ignores


DATA_ERR = "error: {data}/{name}/train\\.txt:{line}: "
LENIENT = "\\(or pass --lenient_data to repair and count\\)"


def _train(name, *extra):
    return ("--dataset_name", name, "--save_name", name, *extra)


def _cases() -> list[Case]:
    c = []

    def data(name, outcome, expect, what, *extra, ds=None):
        c.append(Case(name, "conll", "train", _train(ds or name, *extra), outcome, expect, what))

    facts = {k: f for k, (_, f) in conll_variants().items()}

    def err(name, msg):
        return DATA_ERR.format(data="{data}", name=name, line=facts[name]["line"]) + msg

    data("conll_no_tab", "error", err("conll_no_tab", "expected `token<TAB>tag`, found no tab; write one token and "
                                                      "one tag per line separated by a single tab " + LENIENT),
         "a token line separated by a space instead of a tab")
    data("conll_no_tab_lenient", "recovered",
         r"warning: .*conll_no_tab/train\.txt: 4 posts, 21 tokens; 1 problem\(s\) repaired/skipped under "
         r"--lenient_data \(first: .*train\.txt:" + str(facts["conll_no_tab"]["line"]) + ": expected",
         "the same file with --lenient_data: split on the last whitespace, counted", "--lenient_data",
         ds="conll_no_tab")
    data("conll_three_columns", "error", err("conll_three_columns", "expected `token<TAB>tag`, found 3 tab-separated "
                                                                    "columns; .*" + LENIENT),
         "a `token<TAB>POS<TAB>tag` line")
    data("conll_three_columns_lenient", "recovered", r"train\.txt: 4 posts, 21 tokens; 1 problem\(s\) repaired",
         "the same with --lenient_data: first and last column kept, counted", "--lenient_data",
         ds="conll_three_columns")
    data("conll_unknown_tag", "error", err("conll_unknown_tag", "unknown tag 'LOC'; use O, B-<TYPE> or I-<TYPE> "
                                                                + LENIENT), "a tag without its B-/I- prefix")
    data("conll_unknown_tag_lenient", "recovered", r"train\.txt: 4 posts, 21 tokens; 1 problem\(s\) repaired.*"
                                                   r"unknown tag 'LOC'", "the same with --lenient_data: read as O, "
                                                                         "counted", "--lenient_data",
         ds="conll_unknown_tag")
    data("conll_i_after_o", "recovered",
         r"note: .*conll_i_after_o/train\.txt: 1 I- tag\(s\) begin a chunk \(first: .*train\.txt:"
         + str(facts["conll_i_after_o"]["line"]) + r"\)",
         "an I- tag after O (read as an entity start, as conlleval does)")
    data("conll_type_change_in_chunk", "recovered",
         r"note: .*train\.txt: 1 I- tag\(s\) begin a chunk \(first: .*train\.txt:"
         + str(facts["conll_type_change_in_chunk"]["line"]) + r"\)",
         "B-PER followed by I-ORG (a new ORG chunk, conlleval)")
    for name, what in (("conll_crlf", "Windows line ends (CRLF)"), ("conll_cr_only", "old-Mac line ends (CR)"),
                       ("conll_bom", "a UTF-8 byte-order mark"),
                       ("conll_no_final_newline", "no newline after the last line")):
        data(name, "accepted", r"^train: 4 posts, images 4/4 usable", what + ": read exactly as the clean file")
    data("conll_nul_bytes", "error", err("conll_nul_bytes", "NUL byte in text; the file is binary or corrupted, "
                                                            "re-export it as plain UTF-8 text"),
         "a NUL byte inside a token")
    data("conll_invalid_utf8", "error", err("conll_invalid_utf8", "invalid UTF-8 byte 0xff; re-save the file as UTF-8"),
         "a byte that is not UTF-8")
    data("conll_latin1", "error", err("conll_latin1", "invalid UTF-8 byte 0xe9; re-save the file as UTF-8"),
         "a Latin-1 file (Caf\\xe9)")
    data("conll_empty", "error", r"error: .*conll_empty/train\.txt:1: no posts found; the file is empty",
         "an empty file")
    data("conll_whitespace_only", "error", r"error: .*conll_whitespace_only/train\.txt:1: no posts found",
         "only blank and whitespace lines")
    data("conll_only_imgid", "error", err("conll_only_imgid", "IMGID:p1 has no tokens; remove the line or add the "
                                                              "post's tokens " + LENIENT), "only IMGID lines")
    data("conll_only_imgid_lenient", "error", r"error: .*conll_only_imgid/train\.txt:1: no posts found",
         "only IMGID lines with --lenient_data: all skipped, nothing left", "--lenient_data", ds="conll_only_imgid")
    data("conll_post_without_imgid", "error", err("conll_post_without_imgid", "post has no IMGID line; add "
                                                                              "`IMGID:<id>` before its first token"),
         "a post with no IMGID line")
    data("conll_imgid_inside_post", "error", err("conll_imgid_inside_post", "IMGID line inside a post; add a blank "
                                                                            "line before it"),
         "a missing blank line between two posts")
    data("conll_600_tokens", "recovered",
         r"^train: 5 posts, .*, 1 post longer than --max_len tagged in \d+ overlapping windows",
         "a 600-token post (past --max_len 48: tagged in overlapping windows, counted)")
    data("conll_600_tokens_max_len_over_encoder", "error",
         r"error: --max_len 1024 is more than the 512 positions of --text_encoder .*; use --max_len 512 or less",
         "the same post with --max_len above the encoder's positions", "--max_len", "1024", ds="conll_600_tokens")
    data("conll_vanishing_tokens", "recovered", r"^train: 5 posts, .*, 3 words with no sub-tokens mapped to the "
                                                r"unknown token", "zero-width space, lone U+FE0F, lone combining "
                                                                  "accent as tokens")
    data("conll_duplicate_imgids", "recovered",
         r"note: .*train\.txt: 2 IMGID\(s\) name more than one post \(first: p1 at .*train\.txt:1 and "
         r".*train\.txt:\d+\); those posts share one image", "two posts reuse earlier IMGIDs")
    data("conll_unseen_type_in_test", "error",
         r"error: .*conll_unseen_type_in_test/test\.txt:1: word 1 of this post has tag B-EVENT, which is not in the train label map",
         "test.txt has a type train.txt never has")
    data("conll_missing_valid", "error",
         r"error: .*conll_missing_valid/valid\.txt not found: dataset conll_missing_valid expects train\.txt, "
         r"valid\.txt, test\.txt in", "no valid.txt")
    c.append(Case("conll_unknown_dataset", "conll", "train", _train("no_such_set"), "error",
                  r"error: --dataset_name 'no_such_set': not a known dataset .* and .*no_such_set/train\.txt does "
                  r"not exist", "--dataset_name naming nothing"))

    # images: post p1's image is the case; p2-p4 have good pictures; valid/test have theirs
    def img(name, outcome, expect, what):
        c.append(Case(name, "image", "train", _train(name), outcome, expect, what))
    bad = r"^train: 4 posts, images 3/4 usable \(1 missing/unusable -> text-only: {}\)"
    img("img_missing", "recovered", bad.format("missing 1"), "the post's image is not there")
    img("img_zero_bytes", "recovered", bad.format("zero bytes 1"), "a 0-byte file (an interrupted download)")
    img("img_truncated_jpeg", "recovered", bad.format(r"unreadable 1"), "a JPEG cut in half")
    img("img_not_an_image", "recovered", bad.format(r"unreadable 1"), "an HTML error page saved as .jpg")
    img("img_png_named_jpg", "accepted", r"^train: 4 posts, images 4/4 usable", "PNG bytes in a .jpg file")
    img("img_cmyk_jpeg", "accepted", r"^train: 4 posts, images 4/4 usable", "a CMYK JPEG (converted to RGB)")
    img("img_16bit_png", "accepted", r"^train: 4 posts, images 4/4 usable", "a 16-bit grayscale PNG (scaled to 8 bit)")
    img("img_palette_transparency", "accepted", r"^train: 4 posts, images 4/4 usable",
        "a palette PNG with a transparent colour (composited on white)")
    img("img_animated_gif", "accepted", r"^train: 4 posts, images 4/4 usable", "an animated GIF (first frame)")
    img("img_webp", "accepted", r"^train: 4 posts, images 4/4 usable", "a WebP picture")
    img("img_1x1", "accepted", r"^train: 4 posts, images 4/4 usable", "a 1x1 picture (upscaled)")
    img("img_bomb_20000", "recovered", bad.format(r"decompression bomb 1"),
        "a 100-byte PNG claiming 20000x20000 pixels (never decoded)")
    img("img_directory", "recovered", bad.format("not a file 1"), "a directory where the image file should be")
    c.append(Case("img_unreadable_trainable_vision", "image", "train",
                  _train("img_truncated_jpeg", "--save_name", "img_unreadable_trainable_vision", "--vision_trainable",
                         "--unfreeze_last_vision_blocks", "1"), "recovered",
                  r"^train: 4 posts, images 3/4 usable \(1 missing/unusable -> text-only: unreadable 1\)",
                  "a truncated JPEG with images read on the fly (trainable vision): counted when the split is built, "
                  "so image controls never pair it"))

    # predict.py on the trained run: images and inputs
    def pred(name, outcome, expect, what, *args):
        c.append(Case(name, "predict", "predict", ("--save_name", "{run}", *args), outcome, expect, what))
    text = "Kevin Durant enters Oracle Arena"
    pw = r"warning: --text: image {files}/{f} is {why}; this post is tagged text-only"
    pred("predict_image_missing", "recovered", pw.format(files="{files}", f="gone\\.jpg", why="missing"),
         "--image names no file", "--text", text, "--image", "{files}/gone.jpg")
    pred("predict_image_truncated", "recovered", pw.format(files="{files}", f="trunc\\.jpg",
                                                          why=r"unreadable \(OSError\)"),
         "--image is a truncated JPEG", "--text", text, "--image", "{files}/trunc.jpg")
    pred("predict_image_directory", "recovered", pw.format(files="{files}", f="adir\\.jpg", why="not a file"),
         "--image is a directory", "--text", text, "--image", "{files}/adir.jpg")
    pred("predict_image_bomb", "recovered", pw.format(files="{files}", f="bomb\\.png", why="a decompression bomb"),
         "--image claims 20000x20000 pixels", "--text", text, "--image", "{files}/bomb.png")
    pred("predict_image_gif", "accepted", r"\[image .*anim\.gif: used\]", "--image is an animated GIF",
         "--text", text, "--image", "{files}/anim.gif")
    pred("predict_image_other_format", "accepted", r"\[image .*pic\.tiff: used\]",
         "--image is a TIFF (any format the decoder reads)", "--text", text, "--image", "{files}/pic.tiff")
    pred("predict_input_bad_json", "error", r"error: .*files/bad\.jsonl:2: invalid JSON \(.*\); write one JSON "
                                            r"document per line", "--input with a broken JSON line",
         "--input", "{files}/bad.jsonl")
    pred("predict_input_bad_json_lenient", "recovered", r"warning: 1 input line\(s\) skipped under --lenient_data",
         "the same with --lenient_data: skipped, counted", "--input", "{files}/bad.jsonl", "--lenient_data",
         "--out_dir", "{save}/pred_out")
    pred("predict_input_empty", "error", r"error: .*files/empty\.jsonl:1: no posts found", "--input is empty",
         "--input", "{files}/empty.jsonl")
    pred("predict_input_invalid_utf8", "error", r"error: .*files/latin1\.jsonl:1: invalid UTF-8 byte 0xe9",
         "--input in Latin-1", "--input", "{files}/latin1.jsonl")
    pred("predict_input_missing", "error", r"error: --input .*files/nope\.jsonl: file not found",
         "--input names no file", "--input", "{files}/nope.jsonl")

    # run directories
    def run(name, entry, setup, outcome, expect, what, *args, **kw):
        c.append(Case(name, "run", entry, args, outcome, expect, what, setup, **kw))
    run("run_unknown_save_name", "test", "", "error",
        r"error: --save_name ghost: .*ghost/config\.json is missing; runs with a model\.pt in .*: \w+, .*\(newest "
        r"first\)",
        "test.py --save_name naming no run", "--save_name", "ghost")
    run("run_unknown_save_name_predict", "predict", "", "error",
        r"error: --save_name ghost: .*ghost/config\.json is missing", "predict.py --save_name naming no run",
        "--save_name", "ghost", "--text", "hi")
    run("run_missing_label_map", "test", "drop:label_map.json", "error",
        r"error: --save_name run_missing_label_map: .*run_missing_label_map/label_map\.json is missing",
        "a run directory without label_map.json", "--save_name", "run_missing_label_map")
    run("run_missing_label_map_resume", "train", "drop:label_map.json", "error",
        r"error: --continue_train_name run_missing_label_map_resume: .*/label_map\.json is missing; it is written "
        r"with every run", "resuming a run without label_map.json", "--continue_train_name",
        "run_missing_label_map_resume")
    run("run_unknown_resume", "train", "", "error",
        r"error: --continue_train_name ghost: .*ghost/last\.pt not found; runs in .*: \w+.* \(newest first\)",
        "--continue_train_name naming no run", "--continue_train_name", "ghost")
    run("run_foreign_checkpoint", "test", "foreign:model.pt", "error",
        r"error: .*run_foreign_checkpoint/model\.pt: does not match the model in .*config\.json .*the files come "
        r"from different runs", "model.pt copied from a roberta_crf run", "--save_name", "run_foreign_checkpoint")
    run("run_foreign_checkpoint_resume", "train", "foreign:last.pt", "error",
        r"error: .*run_foreign_checkpoint_resume/last\.pt: does not match the model in .*config\.json .*the files "
        r"come from different runs", "last.pt copied from a roberta_crf run", "--continue_train_name",
        "run_foreign_checkpoint_resume")
    run("run_best_as_last", "train", "best_as_last", "error",
        r"error: .*run_best_as_last/last\.pt: not a resumable checkpoint \(no optimizer, scheduler, .*\); .*model\.pt",
        "model.pt copied over last.pt (weights only, no optimiser state)", "--continue_train_name",
        "run_best_as_last")
    run("run_changed_architecture", "train", "copy", "error",
        r"error: --fusion_layers differs from the run being resumed \(1\); the model structure comes from that run",
        "--continue_train_name with --fusion_layers changed", "--continue_train_name", "run_changed_architecture",
        "--fusion_layers", "3")
    run("run_truncated_checkpoint", "test", "truncate:model.pt", "error",
        r"error: .*run_truncated_checkpoint/model\.pt: not a readable MANGO checkpoint \(.*\); retrain or pick "
        r"another run", "model.pt cut in half", "--save_name", "run_truncated_checkpoint")
    run("run_pickle_with_code", "test", "pickle:model.pt", "error",
        r"error: .*run_pickle_with_code/model\.pt: not a readable MANGO checkpoint \(UnpicklingError\)",
        "model.pt is a pickle that would run a shell command (refused by weights_only, not run)",
        "--save_name", "run_pickle_with_code")
    run("run_corrupt_config", "test", "garble:config.json", "error",
        r"error: .*run_corrupt_config/config\.json: not valid JSON \(line \d+, column \d+\); the run directory is "
        r"damaged", "config.json cut short", "--save_name", "run_corrupt_config")
    run("run_corrupt_label_map", "test", "badlabels:label_map.json", "error",
        r"error: .*run_corrupt_label_map/label_map\.json: not a MANGO label map \(.*\); the run directory is damaged",
        "label_map.json without its <PAD>, O head", "--save_name", "run_corrupt_label_map")
    run("run_encoder_moved", "test", "encoder_gone", "error",
        r"error: .*run_encoder_moved/config\.json: text_encoder .*moved_away: no such directory; put the encoder "
        r"back there or edit text_encoder in config\.json", "the run's text-encoder directory is gone",
        "--save_name", "run_encoder_moved")
    run("run_existing_save_name", "train", "copy", "error",
        r"error: --save_name run_existing_save_name: .* already holds a run; resume it with --continue_train_name",
        "a new run named like an existing one (never overwritten)", "--dataset_name", "clean", "--save_name",
        "run_existing_save_name")
    run("run_save_dir_is_file", "train", "save_dir_file", "error",
        r"error: cannot write the run directory .*not_a_dir/x: .*; pass a writable --save_dir",
        "--save_dir is a file (an unwritable save_models/)", "--dataset_name", "clean", "--save_name", "x",
        "--save_dir", "{save}/not_a_dir")
    run("run_save_dir_read_only", "train", "save_dir_read_only", "error",
        r"error: cannot write the run directory .*read_only/x: Permission denied; pass a writable --save_dir",
        "a read-only save_models/ (chmod 555; skipped as root, which ignores it)", "--dataset_name", "clean",
        "--save_name", "x", "--save_dir", "{save}/read_only", not_as_root=True)
    run("run_nan_loss", "train", "", "error",
        r"error: 10 non-finite (losses|gradients) in a row at epoch \d+ \(\d+ skipped in all\); lower the learning "
        r"rates", "--fusion_lr 1e30: every step after the first is non-finite; stopped after --max_bad_steps 10",
        "--dataset_name", "clean", "--save_name", "nan", "--fusion_lr", "1e30", "--text_lr", "1e30",
        "--batch_size", "1", "--epochs", "4")
    run("run_stale_checkpoint_tmp", "train", "stale_tmp", "recovered",
        r"resumed run_stale_checkpoint_tmp after epoch 1",
        "a half-written last.pt.tmp left by a kill during a save: ignored, resumed from last.pt",
        "--continue_train_name", "run_stale_checkpoint_tmp", "--epochs", "2")
    run("run_corrupt_feature_cache", "train", "corrupt_cache", "recovered",
        r"warning: .*\.pt: unreadable feature cache entry \(.*\); recomputing it",
        "a damaged file in the frozen-feature cache: recomputed", "--dataset_name", "clean", "--save_name",
        "cache_again", "--cache_dir", "{save}/cache_corrupt")
    run("run_cache_dir_unwritable", "train", "cache_dir_file", "recovered",
        r"warning: could not write the feature cache .*cache_is_file/sub/.*\(Not a directory\); features are "
        r"recomputed next time", "--cache_dir below a file: the run goes on without caching", "--dataset_name",
        "clean", "--save_name", "uncached", "--cache_dir", "{save}/cache_is_file/sub")
    return c


CASES = _cases()
CATEGORIES = {"conll": "CoNLL files", "image": "images", "predict": "predict.py inputs", "run": "runs"}
# the data sets a run case trains on (besides the case datasets)
EXTRA_DATASETS = ("clean", "conll_unseen_type_in_test", "conll_missing_valid")


# ----------------------------------------------------------------------------- writing the corpus

def _dataset(root: Path, name: str, train: bytes, images: dict | None = None, test: bytes | None = None,
             valid: bool = True):
    d = root / name
    img = d / f"{name}_images"
    img.mkdir(parents=True, exist_ok=True)
    (d / "train.txt").write_bytes(train)
    if valid:
        (d / "valid.txt").write_bytes(_text(conll_lines(VALID)).encode())
    (d / "test.txt").write_bytes(test if test is not None else _text(conll_lines(TEST)).encode())
    for k, (imgid, _) in enumerate(TRAIN + VALID + TEST):
        (img / f"{imgid}.png").write_bytes(_encode(picture(k), "PNG"))
    for fname, content in (images or {}).items():
        for p in img.glob("p1.*"):
            p.unlink()
        if fname is not None:
            write_image(img / fname, content)


def make_corpus(out) -> Path:
    """Write every case's files under out (see the module docstring); returns out/data."""
    out = Path(out)
    data, files = out / "data", out / "files"
    if out.exists():
        shutil.rmtree(out)
    data.mkdir(parents=True)
    files.mkdir()
    for name, (train, _) in conll_variants().items():
        _dataset(data, name, train)
    clean = _text(conll_lines(TRAIN)).encode()
    _dataset(data, "clean", clean)
    _dataset(data, "conll_unseen_type_in_test", clean,
             test=_text(["IMGID:t1", "Expo\tB-EVENT", "2024\tI-EVENT", "opens\tO", ""]).encode())
    _dataset(data, "conll_missing_valid", clean, valid=False)
    for name, (fname, content) in IMAGES.items():
        lines = conll_lines(TRAIN)
        if fname is not None and Path(fname).suffix not in (".jpg", ".png"):
            lines[0] = f"IMGID:{fname}"  # an IMGID may carry its extension
        _dataset(data, name, _text(lines).encode(), images={fname: content})
    # predict.py inputs
    write_image(files / "trunc.jpg", _truncated_jpeg)
    write_image(files / "adir.jpg", "dir")
    (files / "bomb.png").write_bytes(png_claiming(20000, 20000))
    (files / "anim.gif").write_bytes(_animated_gif())
    (files / "pic.tiff").write_bytes(_encode(picture(4), "TIFF"))
    (files / "bad.jsonl").write_text('{"text": "Kevin Durant enters Oracle Arena"}\n{"text": "Anna in Paris"\n'
                                     '{"tokens": ["Star", "Wars"]}\n')
    (files / "empty.jsonl").write_bytes(b"")
    (files / "latin1.jsonl").write_bytes('{"text": "Caf\xe9 in Paris"}\n'.encode("latin-1"))
    return data


class _RunsCode:
    """Unpickling this would run a shell command that writes PWNED next to the checkpoint."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def prepare_run(case: Case, save: Path, good: Path, other: Path):
    """Make case.setup's broken run directory <save>/<case.name> from the trained runs `good` (MNER) and `other`
    (roberta_crf, a different architecture)."""
    import pickle
    import torch
    what, _, arg = case.setup.partition(":")
    run = save / case.name
    if what in ("copy", "drop", "foreign", "best_as_last", "truncate", "pickle", "garble", "badlabels",
                "encoder_gone", "stale_tmp"):
        shutil.copytree(good, run)
    if what == "copy":
        pass
    elif what == "drop":
        (run / arg).unlink()
    elif what == "foreign":
        shutil.copy(other / arg, run / arg)
    elif what == "best_as_last":
        shutil.copy(good / "model.pt", run / "last.pt")
    elif what == "truncate":
        b = (good / arg).read_bytes()
        (run / arg).write_bytes(b[: len(b) // 2])
    elif what == "pickle":
        with open(run / arg, "wb") as f:
            pickle.dump({"model": _RunsCode(run / "PWNED")}, f, protocol=2)
    elif what == "garble":
        t = (good / arg).read_text()
        (run / arg).write_text(t[: len(t) // 3])
    elif what == "badlabels":
        (run / arg).write_text(json.dumps({"labels": ["O", "B-PER"]}))
    elif what == "encoder_gone":
        cfg = json.loads((run / "config.json").read_text())
        cfg["text_encoder"] = str(save / "moved_away")
        (run / "config.json").write_text(json.dumps(cfg))
    elif what == "stale_tmp":
        b = (good / "last.pt").read_bytes()
        (run / "last.pt.tmp").write_bytes(b[: len(b) // 3])  # what a kill in the middle of torch.save leaves
        (run / "model.pt.tmp").write_bytes(b"")
        assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0
    elif what == "save_dir_file":
        (save / "not_a_dir").write_text("a file where the save folder should be\n")
    elif what == "save_dir_read_only":
        (save / "read_only").mkdir()
        (save / "read_only").chmod(0o555)
    elif what == "cache_dir_file":
        (save / "cache_is_file").write_text("a file where the cache folder should be\n")
    elif what == "corrupt_cache":
        shutil.copytree(save / "cache", save / "cache_corrupt")
        for f in (save / "cache_corrupt").rglob("*.pt"):
            f.write_bytes(f.read_bytes()[:100])
    elif what:
        raise ValueError(f"unknown setup {case.setup!r}")
    return run


def table() -> str:
    """CASES as Markdown, grouped by category, with the outcome counts."""
    out = ["| category | case | input | entry point | outcome | expected (regex) |", "|---|---|---|---|---|---|"]
    for cat, title in CATEGORIES.items():
        for k in (k for k in CASES if k.category == cat):
            exp = k.expect.replace("|", "\\|")
            exp = f"`` {exp} ``" if "`" in exp else f"`{exp}`"
            out.append(f"| {title} | `{k.name}` | {k.what} | {k.entry}.py | {k.outcome} | {exp} |")
    counts = {}
    for k in CASES:
        counts.setdefault(CATEGORIES[k.category], {}).setdefault(k.outcome, 0)
        counts[CATEGORIES[k.category]][k.outcome] += 1
    summary = ["| category | error | recovered | accepted | total |", "|---|---|---|---|---|"]
    for cat, n in counts.items():
        summary.append(f"| {cat} | {n.get('error', 0)} | {n.get('recovered', 0)} | {n.get('accepted', 0)} | "
                       f"{sum(n.values())} |")
    summary.append(f"| all | {sum(k.outcome == 'error' for k in CASES)} | "
                   f"{sum(k.outcome == 'recovered' for k in CASES)} | {sum(k.outcome == 'accepted' for k in CASES)} "
                   f"| {len(CASES)} |")
    return "\n".join(summary) + "\n\n" + "\n".join(out) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="folder to write the corpus to (replaced)")
    ap.add_argument("--table", action="store_true", help="print the case table as Markdown")
    a = ap.parse_args()
    if a.table:
        sys.stdout.write(table())
    elif a.out:
        print(f"wrote {len(CASES)} cases' files under {make_corpus(a.out).parent}")
    else:
        ap.print_help()
