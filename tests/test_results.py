"""The results tooling: bench.py end to end on tiny encoders, results.py on hand-made runs, the scripts'
--list / --dry-run paths. Speed figures are printed, never asserted."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from types import SimpleNamespace

import bench
import config as C
import dataloader as D
import results
from conftest import ROOT

PY = sys.executable


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    e["VIRTUAL_ENV"] = e.get("VIRTUAL_ENV") or str(ROOT / ".venv")
    for k in ("DATASET", "EPOCHS", "SEED", "EXTRA_ARGS", "MODEL", "SAVE_NAME"):
        e.pop(k, None)
    return e


TINY_DUAL = ["--vision_img_size", "32", "--vision_patch_size", "8", "--vision_fine_patch_size", "4",
             "--vision_embed_dim", "16", "--vision_heads", "2", "--vision_depth", "1", "--vision_swin_window", "2",
             "--vision_delegate_topk", "2", "--vision_max_patches", "4"]


@pytest.fixture(scope="module")
def tiny_flags(tiny_data_dir, tiny_bert_dir, tiny_clip_dir):
    return ["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny", "--text_encoder", tiny_bert_dir,
            "--image_encoder", tiny_clip_dir, "--batch_size", "4", "--fusion_layers", "1", "--fusion_dim", "16",
            "--cross_attn_heads", "2", "--device", "cpu", "--swanlab_mode", "disabled", *TINY_DUAL]


@pytest.mark.parametrize("case,extra", [("hf_recipe", []), ("text", ["--grad_checkpointing"]), ("mner_cached", []),
                                        ("mner_pixels", ["--no-length_bucketing"]), ("mner_dual", ["--amp"])])
def test_bench_case_reports_figures(tiny_flags, case, extra):
    r = bench.run_case({"case": case, "repeats": 2, "steps": 2, "eval_posts": 4}, tiny_flags + extra)
    assert r["case"] == case and r["train_posts_per_s"] > 0 and r["eval_posts_per_s"] > 0 and r["peak_rss_mib"] > 0
    assert len(r["train_posts_per_s_all"]) == 2 and r["n_train"] == 24 and 0 <= r["pad_share"] < 1 and r["epoch_cpu_s"] > 0
    tps = r["train_posts_per_s"]  # rounded to 0.1, and epoch_s = 24 / (exact posts/s) rounded to 0.1
    assert 24 / (tps + 0.05) - 0.051 <= r["epoch_s"] <= 24 / max(tps - 0.05, 1e-9) + 0.051
    assert r["grad_ckpt"] == ("--grad_checkpointing" in extra) and r["amp"] == ("--amp" in extra)
    assert r["bucketing"] == ("--no-length_bucketing" not in extra and case != "hf_recipe")
    assert 0 < r["train_gflops"] and 0 < r["matmul_peak_gflops"]  # counted matmul work / time, and the ceiling


def test_bench_driver_table_and_json(tmp_path, tiny_flags):
    """The driver end to end: each case in a child process, its row in the table and the JSON, the ratio lines."""
    out = tmp_path / "bench.json"
    p = subprocess.run([PY, "bench.py", "--cases", "hf_recipe,text", "--amp_modes", "fp32", "--bucketing", "on",
                        "--repeats", "1", "--steps", "1", "--eval_posts", "4", "--json", str(out),
                        *tiny_flags], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["round"], r["case"], r["bucketing"]) for r in rows] == [(1, "hf_recipe", False), (1, "text", True)]
    assert all(r["epoch_s"] > 0 and r["eval_posts_per_s"] > 0 for r in rows)
    assert p.stdout.count("vs hf_recipe: train pass") == 1 and "| 1 | text | fp32 | on | off |" in p.stdout
    assert "hardware:" in p.stdout


def test_bench_driver_rounds_alternate_the_cases(monkeypatch, capsys):
    """Rounds run the whole case list again in turn; the recipe once per round (its own batching), MANGO once per
    bucketing mode; each ratio is the median over the rounds (fake children: text takes half the recipe's time)."""
    seen = []

    def child(spec, flags, failed):
        seen.append((spec["case"], failed["bucketing"]))
        t = {"hf_recipe": 2.0, "text": 1.0}[spec["case"]]
        return {**failed, "bucketing": failed["bucketing"] == "on", "grad_ckpt": False, "epoch_s": t,
                "epoch_cpu_s": t, "eval_posts_per_s": 1 / t, "train_posts_per_s": 1 / t, "peak_rss_mib": 1,
                "train_rss_growth_mib": 0, "peak_cuda_mib": None}
    monkeypatch.setattr(bench, "run_child", child)
    bench.main(["--cases", "hf_recipe,text", "--amp_modes", "fp32", "--bucketing", "on,off", "--rounds", "2"])
    assert seen == [("hf_recipe", "off"), ("text", "on"), ("text", "off")] * 2
    out = capsys.readouterr().out
    assert out.count("vs hf_recipe: train pass: 0.50x wall clock, 0.50x CPU time (median of 2 rounds") == 2
    assert out.count("(median of 2 rounds") == 4
    assert "| 2 | text | fp32 | on | off |" in out and "| 1 | text | fp32 | off | off |" in out


def test_bench_paired_times_the_cases_step_by_step(tiny_flags):
    f = bench.run_paired(["text", "mner_dual", "mner_dual+--vision_depth=0"], 4, tiny_flags)
    assert list(f) == ["text", "mner_dual", "mner_dual+--vision_depth=0"] and f["text"]["ratio"] == 1.0
    assert all(d["ratio"] > 0 and d["step_s"] > 0 for d in f.values())


def test_bench_paired_pairs_the_same_batch_in_rotating_order(monkeypatch):
    """Fake cases on a fake clock: case b's step costs twice a's, c's three times; each batch k is stepped by every
    case in turn, the order rotated by one each batch, and the ratios come out exactly."""
    clock, log = [0.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def fake(case, n, argv, own=()):
        cost = {"text": 1.0, "mner_cached": 2.0, "mner_dual": 3.0}[case]
        batches = [{"index": torch.tensor([i])} for i in range(8)]
        step = lambda b: (clock.__setitem__(0, clock[0] + cost), log.append((case, int(b["index"]))))  # noqa: E731
        return SimpleNamespace(batches=batches, prepare=lambda b: b, sync=lambda: None, step=step)
    monkeypatch.setattr(bench, "case_setup", fake)
    f = bench.run_paired(["text", "mner_cached", "mner_dual"], 4, [])
    assert [f[c]["ratio"] for c in f] == [1.0, 2.0, 3.0] and f["mner_dual"]["step_s"] == 3.0
    assert log[:6] == [("text", 0), ("mner_cached", 0), ("mner_dual", 0), ("mner_cached", 2), ("mner_dual", 2),
                       ("text", 2)]
    monkeypatch.setattr(bench, "case_setup", lambda case, n, argv, own=(): SimpleNamespace(
        batches=[{"index": torch.tensor([len(own)])}], prepare=None, sync=None, step=None))
    with pytest.raises(SystemExit, match="batches the posts otherwise"):
        bench.run_paired(["text", "text+--batch_size=2"], 2, [])


@pytest.mark.parametrize("args,msg", [(["--amp_modes", "fp32,amp"], "one value each"), (["--steps", "1"], "2 or more"),
                                      (["--cases", "hf_recipe,text", "--amp_modes", "fp32"], "its own loop"),
                                      (["--cases", "text,textx+--amp", "--amp_modes", "fp32"], "unknown"),
                                      (["--cases", "text,hf_recipe+--amp", "--amp_modes", "fp32"], "its own loop"),
                                      (["--cases", "text,text", "--amp_modes", "fp32"], "named twice")])
def test_bench_paired_refuses_what_it_cannot_pair(args, msg):
    p = subprocess.run([PY, "bench.py", "--paired", "--bucketing", "on", *args], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_bench_ratios_are_medians_over_rounds():
    """Hand-made rows: the train pass against the recipe and MNER against the text path, per round, then the median."""
    def row(k, case, s, cpu, eval_=100.0):
        return {"round": k, "case": case, "amp": False, "bucketing": case != "hf_recipe", "grad_ckpt": False,
                "epoch_s": s, "epoch_cpu_s": cpu, "eval_posts_per_s": eval_}
    rows = [row(1, "hf_recipe", 100, 200), row(1, "text", 50, 80, 150), row(1, "mner_cached", 60, 100),
            row(2, "hf_recipe", 80, 200), row(2, "text", 48, 90, 120), row(2, "mner_cached", 72, 99),
            row(3, "hf_recipe", 90, 180), row(3, "text", 36, 72, 180), row(3, "mner_cached", 45, 90)]
    lines = bench.ratios(rows)
    assert lines[0].startswith("text (bucketing on, grad ckpt off) vs hf_recipe: train pass: 0.50x wall clock, 0.40x CPU time")
    assert "wall 0.50 0.60 0.40; CPU 0.40 0.45 0.40" in lines[0]
    assert lines[1].startswith("text (bucketing on, grad ckpt off) vs hf_recipe: eval posts/s: 1.50x wall clock (")
    assert lines[2].startswith("mner_cached (fp32, bucketing on) vs text: train pass: 1.25x wall clock, 1.25x CPU time")
    assert bench.ratios(rows[:3])[2] == "mner_cached (fp32, bucketing on) vs text: train pass: 1.20x wall clock, 1.25x CPU time"
    # a case that failed in round 1 still has its ratio from the rounds where it ran
    later = bench.ratios([r for r in rows if (r["round"], r["case"]) != (1, "mner_cached")])
    assert later[2].startswith("mner_cached (fp32, bucketing on) vs text: train pass: 1.38x wall clock") and "median of 2 rounds" in later[2]


def test_bench_rounds_must_be_positive():
    p = subprocess.run([PY, "bench.py", "--cases", "text", "--rounds", "0"], cwd=ROOT, env=env(), capture_output=True,
                       text=True)
    assert p.returncode != 0 and "--rounds 0" in p.stderr and "Traceback" not in p.stderr


def test_bench_unknown_case_is_one_line():
    p = subprocess.run([PY, "bench.py", "--cases", "text,bogus"], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert p.returncode != 0 and "--cases bogus: unknown" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([PY, "bench.py", "--cases", "text+--amp"], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert p.returncode != 0 and "--cases text+--amp: unknown" in p.stderr and "with --paired" in p.stderr


def fake_run(save, name, f1s_dev, test_f1, data_dir, mode="conlleval"):
    run = save / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"dataset_name": "tiny", "data_dir": str(data_dir),
                                                 "epochs": len(f1s_dev)}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "dev_f1": f, "time_s": 10.0 + i}) + "\n"
                                               for i, f in enumerate(f1s_dev)))
    (run / "test_report.json").write_text(json.dumps({"mode": mode, "precision": test_f1, "recall": test_f1,
                                                      "f1": test_f1,
                                                      "gold_support": 150, "per_type": {"PER": {"f1": test_f1}}}))
    (run / "wall_s.txt").write_text("60\n30\n")  # an interrupted run resumed: both parts count


def test_layout_bench_pairs_both_steps(monkeypatch, capsys):
    """script/layout_bench.py times the backbone in both layouts on the same input and prints a ratio per step."""
    import re
    import runpy
    monkeypatch.setattr(sys, "argv", ["layout_bench.py", "--pairs", "2", "--batch", "1",
                                      "--threads", str(torch.get_num_threads())])
    runpy.run_path(str(ROOT / "script" / "layout_bench.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["frozen forward", "forward + backward, last two blocks trainable"]
    assert all(float(re.search(r"= ([0-9.]+)x", ln).group(1)) > 0 for ln in lines)


def test_results_mean_std_and_missing_seeds(tmp_path, tiny_data_dir):
    save = tmp_path / "save"
    fake_run(save, "repro_tiny_MNER_s1", [0.5, 0.9, 0.8], 0.90, tiny_data_dir)
    fake_run(save, "repro_tiny_MNER_s2", [0.7, 0.95], 0.96, tiny_data_dir)
    results.main(["--datasets", "tiny", "--models", "MNER", "roberta_crf", "--seeds", "1", "2", "3",
                  "--save_dir", str(save), "--out_dir", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "tiny.json").read_text())
    (row,) = data["rows"]  # roberta_crf has no runs: no row
    assert row["seeds"] == [1, 2] and row["missing_seeds"] == [3]
    assert row["test_f1"]["mean"] == pytest.approx(0.93) and row["test_f1"]["std"] == pytest.approx(0.0424264, rel=1e-4)
    assert row["dev_f1"]["mean"] == pytest.approx(0.925)  # best dev epoch of each run: 0.9 and 0.95
    assert [r["best_epoch"] for r in row["runs"]] == [2, 2] and row["runs"][0]["wall_s"] == 90
    assert row["support"] == 150 and row["images_present"] == "4/8"  # tiny test: every other post has a picture
    md = (tmp_path / "out" / "tiny.md").read_text()
    assert "**93.00 ± 4.24**" in md and "missing 3" in md


def test_reproduce_and_ablation_list(tmp_path):
    p = subprocess.run(["bash", "script/ablation.sh", "--list"], cwd=ROOT, env=env(), capture_output=True, text=True)
    names = [l.split()[0] for l in p.stdout.splitlines()]
    assert p.returncode == 0 and {"full", "no_residual", "no_preserve", "no_nce", "no_gate", "no_resampler",
                                  "fusion_layers_1",
                                  "fusion_layers_3", "fusion_layers_7", "text_only", "clip", "efficientnet",
                                  "dual_granularity", "shuffle", "blank", "dual_shuffle", "dual_blank", "text_base",
                                  "text_epochs10", "text_head_lr", "text_frozen_emb",
                                  "text_frozen_2", "text_dapt", "text_default", "text_default_e10",
                                  "text_default_lr1e4", "text_default_bs8",
                                  "text_default_fast", "text_default_bs32", "text_default_bs32_lr1e4",
                                  "text_default_ema99",
                                  "text_default_ema995", "text_default_mpnet", "text_r2", "text_r2_bio",
                                  "text_r2_bilstm", "text_r4",
                                  "text_r4_bioes",
                                  "text_r4_no_bucketing", "text_r4_one_lr", "text_r4_no_ema", "text_r4_trained_emb",
                                  "text_r4_no_case", "text_r4_clip5", "text_r4_e10", "text_r7_crf_lr1e2",
                                  "text_r7_no_case", "text_r7_e10", "text_r11_freeze1", "text_r14_amp"} == set(names)
    p = subprocess.run(["bash", "script/ablation.sh", "--dry-run", "--exp", "no_gate,fusion_layers_7,full"], cwd=ROOT,
                       env=dict(env(), SAVE_DIR=str(tmp_path)), capture_output=True, text=True)
    lines = p.stdout.splitlines()
    # fusion_layers_7 is the full run: trained and scored once; each is also scored with shuffled images
    assert p.returncode == 0 and len(lines) == 6
    assert "--fusion_gate rel" in lines[0] and "abl_demo_no_gate_s42" in lines[0]  # only the per-dimension gate goes
    assert lines[1].startswith("python test.py") and "--record_file results/ablation_demo.csv" in lines[1]
    assert "--split valid,test" in lines[1] and lines[2] == lines[1] + " --image_control shuffle"
    p = subprocess.run(["bash", "script/ablation.sh", "--exp", "nope"], cwd=ROOT, env=env(), capture_output=True,
                       text=True)
    assert p.returncode == 2 and "--exp nope: unknown experiment" in p.stderr
    p = subprocess.run(["bash", "script/reproduce.sh", "--dry-run"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2 and "reproduce.sh takes no arguments ('--dry-run')" in p.stderr  # not hours of runs
    for empty in (["--exp"], ["--exp="]):  # never "every experiment"
        p = subprocess.run(["bash", "script/ablation.sh", *empty], cwd=ROOT, env=env(), capture_output=True, text=True)
        assert p.returncode == 2 and "--exp needs NAME" in p.stderr, empty
    # the text-path levers: the text model, the experiment's flags after the environment's (they win), no image control
    p = subprocess.run(["bash", "script/ablation.sh", "--dry-run", "--exp", "text_epochs10,text_head_lr"], cwd=ROOT,
                       env=dict(env(), SAVE_DIR=str(tmp_path), EPOCHS="6", DATASET="twitter2017"),
                       capture_output=True, text=True)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and len(lines) == 4
    base = "--model roberta_crf --no-freeze_word_embeddings --head_lr 1e-3 --ema_decay 0 --no-bio_constraints"
    assert lines[0].endswith(f"{base} --epochs 10") and "--epochs 6" in lines[0]
    assert lines[2].endswith(f"{base} --head_lr 3e-3") and "image_control" not in p.stdout


def test_ablation_runs_one_experiment_end_to_end(tmp_path, tiny_flags):
    """The real script: trains the experiment with its flag, scores it with test.py and appends a CSV row."""
    rec = tmp_path / "abl.csv"
    extra = " ".join(tiny_flags + ["--epochs", "1"])
    e = dict(env(), SAVE_DIR=str(tmp_path / "save"), RECORD_FILE=str(rec), EXTRA_ARGS=extra, DATASET="tiny")
    p = subprocess.run(["bash", "script/ablation.sh", "--exp", "no_gate"], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = json.loads((tmp_path / "save" / "abl_tiny_no_gate_s42" / "config.json").read_text())
    assert cfg["fusion_gate"] == "rel" and cfg["dataset_name"] == "tiny"
    rows = list(csv.DictReader(rec.open()))
    assert [(r["run_name"], r["split"], r["image_control"]) for r in rows] == [
        ("abl_tiny_no_gate_s42", "test", "none"), ("abl_tiny_no_gate_s42", "test", "shuffle")]
    assert all(r["dev_f1"] != "NA" for r in rows)


def test_ablation_table_puts_each_row_next_to_its_shuffled_control(tmp_path):
    head = "run_name,split,mode,image_control,dev_f1,acc,precision,recall,f1\n"
    rows = {1: ["abl_demo_full_s1,test,conlleval,none,0.9800,0,0,0,0.9700",
                "abl_demo_full_s1,test,conlleval,shuffle,0.9800,0,0,0,0.6000",
                "abl_demo_shuffle_s1,test,conlleval,shuffle,0.6100,0,0,0,0.6200"],
            2: ["abl_demo_full_s2,test,conlleval,none,0.9600,0,0,0,0.9900",
                "abl_demo_full_s2,test,conlleval,shuffle,0.9600,0,0,0,0.6400"]}
    files = []
    for s, lines in rows.items():
        f = tmp_path / f"s{s}.csv"
        f.write_text(head + "\n".join(lines) + "\n")
        files.append(str(f))
    table = results.ablation_table(files).splitlines()
    full = next(l for l in table if l.startswith("| full |"))
    assert "| 2 | 97.00 ± 1.41 | **98.00 ± 1.41** | 62.00 ± 2.83 | +36.00 |" in full
    shuf = next(l for l in table if l.startswith("| shuffle |"))
    assert "| 1 | 61.00 | **62.00** | - | - |" in shuf  # trained and scored with shuffled images: its own row


def test_peer_recipe_selects_on_dev_and_scores_test_once(tiny_flags, tmp_path):
    """peer.py: the Hugging Face recipe trained epoch by epoch, dev-scored after each, test scored with the best
    dev epoch's weights, everything in the JSON."""
    import peer
    out = peer.main(tiny_flags + ["--epochs", "2", "--json", str(tmp_path / "peer.json")])
    devs = [e["dev_f1"] for e in out["epochs"]]
    assert [e["epoch"] for e in out["epochs"]] == [1, 2] and out["dev_f1"] == max(devs)
    assert out["best_epoch"] == 1 + devs.index(max(devs)) and 0 <= out["test"]["f1"] <= 1
    assert out["test"]["gold_support"] > 0 and json.loads((tmp_path / "peer.json").read_text()) == out
    c = C.get_config(tiny_flags)
    r = peer.Recipe(c, D.load_split(c, "train"))
    tags = r.tag([D.Post(["a"] * 300, ["O"] * 300, None)])[0]  # one sub-word a word: words past --max_len are cut
    assert len(tags) == 300 and tags[c.max_len - 1:] == ["O"] * (300 - c.max_len + 1)


def test_peer_table_from_peer_jsons(tmp_path):
    """results.py --peers: one row per recipe and dataset, mean ± sample std of the seeds' dev and test F1."""
    import results
    files = []
    for seed, dev, test in ((1, 0.80, 0.70), (2, 0.82, 0.74)):
        f = tmp_path / f"p{seed}.json"
        f.write_text(json.dumps({"recipe": "flair_sequence_tagger", "dataset": "d", "seed": seed, "dev_f1": dev,
                                 "test": {"f1": test}, "best_epoch": seed + 3, "test_posts_per_s": 100.0 * seed,
                                 "epochs": [{"epoch": 1, "train_s": 10.0 * seed}]}))
        files.append(str(f))
    row = results.peer_table(files).splitlines()[2]
    assert row == ("| flair_sequence_tagger | d | 1,2 | 81.00 ± 1.41 | **72.00 ± 2.83** | 70.00, 74.00 | 4, 5 | 15 | "
                   "150 |")
