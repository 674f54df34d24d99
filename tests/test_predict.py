"""predict.py and plots.py on a tiny trained run: tagging new posts (text only, with an image, a missing image),
the JSONL round trip, character spans, CRF marginals, per-post and per-run pictures, refusals."""
from __future__ import annotations

import itertools
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import bundle as BU
import explain
import model as M
import predict
import test as test_py
import train
from config import cli, get_config
from crf import CRFHead

TEXT = "RT @kd35: Kevin Durant enters Oracle Arena tonight! http://t.co/x #NBA"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data_dir, tiny_bert_dir, tiny_clip_dir):
    """A 2-epoch tiny MNER run (tiny BERT + tiny CLIP, 4x4 region grid); returns predict.py's common flags."""
    d = tmp_path_factory.mktemp("predict_runs")
    train.main(["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny", "--text_encoder", tiny_bert_dir,
                "--image_encoder", tiny_clip_dir, "--save_dir", str(d / "save"), "--cache_dir", str(d / "cache"),
                "--swanlab_mode", "disabled", "--batch_size", "4", "--fusion_layers", "2", "--fusion_dim", "32",
                "--cross_attn_heads", "2", "--resampler_tokens", "4", "--fusion_lr", "3e-3", "--seed", "7",
                "--epochs", "2", "--save_name", "p"])
    return ["--save_dir", str(d / "save"), "--save_name", "p", "--cache_dir", str(d / "cache"), "--device", "cpu"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "p.png"
    im = Image.new("RGB", (96, 72), (30, 90, 160))
    ImageDraw.Draw(im).ellipse((10, 8, 50, 48), fill=(250, 200, 20))
    im.save(p)
    return p


def run_dir(run):
    return Path(run[1]) / run[3]


def assert_png(path, min_size=(200, 100)):
    """A real PNG of sensible size that is not one flat colour."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert min_size[0] <= w <= 4000 and min_size[1] <= h <= 4000, (path, im.size)
        assert np.asarray(im.convert("L"), dtype=np.float32).std() > 5, f"{path} is blank"


def check_spans(rec: dict):
    """Every word and entity maps back to its characters in the original text."""
    text, words = rec["text"], rec["tokens"]
    for e in rec["entities"]:
        assert text[e["char_start"]:e["char_end"]] == e["text"]
        assert e["words"] == words[e["word_start"]:e["word_end"]]
        assert text[e["char_start"]:].startswith(e["words"][0]) and text[:e["char_end"]].endswith(e["words"][-1])
        assert 0.0 <= e["score"] <= 1.0


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli(lambda: predict.main(argv))
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ----------------------------------------------------------------------------- units

def test_split_words_keeps_scripts_marks_numbers_and_emoji_whole():
    text = "नमस्ते दिल्ली สวัสดี cafe\u0301 H₂O 10 km² ½ I ❤️ NY 🇺🇸 👍🏽 a\x1cb !!"
    assert predict.split_words(text)[0] == ["नमस्ते", "दिल्ली", "สวัสดี", "cafe\u0301", "H₂O", "10", "km²", "½", "I",
                                            "❤️", "NY", "🇺🇸", "👍🏽", "a", "b", "!", "!"]


def test_split_words_keeps_offsets():
    words, spans = predict.split_words(TEXT + " don't Jean-Luc's U.S. 🙂")
    assert words[:4] == ["RT", "@kd35", ":", "Kevin"]
    assert {"http://t.co/x", "#NBA", "don't", "Jean-Luc's", "!", "🙂"} <= set(words)
    assert words[-5:] == ["U", ".", "S", ".", "🙂"]
    for w, (s, e) in zip(words, spans):
        assert (TEXT + " don't Jean-Luc's U.S. 🙂")[s:e] == w


def test_post_from_record_variants():
    p = predict.post_from_record({"tokens": ["New", "York", "!"]}, "x")
    assert p.text == "New York !" and p.spans == [(0, 3), (4, 8), (9, 10)]
    p = predict.post_from_record({"text": "New  York!", "tokens": ["New", "York", "!"], "image": None}, "x")
    assert p.spans == [(0, 3), (5, 9), (9, 10)] and p.image is None
    for rec, msg in [({"text": 3}, '"text" must be a string'), ({"tokens": []}, '"tokens" must be a non-empty'),
                     ({"image": "a.jpg"}, 'needs "text"'), ({"text": "  "}, "has no words"),
                     ({"text": "a b", "tokens": ["a", "c"]}, "token 'c' is not in"), ([1], "expected a JSON object"),
                     ({"tokens": ["a\tb", "c"]}, "must not hold tabs or line breaks")]:
        with pytest.raises(ValueError, match=msg):
            predict.post_from_record(rec, "x")


@pytest.mark.parametrize("seed,bio", [(0, False), (1, False), (0, True)])
def test_crf_marginals_match_brute_force(seed, bio):
    """CRFHead.marginals == sum over all tag paths of p(path) with the label at that word (PAD never emitted); with
    the BIO bans, over the valid paths only (an I- label never first, never after O)."""
    g = torch.Generator().manual_seed(seed)
    L, W = 4, 3  # PAD, O, B-X, I-X
    head = CRFHead(L, bio=bio)
    with torch.no_grad():
        for prm in head.crf.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
    em = torch.randn(2, W, L, generator=g)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = (head.log_marginals(em, mask).exp() * mask[..., None]).detach()
    crf, x = head.crf, CRFHead._pin(em)
    for b in range(2):
        n = int(mask[b].sum())
        want = torch.zeros(W, L)
        paths = [p for p in itertools.product(range(L), repeat=n)
                 if not bio or all(t != 3 or (i and p[i - 1] in (2, 3)) for i, t in enumerate(p))]
        scores = torch.stack([crf.start_transitions[p[0]] + crf.end_transitions[p[-1]]
                              + sum(x[b, t, p[t]] for t in range(n))
                              + sum(crf.transitions[p[t - 1], p[t]] for t in range(1, n)) for p in paths])
        prob = scores.softmax(0)
        for pr, p in zip(prob, paths):
            for t in range(n):
                want[t, p[t]] += pr
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-4)
    assert (got[..., 0] < 1e-6).all()  # PAD
    if bio:
        assert (got[:, 0, 3] < 1e-6).all()


def test_softmax_probabilities():
    em = torch.randn(1, 3, 5)
    p = torch.from_numpy(BU.softmax_probs(em.numpy(), np.array([[True, True, False]])))
    torch.testing.assert_close(p[0, :2].sum(-1), torch.ones(2))
    assert (p[0, 2] == 0).all() and (p[..., 0] == 0).all()


def test_region_grids_and_heat():
    c = get_config(["--use_dual_granularity", "--vision_img_size", "32", "--vision_patch_size", "8",
                    "--vision_fine_patch_size", "4", "--vision_embed_dim", "32", "--vision_heads", "2",
                    "--vision_depth", "1", "--vision_swin_window", "2", "--vision_max_patches", "16"])
    dual = M.DualGranularityEncoder(c)
    grids = explain.region_grids(dual)
    assert grids[0] == (0, 1, 0) and grids[-1][1] == dual.n_tokens
    assert explain.region_grids(types.SimpleNamespace(n_tokens=49)) == [(0, 49, 7)]  # EfficientNet's 7x7 map
    w = np.full(dual.n_tokens, 1.0 / dual.n_tokens)
    heat = explain.region_heat(w, grids, 64)
    assert heat.sum() == pytest.approx(1.0, rel=1e-3) and heat.std() < 0.05 * heat.mean()  # uniform in, uniform out
    one = np.zeros(49)
    one[0] = 1.0  # top-left region -> heat in the top-left corner
    h = explain.region_heat(one, [(0, 49, 7)], 70)
    assert np.unravel_index(h.argmax(), h.shape)[0] < 10 and np.unravel_index(h.argmax(), h.shape)[1] < 10
    fine = np.zeros(dual.n_tokens)
    fine[1 + dual.Gc ** 2:] = 1.0 / dual.k  # all the weight on the kept fine tokens, each at the last fine cell
    h = explain.region_heat(fine, grids, 64, cells=[dual.Gf ** 2 - 1] * dual.k)
    assert h.sum() == pytest.approx(1.0, rel=1e-3) and min(np.unravel_index(h.argmax(), h.shape)) > 56


# ----------------------------------------------------------------------------- predict.py

def test_text_only_and_with_image(run, image, capsys):
    plain = predict.main([*run, "--text", TEXT])[0]
    out = capsys.readouterr().out
    assert "[no image]" in out and "posts/s" in out.splitlines()[-1]
    assert not plain["image_used"] and len(plain["tags"]) == 12
    rec = {"text": TEXT, "tokens": predict.split_words(TEXT)[0], **plain}
    check_spans(rec)
    assert plain["entities"], "the tiny run predicts entities (spans are checked on real ones)"
    for e in plain["entities"]:
        assert f"{e['type']:6s}{e['text']}" in out and f"{e['char_start']}:{e['char_end']}" in out
    seen = predict.main([*run, "--text", TEXT, "--image", str(image)])[0]
    assert seen["image_used"]
    assert f"[image {image}: used]" in capsys.readouterr().out


def test_missing_image_warns_and_runs_text_only(run, tmp_path, capsys):
    plain = predict.main([*run, "--text", TEXT])[0]
    capsys.readouterr()
    got = predict.main([*run, "--text", TEXT, "--image", str(tmp_path / "gone.jpg")])[0]
    out = capsys.readouterr().out
    warnings = [l for l in out.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "gone.jpg is missing" in warnings[0] and "text-only" in warnings[0]
    assert got["tags"] == plain["tags"] and got["entities"] == plain["entities"] and not got["image_used"]


def test_jsonl_round_trip_and_conll(run, image, tmp_path, capsys):
    posts = [{"id": "a", "text": TEXT, "image": str(image)},
             {"id": "b", "tokens": ["Durant", "joins", "the", "Warriors", "!"]},
             {"id": "c", "text": "Oracle Arena, Oakland", "image": str(tmp_path / "nope.png")},
             {"id": "d", "text": "Kevin  Durant!", "tokens": ["Kevin", "Durant", "!"], "image": None}]
    src = tmp_path / "posts.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in posts))
    predict.main([*run, "--input", str(src), "--out_dir", str(tmp_path / "o1"), "--batch_size", "3"])
    out = capsys.readouterr().out
    assert "nope.png is missing" in out and "wrote " in out and "posts/s" in out
    rows = [json.loads(l) for l in (tmp_path / "o1" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]  # input order and keys kept
    assert [r["image_used"] for r in rows] == [True, False, False, False]
    assert rows[1]["text"] == "Durant joins the Warriors !" and rows[3]["tokens"] == ["Kevin", "Durant", "!"]
    for r in rows:
        check_spans(r)
        assert len(r["tags"]) == len(r["tokens"])
    assert sum(len(r["entities"]) for r in rows) > 0
    # the output is valid input and gives the same predictions back
    predict.main([*run, "--input", str(tmp_path / "o1" / "predictions.jsonl"), "--out_dir", str(tmp_path / "o2"),
                  "--batch_size", "3"])
    again = [json.loads(l) for l in (tmp_path / "o2" / "predictions.jsonl").read_text().splitlines()]
    assert again == rows
    predict.main([*run, "--input", str(src), "--out_dir", str(tmp_path / "o3"), "--format", "conll"])
    blocks = (tmp_path / "o3" / "predictions.conll").read_text().strip("\n").split("\n\n")
    assert len(blocks) == 4 and blocks[0].splitlines()[0] == f"IMGID:{image}"
    assert [l.split("\t") for l in blocks[1].splitlines()[1:]] == [list(x) for x in zip(rows[1]["tokens"],
                                                                                        rows[1]["tags"])]


def test_same_tags_as_test_py(run, tiny_data_dir, tmp_path, capsys):
    """The test split as new posts (its words, its images; half are missing) gets exactly the tags test.py wrote:
    predict.py goes through the training preprocessing, tokenisation and feature cache, not a copy of them."""
    import dataloader as D
    posts = D.read_conll(tiny_data_dir / "tiny" / "test.txt")
    src = tmp_path / "test_posts.jsonl"
    img = tiny_data_dir / "tiny" / "tiny_images"
    src.write_text("".join(json.dumps({"tokens": p.tokens,
                                       "image": str(img / f"{p.imgid}.png")}) + "\n" for p in posts))
    res = predict.main([*run, "--input", str(src), "--out_dir", str(tmp_path)])
    assert capsys.readouterr().out.count("is missing; this post is tagged text-only") == 4
    blocks = (run_dir(run) / "test_predictions.conll").read_text().strip("\n").split("\n\n")
    assert [r["tags"] for r in res] == [[l.split("\t")[2] for l in b.splitlines()[1:]] for b in blocks]
    assert [r["image_used"] for r in res] == [i % 2 == 0 for i in range(len(posts))]


def test_long_post_every_word_tagged_window_by_window(run, tmp_path, capsys):
    """A post longer than --max_len gets a tag for every word; the words each window owns carry the tags that
    window gets when it is tagged as a post of its own (the model reads the windows, nothing is padded with O)."""
    import dataloader as D
    from config import config_from_dict
    words = (predict.split_words(TEXT)[0] + "and then we all went home".split()) * 12
    cfg = config_from_dict(json.loads((run_dir(run) / "config.json").read_text()))
    wins = D.encode_windows(M.load_tokenizer(cfg), words, cfg.max_len)
    assert len(wins) >= 2
    recs = [{"tokens": words}] + [{"tokens": words[w.start:w.start + w.enc.n_kept]} for w in wins]
    src = tmp_path / "long.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = predict.main([*run, "--input", str(src), "--out_dir", str(tmp_path / "o")])
    assert len(res[0]["tags"]) == len(words)
    for w, alone in zip(wins, res[1:]):
        a, b = w.own_a - w.start, w.own_b - w.start
        assert res[0]["tags"][w.own_a:w.own_b] == alone["tags"][a:b]
    check_spans({"text": " ".join(words), "tokens": words, **res[0]})


def test_image_coordinates_map_into_the_models_view():
    """ImagePrep resizes the short side to prep.short and centre-crops S: the image's centre is the view's, the
    short side spans prep.short view pixels, and the whole image covers the view (its corners fall outside it)."""
    import dataloader as D
    prep = D.ImagePrep(64)
    for size in ((96, 72), (72, 96), (64, 64), (300, 120)):
        w, h = size
        (ax, ay), (bx, by) = explain.image_to_view(0, 0, size, prep), explain.image_to_view(w, h, size, prep)
        cx, cy = explain.image_to_view(w / 2, h / 2, size, prep)
        assert abs(cx - 32) <= 1 and abs(cy - 32) <= 1, (size, cx, cy)
        assert ax <= 0 and ay <= 0 and bx >= 64 and by >= 64, (size, ax, ay, bx, by)
        assert abs(min(bx - ax, by - ay) - prep.short) <= 1, (size, bx - ax, by - ay)


def test_kept_attention_map_counts_what_each_key_moves():
    """A key whose value is zero moves nothing: its attention weight goes to the keys that do, rows sum to 1, and
    with equal value norms the weights are the heads' plain mean."""
    torch.manual_seed(0)
    att = M.Attention(8, 2)
    att.keep_weights = True
    q, kv = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    att(q, kv)
    plain = att.last_weights.mean(1)
    att.last_values = torch.ones_like(att.last_values)  # same value for every key: same norm
    assert torch.allclose(explain.kept_map(att), plain, atol=1e-6)
    att.last_values[:, :, 1] = 0                         # key 1 adds nothing to the output
    w = explain.kept_map(att)
    assert torch.allclose(w.sum(-1), torch.ones(1, 3)) and torch.all(w[..., 1] == 0)
    assert torch.all(w[..., 0] > plain[..., 0])


def test_explain_hits_reads_boxes_and_counts_posts_without_one(run, tiny_data_dir, tmp_path, capsys):
    """test.py --explain_hits: every post with an image and a box is scored (a box over the whole of a square
    picture, which fills the view, is always hit), a post with an image but no box is skipped and counted, and a box
    outside its image is one error line naming the file and line."""
    import shutil

    import dataloader as D
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir / "tiny", data / "tiny")
    posts = D.read_conll(data / "tiny" / "test.txt")
    lines, boxed = [], 0
    for i, p in enumerate(posts):
        img = data / "tiny" / "tiny_images" / f"{p.imgid}.png"
        types = [t[2:] for t in p.tags if t.startswith("B-")]
        if not img.is_file() or not types or i == 0:
            continue
        Image.open(img).resize((40, 40)).save(img)  # square: padded to the view, it still covers all of it
        w, h = 40, 40
        lines.append(json.dumps({"imgid": p.imgid, "type": types[0], "box": [0, 0, w, h], "size": [w, h]}))
        boxed += 1
    with_image = sum((data / "tiny" / "tiny_images" / f"{p.imgid}.png").is_file() for p in posts)
    (data / "tiny" / "test_boxes.jsonl").write_text("\n".join(lines) + "\n")
    test_py.main([*run, "--data_dir", str(data), "--explain_hits"])
    h = json.loads((run_dir(run) / "test_report.json").read_text())["explain_hits"]
    assert h["posts"] == h["hits"] == boxed > 0 and h["no_box"] + h["no_entity"] == with_image - boxed
    assert "attention peak inside the cued object's box" in capsys.readouterr().out
    (data / "tiny" / "test_boxes.jsonl").write_text(lines[0] + "\n" + lines[0].replace('"box": [0, 0,',
                                                                                       '"box": [0, -5,'))
    with pytest.raises(SystemExit):
        cli(lambda: test_py.main([*run, "--data_dir", str(data), "--explain_hits"]))
    assert "test_boxes.jsonl:2: expected" in capsys.readouterr().err


def test_bad_input_one_line(run, tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    assert f"{f}:2: needs \"text\"" in one_line_error([*run, "--input", str(f)], capsys)
    assert "give either --text" in one_line_error(run, capsys)
    assert "--image goes with --text" in one_line_error([*run, "--input", str(f), "--image", "x.jpg"], capsys)
    assert "ghost/config.json is missing" in one_line_error([*run[:3], "ghost", "--text", "hi"], capsys)
    # under --lenient_data the bad line is skipped and counted
    res = predict.main([*run, "--input", str(f), "--lenient_data", "--out_dir", str(tmp_path / "o")])
    assert len(res) == 1 and "1 input line(s) skipped" in capsys.readouterr().out


# ----------------------------------------------------------------------------- pictures

def test_explain_pictures(run, image, tmp_path, capsys):
    src = tmp_path / "posts.jsonl"
    src.write_text(json.dumps({"text": TEXT,
                               "image": str(image)}) + "\n" + json.dumps({"text": "no picture here"}) + "\n")
    out_dir = tmp_path / "ex"
    res = predict.main([*run, "--input", str(src), "--out_dir", str(out_dir), "--explain"])
    out = capsys.readouterr().out
    att = res[0]["explain"]["att"]
    assert att.shape == (12, 16) and np.allclose(att.sum(-1), 1.0, atol=1e-4)  # 12 words x 4x4 CLIP patches
    assert all(0 <= v <= 1 for v in res[0]["explain"]["rel"] + res[0]["explain"]["gate"])
    assert_png(out_dir / "explain" / "post1_attention.png", (300, 300))
    assert_png(out_dir / "explain" / "post1_relevance.png", (400, 100))
    assert not list((out_dir / "explain").glob("post2_*"))  # the post without an image gets no picture ...
    assert "no attention overlay or rel/gate strip for post 2" in out  # ... but a line saying so
    assert len(json.loads((out_dir / "predictions.jsonl").read_text().splitlines()[1])["tags"]) == 3  # and predictions
    predict.main([*run, "--text", TEXT, "--image", str(image), "--out_dir", str(tmp_path / "w"), "--explain",
                  "--explain_word", "durant"])
    assert_png(tmp_path / "w" / "explain" / "post1_attention.png", (300, 300))
    post = predict.post_from_record({"text": TEXT}, "x")
    ex = {"att": att, "rel": [0.0] * 12}
    assert predict.explain_targets(post, ["O"] * 12, ex, "durant", "conlleval") == [("'Durant' (word 4)", [4])]
    assert predict.explain_targets(post, ["O"] * 12, ex, "nowhere", "conlleval") == []


def test_coattn_model_softmax_head(run, image, tmp_path, tiny_data_dir, tiny_bert_dir, tiny_clip_dir, capsys):
    """roberta_clip_coattn: its own text->image attention, no rel/gate strip; MNER --head softmax: scores."""
    flags = ["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny", "--text_encoder", tiny_bert_dir,
             "--image_encoder", tiny_clip_dir, "--save_dir", run[1], "--cache_dir", run[5], "--swanlab_mode",
             "disabled", "--batch_size", "4", "--cross_attn_heads", "2", "--fusion_layers", "1", "--fusion_dim", "16",
             "--epochs", "1"]
    train.main([*flags, "--model", "roberta_clip_coattn", "--save_name", "co"])
    train.main([*flags, "--head", "softmax", "--save_name", "sm"])
    res = predict.main([*run[:3], "co", *run[4:], "--text", TEXT, "--image", str(image), "--explain",
                        "--out_dir", str(tmp_path)])
    assert np.allclose(res[0]["explain"]["att"].sum(-1), 1.0, atol=1e-4) and res[0]["explain"]["gate"] is None
    assert_png(tmp_path / "explain" / "post1_attention.png", (300, 300))
    assert not (tmp_path / "explain" / "post1_relevance.png").exists()
    res = predict.main([*run[:3], "sm", *run[4:], "--text", TEXT])
    assert all(0 < e["score"] <= 1 for e in res[0]["entities"])


def test_explain_refused_when_image_path_off(run, image, capsys, tiny_bert_dir):
    msg = one_line_error([*run, "--text", TEXT, "--image", str(image), "--explain", "--no-use_image"], capsys)
    assert "--no-use_image turns its image path off" in msg and "no text->image attention to draw" in msg
    # predictions still work with the image path off: the image is not used
    res = predict.main([*run, "--text", TEXT, "--image", str(image), "--no-use_image"])
    assert not res[0]["image_used"] and "the images are not used" in capsys.readouterr().out
    # a model built without an image path
    c = get_config(["--text_encoder", tiny_bert_dir, "--model", "roberta_crf"])
    assert "model roberta_crf of this run has no image path" in explain.image_path_off(M.build_model(c, 10), c)


def test_run_plots_from_test_py(run, tmp_path, capsys):
    steps = [json.loads(l) for l in (run_dir(run) / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 13)) and {"loss", "tag", "residual"} <= set(steps[0])
    test_py.main([*run, "--plots", "--out_dir", str(tmp_path)])
    names = {"dev_f1.png", "losses.png", "test_per_type.png", "test_confusion.png"}
    assert {p.name for p in (tmp_path / "plots").iterdir()} == names
    for n in names:
        assert_png(tmp_path / "plots" / n, (300, 300))
    assert capsys.readouterr().out.count("wrote ") == 4


def test_read_steps_keeps_last_line_of_a_redone_step(tmp_path):
    import plots
    rows = [{"epoch": 1, "step": 2, "train_loss": 5.0, "train_tag": 4.0},
            {"epoch": 2, "step": 4, "train_loss": 3.0, "train_tag": 2.0}]
    assert plots.read_steps(tmp_path, rows) == [{"step": 2, "loss": 5.0, "tag": 4.0}, {"step": 4, "loss": 3.0,
                                                                                       "tag": 2.0}]
    lines = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}, {"step": 3, "loss": 7.0},  # killed after step 3,
             {"step": 3, "loss": 6.5}, {"step": 4, "loss": 6.0}]                            # resumed from step 2
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    assert [r["loss"] for r in plots.read_steps(tmp_path, rows)] == [9.0, 8.0, 6.5, 6.0]
    assert_png(plots.loss_curves(plots.read_steps(tmp_path, rows), [2, 4], tmp_path / "l.png"), (300, 200))


def test_predict_tags_new_posts_as_test_py_scored_them(tmp_path, tiny_data_dir, tiny_bert_dir, tiny_clip_dir):
    """The test split given to predict.py as new posts (words and image files) gets the tags test.py wrote."""
    import dataloader as D
    save = tmp_path / "save"
    train.main(["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny", "--text_encoder", tiny_bert_dir,
                "--image_encoder", tiny_clip_dir, "--save_dir", str(save), "--cache_dir", str(tmp_path / "cache"),
                "--swanlab_mode", "disabled", "--batch_size", "4", "--fusion_layers", "1", "--fusion_dim", "16",
                "--cross_attn_heads", "2", "--resampler_tokens", "2", "--fusion_lr", "3e-3", "--seed", "7",
                "--epochs", "1", "--save_name", "c"])
    posts = D.read_conll(tiny_data_dir / "tiny" / "test.txt")
    src = tmp_path / "posts.jsonl"
    img = tiny_data_dir / "tiny" / "tiny_images"
    src.write_text("".join(json.dumps({"tokens": p.tokens,
                                       "image": str(img / f"{p.imgid}.png")}) + "\n" for p in posts))
    res = predict.main(["--save_dir", str(save), "--save_name", "c", "--cache_dir", str(tmp_path / "cache"),
                        "--device", "cpu", "--input", str(src), "--out_dir", str(tmp_path)])
    blocks = (save / "c" / "test_predictions.conll").read_text().strip("\n").split("\n\n")
    assert [r["tags"] for r in res] == [[l.split("\t")[2] for l in b.splitlines()[1:]] for b in blocks]


def test_overlay_colours_are_not_stretched(tmp_path):
    """Near-uniform attention (within 5 % of uniform) is drawn blue-green, not stretched into a red 'focus'; a
    real peak (10x uniform) is red; the caption gives the range in multiples of uniform."""
    import plots
    S = 64
    view = np.full((S, S, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    flat = 1 + 0.05 * rng.uniform(-1, 1, (S, S))
    peak = np.ones((S, S))
    peak[20:28, 20:28] = 10.0
    reds = []
    for heat in (flat, peak):
        out = plots.attention_overlay(view, [("x", heat / heat.sum())], tmp_path / "o.png")
        panel = np.asarray(Image.open(out).convert("RGB"))[30:30 + S, 12:12 + S]
        reds.append(int(panel[..., 0].max()))
    assert reds[0] < 100 < reds[1], reds  # grey 128 under the colour: 70 = no red at all


def test_new_posts_see_their_own_picture_whatever_control_the_run_trained_under(run, image, tmp_path):
    """A run trained under --image_control blank (a control run), with a vision that trains (no feature cache):
    predict.py still shows each new post its own picture, as the cached path and --bundle do."""
    import shutil
    probs = {}
    for control in ("none", "blank"):
        d = tmp_path / control
        shutil.copytree(run_dir(run), d / "p")
        cfg = json.loads((d / "p" / "config.json").read_text())
        cfg.update(image_control=control, vision_trainable=True, unfreeze_last_vision_blocks=1)
        (d / "p" / "config.json").write_text(json.dumps(cfg))
        flags = [*run[:1], str(d), *run[2:]]
        probs[control] = predict.main([*flags, "--text", TEXT, "--image", str(image)])[0]["probs"]
    assert probs["blank"] == probs["none"]
