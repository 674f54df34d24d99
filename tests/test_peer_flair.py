"""peer_flair.py, the flair peer, in its own environment (script/peer_flair.sh makes .venv-flair; CI does not):
it trains flair's recipe on a tiny dataset and scores it with MANGO's scorer."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import dataloader as D
from config import get_config
from metrics import get_entities

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("FLAIR_VENV", ROOT / ".venv-flair"))


def _has_flair() -> bool:
    py = VENV / "bin" / "python"
    return py.is_file() and subprocess.run([str(py), "-c", "import flair"], capture_output=True).returncode == 0


needs_flair = pytest.mark.skipif(not _has_flair(),
                                 reason=f"flair's environment {VENV} is absent (bash script/peer_flair.sh makes it)")


@needs_flair
def test_peer_flair_scores_a_tiny_set_with_mangos_scorer(tiny_data_dir, tiny_bert_dir, tmp_path):
    out = tmp_path / "flair.json"
    p = subprocess.run([str(VENV / "bin" / "python"), "peer_flair.py", "--dataset_name", "tiny", "--data_dir",
                        str(tiny_data_dir), "--text_encoder", tiny_bert_dir, "--epochs", "1", "--batch_size", "4",
                        "--threads", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    posts = D.load_split(get_config(["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny"]), "test")
    gold = sum(len(get_entities(x.tags, "conlleval")) for x in posts)
    assert res["test"]["mode"] == "conlleval" and res["test"]["gold_support"] == gold  # MANGO's scorer's report
    assert len(res["epochs"]) == 1 and res["epochs"][0]["train_s"] > 0 and res["test_posts_per_s"] > 0
    assert 0.0 <= res["test"]["f1"] <= 1.0 and "test (conlleval)" in p.stdout


@needs_flair
def test_predicted_type_is_the_predictions_not_the_golds():
    """flair keeps one Span per position: a predicted span where the gold has one carries both labels, and its
    first (gold) label must not become the prediction's type."""
    code = ("from flair.data import Sentence; import peer_flair as P\n"
            "s = Sentence(['Kevin', 'Durant', 'plays']); s[0:2].add_label('ner', 'PER')\n"
            "s[0:2].add_label('predicted', 'ORG'); s[2:3].add_label('predicted', 'MISC')\n"
            "print(P.predicted_tags(s))")
    p = subprocess.run([str(VENV / "bin" / "python"), "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "['B-ORG', 'I-ORG', 'B-MISC']"


@needs_flair
def test_speed_script_times_both_sides_and_writes_their_ratios(tiny_data_dir, tiny_bert_dir, tmp_path):
    out = tmp_path / "speed.json"
    env = {**os.environ, "THREADS": "1", "DATASET": "tiny", "EXTRA_ARGS": f"--data_dir {tiny_data_dir}",
           "TEXT_ENCODER": tiny_bert_dir, "OUT": str(out)}
    p = subprocess.run(["bash", "script/speed_vs_flair.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    for side in ("flair", "mango"):
        assert res[side]["train_s"] > 0 and res[side]["test_posts_per_s"] > 0
    assert res["bundle_eval_ratio"] == round(res["mango"]["bundle_test_posts_per_s"] / res["flair"]["test_posts_per_s"], 3)
    # the checkpoint and its fp32 bundle tag alike: MANGO's last two test reports (test.py on each) are the same
    overall = [l for l in p.stdout.splitlines() if l.startswith("[Overall]")]
    assert len(overall) == 4 and overall[-1] == overall[-2]  # flair's, train.py's final test, then test.py twice
    assert res["train_ratio"] == round(res["mango"]["train_s"] / res["flair"]["train_s"], 3)
    assert res["mango"]["amp"] is False  # MANGO_ARGS unset: fp32 on both sides
    assert res["eval_ratio"] == round(res["mango"]["test_posts_per_s"] / res["flair"]["test_posts_per_s"], 3)
    assert "train pass: MANGO" in p.stdout
