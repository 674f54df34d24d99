"""export.py and bundle.py on a tiny trained MNER run: the numpy CRF against the torch one, fp32 ONNX and
TorchScript bundles give the checkpoint's tags, int8 agreement, predict.py --bundle without the training code,
and one-line refusals."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import bundle as BU
import dataloader as D
import export
import predict
import runtime
import train
from config import ConfigError, cli
from conftest import CLIP_MEAN, CLIP_STD
from crf import CRFHead, crf_tags, pin_pad

ROOT = Path(__file__).resolve().parents[1]


_RUN: dict = {}


def make_tiny_run(tmp_path_factory, tiny_data_dir, tiny_bert_dir, tiny_clip_dir) -> dict:
    """A 2-epoch tiny MNER run (tiny BERT + tiny CLIP) and its fp32 ONNX bundle, made once per session
    (test_serve.py uses the same one)."""
    if _RUN:
        return _RUN
    d = tmp_path_factory.mktemp("export_runs")
    train.main(["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny", "--text_encoder", tiny_bert_dir,
                "--image_encoder", tiny_clip_dir, "--save_dir", str(d / "save"), "--cache_dir", str(d / "cache"),
                "--swanlab_mode", "disabled", "--batch_size", "4", "--fusion_layers", "2", "--fusion_dim", "32",
                "--cross_attn_heads", "2", "--resampler_tokens", "4", "--fusion_lr", "3e-3", "--seed", "7",
                "--epochs", "2", "--save_name", "e"])
    flags = ["--save_dir", str(d / "save"), "--save_name", "e", "--cache_dir", str(d / "cache"), "--device", "cpu"]
    out = export.main(flags)
    _RUN.update(flags=flags, save=d / "save", bundle=out, data=tiny_data_dir)
    return _RUN


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data_dir, tiny_bert_dir, tiny_clip_dir):
    return make_tiny_run(tmp_path_factory, tiny_data_dir, tiny_bert_dir, tiny_clip_dir)


def new_posts(tiny_run, tmp_path) -> tuple[Path, list[dict]]:
    """The tiny test split as new posts (words + image paths; half of the images are missing) in a JSONL file."""
    import dataloader as D
    data = tiny_run["data"] / "tiny"
    posts = D.read_conll(data / "test.txt")
    recs = [{"tokens": p.tokens, "image": str(data / "tiny_images" / f"{p.imgid}.png")} for p in posts]
    recs.append({"text": "Kevin Durant enters Oracle Arena tonight !"})
    long_post = "we talked about the game for a long while".split() * 16 + "Kevin Durant visits Paris".split()
    recs.append({"tokens": long_post})
    f = tmp_path / "posts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return f, recs


# ----------------------------------------------------------------------------- CRF in numpy

@pytest.mark.parametrize("seed,bio,bioes", [(0, False, False), (1, False, False), (2, False, False), (0, True, False),
                                            (1, True, False), (0, False, True), (1, True, True)])
def test_numpy_crf_matches_torch(seed, bio, bioes):
    """crf.crf_tags (Viterbi and forward-backward in numpy) == CRFHead.decode and CRFHead.marginals, on the
    scores the export writes (runtime.crf_params: with the bans when the head has them, BIOES tags mapped to BIO)."""
    g = torch.Generator().manual_seed(seed)
    L, W = 6, 7
    head = CRFHead(L, bio=bio, bioes=bioes)
    with torch.no_grad():
        for prm in head.crf.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
    em = torch.randn(3, W, head.n_scores, generator=g) * 3
    mask = torch.tensor([[True] * W, [True] * 4 + [False] * 3, [True] + [False] * (W - 1)])
    crf = runtime.crf_params(SimpleNamespace(head=head))
    ids, probs = crf_tags(pin_pad(em.numpy()), mask.numpy(), crf)
    assert ids == head.decode(em, mask)
    want = (head.log_marginals(em, mask).exp() * mask[..., None]).detach().numpy()
    assert want.shape == (3, W, L)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), mask.float().numpy(), atol=1e-5)  # each word's labels sum to 1


def test_softmax_probs_match():
    em = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    want = torch.cat([torch.zeros(2, 3, 1), em[..., 1:].softmax(-1)], -1) * mask[..., None]
    np.testing.assert_allclose(BU.softmax_probs(em.numpy(), mask.numpy()), want.numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- bundles

def test_bundle_layout_and_identical_tags(tiny_run, tmp_path, capsys):
    """The fp32 ONNX bundle holds what it says and tags new posts exactly as predict.py with the checkpoint."""
    b = tiny_run["bundle"]
    meta = json.loads((b / "meta.json").read_text())
    assert meta["format"] == "onnx" and not meta["int8"] and meta["head"] == "crf"
    for f in ("text.onnx", "mm.onnx", "vision.onnx", "explain.onnx", "crf.npz", "label_map.json",
              "tokenizer/tokenizer_config.json"):
        assert (b / f).is_file(), f
    # the whole preprocessing travels: the fit, and CLIP's shortest-edge resize for --image_fit crop (64, not the
    # ImageNet rule's 73 for a 64 crop)
    assert D.ImagePrep(**meta["image_prep"]) == D.ImagePrep(64, CLIP_MEAN, CLIP_STD, short=64, truncate=True, fit="pad")
    src, recs = new_posts(tiny_run, tmp_path)
    ref = predict.main([*tiny_run["flags"], "--input", str(src), "--out_dir", str(tmp_path / "ref")])
    got = predict.main(["--bundle", str(b), "--input", str(src), "--out_dir", str(tmp_path / "onnx")])
    assert [r["tags"] for r in got] == [r["tags"] for r in ref]
    assert len(got[-1]["tags"]) == len(recs[-1]["tokens"]) > 128  # a post past max_len: every word tagged
    assert [r["image_used"] for r in got] == [r["image_used"] for r in ref] and sum(r["image_used"] for r in got) == 4
    for a, r in zip(got, ref):  # each post with its own picture: a picture given to another post moves these ~1e-2
        assert [e["type"] for e in a["entities"]] == [e["type"] for e in r["entities"]]
        np.testing.assert_allclose(a["probs"], r["probs"], atol=1e-4)
    lines = (tmp_path / "onnx" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(recs) and json.loads(lines[0])["tags"] == ref[0]["tags"]


def test_test_py_scores_a_bundle_as_the_checkpoint(tiny_run, tmp_path, capsys):
    """test.py --bundle: the same runtime interface as the checkpoint, so the fp32 bundle scores the split exactly as
    the checkpoint (images from the bundle's own vision graph), in its own report; a bundle of another run and
    --explain_hits (the checkpoint's attention) are refused in one line each."""
    import test as test_py
    from config import ConfigError
    flags = [*tiny_run["flags"], "--data_dir", str(tiny_run["data"]), "--split", "test"]
    ref = test_py.main(flags)
    capsys.readouterr()
    got = test_py.main([*flags, "--bundle", str(tiny_run["bundle"])])
    assert re.search(r"test: images \d+/\d+ usable \(the bundle's vision graph\)", capsys.readouterr().out)
    run = tiny_run["save"] / "e"
    assert got == ref and (run / "test_report.bundle.json").is_file()
    assert (run / "test_predictions.bundle.conll").read_text() == (run / "test_predictions.conll").read_text()
    with pytest.raises(ConfigError, match="--explain_hits reads the checkpoint's attention"):
        test_py.main([*flags, "--bundle", str(tiny_run["bundle"]), "--explain_hits"])
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((tiny_run["bundle"] / "meta.json").read_text())
    for f in tiny_run["bundle"].iterdir():
        (other / f.name).symlink_to(f)
    (other / "meta.json").unlink()
    (other / "meta.json").write_text(json.dumps({**meta, "run": "/elsewhere/another_run"}))
    with pytest.raises(ConfigError, match="exported from run another_run, not from --save_name e"):
        test_py.main([*flags, "--bundle", str(other)])
    flip = "--no-bio_constraints" if meta["bio_constraints"] else "--bio_constraints"
    with pytest.raises(ConfigError, match=f"^{flip}: bundle .* decodes with the BIO bans"):
        test_py.main([*flags, "--bundle", str(tiny_run["bundle"]), flip])
    test_py.main([*flags, "--plots", "--bundle", str(tiny_run["bundle"]), "--out_dir", str(tmp_path)])
    assert (tmp_path / "plots" / "test_per_type.bundle.png").is_file()  # the bundle's own scores drawn


def check_explain(save, name: str, bundle_dir, data_dir) -> None:
    """The bundle's explain graph gives the checkpoint's word -> image-cell attention (rows sum to 1, one row per
    word, a post longer than one window included)."""
    import dataloader as D
    from runtime import CheckpointRuntime
    ck, bu = CheckpointRuntime(save, name), BU.Bundle(bundle_dir)
    assert ck.explains and bu.explains and bu.meta["explain_side"] == ck.meta["explain_side"]
    side = bu.meta["explain_side"]
    posts = D.read_conll(data_dir / "tiny" / "test.txt")
    n = 0
    for p in posts:
        px, _ = BU.prep_image(data_dir / "tiny" / "tiny_images" / f"{p.imgid}.png", bu.prep)
        if px is None:
            continue
        for words in (p.tokens, p.tokens * 20):
            a = ck.explain(words, ck.vision_features(px[None])[0])
            b = bu.explain(words, bu.vision_features(px[None])[0])
            assert a.shape == b.shape == (len(words), side * side)
            np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-4)
            np.testing.assert_allclose(b, a, atol=1e-4)
        n += 1
    assert n > 0


def test_bundle_explains_like_the_checkpoint(tiny_run):
    check_explain(tiny_run["save"], "e", tiny_run["bundle"], tiny_run["data"])


def test_torchscript_and_int8_bundles(tiny_run, tmp_path, capsys):
    """--export_format torch gives identical tags; the int8 ONNX bundle's agreement is measured and printed."""
    flags = tiny_run["flags"]
    src, _ = new_posts(tiny_run, tmp_path)
    ref = [r["tags"] for r in predict.main([*flags, "--input", str(src), "--out_dir", str(tmp_path / "r")])]
    ts = export.main([*flags, "--export_format", "torch", "--bundle", str(tmp_path / "ts")])
    assert (ts / "text.pt").is_file()
    assert [r["tags"] for r in predict.main(["--bundle", str(ts), "--input", str(src), "--out_dir",
                                             str(tmp_path)])] == ref
    q = export.main([*flags, "--int8", "--bundle", str(tmp_path / "q")])
    qmeta = json.loads((q / "meta.json").read_text())
    assert qmeta["int8"] and set(qmeta["int8_fp32"]) == {"text", "mm"}
    assert all(names and names[0].endswith("emit/MatMul") for names in qmeta["int8_fp32"].values()), qmeta
    out = capsys.readouterr().out
    assert "word tags and" in out and "identical to the checkpoint" in out
    got = [r["tags"] for r in predict.main(["--bundle", str(q), "--input", str(src), "--out_dir", str(tmp_path)])]
    words = sum(len(t) for t in ref)
    agree = sum(a == b for x, y in zip(got, ref) for a, b in zip(x, y))
    print(f"int8 bundle vs checkpoint on the tiny test posts: {agree}/{words} word tags agree")
    assert agree / words >= 0.8  # a 2-epoch random tiny model; the real figure comes from script/export_bench.sh


def test_int8_keeps_emission_and_outlier_input_matmuls_fp32(tmp_path):
    """quantize_int8 leaves in fp32 the MatMul feeding the output and, within the budget, the one whose input has
    an outlier channel (worst uint8 SNR); the others become integer MatMuls."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = {f"w{i}": numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"w{i}")
         for i, shape in ((1, (8, 8)), (2, (8, 8)), (3, (8, 3)))}
    scale = numpy_helper.from_array(np.array([100.0] + [1.0] * 7, np.float32), "scale")  # channel 0: an outlier
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Mul", ["h1", "scale"], ["h2"], name="outlier"),
             helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="mm2"),
             helper.make_node("MatMul", ["h3", "w3"], ["out"], name="mm3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 5, 3])],
                              [*w.values(), scale])
    f = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(f))
    feed = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    assert export.fp32_matmuls(f, feed, budget=0.5) == ["mm3", "mm2"]
    assert export.fp32_matmuls(f, feed) == ["mm3"]  # 6% of the work: neither 8x8 layer fits
    calib = [{"x": rng.standard_normal((2, 5, 8)).astype(np.float32)} for _ in range(4)]
    assert export.quantize_int8(f, feed, calib) == ["mm3"]
    g = onnx.load(str(f)).graph
    quantised = {n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}  # QDQ: x -> Q -> DQ -> MatMul
    feeds_of = {n.name: n.input for n in g.node if n.op_type == "MatMul"}
    dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    assert set(feeds_of["mm3"]) & dq_out == set() and set(feeds_of["mm2"]) <= dq_out and set(feeds_of["mm1"]) <= dq_out
    assert quantised  # the scales are constants in the graph: nothing is computed per batch
    assert not [n for n in g.node if n.op_type == "DynamicQuantizeLinear"]


def test_int8_scores_do_not_depend_on_the_batch(tiny_run, tmp_path):
    """The same post alone and in batches of 2, 8 and 32 gets identical tags and scores from an int8 bundle."""
    q = export.main([*tiny_run["flags"], "--int8", "--bundle", str(tmp_path / "q")])
    b = BU.Bundle(q)
    others = [["Paris", "is", "lovely", "in", "spring"], ["@NBA", "rocks"], ["New", "York", "Knicks", "win", "again",
              "tonight", "at", "Madison", "Square", "Garden"]]
    post = ["Kevin", "Durant", "enters", "Oracle", "Arena", "tonight"]
    alone = b.tag([post], batch_size=1)[0]
    for n in (2, 8, 32):
        batch = [post] + [others[i % 3] for i in range(n - 1)]
        got = b.tag(batch, batch_size=n)[0]
        assert got["tags"] == alone["tags"] and got["probs"] == alone["probs"], n
    with pytest.raises(Exception, match="--int8 --export_format torch"):
        export.main([*tiny_run["flags"], "--int8", "--export_format", "torch", "--bundle", str(tmp_path / "t")])


def test_predict_bundle_imports_no_training_code(tiny_run, tmp_path):
    """predict.py --bundle in a fresh interpreter: model.py, train.py and test.py are never imported."""
    src, _ = new_posts(tiny_run, tmp_path)
    code = ("import sys, predict; predict.main(sys.argv[1:]); "
            "bad = sorted({'model', 'train', 'test', 'export'} & set(sys.modules)); print('imported:', bad)")
    r = subprocess.run([sys.executable, "-c", code, "--bundle", str(tiny_run["bundle"]), "--input", str(src),
                        "--out_dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "imported: []" in r.stdout, r.stdout


def test_features_from_paths_pool(tiny_run, tmp_path):
    """Pool decoding keeps order, skips missing/broken files with their reason, and batches the backbone."""
    rt = BU.Bundle(tiny_run["bundle"])
    ok = tmp_path / "a.png"
    im = Image.new("RGB", (80, 60), (10, 200, 30))
    ImageDraw.Draw(im).rectangle((5, 5, 40, 40), fill=(200, 0, 0))
    im.save(ok)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths = [ok, None, tmp_path / "missing.png", tmp_path / "broken.jpg"] + [ok] * 5
    calls = []

    def encode(x):
        calls.append(len(x))
        return rt.vision_features(x)
    with ThreadPoolExecutor(2) as pool:
        feats, why = BU.features_from_paths(paths, rt.prep, encode, pool, batch=4, ahead=1)
    assert why[:4] == ["ok", "no image", "missing", "unreadable (UnidentifiedImageError)"] and why[4:] == ["ok"] * 5
    assert feats[1] is None and feats[2] is None and feats[3] is None
    assert calls == [4, 2] and feats[0].shape == tuple(rt.meta["image_feats"])
    np.testing.assert_array_equal(feats[0], feats[-1])


def test_refusals_one_line(tiny_run, tmp_path, capsys):
    def err(fn) -> str:
        with pytest.raises(SystemExit) as e:
            cli(fn)
        assert e.value.code == 2
        lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]
    assert "no meta.json there" in err(lambda: predict.main(["--bundle", str(tmp_path), "--text", "hi"]))
    assert "--explain" in err(lambda: predict.main(["--bundle", str(tiny_run["bundle"]), "--text", "hi", "--explain"]))
    assert "--save_name is required" in err(lambda: export.main([]))
    assert "invalid choice" in err(lambda: export.main([*tiny_run["flags"], "--export_format", "tf"]))


@pytest.mark.parametrize("stem", ["efficientnet_lite0", "conv"])
def test_dual_granularity_bundle(tmp_path, tiny_data_dir, tiny_bert_dir, capsys, stem):
    """A --use_dual_granularity run (command (a)'s model: the shipped EfficientNet-Lite0 stem; or the from-scratch
    conv stem, never cached) exports: vision.onnx gives the stem maps, mm.onnx the encoder + fusion; the fp32
    bundle tags new posts exactly as the checkpoint does, images and all (fp16-rounded features only where training
    caches them), and the int8 bundle's agreement is measured."""
    save = tmp_path / "save"
    train.main(["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny", "--text_encoder", tiny_bert_dir,
                "--save_dir", str(save), "--cache_dir", str(tmp_path / "cache"), "--swanlab_mode", "disabled",
                "--batch_size", "4", "--fusion_layers", "1", "--fusion_dim", "32", "--cross_attn_heads", "2",
                "--resampler_tokens", "4", "--fusion_lr", "3e-3", "--seed", "7", "--epochs", "1", "--save_name", "d",
                "--use_dual_granularity", "--vision_img_size", "32", "--vision_embed_dim", "16", "--vision_heads", "2",
                "--vision_depth", "1", "--vision_swin_window", "2", "--vision_delegate_topk", "2",
                "--vision_max_patches", "8", "--vision_stem", stem,
                *([] if stem == "efficientnet_lite0"
                  else ["--vision_patch_size", "16", "--vision_fine_patch_size", "8"])])
    flags = ["--save_dir", str(save), "--save_name", "d", "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]
    b = export.main(flags)
    meta = json.loads((b / "meta.json").read_text())
    assert (b / "vision.onnx").is_file() and (b / "mm.onnx").is_file()
    # at 32 px: the final 1280-channel features (1 x 1) and the stride-16 map (2 x 2); conv stem: 16/8 strides,
    # --vision_embed_dim channels each
    n = 1280 * 1 * 1 + 112 * 2 * 2 if stem == "efficientnet_lite0" else 16 * 2 * 2 + 16 * 4 * 4
    assert meta["image_feats"] == [n]
    assert meta["cached_features"] == (stem == "efficientnet_lite0")
    check_explain(save, "d", b, tiny_data_dir)
    tiny_run = {"data": tiny_data_dir}
    src, recs = new_posts(tiny_run, tmp_path)
    ref = predict.main([*flags, "--input", str(src), "--out_dir", str(tmp_path / "ref")])
    got = predict.main(["--bundle", str(b), "--input", str(src), "--out_dir", str(tmp_path / "onnx")])
    assert sum(r["image_used"] for r in got) == 4 and [r["image_used"] for r in got] == [r["image_used"] for r in ref]
    assert [r["tags"] for r in got] == [r["tags"] for r in ref]
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a["probs"], r["probs"], atol=1e-4)
    q = export.main([*flags, "--int8", "--bundle", str(tmp_path / "q")])
    assert "mm" in json.loads((q / "meta.json").read_text())["int8_fp32"]
    qt = [r["tags"] for r in predict.main(["--bundle", str(q), "--input", str(src), "--out_dir", str(tmp_path / "q8")])]
    words = sum(len(r["tags"]) for r in ref)
    agree = sum(a == b for x, r in zip(qt, ref) for a, b in zip(x, r["tags"]))
    print(f"dual-granularity int8 bundle vs checkpoint: {agree}/{words} word tags agree")
    assert agree / words >= 0.8


def test_a_moved_run_scores_predicts_and_exports_where_it_lies(tiny_run, tmp_path, capsys):
    """A run copied to another folder, whose config.json names paths of a machine that is not this one, is scored,
    tagged and exported beside its copy; nothing is written to the original run or created at the old paths."""
    import shutil
    import test as T
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_run["save"] / "e", moved / "e", ignore=shutil.ignore_patterns("bundle*", "*_report*"))
    old = tmp_path / "old_machine"
    cfg = json.loads((moved / "e" / "config.json").read_text())
    cfg.update(data_dir=str(old / "data"), cache_dir=str(old / "cache"), save_dir=str(old / "save"))
    (moved / "e" / "config.json").write_text(json.dumps(cfg))
    before = sorted(p.name for p in (tiny_run["save"] / "e").iterdir())
    T.main(["--save_dir", str(moved), "--save_name", "e", "--data_dir", str(tiny_run["data"]), "--device", "cpu"])
    assert (moved / "e" / "test_report.json").is_file()
    assert "its cache_dir" in capsys.readouterr().out  # said once, in one line
    predict.main(["--save_dir", str(moved), "--save_name", "e", "--text", "Kevin Durant visits Paris"])
    out = export.main(["--save_dir", str(moved), "--save_name", "e"])
    assert Path(out).parent == moved / "e"
    assert not old.exists()
    assert sorted(p.name for p in (tiny_run["save"] / "e").iterdir()) == before


def test_each_tool_takes_only_its_own_flags(tiny_run, capsys):
    """test.py / predict.py / export.py / serve.py / train.py: a flag of another tool, or a run's own (data, model,
    training) flag, is one error line naming it (test.py --dataset_name X used to score the run's own set
    silently); each tool's --help lists only its flags."""
    import serve
    import test as T
    from config import ConfigError, build_parser
    base = ["--save_dir", str(tiny_run["save"]), "--save_name", "e", "--data_dir", str(tiny_run["data"])]
    for main, extra, tool in ((T.main, [], "test"), (predict.main, ["--text", "Paris"], "predict"),
                              (export.main, [], "export")):
        with pytest.raises(ConfigError, match=f"{tool}.py does not take --dataset_name: a run's own value comes "
                                              "from its config.json"):
            main(base + extra + ["--dataset_name", "twitter2017", "--epochs", "3"])
    with pytest.raises(ConfigError, match="serve.py does not take --split: it is a flag of test.py"):
        serve.main(["--save_name", "e", "--split", "valid"])
    with pytest.raises(ConfigError, match="train.py does not take --port: it is a flag of serve.py"):
        train.main(["--port", "9"])
    T.main(base + ["--split", "valid"])
    import re
    flags = {t: set(re.findall(r"--\w+", build_parser(t).format_help())) for t in ("train", "test", "predict",
                                                                                  "export", "serve")}
    assert "--epochs" in flags["train"] and not {"--host", "--split", "--text"} & flags["train"]
    assert "--split" in flags["test"] and not {"--epochs", "--text", "--host"} & flags["test"]
    assert "--host" in flags["serve"] and not {"--max_len", "--split"} & flags["serve"]
    assert "--int8" in flags["export"] and "--host" not in flags["export"]
    assert "--input" in flags["predict"] and "--record_file" not in flags["predict"]


def test_int8_calibrates_on_the_training_posts_own_pictures(tiny_run):
    """The fused graph's int8 scales come from the features of real training pictures, not of noise; a post without
    a usable picture gets random pixels."""
    from runner import load_run
    config = load_run(tiny_run["save"], "e", {})[0]
    posts = D.load_split(config, "train")[:6]
    px = export.calibration_pixels(config, posts, 0)
    prep, root = D.image_prep_for(config), D.image_root(config, "train")
    for p, x in zip(posts, px):
        im = D.load_image(D.find_image(root, p.imgid))[0]
        assert torch.equal(x, prep(im)) if im is not None else x.std() > 0.5
    assert any(D.load_image(D.find_image(root, p.imgid))[0] is not None for p in posts)


def test_export_never_replaces_a_folder_that_is_not_a_bundle(tiny_run, tmp_path):
    """--bundle naming a run directory (or any folder without meta.json) is refused before anything is written; an
    earlier bundle is replaced. An fp32 bundle that tags dev words otherwise than the checkpoint fails the export."""
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    for target in (keep, tiny_run["save"] / "e"):
        with pytest.raises(ConfigError, match="already there and not a bundle"):
            export.main([*tiny_run["flags"], "--bundle", str(target)])
    assert (keep / "notes.txt").read_text() == "mine" and (tiny_run["save"] / "e" / "model.pt").is_file()
    out = export.main([*tiny_run["flags"], "--bundle", str(tmp_path / "b")])
    assert export.main([*tiny_run["flags"], "--bundle", str(out)]) == out  # an earlier bundle replaces itself


def test_an_fp32_bundle_that_disagrees_fails_the_export(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "check_bundle", lambda *a, **k: {"posts": 2, "words": 9, "agree_words": 8,
                                                                 "same_posts": 1})
    with pytest.raises(ConfigError, match="tags 1 dev words otherwise than the checkpoint"):
        export.main([*tiny_run["flags"], "--bundle", str(tmp_path / "b")])


def test_export_writes_the_opset_asked_for(tiny_run, tmp_path):
    import onnx
    out = export.main([*tiny_run["flags"], "--opset", "17", "--bundle", str(tmp_path / "b17")])
    for graph in ("text.onnx", "mm.onnx"):
        versions = {o.domain: o.version for o in onnx.load(str(out / graph)).opset_import}
        assert versions.get("", versions.get("ai.onnx")) == 17, (graph, versions)
    assert json.loads((out / "meta.json").read_text())["opset"] == 17
