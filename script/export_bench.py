"""Checkpoint vs exported bundles on a split, text path: F1 and posts/s (medians over repeats), one table.

    python script/export_bench.py --save_name RUN [--bundles DIR,DIR] [--split test] [--repeats 3]
                                  [--dataset_name twitter2017 --data_dir DIR] [--threads 2]

The checkpoint runs as train.py's final test scores it (runner.predict: the run's torch model, batches of
--batch_size sorted by length); each bundle through bundle.Bundle.tag with the same batch size. Images are not
used (the text path), so an MNER run is timed on its text-only graph. Model loading is not timed; tokenisation
and decoding are, on both sides. Default bundles: <run>/bundle and <run>/bundle_int8.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bundle as BU  # noqa: E402
import dataloader as D  # noqa: E402
from metrics import evaluate  # noqa: E402
from model import load_tokenizer  # noqa: E402
from runner import load_run, predict  # noqa: E402


def timed(fn, repeats: int):
    """(last result, median seconds) of fn() over repeats runs."""
    times, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return res, statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save_name", required=True)
    ap.add_argument("--save_dir", default="save_models")
    ap.add_argument("--bundles", default="",
                    help="comma-separated bundle dirs (default: <run>/bundle,<run>/bundle_int8)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--dataset_name", default="", help="default: the run's")
    ap.add_argument("--data_dir", default="", help="default: the run's")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    over = {"device": "cpu", "batch_size": a.batch_size}
    over.update({k: v for k, v in (("dataset_name", a.dataset_name), ("data_dir", a.data_dir)) if v})
    config, label_map, model, _ = load_run(a.save_dir, a.save_name, over)
    model.eval()  # no vision module is given to the dataset below, so an MNER run takes its text-only path
    posts = D.load_split(config, a.split)
    gold = [p.tags for p in posts]
    rows = []

    def ckpt():
        ds = D.make_dataset(config, a.split, posts, load_tokenizer(config), label_map, None)
        return predict(model, ds, config, label_map, torch.device("cpu"))
    preds, dt = timed(ckpt, a.repeats)
    base = evaluate(gold, preds, config.eval_mode)["f1"]
    rows.append(("checkpoint (torch fp32)", base, len(posts) / dt, preds))
    run = Path(a.save_dir) / a.save_name
    dirs = [Path(d) for d in a.bundles.split(",") if d] or [d for d in (run / "bundle", run / "bundle_int8")
                                                             if d.is_dir()]
    for d in dirs:
        rt = BU.Bundle(d, threads=a.threads)
        words = [p.tokens for p in posts]
        out, dt = timed(lambda: rt.tag(words, None, a.batch_size), a.repeats)
        tags = [r["tags"] for r in out]
        name = f"bundle {d.name} ({rt.meta['format']}{', int8' if rt.meta['int8'] else ''})"
        rows.append((name, evaluate(gold, tags, config.eval_mode)["f1"], len(posts) / dt, tags))
    print(f"{a.save_name} on {config.dataset_name}/{a.split} ({len(posts)} posts), text path, batch {a.batch_size}, "
          f"{a.threads} threads, median of {a.repeats}:")
    print(f"| {'what':40s} | F1     | dF1 (points) | posts/s | speed-up | word tags = checkpoint |")
    print(f"|{'-' * 42}|--------|--------------|---------|----------|------------------------|")
    n_words = sum(map(len, gold))
    for name, f1, ps, tags in rows:
        agree = sum(x == y for t, r in zip(tags, preds) for x, y in zip(t, r))
        print(f"| {name:40s} | {100 * f1:6.2f} | {100 * (f1 - base):+12.2f} | {ps:7.1f} | {ps / rows[0][2]:7.2f}x "
              f"| {agree}/{n_words} ({100 * agree / n_words:.2f}%) |")


if __name__ == "__main__":
    main()
