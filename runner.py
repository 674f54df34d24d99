"""What the entry points share: device, mixed precision, run directories, the inference loop
(run_batches), training's scoring of a split, writing predictions. It imports no entry point (tests/test_imports.py).
"""
from __future__ import annotations

import functools
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import dataloader as D
from config import TOOL_FLAGS, ConfigError, config_from_dict, get_config
from metrics import evaluate
from model import MODELS, build_model

# flags test.py / predict.py / export.py take from the command line over the run's config.json (they change no
# weights); predict.py's --use_image applies after the model is built
RUNTIME_FLAGS = (TOOL_FLAGS["test"] | TOOL_FLAGS["predict"] | TOOL_FLAGS["export"]) - {"save_name", "use_image"}
RUN_FILES = ("config.json", "label_map.json", "model.pt")


# ----------------------------------------------------------------------------- device, mixed precision

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def bf16_vector_units() -> bool:
    """Whether this CPU has vector units for bf16 (oneDNN's check: AVX-512 on x86, BF16 on Arm; it pays most with
    AVX512-BF16 or AMX). Without them (an AVX2-only x86) bf16 is emulated: a train step took 20x its fp32 time."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check: say nothing
        return True


@functools.lru_cache(maxsize=None)
def cpu_bf16_ok() -> bool:
    """bf16_vector_units(), asked once per process: where the answer is no, its one warning line comes once."""
    ok = bf16_vector_units()
    if not ok:
        print(f"warning: --amp: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no fast bf16, so bf16 "
              "autocast runs many times slower than fp32 here; pass --no-amp on this machine", file=sys.stderr)
    return ok


def amp_context(config, device):
    """(autocast context factory, GradScaler or None): bf16 autocast where supported, else fp16 with a GradScaler
    on CUDA; (nullcontext, None) without --amp. A CPU without fast bf16 gets a one-line warning (once)."""
    if not config.amp:
        return nullcontext, None
    if device.type == "cpu":
        cpu_bf16_ok()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


# ----------------------------------------------------------------------------- run directories

def load_checkpoint(path) -> dict:
    """A checkpoint saved by train.py, loaded without executing anything (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: checkpoint not found") from None
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise ConfigError(f"{path}: not a readable MANGO checkpoint ({type(e).__name__}); "
                          "retrain or pick another run") from None


def read_run_json(path) -> dict:
    """A run's JSON file (config.json, label_map.json) as a dict; one-line errors when it is missing or damaged."""
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
    transformers); `where`: the run's config.json, for the error."""
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


def localize(config, run: Path, given: set[str]) -> None:
    """A saved run works where it lies: its --save_dir becomes the folder it was found in, and its data_dir, cache_dir
    and image_root of the machine it was trained on, when not `given` and not folders here, this checkout's defaults."""
    config.save_dir, defaults = str(run.parent), get_config(check=False)
    for k in ("data_dir", "cache_dir", "image_root"):
        v = getattr(config, k)
        if k in given or not v or Path(v).is_dir() or v == getattr(defaults, k):
            continue
        setattr(config, k, getattr(defaults, k))
        shown = getattr(defaults, k) or "the dataset's own image folder"
        print(f"note: {run.name}: its {k} {v} is not on this machine; using {shown} (--{k} chooses another)")


def load_run(save_dir, name: str, overrides=None):
    """(config, label_map, model, checkpoint) of a run directory, `overrides` (runtime flags) applied."""
    run, overrides = Path(save_dir) / name, overrides or {}
    for f in RUN_FILES:
        if not (run / f).is_file():
            raise ConfigError(f"--save_name {name}: {run / f} is missing; runs with a model.pt in {save_dir}: "
                              f"{runs_with(save_dir, 'model.pt')}")
    config = config_from_dict(read_run_json(run / "config.json"), str(run / "config.json"))
    for k, v in overrides.items():
        setattr(config, k, v)
    localize(config, run, set(overrides))
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


# ----------------------------------------------------------------------------- predicting and scoring a split

@torch.no_grad()
def run_batches(model, dataset: D.MNERDataset, config, device, each, amp=None, desc: str = "predict") -> list:
    """The one inference loop of the tools: each(batch) -> one output per item of the batch, for every batch of
    `dataset` in eval order (labels dropped), under amp; -> per post (windows merged: dataset.merge)."""
    model.eval()
    out: list = [None] * len(dataset)
    for batch in tqdm(D.make_loader(dataset, config, train=False), desc=desc, unit="batch", leave=False,
                      dynamic_ncols=True):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with (amp or nullcontext)():
            rows = each(batch)
        for k, x in zip(batch["index"].tolist(), rows):
            out[k] = x
    return dataset.merge(out)


def predict(model, dataset: D.MNERDataset, config, label_map: D.LabelMap, device, amp=None) -> list[list[str]]:
    """Word tags of every word of every post of `dataset` (long posts read from their windows)."""
    return run_batches(model, dataset, config, device, lambda b: [label_map.decode(r) for r in model.decode(b)],
                       amp, f"eval {dataset.name}")


def evaluate_split(model, dataset, config, label_map, device, amp=None):
    """(scores, word tags per post) of a split under --eval_mode."""
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
