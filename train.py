"""Train a MANGO model: config -> data -> model -> AdamW + schedule -> epochs (dev selection) -> test once.

    python train.py --dataset_name demo --model MNER --epochs 10
    python train.py --continue_train_name <run> [--epochs 14]   # resume from <run>/last.pt (a new --epochs
                                                                # stretches or shortens the lr decay only)

The run directory save_models/<run>/ holds config.json, label_map.json, model.pt (best on dev), last.pt (everything
needed to resume), metrics.jsonl (a line per epoch), steps.jsonl, test_report.json and test_predictions.conll.
"""
from __future__ import annotations

import ast
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from datetime import datetime
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import dataloader as D
from config import (IMAGE_MODELS, ConfigError, cli, config_from_dict, get_config, given_flags, resolve_auto,
                    save_config, RESUME_MAY_CHANGE, RESUME_REFUSED)
from distill import teacher_dir, teacher_targets, unlabelled_posts
from model import build_model, build_teacher, check_flags, load_tokenizer
from runner import (amp_context, check_encoders, evaluate_split, load_checkpoint, localize, pick_device,
                    read_run_json, runs_with, write_predictions)

RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "best", "bad_epochs", "step", "stopped", "rng", "schedule")
NO_DECAY = ("bias", "norm", "ln", "LayerNorm", "crf.", "alpha", "queries", "_pos")


# ----------------------------------------------------------------------------- run set-up

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a run draws from, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {"python": repr(random.getstate()), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict):
    random.setstate(ast.literal_eval(s["python"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available():  # a run saved with more GPUs visible restores those there are
        for i, state in enumerate(s["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)


def new_run_dir(config, resume: bool = False) -> Path:
    root = Path(config.save_dir)
    name = config.save_name or "_".join(x for x in (datetime.now().strftime("%Y%m%d-%H%M%S"), config.dataset_name,
                                                    config.model, config.ex_name) if x)
    if config.save_name and not resume and any((root / name / f).exists()
                                               for f in ("metrics.jsonl", "last.pt", "model.pt")):
        raise ConfigError(f"--save_name {name}: {root / name} already holds a run; resume it with "
                          f"--continue_train_name {name}, pick another --save_name, or delete that directory")
    run, k = root / name, 2
    while not config.save_name and run.exists():  # collision-safe for generated names
        run, k = root / f"{name}_{k}", k + 1
    try:
        run.mkdir(parents=True, exist_ok=True)
        (run / ".write_test").write_text("ok")
        (run / ".write_test").unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run}: {e.strerror}; pass a writable --save_dir")
    return run


def atomic_save(obj, path: Path):
    """torch.save to <path>.tmp, flushed to disk, then renamed over path: a kill, a full disk or a read-only folder
    leaves the previous file whole. A failed write is one line (ConfigError) naming the file and the reason."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # a Python file: write errors arrive as OSError (ENOSPC, EROFS, EACCES, ...)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports some write failures as RuntimeError
        if tmp.is_file() or tmp.is_symlink():
            tmp.unlink()
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"write failed ({str(e).splitlines()[0][:100]})"
        with suppress(OSError):
            why += f", {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        raise ConfigError(f"could not write {path}: {why}; {path.name} is left as it was. Free space or pass a "
                          f"writable --save_dir, then resume with --continue_train_name {path.parent.name}") from None


class Tracker:
    """SwanLab when enabled (online with SWANLAB_API_KEY, else local files in the run dir), always steps.jsonl."""

    def __init__(self, config, run: Path):
        self.sw = None
        self.steps = run / "steps.jsonl"  # per-step losses for plots.py, whatever SwanLab does
        mode = config.swanlab_mode
        if mode == "auto":
            mode = "online" if os.environ.get("SWANLAB_API_KEY") else "local"
        if mode != "disabled":
            import swanlab
            self.sw = swanlab
            # "local" = SwanLab's offline mode: files under the run dir, no login, `swanlab sync` uploads later
            swanlab.init(project=config.ex_project, name=run.name, config=vars(config),
                         mode="offline" if mode == "local" else mode, log_dir=str(run / "swanlog"))

    def log(self, data: dict, step: int):
        if self.sw is not None:
            self.sw.log({k: v for k, v in data.items() if isinstance(v, (int, float))}, step=step)

    def log_step(self, losses: dict, step: int):
        """A line of steps.jsonl (a resumed run redoes the steps after its checkpoint: readers keep the last)."""
        with open(self.steps, "a") as f:
            f.write(json.dumps({"step": step, **losses}) + "\n")

    def finish(self):
        if self.sw is not None:
            self.sw.finish()


# ----------------------------------------------------------------------------- optimiser

def base_lrs(config) -> dict:
    """Learning rate of each parameter group base (model.param_groups)."""
    return {"text": config.text_lr, "vision": config.backbone_lr, "head": config.head_lr, "crf": config.crf_lr,
            "rest": config.fusion_lr}


def lr_plan(config, steps: int) -> dict:
    """The learning-rate schedule of a new run over `steps` optimiser steps (see lr_factor); saved in last.pt."""
    warm = int(config.warmup_prop * steps)
    return {"epochs": config.epochs, "total": steps, "warmup": warm, "start": warm, "start_value": 1.0}


def lr_factor(plan: dict):
    """factor(t) of optimiser step t: linear warm-up over the first plan["warmup"] steps, then linear decay from
    plan["start_value"] at step plan["start"] to 0 at step plan["total"]. A new run decays from 1 at the end of
    warm-up; a resumed run whose --epochs changed decays from where it stood (steps before "start" are done)."""
    warm, total, start, value = plan["warmup"], plan["total"], plan["start"], plan["start_value"]

    def factor(t):
        if t < warm:
            return (t + 1) / (warm + 1)
        return max(0.0, value * (total - t) / max(1, total - start))
    return factor


def replan(plan: dict, step: int, epochs: int, total: int) -> dict:
    """The schedule of a run resumed after `step` optimiser steps with --epochs `epochs` (`total` steps in all):
    warm-up is kept; the decay now ends at `total`, starting from the factor reached at `step`. A run that had
    finished its decay (factor 0) and gets more epochs goes on where a run planned for `epochs` would stand."""
    if total == plan["total"]:
        return {**plan, "epochs": epochs}
    if step <= plan["warmup"]:  # still warming up: warm-up as planned, then the whole decay to the new end
        return {**plan, "epochs": epochs, "total": total}
    value = lr_factor(plan)(step)
    if value == 0 and total > step:
        value = (total - step) / max(1, total - plan["warmup"])
    return {"epochs": epochs, "total": total, "warmup": plan["warmup"], "start": step, "start_value": value}


def optimizer_steps(config, n_batches: int) -> int:
    """Optimiser steps of the whole run: --epochs x the epoch's n_batches in groups of --gradient_accumulation_steps."""
    return config.epochs * math.ceil(n_batches / config.gradient_accumulation_steps)


def make_optimizer(model, config, steps: int | None = None, plan: dict | None = None):
    """AdamW with a group per base rate (base_lrs) and weight decay (none for biases and norm layers), and a LambdaLR
    schedule: lr_plan(config, steps), or `plan` when given."""
    lrs = base_lrs(config)
    groups = []
    for name, params in model.param_groups(crf_group=config.crf_lr >= 0).items():
        for decay in (True, False):
            ps = [p for n, p in params if (not any(k in n for k in NO_DECAY) and p.dim() > 1) == decay]
            if ps:
                groups.append({"params": ps, "lr": lrs[name], "name": f"{name}{'' if decay else '_nodecay'}",
                               "weight_decay": config.weight_decay_rate if decay else 0.0, "base": name})
    # the fused kernel: one pass per tensor instead of a loop over parameters
    opt = torch.optim.AdamW(groups, lr=config.fusion_lr, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(plan or lr_plan(config, steps)))


def training_state(opt, sched, scaler) -> dict:
    """Optimiser, scheduler and fp16 loss-scaler state for last.pt (scaler None: no --amp fp16 here)."""
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None}


def restore_training_state(ckpt: dict, opt, sched, scaler) -> None:
    """The inverse of training_state; a checkpoint without scaler state leaves the scaler at its initial scale."""
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])


# ----------------------------------------------------------------------------- the loop

def skip_bad_step(bad_run: list, config, epoch: int, what: str):
    """Count a step skipped for a non-finite loss or gradient (bad_run = [in a row, in all]); one-line stop after
    --max_bad_steps in a row."""
    bad_run[0] += 1
    bad_run[1] += 1
    if bad_run[0] >= config.max_bad_steps:
        raise ConfigError(f"{bad_run[0]} non-finite {what} in a row at epoch {epoch + 1} ({bad_run[1]} skipped in all)"
                          f"; lower the learning rates (--fusion_lr {config.fusion_lr}, --head_lr {config.head_lr}, "
                          f"--text_lr {config.text_lr}) or raise --max_bad_steps {config.max_bad_steps}")


def train_step(model, group: list[dict], opt, sched, config, device, epoch: int, amp, scaler, bad_run: list,
               ema=None) -> dict:
    """One optimiser step over an accumulation group of batches (no gradient crosses epochs); bench.py times it.
    A non-finite loss skips the group's step, the rest of the group unread; so does a non-finite gradient norm
    (skip_bad_step), except under fp16 loss scaling, where it is the scaler's overflow: the scale is lowered and the
    step skipped, as GradScaler.step does. A step taken also updates `ema` when given. Returns {"losses": [(loss,
    {part: value}) of each finite batch], "norm": the gradient norm before clipping, or None if no step}."""
    losses = []
    for batch in group:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp():
            out = model(batch, epoch=epoch)
        loss = out["loss"].float()
        if not torch.isfinite(loss.detach()):
            opt.zero_grad(set_to_none=True)
            skip_bad_step(bad_run, config, epoch, "losses")
            return {"losses": losses, "norm": None}
        (scaler.scale(loss / len(group)) if scaler else loss / len(group)).backward()
        losses.append((loss.item(), {k: v.item() for k, v in out["parts"].items()}))
    if scaler:
        scaler.unscale_(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.update()
        else:
            skip_bad_step(bad_run, config, epoch, "gradients")
        return {"losses": losses, "norm": None}
    bad_run[0] = 0
    if config.clip_grad > 0:
        torch.nn.utils.clip_grads_with_norm_(params, config.clip_grad, norm)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    return {"losses": losses, "norm": norm.item()}


class WeightEMA:
    """Exponential moving average of the trainable weights (--ema_decay d) over the optimiser steps taken, from 0 and
    read bias-corrected (avg_n / (1 - d^n)), so the initial weights carry no weight. Buffers stay live. Inside
    `with ema.averaged():` the model holds the average; the live weights come back on leaving, whatever happens.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self):
        self.n += 1
        torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1 - self.decay)

    @contextmanager
    def averaged(self):
        if not self.n:  # no step yet: the live weights are all there is
            yield
            return
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, torch._foreach_div(self.avg, 1 - self.decay ** self.n))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, live)

    def state_dict(self) -> dict:
        return {"avg": self.avg, "n": self.n}

    @torch.no_grad()
    def load_state_dict(self, s: dict):
        if len(s["avg"]) != len(self.avg) or any(a.shape != b.shape for a, b in zip(s["avg"], self.avg)):
            raise ValueError("the averaged weights do not match the model's trainable parameters")
        torch._foreach_copy_(self.avg, s["avg"])
        self.n = s["n"]


def train_epoch(model, loader, opt, sched, config, device, epoch, amp, scaler, tracker, step0, bad_run, ema=None):
    """One epoch of train_step; returns ({loss term: mean over the epoch's finite batches}, optimiser steps so far)."""
    model.train()
    sums, step, seen = {}, step0, 0
    opt.zero_grad(set_to_none=True)
    # a with-block: the bar is closed (its line cleared) before an error line is printed, as for a loop over tqdm
    with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, dynamic_ncols=True) as bar:
        batches = iter(loader)  # in groups of --gradient_accumulation_steps, the last one maybe shorter
        while group := list(islice(batches, config.gradient_accumulation_steps)):
            r = train_step(model, group, opt, sched, config, device, epoch, amp, scaler, bad_run, ema)
            bar.update(len(group))
            for loss, parts in r["losses"]:
                for k, v in [*parts.items(), ("loss", loss)]:
                    sums[k] = sums.get(k, 0.0) + v
            seen += len(r["losses"])
            if r["norm"] is None:
                continue
            step += 1
            loss, parts = r["losses"][-1]
            logged = {**parts, "loss": loss, "grad_norm": r["norm"]}
            tracker.log({**{f"train/{k}": v for k, v in logged.items()},
                         **{f"lr/{g['name']}": g["lr"] for g in opt.param_groups}}, step)
            tracker.log_step(logged, step)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    return {k: v / max(1, seen) for k, v in sums.items()}, step


# ----------------------------------------------------------------------------- the run's steps

def resolve_resume(argv: list[str]):
    """(config, resume): the flags, and with --continue_train_name the run's own config (flags that may change
    on resume applied over it) and its last.pt; resume is None for a new run."""
    config = get_config(argv, tool="train")
    if not config.continue_train_name:
        check_flags(config, given_flags(argv))
        return config, None
    src = Path(config.save_dir) / config.continue_train_name
    if not (src / "last.pt").is_file():
        raise ConfigError(f"--continue_train_name {config.continue_train_name}: {src / 'last.pt'} not found; "
                          f"runs in {config.save_dir}: {runs_with(config.save_dir, 'last.pt')}")
    for f in ("config.json", "label_map.json"):
        if not (src / f).is_file():
            raise ConfigError(f"--continue_train_name {config.continue_train_name}: {src / f} is missing; it is "
                              "written with every run, so this run directory is damaged: start a new run")
    saved = config_from_dict(read_run_json(src / "config.json"), str(src / "config.json"),
                             resume=f"--continue_train_name {config.continue_train_name}")
    # the flags given now over the run's own, an auto value (-1) read for the run's model
    given, written = given_flags(argv) - {"continue_train_name"}, get_config(argv, False, "train", auto=False)
    merged = copy.copy(saved)
    vars(merged).update({k: getattr(written, k) for k in given})
    resolve_auto(merged)
    for k in given:
        new, old = getattr(merged, k), getattr(saved, k)
        if new != old and new != getattr(written, k):  # an auto value: what it stands for depends on how the run began
            raise ConfigError(f"--{k} {getattr(written, k)}: an auto value on resume; the run uses --{k} {old}: "
                              "give a value, or drop the flag to keep it")
        if k in RESUME_REFUSED and new != old:
            raise ConfigError(f"--{k} {new}: the run being resumed used --{k} {old}; "
                              + RESUME_REFUSED[k].format(new=new, old=old))
        if k not in RESUME_MAY_CHANGE and new != old:
            raise ConfigError(f"--{k} differs from the run being resumed ({old!r}); "
                              "the model structure comes from that run: drop the flag or start a new run")
    merged.continue_train_name = merged.save_name = config.continue_train_name
    localize(merged, src, given)
    check_encoders(merged, src / "config.json")
    resume = load_checkpoint(src / "last.pt")
    missing = [k for k in RESUME_KEYS if k not in resume] if isinstance(resume, dict) else list(RESUME_KEYS)
    if missing:
        raise ConfigError(f"{src / 'last.pt'}: not a resumable checkpoint (no {', '.join(missing)}); last.pt is "
                          "written after every epoch by this version, model.pt holds the best weights only: score "
                          "the run with test.py or start a new one")
    return merged, resume


def load_data(config, resume):
    """(posts per split, label map, tokenizer); a resumed run keeps its own label map."""
    if config.teacher_run:
        teacher_dir(config)  # a missing teacher is refused before any run directory is made
    posts = {s: D.load_split(config, s) for s in ("train", "valid", "test")}
    if (overlaps := D.split_overlaps(posts)) and not config.allow_split_overlap:
        raise D.DataError(f"--dataset_name {config.dataset_name}: {'; '.join(overlaps)}: dev or test would score posts "
                          "seen elsewhere; fix the release (python check_data.py --check) "
                          "or pass --allow_split_overlap")
    config.data_hash = D.split_hashes(config)  # stored in config.json: which version of the data the run used
    label_map = (D.LabelMap.load(Path(config.save_dir) / config.continue_train_name / "label_map.json") if resume
                 else D.LabelMap.from_posts(posts["train"]))
    return posts, label_map, load_tokenizer(config)


def text_path_settings(config, argv, train_posts, say) -> None:
    """An image model whose training posts have no usable image trains only its text path: its auto settings
    (tag scheme, head rate, weight average) become the text path's."""
    if not (config.model in IMAGE_MODELS and config.use_image) or D.any_image(config, train_posts):
        return
    # the same flags resolved as without images: only the auto values that depend on it can differ
    text = vars(get_config(argv, tool="train", images=False))
    changed = {k: v for k, v in text.items() if v != getattr(config, k)}
    if changed:
        vars(config).update(changed)
        say(f"no training post has an image: {config.model} trains its text path with the text path's settings ("
            + ", ".join(f"--{k} {v}" for k, v in changed.items()) + ")")


def build(config, resume, posts, label_map, tokenizer, device):
    """The model (built on CPU with the run's seed, so every init repeats), the run directory with its config and
    label map, and the datasets (frozen-vision features cached). Returns (model, run dir, datasets)."""
    torch.manual_seed(config.seed)
    model = build_model(config, len(label_map))
    run = new_run_dir(config, resume=resume is not None)
    save_config(config, run / "config.json")
    label_map.save(run / "label_map.json")
    vision = model.vision.to(device) if model.uses_image and config.use_image else None
    teacher = build_teacher(config)  # --vision_distill_lambda: its cached features are the train split's targets
    posts, targets = dict(posts), None
    if config.teacher_run:  # the student also learns the teacher's tag marginals, on unlabelled posts too
        posts["train"] = posts["train"] + unlabelled_posts(config, posts)
        targets = teacher_targets(config, posts["train"], label_map, device)
    ds = {s: D.make_dataset(config, s, p, tokenizer, label_map, vision, train=s == "train",
                            teacher=teacher and teacher.to(device), iob2_labels=s == "train" and model.iob2_targets,
                            targets=targets if s == "train" else None)
          for s, p in posts.items()}
    for d in ds.values():
        print(d.describe())
    return model.to(device), run, ds


def start_state(config, resume, model, train_loader, device, run):
    """Optimiser, schedule, amp, and where the loop starts: fresh, or restored from last.pt, where the warm-up and
    the decay reached so far are kept, a new --epochs only moves where the decay ends (replan), and the
    learning-rate flags given now apply to the remaining steps."""
    total = optimizer_steps(config, len(train_loader))
    state = SimpleNamespace(epoch=0, best=-1.0, bad_epochs=0, step=0, plan=lr_plan(config, total))
    if resume:
        old = resume["schedule"]
        # a run that had stopped early only redoes the final test
        state = SimpleNamespace(epoch=config.epochs if resume["stopped"] else resume["epoch"] + 1,
                                best=resume["best"], bad_epochs=resume["bad_epochs"], step=resume["step"],
                                plan=replan(old, resume["step"], config.epochs, total))
    opt, sched = make_optimizer(model, config, plan=state.plan)
    amp, scaler = amp_context(config, device)
    if not resume:
        return state, opt, sched, amp, scaler
    run_src = Path(config.save_dir) / config.continue_train_name
    try:
        model.load_state_dict(resume["model"])
        restore_training_state(resume, opt, sched, scaler)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{run_src / 'last.pt'}: does not match the model in {run_src / 'config.json'} "
                          f"({str(e).splitlines()[0][:120]}); the files come from different runs") from None
    # the optimiser state brings back each group's old settings: the rate and decay flags given now apply
    lrs = base_lrs(config)
    sched.base_lrs = [lrs[g["base"]] for g in opt.param_groups]
    for g, base in zip(opt.param_groups, sched.base_lrs):
        g["lr"] = base * sched.lr_lambdas[0](sched.last_epoch)
        g["weight_decay"] = 0.0 if g["name"].endswith("_nodecay") else config.weight_decay_rate
    if state.plan["total"] != old["total"] and state.epoch < config.epochs:
        restart = lr_factor(old)(state.step) == 0 and state.plan["start_value"] > 0
        print(f"note: --epochs {old['epochs']} -> {config.epochs}: the learning rate now decays to 0 at step "
              f"{state.plan['total']} instead of {old['total']}; warm-up ({old['warmup']} steps) unchanged"
              + (f"; the run had finished its decay, so it goes on from factor {state.plan['start_value']:.3f}, where "
                 f"a run planned for {config.epochs} epochs would stand at step {state.step}" if restart else ""))
    set_rng_state(resume["rng"])
    if "rng_ranks" in resume:  # last.pt of a multi-process run (an earlier version): its global batch was larger
        n = len(resume["rng_ranks"])
        print(f"note: {run.name} trained in {n} processes (global batch {n} x --batch_size); it goes on in one "
              f"process at --batch_size {config.batch_size}")
    # epochs logged after the checkpoint (a kill between the two writes) are redone, so drop their lines, and a line
    # cut short (a full disk)
    log, done = run / "metrics.jsonl", resume["epoch"] + 1
    if log.exists():
        keep = [line for line in log.read_text().splitlines() if logged_epoch(line) <= done]
        log.write_text("".join(line + "\n" for line in keep))
    print(f"resumed {run.name} after epoch {done} (best dev F1 {state.best:.4f})")
    return state, opt, sched, amp, scaler


def logged_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; infinity for a line that is not a whole record."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def improves(config, f1: float, best: float) -> bool:
    """A dev F1 that counts as a gain: more than --min_gain above the best so far."""
    return f1 > best + config.min_gain


def stops_early(config, bad_epochs: int, epoch: int) -> bool:
    """Stop after --patience_epochs epochs without a gain, once --min_epoch_num epochs are done (epoch: 0-based)."""
    return bad_epochs >= config.patience_epochs and epoch + 1 >= config.min_epoch_num


def epoch_row(epoch: int, state, times: tuple, losses: dict, dev: dict, improved: bool, skipped: int) -> dict:
    """metrics.jsonl's line for an epoch; times = (start, train end, dev end)."""
    t0, t1, t2 = times
    return {"epoch": epoch + 1, "step": state.step, "time_s": round(time.time() - t0, 2),
            "train_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2), **{f"train_{k}": v for k, v in losses.items()},
            "dev_precision": dev["precision"], "dev_recall": dev["recall"], "dev_f1": dev["f1"],
            "dev_per_type": {t: {k: v[k] for k in ("precision", "recall", "f1")} for t, v in dev["per_type"].items()},
            "best_dev_f1": max(state.best, dev["f1"]), "improved": improved, "skipped_steps": skipped}


def training_parts(config, model, resume, run, device):
    """(the weight average or None, the tracker); says what trains."""
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay > 0 else None
    if ema is not None and resume:
        try:
            ema.load_state_dict(resume["ema"])
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{Path(config.save_dir) / config.continue_train_name / 'last.pt'}: no usable weight "
                              f"average for --ema_decay {config.ema_decay} ({e}); start a new run") from None
    tracker = Tracker(config, run)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"run {run} | {config.model} on {config.dataset_name} | {n_train / 1e6:.2f}M of {n_params / 1e6:.2f}M "
          f"parameters train | {device}")
    return ema, tracker


def fit(config, model, ds, run, device, resume):
    """The epochs: train, score dev, keep the best model.pt, write last.pt and a metrics.jsonl line per epoch,
    stop early after --patience_epochs epochs without a dev gain (once --min_epoch_num is reached)."""
    train_loader = D.make_loader(ds["train"], config, train=True)
    state, opt, sched, amp, scaler = start_state(config, resume, model, train_loader, device, run)
    ema, tracker = training_parts(config, model, resume, run, device)
    bad_run = [0, 0]  # non-finite steps skipped: in a row, in all
    for epoch in range(state.epoch, config.epochs):
        t0, skipped = time.time(), bad_run[1]
        train_loader.batch_sampler.set_epoch(epoch)
        ds["train"].epoch = epoch
        losses, state.step = train_epoch(model, train_loader, opt, sched, config, device, epoch, amp, scaler, tracker,
                                         state.step, bad_run, ema)
        skipped, t1 = bad_run[1] - skipped, time.time()
        # dev and model.pt see the averaged weights (--ema_decay); training goes on from the live ones
        with ema.averaged() if ema is not None else nullcontext():
            dev = evaluate_split(model, ds["valid"], config, ds["valid"].label_map, device, amp)[0]
            t2 = time.time()
            improved = improves(config, dev["f1"], state.best)
            state.best, state.bad_epochs = (dev["f1"], 0) if improved else (state.best, state.bad_epochs + 1)
            if improved:
                atomic_save({"model": model.state_dict(), "config": vars(config),
                             "labels": ds["valid"].label_map.labels, "epoch": epoch, "dev_f1": dev["f1"]},
                            run / "model.pt")
        row = epoch_row(epoch, state, (t0, t1, t2), losses, dev, improved, skipped)
        tracker.log({"dev/f1": dev["f1"], "dev/precision": dev["precision"], "dev/recall": dev["recall"],
                     **{f"dev/{t}_f1": v["f1"] for t, v in dev["per_type"].items()}, "epoch": epoch + 1}, state.step)
        print(f"epoch {epoch + 1}/{config.epochs} loss {losses.get('loss', float('nan')):.4f} dev P/R/F1 "
              f"{dev['precision']:.4f}/{dev['recall']:.4f}/{dev['f1']:.4f}{' *' if improved else ''}"
              f" ({row['time_s']:.1f}s)"
              + (f"; {skipped} step(s) with a non-finite loss or gradient skipped" if skipped else ""))
        stop = stops_early(config, state.bad_epochs, epoch)
        with open(run / "metrics.jsonl", "a") as f:  # metrics.jsonl first: resume drops the lines after last.pt's
            f.write(json.dumps(row) + "\n")
        atomic_save({"model": model.state_dict(), **training_state(opt, sched, scaler), "schedule": state.plan,
                     "epoch": epoch, "best": state.best, "bad_epochs": state.bad_epochs, "step": state.step,
                     "stopped": stop, "rng": rng_state(), **({"ema": ema.state_dict()} if ema is not None else {})},
                    run / "last.pt")
        if stop:
            print(f"early stop: no dev gain > {config.min_gain} for {state.bad_epochs} epochs")
            break
    tracker.finish()
    return amp


def final_test(config, model, ds, run, device, amp, test_posts):
    """The best-on-dev checkpoint scored once on test: test_report.json, test_predictions.conll, the report."""
    best = load_checkpoint(run / "model.pt")
    model.load_state_dict(best["model"])
    res, preds = evaluate_split(model, ds["test"], config, ds["test"].label_map, device, amp)
    (run / "test_report.json").write_text(json.dumps(res, indent=1))
    write_predictions(run / "test_predictions.conll", test_posts, preds)
    from metrics import format_report
    print(f"test ({config.eval_mode}), best dev epoch {best['epoch'] + 1}:")
    print(format_report(res))
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would train alone and write the same run directory
        raise ConfigError(f"train.py runs as one process (WORLD_SIZE is {os.environ['WORLD_SIZE']}: a torchrun "
                          "launch); start it with python train.py and pick the GPU with --device cuda:N")
    config, resume = resolve_resume(argv)
    device = pick_device(config.device)
    seed_everything(config.seed)
    posts, label_map, tokenizer = load_data(config, resume)
    if resume is None:
        text_path_settings(config, argv, posts["train"], print)
    model, run, ds = build(config, resume, posts, label_map, tokenizer, device)
    amp = fit(config, model, ds, run, device, resume)
    res = final_test(config, model, ds, run, device, amp, posts["test"])
    return run, res


if __name__ == "__main__":
    cli(main)
