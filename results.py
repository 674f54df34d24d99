"""Collect the runs of script/reproduce.sh into results/<dataset>.json and a Markdown table.

    python results.py --datasets twitter2017 demo --models roberta_crf MNER MNER_dual --seeds 1 2 3

Reads save_models/repro_<dataset>_<model>_s<seed>/{config.json, metrics.jsonl, test_report.json, wall_s.txt}.
Each run's test score is that of its best dev epoch (train.py selects on dev and scores test once);
the table gives mean ± sample std over the seeds found, and says which seeds are missing.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import dataloader as D
from config import ROOT, ConfigError, cli, config_from_dict

MODEL_NAMES = {"roberta_crf": "text-only baseline (roberta_crf)", "MNER": "MNER + EfficientNet-Lite0",
               "MNER_dual": "MNER + dual granularity",
               "MNER_dual_conv": "MNER + dual granularity, conv stem + distillation (112 px)",
               "roberta_crf_distill": "text path distilled from all-mpnet-base-v2 (+ MNRE posts unlabelled)"}


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


def image_coverage(config) -> str:
    """'k/n' test posts whose image file is present (0/n: the image path never runs)."""
    posts = D.load_split(config, "test")
    root = D.image_root(config, "test")
    found = sum(1 for p in posts if (f := D.find_image(root, p.imgid)) is not None and f.is_file())
    return f"{found}/{len(posts)}"


def collect(save_dir: Path, dataset: str, model: str, seeds: list[int]) -> dict | None:
    runs, missing = [], []
    for s in seeds:
        run = save_dir / f"repro_{dataset}_{model}_s{s}"
        if not (run / "test_report.json").is_file():
            missing.append(s)
            continue
        if not (run / "metrics.jsonl").is_file():
            raise ConfigError(f"{run}: test_report.json without metrics.jsonl; not a finished train.py run: rerun it "
                              "or move it out of --save_dir")
        test = json.loads((run / "test_report.json").read_text())
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        best = max(rows, key=lambda r: r["dev_f1"])
        wall = [int(x) for x in (run / "wall_s.txt").read_text().split()] if (run / "wall_s.txt").exists() else []
        runs.append({"seed": s, "run": run.name, "test_precision": test["precision"], "test_recall": test["recall"],
                     "test_f1": test["f1"], "test_per_type": {t: v["f1"] for t, v in test["per_type"].items()},
                     "dev_f1": best["dev_f1"], "best_epoch": best["epoch"], "epochs_run": len(rows),
                     "epoch_s": statistics.median(r["time_s"] for r in rows), "wall_s": sum(wall) or None,
                     "mode": test["mode"], "support": test["gold_support"]})
    if not runs:
        return None
    raw = json.loads((save_dir / runs[0]["run"] / "config.json").read_text())
    config = config_from_dict(raw)
    hashes = {json.dumps(json.loads((save_dir / r["run"] / "config.json").read_text()).get("data_hash")) for r in runs}
    if len(hashes) > 1:
        raise SystemExit(f"error: the runs of {dataset} {model} used different versions of its split files; "
                         "rerun them on one version (python check_data.py --check)")

    def ms(k):
        xs = [r[k] for r in runs]
        return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None}
    return {"dataset": dataset, "model": model, "seeds": [r["seed"] for r in runs], "missing_seeds": missing,
            "test_precision": ms("test_precision"), "test_recall": ms("test_recall"), "test_f1": ms("test_f1"),
            "dev_f1": ms("dev_f1"), "mode": runs[0]["mode"], "support": runs[0]["support"],
            "images_present": image_coverage(config), "epochs": config.epochs, "text_encoder": config.text_encoder,
            "data": data_version(raw.get("data_hash")),
            "runs": runs}


def data_version(hashes: dict | None) -> str:
    """A row's data version: the first 8 hex digits of each split file's sha256 (train/valid/test)."""
    return "/".join(hashes[s][:8] for s in ("train", "valid", "test") if s in hashes) if hashes else "-"


def pm(x: dict, scale=100.0) -> str:
    return f"{x['mean'] * scale:.2f}" + (f" ± {x['std'] * scale:.2f}" if x["std"] is not None else "")


def markdown(rows: list[dict], hardware: str, note: str = "") -> str:
    out = ["| dataset | model | test images | seeds | test P | test R | test F1 | dev F1 | mode, gold entities | "
           "epochs run (best) | s/epoch | wall/run | data (sha256 train/valid/test) |", "|---" * 13 + "|"]
    for r in rows:
        runs = r["runs"]
        ep = ", ".join(f"{x['epochs_run']} ({x['best_epoch']})" for x in runs)
        walls = [x["wall_s"] for x in runs if x["wall_s"]]
        wall = f"{statistics.median(walls) / 60:.1f} min" if walls else "-"
        missing = ",".join(map(str, r["missing_seeds"]))
        seeds = ",".join(map(str, r["seeds"])) + (f" (missing {missing})" if missing else "")
        out.append(f"| {r['dataset']} | {MODEL_NAMES.get(r['model'], r['model'])} | {r['images_present']} | {seeds} | "
                   f"{pm(r['test_precision'])} | {pm(r['test_recall'])} | **{pm(r['test_f1'])}** | {pm(r['dev_f1'])} | "
                   f"{r['mode']}, {r['support']} | {ep} | {statistics.median(x['epoch_s'] for x in runs):.0f} | "
                   f"{wall} | "
                   f"{r.get('data', '-')} |")
    out.append(f"\nMean ± sample std over seeds, in %. Text encoder: {rows[0]['text_encoder'] if rows else '-'}. "
               f"Hardware: {hardware}" + (f"; {note}" if note else "") + ".")
    older = {}  # rows kept from an earlier collection, which may have run elsewhere
    for r in rows:
        if (r.get("hardware", hardware), r.get("note", note)) != (hardware, note):
            shown = f"{r['dataset']} {MODEL_NAMES.get(r['model'], r['model'])}"
            older.setdefault((r["hardware"], r["note"]), []).append(shown)
    for (hw, nt), which in older.items():
        out.append(f"Kept from an earlier collection ({', '.join(which)}): {hw}" + (f"; {nt}" if nt else "") + ".")
    return "\n".join(out)


def ablation_table(csv_files: list[str]) -> str:
    """The ablation table from script/ablation.sh's record files (one per seed): for each experiment, dev and test F1
    (mean ± sample std over its runs) with real images, and the test F1 of the same runs scored with shuffled
    images (test.py --image_control shuffle) beside it."""
    import re
    cells: dict[str, dict[str, list[float]]] = {}
    for path in csv_files:
        for r in csv.DictReader(open(path)):
            exp = re.sub(r"^abl_[^_]+_|_s\d+$", "", r["run_name"])
            c = cells.setdefault(exp, {})
            own = r["image_control"] == "none" or exp.endswith(("shuffle", "blank"))  # as trained (controls too)
            c.setdefault("test" if own else f"test_{r['image_control']}", []).append(float(r["f1"]))
            if own and r["dev_f1"] != "NA":
                c.setdefault("dev", []).append(float(r["dev_f1"]))

    def cell(xs):
        if not xs:
            return "-"
        return f"{statistics.mean(xs) * 100:.2f}" + (f" ± {statistics.stdev(xs) * 100:.2f}" if len(xs) > 1 else "")
    out = ["| experiment | runs | dev F1 | test F1 | test F1, shuffled images at test | image gain (test − shuffled) |",
           "|---|---|---|---|---|---|"]
    order = ["full", "no_residual", "no_preserve", "no_nce", "no_gate", "no_resampler", "fusion_layers_1",
             "fusion_layers_3", "shuffle", "blank", "dual_granularity", "dual_shuffle", "dual_blank", "text_only",
             "text_base", "text_epochs10", "text_head_lr", "text_llrd", "text_mean", "text_frozen_emb", "text_frozen_2",
             "text_dapt", "text_context", "text_default", "text_default_e10", "text_default_attn_drop",
             "text_default_lr1e4", "text_default_bs8", "text_default_fast", "text_default_bs32",
             "text_default_bs32_lr1e4", "text_default_case_input", "text_default_word_mask", "text_default_ema99",
             "text_default_ema995", "text_default_mpnet"]
    for exp, c in sorted(cells.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])):
        gain = (f"{(statistics.mean(c['test']) - statistics.mean(c['test_shuffle'])) * 100:+.2f}"
                if c.get("test") and c.get("test_shuffle") else "-")
        out.append(f"| {exp} | {len(c.get('test', []))} | {cell(c.get('dev', []))} | **{cell(c.get('test', []))}** | "
                   f"{cell(c.get('test_shuffle', []))} | {gain} |")
    return "\n".join(out)


def peer_table(json_files: list[str]) -> str:
    """The peers' rows from peer.py / peer_flair.py --json files: per recipe and dataset, seeds, dev and test F1
    (mean ± sample std, MANGO's scorer), best epochs, median train pass per epoch and test posts/s where recorded."""
    groups: dict[tuple, list[dict]] = {}
    for f in json_files:
        d = json.loads(Path(f).read_text())
        groups.setdefault((d["recipe"], d["dataset"]), []).append(d)

    def ms(xs):
        return f"{statistics.mean(xs) * 100:.2f}" + (f" ± {statistics.stdev(xs) * 100:.2f}" if len(xs) > 1 else "")
    out = ["| peer | dataset | seeds | dev F1 | test F1 | test F1 by seed | best epochs | train s/epoch (median) | "
           "test posts/s |", "|---" * 9 + "|"]
    for (recipe, ds), runs in sorted(groups.items()):
        runs.sort(key=lambda d: d["seed"])
        train_s = statistics.median(e["train_s"] for d in runs for e in d["epochs"])
        pps = [d["test_posts_per_s"] for d in runs if "test_posts_per_s" in d]
        by_seed = ", ".join(f"{d['test']['f1'] * 100:.2f}" for d in runs)
        seeds, epochs = ",".join(str(d["seed"]) for d in runs), ", ".join(str(d["best_epoch"]) for d in runs)
        out.append(f"| {recipe} | {ds} | {seeds} | {ms([d['dev_f1'] for d in runs])} | "
                   f"**{ms([d['test']['f1'] for d in runs])}** | {by_seed} | {epochs} | {train_s:.0f} | "
                   + (f"{statistics.median(pps):.0f} |" if pps else "- |"))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--datasets", nargs="+", default=["twitter2017", "twitter2015", "demo"], help="datasets to collect")
    ap.add_argument("--models", nargs="+", default=list(MODEL_NAMES), help="model keys of script/reproduce.sh")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds to collect")
    ap.add_argument("--save_dir", default=str(ROOT / "save_models"), help="folder of run directories")
    ap.add_argument("--out_dir", default=str(ROOT / "results"), help="where the JSON and Markdown go")
    ap.add_argument("--note", default="",
                    help="how the runs were scheduled (reproduce.sh: runs at a time, threads each)")
    ap.add_argument("--ablation", nargs="+", default=[], help="script/ablation.sh record CSVs: print their table only")
    ap.add_argument("--peers", nargs="+", default=[],
                    help="peer.py / peer_flair.py --json files: print their table only")
    args = ap.parse_args(argv)
    if args.peers:
        print(peer_table(args.peers))
        return
    if args.ablation:
        print(ablation_table(args.ablation))
        return
    from bench import hardware
    hw = hardware(threads=False)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    every = []
    for ds in args.datasets:
        rows = [r for m in args.models if (r := collect(Path(args.save_dir), ds, m, args.seeds))]
        if not rows:
            print(f"{ds}: no finished runs")
            continue
        for r in rows:
            r["note"], r["hardware"] = args.note, hw
        # rows of models not collected now are kept from the file, with their own hardware and note
        old = out / f"{ds}.json"
        if old.is_file():
            prev = json.loads(old.read_text())
            got = {r["model"] for r in rows}
            kept = [{"note": prev.get("note", ""), "hardware": prev.get("hardware", ""), **r}
                    for r in prev.get("rows", []) if r["model"] not in got]
            rows = sorted(kept + rows,
                          key=lambda r: list(MODEL_NAMES).index(r["model"]) if r["model"] in MODEL_NAMES else 99)
        (out / f"{ds}.json").write_text(json.dumps({"hardware": hw, "note": args.note, "rows": rows}, indent=1))
        (out / f"{ds}.md").write_text(markdown(rows, hw, args.note) + "\n")
        every += rows
    if every:
        print(markdown(every, hw, args.note))


if __name__ == "__main__":
    cli(main)
