"""Score a trained run on a split, from its own config and label map.

    python test.py --save_name NAME [--split test|valid|train|valid,test] [--device cpu] [--batch_size 32]
                   [--eval_mode conlleval|strict] [--record_file results.csv] [--plots [--out_dir DIR]]
                   [--image_control shuffle|blank]   # score with wrong or blank images (attribution control)

Prints the per-type and [Overall] lines, writes <split>_report.json and <split>_predictions.conll into the
run directory (<split>_report.<control>.json and so on when --image_control differs from the run's own), and
appends one CSV row to --record_file when given. The model is rebuilt from the run's config.json and
label_map.json (never from the current flags or the test data).
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import dataloader as D
from config import ConfigError, cli, config_from_dict, get_config, given_flags
from metrics import evaluate, format_report
from model import build_model, load_tokenizer

RUNTIME_FLAGS = {"split", "device", "batch_size", "eval_mode", "record_file", "data_dir", "image_root", "cache_dir",
                 "image_control",
                 "num_workers", "amp", "save_dir", "lenient_data", "allow_download", "plots", "out_dir"}
RUN_FILES = ("config.json", "label_map.json", "model.pt")


def load_checkpoint(path) -> dict:
    """A checkpoint saved by train.py, loaded without executing anything (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: checkpoint not found") from None
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise ConfigError(f"{path}: not a readable MANGO checkpoint ({type(e).__name__}); retrain or pick another run") from None


def read_run_json(path) -> dict:
    """A run's JSON file (config.json, label_map.json) as a dict: plain JSON, nothing in a run directory is
    executed or unpickled; one-line errors when it is missing or damaged."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; it is written with every run, so the run directory is damaged") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise ConfigError(f"{path}: not valid JSON ({where}); the run directory is damaged: retrain, or restore the "
                          "file from a copy") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: not a JSON object of flags; the run directory is damaged")
    return d


def check_encoders(config, where) -> None:
    """The encoder directories a saved run names must still exist (a moved folder otherwise fails deep inside
    transformers); `where` is the run's config.json, named in the one-line error."""
    from model import MODELS
    checks = [("text_encoder", "minilm")]
    if MODELS.get(config.model, (None,))[0] and config.use_image and not config.use_dual_granularity:
        checks.append(("image_encoder", "efficientnet_lite0"))
    for flag, builtin in checks:
        v = getattr(config, flag)
        if v != builtin and not config.allow_download and not Path(v).is_dir():
            raise ConfigError(f"{where}: {flag} {v}: no such directory; put the encoder back there or edit {flag} "
                              "in config.json")


def runs_with(save_dir, file: str, shown: int = 8) -> str:
    """The run directories under save_dir that hold `file`, newest first, at most `shown` named (for messages)."""
    runs = sorted(Path(save_dir).glob(f"*/{file}"), key=lambda p: p.stat().st_mtime, reverse=True)
    names = ", ".join(p.parent.name for p in runs[:shown])
    return "none" if not runs else names + (f" and {len(runs) - shown} more" if len(runs) > shown else "") + \
        (" (newest first)" if len(runs) > 1 else "")


def load_run(save_dir, name: str, overrides=None):
    """(config, label_map, model) of a run directory; one-line errors for missing pieces."""
    run = Path(save_dir) / name
    for f in RUN_FILES:
        if not (run / f).is_file():
            raise ConfigError(f"--save_name {name}: {run / f} is missing; runs with a model.pt in {save_dir}: "
                              f"{runs_with(save_dir, 'model.pt')}")
    config = config_from_dict(read_run_json(run / "config.json"))
    for k, v in (overrides or {}).items():
        setattr(config, k, v)
    check_encoders(config, run / "config.json")
    label_map = D.LabelMap.load(run / "label_map.json")
    ckpt = load_checkpoint(run / "model.pt")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ConfigError(f"{run / 'model.pt'}: not a MANGO checkpoint (no model weights); retrain or pick another run")
    model = build_model(config, len(label_map))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"{run / 'model.pt'}: does not match the model in {run / 'config.json'} "
                          f"({str(e).splitlines()[0][:120]}); the files come from different runs") from None
    return config, label_map, model, ckpt


@torch.no_grad()
def predict(model, dataset: D.MNERDataset, config, label_map: D.LabelMap, device, amp=None,
            rank: int = 0, world: int = 1) -> list[list[str]]:
    """Word tags for every post of `dataset`, full length: words past --max_len are predicted O.

    With world > 1 (torchrun, see train.evaluate_gathered) only this rank's shard of the batches is predicted;
    the other posts stay None.
    """
    model.eval()
    loader = D.make_loader(dataset, config, train=False, rank=rank, world=world)
    preds: list[list[str] | None] = [None] * len(dataset)
    ctx = amp or torch.no_grad
    for batch in tqdm(loader, desc=f"eval {dataset.name}", leave=False, dynamic_ncols=True, disable=rank != 0):
        batch = {k: v.to(device) for k, v in batch.items()}
        with ctx():
            ids = model.decode(batch)
        for i, row in zip(batch["index"].tolist(), ids):
            tags = label_map.decode(row)
            preds[i] = tags + ["O"] * (len(dataset.posts[i].tokens) - len(tags))
    return preds


def evaluate_split(model, dataset, config, label_map, device, amp=None):
    preds = predict(model, dataset, config, label_map, device, amp)
    return evaluate([p.tags for p in dataset.posts], preds, config.eval_mode), preds


def write_predictions(path, posts, preds):
    """CoNLL: IMGID line, then `word<TAB>gold<TAB>pred` per word, blank line between posts."""
    with open(path, "w", encoding="utf-8") as f:
        for p, pr in zip(posts, preds):
            f.write(f"IMGID:{p.imgid or ''}\n")
            for w, g, t in zip(p.tokens, p.tags, pr):
                f.write(f"{w}\t{g}\t{t}\n")
            f.write("\n")


RECORD_FIELDS = ["run_name", "split", "mode", "image_control", "dev_f1", "acc", "precision", "recall", "f1",
                 "per_f1", "loc_f1", "org_f1", "misc_f1"]


def record(path, name: str, results: dict, config):
    """Append one CSV row for a run (header written once): the scores of the last split scored, and next to them
    the dev (valid) F1 when that split was scored too, so rows can be chosen on dev and read on test."""
    split = list(results)[-1]
    res = results[split]
    row = {"run_name": name, "split": split, "mode": res["mode"], "image_control": config.image_control,
           "dev_f1": f"{results['valid']['f1']:.4f}" if "valid" in results else "NA",
           "acc": f"{res['accuracy']:.4f}", "precision": f"{res['precision']:.4f}", "recall": f"{res['recall']:.4f}",
           "f1": f"{res['f1']:.4f}", **{f"{t.lower()}_f1": f"{v['f1']:.4f}" for t, v in res["per_type"].items()}}
    p = Path(path)
    new = not p.exists() or p.stat().st_size == 0
    with open(p, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RECORD_FIELDS + sorted(set(row) - set(RECORD_FIELDS)), restval="NA")
        if new:
            w.writeheader()
        w.writerow(row)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cli = get_config(argv)  # flag values are checked (--split) before anything loads
    if not cli.save_name:
        raise ConfigError("--save_name is required: the run directory under --save_dir to score")
    overrides = {k: getattr(cli, k) for k in given_flags(argv) & RUNTIME_FLAGS}
    config, label_map, model, ckpt = load_run(cli.save_dir, cli.save_name, overrides)
    trained_control = read_run_json(Path(cli.save_dir) / cli.save_name / "config.json").get("image_control", "none")
    from train import amp_context, pick_device
    device = pick_device(config.device)
    model.to(device)
    tokenizer = load_tokenizer(config)
    vision = model.vision if model.uses_image and config.use_image else None
    amp = amp_context(config, device)[0] if config.amp else None
    run = Path(config.save_dir) / cli.save_name
    best = ckpt["epoch"] + 1 if "epoch" in ckpt else "?"
    # a control scoring (--image_control other than the run's own) never overwrites the run's own reports
    tag = f".{config.image_control}" if config.image_control != trained_control else ""
    results = {}
    for split in config.split.split(","):
        posts = D.load_split(config, split)
        ds = D.make_dataset(config, split, posts, tokenizer, label_map, vision)
        print(ds.describe())
        t0 = time.time()
        res, preds = evaluate_split(model, ds, config, label_map, device, amp)
        dt = time.time() - t0
        (run / f"{split}_report{tag}.json").write_text(json.dumps(res, indent=1))
        write_predictions(run / f"{split}_predictions{tag}.conll", posts, preds)
        print(f"{cli.save_name} on {config.dataset_name}/{split} (best dev epoch {best}), {len(posts) / dt:.0f} posts/s:")
        print(format_report(res))
        results[split] = res
    if config.record_file:
        record(config.record_file, cli.save_name, results, config)
    if config.plots:
        from plots import run_plots
        for f in run_plots(run, split, Path(config.out_dir or run) / "plots"):
            print(f"wrote {f}")
    return res


if __name__ == "__main__":
    cli(main)
