"""The real workflow end to end on a tiny dataset with tiny encoders: train.py, test.py, the scripts."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from config import ConfigError, get_config
from conftest import ROOT
from model import build_model, load_tokenizer

PY = sys.executable


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e["VIRTUAL_ENV"] = e.get("VIRTUAL_ENV") or str(Path(PY).parent.parent)
    e.pop("SWANLAB_API_KEY", None)
    for k in ("DEVICE", "EPOCHS", "BATCH_SIZE", "VISION_DEPTH", "DATASET", "MODEL", "SEED", "TEXT_ENCODER",
              "IMAGE_ENCODER", "SAVE_NAME", "SWANLAB_MODE", "EXTRA_ARGS"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_data_dir, tiny_bert_dir, tiny_clip_dir):
    """Flags shared by every run: tiny data + tiny BERT + tiny CLIP, its own save and cache dirs."""
    d = tmp_path_factory.mktemp("runs")
    return ["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny", "--text_encoder", tiny_bert_dir,
            "--image_encoder", tiny_clip_dir, "--save_dir", str(d / "save"), "--cache_dir", str(d / "cache"),
            "--swanlab_mode", "disabled", "--batch_size", "4", "--fusion_layers", "2", "--fusion_dim", "32",
            "--cross_attn_heads", "2", "--fusion_lr", "3e-3", "--seed", "7"]


def run_py(args, cwd=ROOT, check=True):
    p = subprocess.run([PY, *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode:
        raise AssertionError(f"{args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def save_dir(base):
    return Path(base[base.index("--save_dir") + 1])


@pytest.fixture(scope="module")
def trained(base):
    """A 2-epoch MNER run through the real CLI."""
    run_py(["train.py", *base, "--epochs", "2", "--save_name", "two"])
    return save_dir(base) / "two"


def test_run_dir_complete(trained):
    for f in ("config.json", "label_map.json", "model.pt", "last.pt", "metrics.jsonl", "test_report.json",
              "test_predictions.conll"):
        assert (trained / f).is_file(), f
    rows = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # exactly --epochs epochs
    for k in ("train_loss", "train_tag", "train_residual", "train_preserve", "train_nce", "train_sparsity", "dev_f1"):
        assert k in rows[0]
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["batch_size"] == 4 and cfg["dataset_name"] == "tiny"
    labels = json.loads((trained / "label_map.json").read_text())["labels"]
    assert labels[:2] == ["<PAD>", "O"]
    pred = (trained / "test_predictions.conll").read_text().split("\n\n")[0].splitlines()
    assert pred[0].startswith("IMGID:") and len(pred[1].split("\t")) == 3


def test_test_py_reproduces_reports(trained, base, capsys):
    """test.py as a command scores dev as training did; in-process (the same main) the test split as training did,
    with a --record_file row, and without the BIO bans into reports of its own."""
    import test as T
    rows = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["dev_f1"])
    out = run_py(["test.py", "--save_dir", str(save_dir(base)), "--save_name", "two", "--split", "valid"]).stdout
    assert f"F1={best['dev_f1']:.4f}" in out
    rep = json.loads((trained / "test_report.json").read_text())
    rec = save_dir(base) / "scores.csv"
    capsys.readouterr()
    T.main(["--save_dir", str(save_dir(base)), "--save_name", "two", "--record_file", str(rec)])
    out = capsys.readouterr().out
    assert f"[Overall] Acc={rep['accuracy']:.4f}, P={rep['precision']:.4f}, R={rep['recall']:.4f}, F1={rep['f1']:.4f}" in out
    row = list(csv.DictReader(rec.open()))[0]
    assert row["run_name"] == "two" and float(row["f1"]) == pytest.approx(rep["f1"], abs=1e-4)
    # decoding without the BIO bans (a run trained with them): its own reports, the run's stay as they were
    before = (trained / "valid_report.json").read_text()
    T.main(["--save_dir", str(save_dir(base)), "--save_name", "two", "--split", "valid", "--no-bio_constraints"])
    assert (trained / "valid_report.no_bio.json").is_file() and (trained / "valid_report.json").read_text() == before


def _conll_posts(path):
    return [p.splitlines() for p in Path(path).read_text().strip().split("\n\n")]


@pytest.mark.parametrize("control", ["shuffle", "blank"])
def test_test_time_image_control_changes_only_posts_with_an_image(trained, base, control, capsys):
    """Scoring a trained MNER run with shuffled or blank images (test.py --image_control): the posts without an image
    get exactly the same emissions and tags, the posts with one get other emissions (the picture is read)."""
    import dataloader as D
    import test as T
    T.main(["--save_dir", str(save_dir(base)), "--save_name", "two", "--split", "train", "--image_control", control])
    out = capsys.readouterr().out
    assert f"image control {control}" in out
    assert (trained / f"train_report.{control}.json").is_file()  # the run's own reports are left alone
    config, label_map, model, _ = T.load_run(save_dir(base), "two", {"split": "train"})
    posts = D.load_split(config, "train")
    tok = load_tokenizer(config)
    em = {}
    for c in ("none", control):
        config.image_control = c
        ds = D.make_dataset(config, "train", posts, tok, label_map, model.vision)
        batch = D.collate([ds[i] for i in range(len(ds))], ds.pad_id)
        with torch.no_grad():
            em[c] = model.eval()(batch)["emissions"]
    has = torch.tensor(ds.has_image)
    assert 0 < has.sum() < len(has)
    assert torch.equal(em["none"][~has], em[control][~has])
    assert all(not torch.allclose(a, b) for a, b in zip(em["none"][has], em[control][has]))


def test_test_py_missing_run_names_file_and_runs(trained, base):
    p = run_py(["test.py", "--save_dir", str(save_dir(base)), "--save_name", "nope"], check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "nope/config.json is missing" in err[0] and "two" in err[0]
    assert "Traceback" not in p.stderr


def cut_in_epoch_2(argv, monkeypatch):
    """train.main(argv) interrupted (Ctrl-C) at epoch 2's dev pass: last.pt holds epoch 1, epoch 2 has trained."""
    real_eval, calls = train.evaluate_split, []

    def crash_on_second_dev_eval(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_eval(*a, **k)
    monkeypatch.setattr(train, "evaluate_split", crash_on_second_dev_eval)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(train, "evaluate_split", real_eval)


def test_resume_matches_uninterrupted(base, monkeypatch):
    """Crash in epoch 2 (after epoch 1's last.pt), resume, and end where an uninterrupted run ends."""
    args = [*base, "--epochs", "2", "--image_dropout_p", "0.3"]
    _, full = train.main([*args, "--save_name", "full"])
    cut_in_epoch_2([*args, "--save_name", "cut"], monkeypatch)
    last = torch.load(save_dir(base) / "cut" / "last.pt", weights_only=True)
    assert last["epoch"] == 0
    _, resumed = train.main(["--continue_train_name", "cut", "--save_dir", str(save_dir(base)),
                             "--swanlab_mode", "disabled"])
    assert resumed["f1"] == full["f1"] and resumed["correct"] == full["correct"]
    a = [json.loads(l) for l in (save_dir(base) / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (save_dir(base) / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in b] == [1, 2]
    assert a[-1]["train_loss"] == pytest.approx(b[-1]["train_loss"], rel=1e-6)
    assert a[-1]["dev_f1"] == b[-1]["dev_f1"]


def test_multi_process_run_resumes_in_one_with_a_note(base, monkeypatch, capsys):
    """A last.pt an earlier version wrote under torchrun (each rank's RNGs in rng_ranks) resumes in one process and
    says that its global batch changes."""
    args = [*base, "--epochs", "2", "--save_name", "ranks"]
    cut_in_epoch_2(args, monkeypatch)
    path = save_dir(base) / "ranks" / "last.pt"
    last = torch.load(path, weights_only=True)
    torch.save({**last, "rng_ranks": [last["rng"], last["rng"]]}, path)
    capsys.readouterr()
    train.main(["--continue_train_name", "ranks", "--save_dir", str(save_dir(base)), "--swanlab_mode", "disabled"])
    assert "ranks trained in 2 processes (global batch 2 x --batch_size); it goes on in one process" in \
        capsys.readouterr().out
    assert len((save_dir(base) / "ranks" / "metrics.jsonl").read_text().splitlines()) == 2


def test_ema_run_saves_the_average_and_resumes_it(base, monkeypatch):
    """--ema_decay: model.pt (what dev scored and the test reads) holds the averaged weights, last.pt the live ones
    and the average; a run cut in epoch 2 resumes to the uninterrupted run's dev F1 and average; a different
    --ema_decay on resume is refused."""
    args = [*base, "--model", "roberta_crf", "--epochs", "2", "--ema_decay", "0.9", "--min_gain", "-1"]
    train.main([*args, "--save_name", "ema_full"])
    best = torch.load(save_dir(base) / "ema_full" / "model.pt", weights_only=True)
    last = torch.load(save_dir(base) / "ema_full" / "last.pt", weights_only=True)
    assert last["ema"]["n"] == last["step"] > 0
    # --min_gain -1: every epoch counts as a gain, model.pt = the last average
    assert best["epoch"] == last["epoch"] == 1
    emit = best["model"]["emit.weight"]
    n = last["ema"]["n"]
    assert any(a.shape == emit.shape and torch.allclose(emit, a / (1 - 0.9 ** n)) for a in last["ema"]["avg"])
    assert not torch.equal(emit, last["model"]["emit.weight"])
    cut_in_epoch_2([*args, "--save_name", "ema_cut"], monkeypatch)
    train.main(["--continue_train_name", "ema_cut", "--save_dir", str(save_dir(base)), "--swanlab_mode", "disabled"])
    a = [json.loads(l) for l in (save_dir(base) / "ema_full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (save_dir(base) / "ema_cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["dev_f1"] for r in a] == [r["dev_f1"] for r in b]
    cut = torch.load(save_dir(base) / "ema_cut" / "last.pt", weights_only=True)
    assert all(torch.allclose(x, y) for x, y in zip(cut["ema"]["avg"], last["ema"]["avg"]))
    with pytest.raises(ConfigError, match="--ema_decay 0.5: the run being resumed used --ema_decay 0.9"):
        train.main(["--continue_train_name", "ema_cut", "--save_dir", str(save_dir(base)), "--ema_decay", "0.5"])


def test_resume_refuses_changed_architecture(trained, base):
    p = run_py(["train.py", "--continue_train_name", "two", "--save_dir", str(save_dir(base)),
                "--fusion_layers", "5"], check=False)
    assert p.returncode == 2 and "--fusion_layers differs" in p.stderr and "Traceback" not in p.stderr


def test_resume_works_where_the_run_lies_and_resolves_auto_flags_for_its_model(trained, tmp_path, capsys):
    """A run moved to another folder resumes there, whatever save_dir and cache_dir its config.json names; a -1
    (auto) given on resume is read for the run's own model, and refused where that is not the run's value (how the
    run began decides it); an abbreviated flag is refused, not dropped."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(trained, moved / "two")
    cfg = json.loads((moved / "two" / "config.json").read_text())
    cfg.update(save_dir="/gone/save_models", cache_dir="/gone/cache", model="roberta_crf", head_lr=3e-3)
    (moved / "two" / "config.json").write_text(json.dumps(cfg))
    argv = ["--continue_train_name", "two", "--save_dir", str(moved)]
    saved, _ = train.resolve_resume([*argv, "--head_lr", "-1"])
    assert saved.save_dir == str(moved) and saved.cache_dir == get_config().cache_dir
    assert "its cache_dir /gone/cache is not on this machine" in capsys.readouterr().out
    assert saved.head_lr == 3e-3  # roberta_crf's auto rate (MNER's would be --fusion_lr, 1e-3)
    (moved / "two" / "config.json").write_text(json.dumps({**cfg, "head_lr": 0.5}))
    with pytest.raises(ConfigError, match=r"^--head_lr -1.0: an auto value on resume; the run uses --head_lr 0.5"):
        train.resolve_resume([*argv, "--head_lr", "-1"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --epoch 5"):
        train.resolve_resume([*argv, "--epoch", "5"])


def test_resume_applies_the_decay_given_now_and_drops_a_cut_log_line(base, tmp_path, capsys):
    """The optimiser state brings back the old weight decay: --weight_decay_rate given on resume applies anyway. A
    run that stopped early after epoch 2 keeps its logged epochs, and a metrics.jsonl line cut short goes."""
    cfg = get_config([*base, "--model", "roberta_crf", "--epochs", "6"])
    model = build_model(cfg, 10)
    opt, sched = train.make_optimizer(model, cfg, steps=12)
    resume = {"model": model.state_dict(), **train.training_state(opt, sched, None), "epoch": 1, "best": 0.5,
              "schedule": train.lr_plan(cfg, 12), "bad_epochs": 3, "step": 4, "stopped": True, "rng": train.rng_state()}
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "dev')
    cfg.weight_decay_rate, cfg.continue_train_name, cfg.save_dir = 0.5, "r", str(tmp_path)
    _, opt, *_ = train.start_state(cfg, resume, model, [None] * 2, torch.device("cpu"), run)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.5}
    assert (run / "metrics.jsonl").read_text().splitlines() == ['{"epoch": 1}', '{"epoch": 2}']
    assert "resumed r after epoch 2 " in capsys.readouterr().out


def test_torchrun_launch_is_refused_in_one_line(base, monkeypatch):
    """One run is one process: under torchrun every rank would train alone and write the same run directory."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.py runs as one process .*WORLD_SIZE is 2"):
        train.main([*base, "--epochs", "1", "--save_name", "ranked"])
    assert not (save_dir(base) / "ranked").exists()


def test_existing_run_is_never_overwritten(trained, base):
    before = (trained / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run.*--continue_train_name two"):
        train.main([*base, "--epochs", "1", "--save_name", "two"])
    assert (trained / "metrics.jsonl").read_text() == before


def test_early_stopping(base):
    """Nothing learns (all learning rates 0), so dev F1 never improves after epoch 1: stop after
    1 + patience_epochs epochs once min_epoch_num is reached."""
    _, _ = train.main([*base, "--epochs", "6", "--text_lr", "0", "--fusion_lr", "0", "--patience_epochs", "2",
                       "--min_epoch_num", "1", "--save_name", "early"])
    rows = (save_dir(base) / "early" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3


def test_lr_groups(base, tiny_bert_dir):
    cfg = get_config(base + ["--vision_trainable", "--unfreeze_last_vision_blocks", "1"])
    m = build_model(cfg, 9)
    opt, sched = train.make_optimizer(m, cfg, steps=10)
    by = {}
    for g in opt.param_groups:
        by.setdefault(g["base"], set()).update(id(p) for p in g["params"])
        assert g["lr"] == pytest.approx({"text": cfg.text_lr, "vision": cfg.backbone_lr, "head": cfg.head_lr,
                                         "rest": cfg.fusion_lr}[g["base"]] * sched.lr_lambdas[0](0))
        if g["name"].endswith("_nodecay"):
            assert g["weight_decay"] == 0
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(names[i].startswith("text.") for i in by["text"])
    assert all(names[i].startswith("vision.") for i in by["vision"]) and by["vision"]
    assert not any(names[i].startswith(("text.", "vision.")) for i in by["rest"])
    assert {names[i].split(".")[0] for i in by["head"]} == {"case", "emit", "head"}  # no fusion in the head group
    assert sum(len(v) for v in by.values()) == sum(p.requires_grad for p in m.parameters())
    nodecay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(("bias" in n or "norm" in n.lower() or "ln" in n or p.dim() < 2 or "crf" in n or "pos" in n or "queries" in n)
               for n, p in m.named_parameters() if n in nodecay)
    assert any("LayerNorm" in n for n in nodecay) and any(n.endswith(".bias") for n in nodecay)


def test_schedule_warmup_then_decay(base):
    cfg = get_config(base + ["--warmup_prop", "0.2"])
    m = build_model(get_config(base + ["--model", "roberta_crf"]), 10)
    opt, sched = train.make_optimizer(m, cfg, steps=10)
    f = [sched.lr_lambdas[0](s) for s in range(11)]
    assert f[0] < f[1] < f[2] and f[2] >= max(f[3:]) and f[-1] == 0


def sh(script, cwd, extra_env=None):
    e = env()
    e.update(extra_env or {})
    return subprocess.run(["bash", str(ROOT / "script" / script)], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=600)


def test_env_vars_reach_flags():
    e = env()
    e.update(DEVICE="cpu", EPOCHS="3", BATCH_SIZE="5", VISION_DEPTH="6", DATASET="demo", MODEL="bert", SEED="9",
             TEXT_ENCODER="/x", IMAGE_ENCODER="/y", SAVE_NAME="n", SWANLAB_MODE="disabled",
             EXTRA_ARGS="--fusion_layers 2 --amp")
    p = subprocess.run(["bash", "-c", f". {ROOT}/script/env_args.sh; env_args; printf '%s\\n' \"${{ARGS[@]}}\""],
                       env=e, capture_output=True, text=True)
    got = p.stdout.split()
    pairs = dict(zip(got[:22:2], got[1:22:2]))
    assert pairs == {"--device": "cpu", "--epochs": "3", "--batch_size": "5", "--vision_depth": "6",
                     "--dataset_name": "demo", "--model": "bert", "--seed": "9", "--text_encoder": "/x",
                     "--image_encoder": "/y", "--save_name": "n", "--swanlab_mode": "disabled"}
    assert got[22:] == ["--fusion_layers", "2", "--amp"]
    cfg = get_config(got[:4] + got[20:])  # the flags parse
    assert cfg.device == "cpu" and cfg.epochs == 3 and cfg.fusion_layers == 2 and cfg.amp
    assert cfg.swanlab_mode == "disabled"


def test_scripts_from_another_cwd_and_batch_test(trained, base, tmp_path):
    # test.sh from a foreign cwd, with env overrides
    p = sh("test.sh", tmp_path, {"SAVE_NAME": "two", "EXTRA_ARGS": f"--save_dir {save_dir(base)} --split valid"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[Overall]" in p.stdout
    # batch_test.sh without names: every run directory under SAVE_DIR (here a folder holding a copy of one run)
    only = tmp_path / "only"
    shutil.copytree(trained, only / "two")
    p = sh("batch_test.sh", tmp_path, {"SAVE_DIR": str(only), "OUT_DIR": str(tmp_path / "logs")})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "logs" / "summary.csv").open()))
    assert list(rows[0]) == ["run_name", "split", "mode", "image_control", "dev_f1", "acc", "precision", "recall", "f1",
                             "per_f1", "loc_f1", "org_f1", "misc_f1", "data_hash", "log_file"]
    rep = json.loads((trained / "test_report.json").read_text())
    dev = max(json.loads(l)["dev_f1"] for l in (trained / "metrics.jsonl").read_text().splitlines())
    assert [r["run_name"] for r in rows] == ["two"] and float(rows[0]["f1"]) == pytest.approx(rep["f1"], abs=1e-4)
    assert rows[0]["split"] == "test" and float(rows[0]["dev_f1"]) == pytest.approx(dev, abs=1e-4)
    # batch_test.sh with names: a run that is not there gets an NA row and its log; relative folders are the caller's
    p = subprocess.run(["bash", str(ROOT / "script" / "batch_test.sh"), "ghost"], cwd=tmp_path,
                       env={**env(), "SAVE_DIR": "only", "OUT_DIR": "logs2"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "logs2" / "summary.csv").open()))
    assert rows[0]["run_name"] == "ghost" and rows[0]["f1"] == "NA" and Path(rows[0]["log_file"]).is_file()


def test_dual_granularity_cli(base):
    """The dual-granularity encoder trains from pixels (no cache) through the real CLI."""
    args = [*base, "--epochs", "1", "--use_dual_granularity", "--vision_img_size", "32", "--vision_patch_size", "8",
            "--vision_fine_patch_size", "4", "--vision_embed_dim", "32", "--vision_heads", "2", "--vision_depth", "1",
            "--vision_swin_window", "2", "--vision_delegate_topk", "4", "--vision_max_patches", "16",
            "--save_name", "dual"]
    out = run_py(["train.py", *args]).stdout
    assert "[Overall]" in out and "images 4/8 usable" in out


@pytest.mark.parametrize("flags,msg", [
    (["--text_lr", "-1"], "--text_lr must be >= 0"),
    (["--max_len", "4"], "--max_len must be >= 8"),
    (["--text_encoder", "/no/such/dir"], "--text_encoder /no/such/dir: no such directory"),
    (["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
    (["--model", "nope"], "--model 'nope' is unknown"),
])
def test_bad_flags_fail_with_one_line(base, flags, msg):
    p = run_py(["train.py", *base, *flags], check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-1500:]
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert msg in lines[-1] and len(lines) == 1, p.stderr


def test_amp_run_and_per_type_log(base):
    """--amp (bf16 autocast on CPU) trains and scores; the epoch log carries per-type dev P/R/F1."""
    run, res = train.main([*base, "--epochs", "1", "--amp", "--save_name", "amp"])
    assert 0.0 <= res["f1"] <= 1.0 and json.loads((run / "config.json").read_text())["amp"] is True
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for v in row["dev_per_type"].values():
        assert set(v) == {"precision", "recall", "f1"}


def test_resume_with_more_epochs_keeps_the_schedule_continuous(base, monkeypatch, capsys):
    """Cut a 3-epoch run after epoch 1, resume it with --epochs 5: warm-up as it was, the decay now ends at the
    new last step, and the learning rate goes on from the value it had at the resume point."""
    lrs = {}  # run -> {step: lr of the "rest" group after that step}
    monkeypatch.setattr(train.Tracker, "log", lambda self, d, step: lrs.setdefault(self.run_name, {}).update(
        {step: d["lr/rest"]} if "lr/rest" in d else {}))
    monkeypatch.setattr(train.Tracker, "run_name", "cut", raising=False)
    cut_in_epoch_2([*base, "--epochs", "3", "--patience_epochs", "9", "--save_name", "grow"],  # no early stop
                   monkeypatch)
    last = torch.load(save_dir(base) / "grow" / "last.pt", weights_only=True)
    old, s = last["schedule"], last["step"]
    assert last["epoch"] == 0 and s == 6 and (old["total"], old["warmup"], old["epochs"]) == (18, 1, 3)
    capsys.readouterr()

    monkeypatch.setattr(train.Tracker, "run_name", "resumed", raising=False)
    train.main(["--continue_train_name", "grow", "--save_dir", str(save_dir(base)), "--swanlab_mode", "disabled",
                "--epochs", "5"])
    assert "note: --epochs 3 -> 5: the learning rate now decays to 0 at step 30 instead of 18; warm-up (1 steps) " \
           "unchanged" in capsys.readouterr().out
    new = torch.load(save_dir(base) / "grow" / "last.pt", weights_only=True)["schedule"]
    assert (new["total"], new["warmup"], new["start"]) == (30, 1, s)
    f_old, f_new = train.lr_factor(old), train.lr_factor(new)
    assert f_new(s) == pytest.approx(f_old(s))                       # continuous at the resume point
    assert f_new(s + 1) < f_new(s) and f_new(30) == 0                 # then one straight decay to the new end
    assert [f_new(t) - f_new(t + 1) for t in range(s, 29)] == pytest.approx([f_new(s) / (30 - s)] * (29 - s))
    cut, resumed = lrs["cut"], lrs["resumed"]
    lr = 3e-3  # --fusion_lr of base
    assert [cut[t] for t in range(1, s + 1)] == pytest.approx([lr * f_old(t) for t in range(1, s + 1)])
    assert sorted(resumed) == list(range(s + 1, 31))                   # epochs 2-5 redone / added: steps 7..30
    assert [resumed[t] for t in range(s + 1, 31)] == pytest.approx([lr * f_new(t) for t in range(s + 1, 31)])
    step = cut[s] - resumed[s + 1]                                     # the first step after resuming moves the lr
    assert 0 < step == pytest.approx(cut[s] / (30 - s))                # by one step of the new decay, not a jump
    assert resumed[30] == 0
    # the cut run's own steps after its checkpoint (epoch 2, redone on resume) followed the old, shorter decay
    assert cut[s + 1] == pytest.approx(lr * f_old(s + 1)) and cut[s + 1] < resumed[s + 1]


def test_resume_refuses_other_eval_mode(trained, base):
    resume = ["--continue_train_name", "two", "--save_dir", str(save_dir(base)), "--swanlab_mode", "disabled"]
    with pytest.raises(ConfigError) as e:
        train.main([*resume, "--eval_mode", "strict"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--eval_mode strict: the run being resumed used --eval_mode conlleval")
    assert "best dev F1" in msg and "test.py --eval_mode strict" in msg


def test_more_epochs_after_a_finished_decay_goes_on_where_a_longer_plan_stands():
    """A run that ran its decay to lr 0 and is resumed with more epochs does not sit at lr 0: it goes on from the
    factor a run planned for the new --epochs would have at that step, then decays to 0 at the new end."""
    old = {"epochs": 2, "total": 20, "warmup": 2, "start": 2, "start_value": 1.0}
    assert train.lr_factor(old)(20) == 0
    new = train.replan(old, 20, 4, 40)
    f = train.lr_factor(new)
    assert f(20) == pytest.approx((40 - 20) / (40 - 2)) and f(40) == 0 and new["warmup"] == 2
    assert f(21) < f(20)


def test_grad_scaler_state_round_trip(tmp_path, tiny_bert_dir):
    """last.pt keeps the fp16 loss scale: training_state -> atomic_save -> load_checkpoint -> restore_training_state.
    (A CPU GradScaler stands in for CUDA's: same state_dict.)"""
    import runner
    cfg = get_config(["--model", "roberta_crf", "--text_encoder", tiny_bert_dir])
    m = build_model(cfg, 10)
    opt, sched = train.make_optimizer(m, cfg, steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler.scale(torch.ones(()))  # the scale lives from the first use
    scaler.update(new_scale=77.0)
    scaler._growth_tracker.fill_(2)
    train.atomic_save(train.training_state(opt, sched, scaler), tmp_path / "last.pt")
    ckpt = runner.load_checkpoint(tmp_path / "last.pt")
    opt2, sched2 = train.make_optimizer(m, cfg, steps=10)
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    train.restore_training_state(ckpt, opt2, sched2, fresh)
    assert fresh.get_scale() == 77.0 and fresh.state_dict() == scaler.state_dict()
    # fp32 runs save no scaler; restoring such a checkpoint into an fp16 run keeps the initial scale
    train.atomic_save(train.training_state(opt, sched, None), tmp_path / "fp32.pt")
    ckpt = runner.load_checkpoint(tmp_path / "fp32.pt")
    assert ckpt["scaler"] is None
    other = torch.amp.GradScaler("cpu", init_scale=1024.0)
    train.restore_training_state(ckpt, opt2, sched2, other)
    assert other.get_scale() == 1024.0


def test_metrics_has_train_and_eval_seconds(trained):
    rows = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert 0 < r["train_s"] and 0 < r["eval_s"] and r["train_s"] + r["eval_s"] <= r["time_s"] + 0.02
