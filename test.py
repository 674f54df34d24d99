"""Score a trained run on a split, from its own config and label map.

    python test.py --save_name NAME [--split test|valid|train] [--device cpu] [--batch_size 32]
                   [--eval_mode conlleval|strict] [--record_file results.csv] [--plots [--out_dir DIR]]

Prints the per-type and [Overall] lines, writes <split>_report.json and <split>_predictions.conll into the
run directory, and appends one CSV row to --record_file when given. The model is rebuilt from the run's
config.json and label_map.json (never from the current flags or the test data).
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import dataloader as D
from config import ConfigError, cli, get_config, given_flags
from metrics import format_report
from model import load_tokenizer
from runner import RUNTIME_FLAGS, amp_context, evaluate_split, load_run, pick_device, write_predictions


def record(path, name: str, res: dict, split: str):
    """Append a row to a CSV of scores (header written once)."""
    row = {"run_name": name, "split": split, "mode": res["mode"], "acc": f"{res['accuracy']:.4f}",
           "precision": f"{res['precision']:.4f}", "recall": f"{res['recall']:.4f}", "f1": f"{res['f1']:.4f}",
           **{f"{t.lower()}_f1": f"{v['f1']:.4f}" for t, v in res["per_type"].items()}}
    p = Path(path)
    new = not p.exists() or p.stat().st_size == 0
    with open(p, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cli = get_config(argv, check=False)
    if not cli.save_name:
        raise ConfigError("--save_name is required: the run directory under --save_dir to score")
    overrides = {k: getattr(cli, k) for k in given_flags(argv) & RUNTIME_FLAGS}
    config, label_map, model, ckpt = load_run(cli.save_dir, cli.save_name, overrides)
    device = pick_device(config.device)
    model.to(device)
    posts = D.load_split(config, config.split)
    tokenizer = load_tokenizer(config)
    vision = model.vision if model.uses_image and config.use_image else None
    ds = D.make_dataset(config, config.split, posts, tokenizer, label_map, vision)
    print(ds.describe())
    t0 = time.time()
    res, preds = evaluate_split(model, ds, config, label_map, device, amp_context(config, device)[0] if config.amp else None)
    dt = time.time() - t0
    run = Path(config.save_dir) / cli.save_name
    (run / f"{config.split}_report.json").write_text(json.dumps(res, indent=1))
    write_predictions(run / f"{config.split}_predictions.conll", posts, preds)
    best = ckpt["epoch"] + 1 if "epoch" in ckpt else "?"
    print(f"{cli.save_name} on {config.dataset_name}/{config.split} (best dev epoch {best}), {len(posts) / dt:.0f} posts/s:")
    print(format_report(res))
    if config.record_file:
        record(config.record_file, cli.save_name, res, config.split)
    if config.plots:
        from plots import run_plots
        for f in run_plots(run, config.split, Path(config.out_dir or run) / "plots"):
            print(f"wrote {f}")
    return res


if __name__ == "__main__":
    cli(main)
