"""Score a trained run on a split, from its own config and label map (never the current flags or the test data).

    python test.py --save_name NAME [--split test|valid,test] [--bundle DIR] ...   (--help lists every flag)

Writes <split>_report[.tag].json and <split>_predictions[.tag].conll into the run directory (the tag names an
--image_control, --[no-]bio_constraints or --bundle other than the run's own) and scores as serve.py does.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import dataloader as D
from bundle import Bundle, split_features
from config import ConfigError, cli, get_config, given_flags
from explain import report_hits
from metrics import evaluate, format_report
from results import record
from runner import RUNTIME_FLAGS, amp_context, load_run, pick_device, read_run_json, write_predictions


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cli = get_config(argv, tool="test")  # flag values are checked (--split) before anything loads
    if not cli.save_name:
        raise ConfigError("--save_name is required: the run directory under --save_dir to score")
    overrides = {k: getattr(cli, k) for k in given_flags(argv) & RUNTIME_FLAGS}
    config, label_map, model, ckpt = load_run(cli.save_dir, cli.save_name, overrides)
    run = Path(cli.save_dir) / cli.save_name  # outputs go beside the run loaded, wherever it was trained
    saved = read_run_json(run / "config.json")
    device = pick_device(config.device)
    amp = amp_context(config, device)[0] if config.amp else None
    if not cli.bundle:
        from runtime import CheckpointRuntime
        rt = CheckpointRuntime(cli.save_dir, cli.save_name, loaded=(config, label_map, model), strict=False,
                               device=device, amp=amp)
    elif cli.explain_hits:
        raise ConfigError("--explain_hits reads the checkpoint's attention; score it without --bundle")
    else:
        rt = Bundle(cli.bundle)
        if Path(rt.meta["run"]).name != cli.save_name:
            raise ConfigError(f"--bundle {cli.bundle} was exported from run {Path(rt.meta['run']).name}, not from "
                              f"--save_name {cli.save_name}; name the run it came from")
        if rt.meta["head"] == "crf" and config.bio_constraints != rt.meta["bio_constraints"]:  # baked into crf.npz
            raise ConfigError(f"--{'' if config.bio_constraints else 'no-'}bio_constraints: bundle {cli.bundle} "
                              f"decodes with the BIO bans {'on' if rt.meta['bio_constraints'] else 'off'}, as its "
                              "run did; score the checkpoint (without --bundle) to decode otherwise")
    vision = model.vision if model.uses_image and config.use_image and not cli.bundle else None
    best = ckpt["epoch"] + 1 if "epoch" in ckpt else "?"
    # a control scoring, another decoding or a bundle writes reports of its own, never over the run's own
    tag = f".{config.image_control}" if config.image_control != saved.get("image_control", "none") else ""
    if config.bio_constraints != saved.get("bio_constraints", False):
        tag += ".bio" if config.bio_constraints else ".no_bio"
    tag += f".{Path(cli.bundle).name}" if cli.bundle else ""
    results = {}
    for split in config.split.split(","):
        posts = D.load_split(config, split)
        ds = D.make_dataset(config, split, posts, rt.tokenizer, label_map, vision)
        print(ds.describe())
        t0 = time.time()
        feats = split_features(rt, config, split, posts) if cli.bundle else rt.dataset_features(ds)
        if cli.bundle and feats is not None:  # the dataset above was built without the vision, so it said nothing
            n = sum(f is not None for f in feats)
            print(f"{split}: images {n}/{len(posts)} usable (the bundle's vision graph)")
        preds = [r["tags"] for r in rt.tag_dataset(ds, feats, config.batch_size)]
        res = evaluate([p.tags for p in posts], preds, config.eval_mode)
        dt = time.time() - t0
        write_predictions(run / f"{split}_predictions{tag}.conll", posts, preds)
        print(f"{cli.save_name}{' (' + cli.bundle + ')' if cli.bundle else ''} on {config.dataset_name}/{split} "
              f"(best dev epoch {best}), {len(posts) / dt:.0f} posts/s:")
        print(format_report(res))
        if config.explain_hits:
            res["explain_hits"] = report_hits(model, ds, config, label_map, device, amp, split)
        (run / f"{split}_report{tag}.json").write_text(json.dumps(res, indent=1))
        results[split] = res
    if config.record_file:
        record(config.record_file, cli.save_name, results, config, D.split_hashes(config))
    if config.plots:
        from plots import run_plots
        for f in run_plots(run, split, Path(config.out_dir or run) / "plots", tag):
            print(f"wrote {f}")
    return res


if __name__ == "__main__":
    cli(main)
