"""Score a trained run on a split, from its own config and label map.

    python test.py --save_name NAME [--split test|valid|train|valid,test] [--device cpu] [--batch_size 32]
                   [--eval_mode conlleval|strict] [--record_file results.csv] [--plots [--out_dir DIR]]
                   [--image_control shuffle|blank]   # score with wrong or blank images (attribution control)
                   [--explain_hits]                   # attention peak inside the cued object's box, per split
                   [--[no-]bio_constraints]           # decode with(out) the BIO bans, whatever the run was trained with
                   [--bundle DIR]                     # score an export.py bundle of the run (onnxruntime, int8)

Prints the per-type and [Overall] lines, writes <split>_report.json and <split>_predictions.conll into the
run directory (<split>_report.<control>.json and so on when --image_control differs from the run's own, .bio /
.no_bio when --bio_constraints does), and
appends one CSV row to --record_file when given (a bundle's reports carry its folder name:
test_report.bundle_int8.json). Scoring runs through the same runtime as serve.py (runtime.CheckpointRuntime, or
bundle.Bundle with --bundle): batches of similar length, text-only and image posts apart, CRF decoding in numpy.
The model is rebuilt from the run's config.json and label_map.json (never from the current flags or the test data).
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import dataloader as D
from config import ConfigError, cli, get_config, given_flags
from metrics import evaluate, format_report
from runner import RUNTIME_FLAGS, amp_context, load_run, pick_device, read_run_json, write_predictions


RECORD_FIELDS = ["run_name", "split", "mode", "image_control", "dev_f1", "acc", "precision", "recall", "f1",
                 "per_f1", "loc_f1", "org_f1", "misc_f1", "data_hash"]


def record(path, name: str, results: dict, config, data_hash: dict | None = None):
    """Append one CSV row for a run (header written once): the scores of the last split scored, and next to them
    the dev (valid) F1 when that split was scored too, so rows can be chosen on dev and read on test."""
    split = list(results)[-1]
    res = results[split]
    row = {"run_name": name, "split": split, "mode": res["mode"], "image_control": config.image_control,
           "dev_f1": f"{results['valid']['f1']:.4f}" if "valid" in results else "NA",
           "acc": f"{res['accuracy']:.4f}", "precision": f"{res['precision']:.4f}", "recall": f"{res['recall']:.4f}",
           "f1": f"{res['f1']:.4f}", **{f"{t.lower()}_f1": f"{v['f1']:.4f}" for t, v in res["per_type"].items()},
           "data_hash": "/".join(f"{s}:{h}" for s, h in (data_hash or {}).items()) or "NA"}
    p = Path(path)
    new = not p.exists() or p.stat().st_size == 0
    fields = RECORD_FIELDS + sorted(set(row) - set(RECORD_FIELDS))
    if not new:  # an older file keeps its own columns
        with open(p, newline="") as f:
            fields = next(csv.reader(f), fields)
    with open(p, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="NA", extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def explain_hits(model, ds, config, label_map, device, amp, split: str) -> dict:
    """--explain_hits: explain.attention_hits over the split's posts with a box, printed in one line."""
    from contextlib import nullcontext

    from explain import attention_hits, image_path_off, read_boxes
    off = image_path_off(model, config)
    path = D.dataset_dir(config) / f"{split}_boxes.jsonl"
    if off or not path.is_file():
        why = off or f"{path} not found: data/make_heldout.py and make_demo.py write it (a demo folder made before: " \
                     "python data/make_demo.py --force)"
        raise ConfigError(f"--explain_hits: {why}")
    h = attention_hits(model, ds, config, label_map, device, amp or nullcontext, read_boxes(path))
    views = "".join(f"; {k} view alone {r:.1%}" for k, r in h["views"].items())
    print(f"attention peak inside the cued object's box: {h['hits']}/{h['posts']} posts ({h['rate']:.1%}; "
          f"a uniform peak: {h['chance']:.1%}{views}); skipped: {h['no_box']} with an image but no box, "
          f"{h['no_entity']} with no entity of the cued type")
    return h


def bundle_features(rt, config, split: str, posts: list) -> list | None:
    """The split's image features from a bundle's own vision graph (images decoded in a pool), --image_control
    applied as images.image_sources does; None for a post without a usable image."""
    root = D.image_root(config, split)
    if not rt.uses_image or root is None:
        return None
    from concurrent.futures import ThreadPoolExecutor

    from bundle import features_from_paths
    with ThreadPoolExecutor(2) as pool:
        feats, _ = features_from_paths([D.find_image(root, p.imgid) for p in posts], rt.prep, rt.vision_features,
                                       pool)
    src = D.image_sources([f is not None for f in feats], config.image_control, config.seed)
    grey = None
    if config.image_control == "blank":
        grey = rt.vision_features(D.grey_pixels(rt.prep)[None].numpy())[0]
    return [None if f is None else (feats[j] if j >= 0 else grey) for f, j in zip(feats, src)]


def open_runtime(cli, loaded, device, amp):
    """The runtime test.py scores with: the run's checkpoint, or --bundle (an export of this run)."""
    if not cli.bundle:
        from runtime import CheckpointRuntime
        return CheckpointRuntime(cli.save_dir, cli.save_name, loaded=loaded, strict=False, device=device, amp=amp)
    if cli.explain_hits:
        raise ConfigError("--explain_hits reads the checkpoint's attention; score it without --bundle")
    from bundle import Bundle
    rt = Bundle(cli.bundle)
    if Path(rt.meta["run"]).name != cli.save_name:
        raise ConfigError(f"--bundle {cli.bundle} was exported from run {Path(rt.meta['run']).name}, not from "
                          f"--save_name {cli.save_name}; name the run it came from")
    return rt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cli = get_config(argv, tool="test")  # flag values are checked (--split) before anything loads
    if not cli.save_name:
        raise ConfigError("--save_name is required: the run directory under --save_dir to score")
    given = given_flags(argv)
    overrides = {k: getattr(cli, k) for k in given & RUNTIME_FLAGS}
    config, label_map, model, ckpt = load_run(cli.save_dir, cli.save_name, overrides)
    saved = read_run_json(Path(cli.save_dir) / cli.save_name / "config.json")
    trained_control = saved.get("image_control", "none")
    device = pick_device(config.device)
    amp = amp_context(config, device)[0] if config.amp else None
    rt = open_runtime(cli, (config, label_map, model), device, amp)
    vision = model.vision if model.uses_image and config.use_image and not cli.bundle else None
    run = Path(cli.save_dir) / cli.save_name  # outputs go beside the run loaded, wherever it was trained
    best = ckpt["epoch"] + 1 if "epoch" in ckpt else "?"
    # a control scoring (--image_control other than the run's own), another decoding (--bio_constraints) or a
    # bundle never overwrites the run's own reports
    tag = f".{config.image_control}" if config.image_control != trained_control else ""
    if config.bio_constraints != saved.get("bio_constraints", False):
        tag += ".bio" if config.bio_constraints else ".no_bio"
    tag += f".{Path(cli.bundle).name}" if cli.bundle else ""
    results = {}
    for split in config.split.split(","):
        posts = D.load_split(config, split)
        ds = D.make_dataset(config, split, posts, rt.tokenizer, label_map, vision)
        print(ds.describe())
        t0 = time.time()
        feats = bundle_features(rt, config, split, posts) if cli.bundle else rt.dataset_features(ds)
        preds = [r["tags"] for r in rt.tag_dataset(ds, feats, config.batch_size)]
        res = evaluate([p.tags for p in posts], preds, config.eval_mode)
        dt = time.time() - t0
        write_predictions(run / f"{split}_predictions{tag}.conll", posts, preds)
        print(f"{cli.save_name}{' (' + cli.bundle + ')' if cli.bundle else ''} on {config.dataset_name}/{split} "
              f"(best dev epoch {best}), {len(posts) / dt:.0f} posts/s:")
        print(format_report(res))
        if config.explain_hits:
            res["explain_hits"] = explain_hits(model, ds, config, label_map, device, amp, split)
        (run / f"{split}_report{tag}.json").write_text(json.dumps(res, indent=1))
        results[split] = res
    if config.record_file:
        record(config.record_file, cli.save_name, results, config, D.split_hashes(config))
    if config.plots:
        from plots import run_plots
        for f in run_plots(run, split, Path(config.out_dir or run) / "plots"):
            print(f"wrote {f}")
    return res


if __name__ == "__main__":
    cli(main)
