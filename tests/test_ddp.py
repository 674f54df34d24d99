"""torchrun: DistributedDataParallel on CPU (2 gloo processes) against one process on the same global batches.

Why the two runs can be compared tightly: with --no-length_bucketing the sampler cuts one seeded shuffle of the
posts into consecutive batches and deals them round-robin to the ranks, so optimiser step k of the 2-process run
(per-rank batch 2, 2 accumulation steps) sees exactly the 8 posts of step k of the 1-process run (batch 8).
The CRF loss is a mean over posts and DDP averages the ranks' gradients, so with every dropout off (--drop_prob 0
and an encoder whose own dropout is 0) both runs compute the same gradients up to float summation order:
the epoch losses agree to a few 1e-6 (relative; asserted at 1e-4) and the predictions to about one entity. A run
whose ranks did not average gradients, trained on the wrong shard, or dropped/duplicated batches would be off by far
more (without the DDP wrapper the first epoch's loss already differs).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dataloader
import train
from conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def env():
    e = dict(os.environ)
    e.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    e.pop("SWANLAB_API_KEY", None)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):  # a pytest run under torchrun must not leak in
        e.pop(k, None)
    return e


def run(cmd: list[str]) -> str:
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{cmd[:6]} failed ({time.time() - t0:.0f}s):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p.stdout.replace("\r", "\n")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mem(tmp_path_factory, tiny_data_dir, tiny_bert_dir):
    """A memorisation set (valid = test = train, 24 posts; half have a picture) and a dropout-free tiny BERT."""
    d = tmp_path_factory.mktemp("ddp")
    data = d / "data" / "mem"
    data.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        shutil.copy(tiny_data_dir / "tiny" / "train.txt", data / f"{split}.txt")
    shutil.copytree(tiny_data_dir / "tiny" / "tiny_images", data / "mem_images")
    bert = d / "bert"
    shutil.copytree(tiny_bert_dir, bert)
    cfg = json.loads((bert / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bert / "config.json").write_text(json.dumps(cfg))
    return d, ["--allow_split_overlap", "--data_dir", str(d / "data"), "--dataset_name", "mem",
               "--text_encoder", str(bert), "--swanlab_mode", "disabled", "--device", "cpu", "--seed", "7"]


def test_ddp_matches_single_process(mem):
    d, base = mem
    # a tiny random encoder learns this set only with its word embeddings trained (frozen is the default)
    flags = [*base, "--model", "roberta_crf", "--drop_prob", "0", "--no-length_bucketing", "--epochs", "8",
             "--no-freeze_word_embeddings",
             "--text_lr", "1e-2", "--fusion_lr", "1e-2", "--min_epoch_num", "100"]
    train.main([*flags, "--batch_size", "8", "--save_dir", str(d / "single"), "--save_name", "one"])  # in-process
    # no --save_name: rank 0 makes up the (timestamped) name and the other rank must use the same directory
    out = run([*TORCHRUN, "train.py", *flags, "--batch_size", "2", "--gradient_accumulation_steps", "2",
               "--save_dir", str(d / "ddp")])

    one = d / "single" / "one"
    runs = [p for p in (d / "ddp").iterdir()]
    assert len(runs) == 1, runs  # one run directory, written by rank 0 only
    two = runs[0]
    for f in ("config.json", "label_map.json", "model.pt", "last.pt", "metrics.jsonl", "test_report.json",
              "test_predictions.conll"):
        assert (two / f).is_file(), f
    # rank-0-only printing: one start line, one line per epoch, one report
    assert out.count("x 2 processes (global batch 4)") == 1 and out.count("[Overall]") == 1
    assert sum(l.startswith("epoch ") and " loss " in l for l in out.splitlines()) == 8

    a, b = rows(one), rows(two)
    assert [r["epoch"] for r in b] == list(range(1, 9))
    assert [r["step"] for r in b] == [r["step"] for r in a] == [3 * e for e in range(1, 9)]  # 24 posts / 8 per step
    for ra, rb in zip(a, b):  # the same optimisation: losses agree up to float summation order
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4, abs=1e-4), (ra["epoch"], ra, rb)
        assert rb["dev_f1"] == pytest.approx(ra["dev_f1"], abs=0.03)
    ta = json.loads((one / "test_report.json").read_text())
    tb = json.loads((two / "test_report.json").read_text())
    assert ta["f1"] > 0.7  # it really learned (a random tagger scores ~0 here), so agreeing is not trivial
    # predictions gathered from both ranks: every post is scored once (40 gold entities in these 24 posts)
    assert tb["gold_support"] == ta["gold_support"] == 40
    assert tb["f1"] == pytest.approx(ta["f1"], abs=0.03)  # ~1 of 40 entities may flip on float noise
    assert (two / "test_predictions.conll").read_text().count("IMGID:") == 24
    assert len(torch.load(two / "last.pt", weights_only=True)["rng_ranks"]) == 2


def test_ddp_image_model_cache_and_resume(mem, tiny_clip_dir):
    """MNER with cached frozen-CLIP features under DDP: posts without a picture and --image_dropout_p skip the
    image path in some batches (unused parameters), rank 0 builds the feature cache
    alone, and --continue_train_name resumes a torchrun run under torchrun."""
    d, base = mem
    flags = [*base, "--model", "MNER", "--image_encoder", tiny_clip_dir, "--fusion_layers", "2", "--fusion_dim", "32",
             "--cross_attn_heads", "2", "--batch_size", "4", "--image_dropout_p", "0.5",
             "--save_dir", str(d / "mner"), "--cache_dir", str(d / "cache"), "--save_name", "m"]
    out = run([*TORCHRUN, "train.py", *flags, "--epochs", "2"])
    assert out.count("[Overall]") == 1 and out.count("images 12/24 usable") == 3  # 3 splits, printed by rank 0
    # one cache entry per distinct picture (the three splits share them), none half-written
    pictures = {dataloader.file_digest(p) for p in (d / "data" / "mem" / "mem_images").iterdir()}
    assert len(list((d / "cache").rglob("*.pt"))) == len(pictures) and not list((d / "cache").rglob("*.tmp"))
    assert [r["epoch"] for r in rows(d / "mner" / "m")] == [1, 2]
    # epoch 2 went through the image path: the mean relevance is > 0 in any batch where an image survived image
    # dropout (the InfoNCE term needs two such posts in one batch of 4, which a seed may never give)
    assert rows(d / "mner" / "m")[1]["train_sparsity"] > 0
    out = run([*TORCHRUN, "train.py", "--continue_train_name", "m", "--save_dir", str(d / "mner"), "--epochs", "3",
               "--swanlab_mode", "disabled"])
    assert "resumed m after epoch 2" in out and out.count("[Overall]") == 1
    assert [r["epoch"] for r in rows(d / "mner" / "m")] == [1, 2, 3]
    last = torch.load(d / "mner" / "m" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and len(last["rng_ranks"]) == 2
