"""Train a MANGO model: config -> data -> model -> AdamW + schedule -> epochs (dev selection) -> test once.

    python train.py --dataset_name demo --model MNER --epochs 10
    python train.py --continue_train_name <run>          # resume from <run>/last.pt
    torchrun --nproc_per_node 4 train.py --dataset_name demo   # DistributedDataParallel, one process per GPU

Under torchrun (WORLD_SIZE > 1) each process trains on its shard of every epoch with --batch_size posts per
batch (global batch = batch_size x processes); gradients are averaged across processes (NCCL on GPU, gloo on
CPU), dev/test predictions are gathered and scored once, and only rank 0 logs and writes the run directory.

A run directory save_models/<run>/ holds config.json, label_map.json, model.pt (best on dev), last.pt
(everything needed to resume), metrics.jsonl (one line per epoch), test_report.json and
test_predictions.conll. Checkpoints are written to a temp file and renamed, so a kill never leaves a
half-written one.
"""
from __future__ import annotations

import ast
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dataloader as D
from config import ConfigError, cli, config_from_dict, get_config, given_flags, save_config, RESUME_MAY_CHANGE
from model import build_model, build_teacher, load_tokenizer
from metrics import evaluate
from test import (check_encoders, evaluate_split, load_checkpoint, predict, read_run_json, runs_with,
                  write_predictions)

RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "best", "bad_epochs", "step", "stopped", "rng")
NO_DECAY = ("bias", "norm", "ln", "LayerNorm", "crf.", "alpha", "queries", "_pos")


# ----------------------------------------------------------------------------- run set-up

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


# ----------------------------------------------------------------------------- distributed (torchrun)

_OWN_GROUP = [False]  # whether this module started the process group (and so ends it)


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def setup_device(name: str) -> torch.device:
    """The device of this process; under torchrun (WORLD_SIZE > 1 in the environment) also joins the process
    group: NCCL with cuda:LOCAL_RANK on GPU, gloo on CPU. A single process just gets pick_device(name)."""
    device = pick_device(name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":  # one GPU per process, whatever --device names
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) here; "
                              "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        _OWN_GROUP[0] = True
    return device


def teardown():
    if _OWN_GROUP[0] and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP[0] = False


def barrier():
    if world() > 1:
        dist.barrier()


def all_gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects); [obj] in one process."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, src: int = 0):
    """Rank src's obj on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextmanager
def main_first():
    """Rank 0 runs the block first (demo-set generation, the frozen-feature cache), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank: all ranks skip a bad batch together, or the others would
    wait in backward's gradient all-reduce forever."""
    ok = torch.isfinite(loss.detach())
    if world() > 1:
        ok = ok.to(torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def evaluate_gathered(model, dataset, config, label_map, device, amp=None):
    """(scores, word tags per post) of a split. Under torchrun each rank predicts its shard, the predictions are
    gathered, rank 0 scores them and every rank gets the same scores (so dev selection and early stopping
    decide alike everywhere)."""
    if world() == 1:
        return evaluate_split(model, dataset, config, label_map, device, amp)
    shard = predict(model, dataset, config, label_map, device, amp, rank=rank(), world=world())
    preds = [None] * len(dataset)
    for part in all_gather({i: p for i, p in enumerate(shard) if p is not None}):
        for i, p in part.items():
            preds[i] = p
    assert all(p is not None for p in preds), "a post was predicted by no rank"
    res = evaluate([p.tags for p in dataset.posts], preds, config.eval_mode) if is_main() else None
    return broadcast(res), preds


def amp_context(config, device):
    """bf16 autocast where supported (CUDA with bf16, recent CPUs), else fp16 with a GradScaler on CUDA."""
    if not config.amp:
        return nullcontext, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


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
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def new_run_dir(config, resume: bool = False) -> Path:
    root = Path(config.save_dir)
    name = config.save_name or "_".join(x for x in (datetime.now().strftime("%Y%m%d-%H%M%S"), config.dataset_name,
                                                    config.model, config.ex_name) if x)
    if config.save_name and not resume and any((root / name / f).exists() for f in ("metrics.jsonl", "last.pt", "model.pt")):
        raise ConfigError(f"--save_name {name}: {root / name} already holds a run; resume it with --continue_train_name "
                          f"{name}, pick another --save_name, or delete that directory")
    run, k = root / name, 2
    while not config.save_name and run.exists():  # collision-safe for generated names
        run, k = root / f"{name}_{k}", k + 1
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run}: {e.strerror}; pass a writable --save_dir")
    return run


def atomic_save(obj, path: Path):
    """torch.save to <path>.tmp, flushed to disk, then renamed over path: a kill, a full disk or a read-only folder
    at any moment leaves the previous file whole (a leftover .tmp is never read and is overwritten next time).
    A failed write is one line (ConfigError) naming the file and the reason."""
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
        try:
            why += f", {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        except OSError:
            pass
        raise ConfigError(f"could not write {path}: {why}; {path.name} is left as it was. Free space or pass a writable "
                          f"--save_dir, then resume with --continue_train_name {path.parent.name}") from None


class Tracker:
    """SwanLab when enabled (online with SWANLAB_API_KEY, else local files in the run dir), always a JSONL file."""

    def __init__(self, config, run: Path, active: bool = True):
        self.run, self.sw = None, None
        self.steps = run / "steps.jsonl" if active else None  # per-step losses for plots.py, whatever SwanLab does
        mode = config.swanlab_mode if active else "disabled"  # inactive: a torchrun rank other than 0
        if mode == "auto":
            mode = "online" if os.environ.get("SWANLAB_API_KEY") else "local"
        if mode != "disabled":
            import swanlab
            self.sw = swanlab
            # "local" = SwanLab's offline mode: files under the run dir, no login, `swanlab sync` uploads later
            self.run = swanlab.init(project=config.ex_project, name=run.name, config=vars(config),
                                    mode="offline" if mode == "local" else mode, log_dir=str(run / "swanlog"))

    def log(self, data: dict, step: int):
        if self.sw is not None:
            self.sw.log({k: v for k, v in data.items() if isinstance(v, (int, float))}, step=step)

    def log_step(self, losses: dict, step: int):
        """A line of steps.jsonl. A resumed run redoes the steps after its checkpoint: readers keep a step's last line."""
        if self.steps is not None:
            with open(self.steps, "a") as f:
                f.write(json.dumps({"step": step, **losses}) + "\n")

    def finish(self):
        if self.sw is not None:
            self.sw.finish()


# ----------------------------------------------------------------------------- optimiser

def make_optimizer(model, config, steps: int):
    """AdamW with layer-wise groups and linear warm-up then linear decay over the real number of steps.

    text encoder -> fin_tuning_lr, trainable pretrained vision -> clip_lr, everything else -> downs_en_lr;
    biases and every norm layer get no weight decay.
    """
    lrs = {"text": config.fin_tuning_lr, "vision": config.clip_lr, "rest": config.downs_en_lr}
    groups = []
    for name, params in model.param_groups().items():
        for decay in (True, False):
            ps = [p for n, p in params if (not any(k in n for k in NO_DECAY) and p.dim() > 1) == decay]
            if ps:
                groups.append({"params": ps, "lr": lrs[name], "weight_decay": config.weight_decay_rate if decay else 0.0,
                               "name": f"{name}{'' if decay else '_nodecay'}", "base": name})
    # the fused kernel does one pass per tensor: 6x faster than the default per-parameter loop on CPU
    opt = torch.optim.AdamW(groups, lr=config.downs_en_lr, fused=True)
    warm = int(config.warmup_prop * steps)

    def factor(step):
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (steps - step) / max(1, steps - warm))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------- the loop

def skip_bad_step(bad_run: list, config, epoch: int, what: str):
    """Count a step skipped for a non-finite loss or gradient (bad_run = [in a row, in all]); stop the run with one
    line after --max_bad_steps of them in a row."""
    bad_run[0] += 1
    bad_run[1] += 1
    if bad_run[0] >= config.max_bad_steps:
        raise ConfigError(f"{bad_run[0]} non-finite {what} in a row at epoch {epoch + 1} ({bad_run[1]} skipped in all); "
                          f"lower the learning rates (--downs_en_lr {config.downs_en_lr}, --fin_tuning_lr "
                          f"{config.fin_tuning_lr}) or raise --max_bad_steps {config.max_bad_steps}")


def train_epoch(model, loader, opt, sched, config, device, epoch, amp, scaler, tracker, step0, bad_run):
    """One epoch; a batch with a non-finite loss or gradient is skipped and counted in bad_run (skip_bad_step)."""
    model.train()
    image_on = epoch >= config.text_only_epochs
    accum = config.gradient_accumulation_steps
    n = len(loader)
    sums: dict[str, float] = {}
    step, seen = step0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, dynamic_ncols=True, disable=not is_main())
    opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        group = accum if i < n - n % accum else n % accum  # the last, partial group still steps: no gradient crosses epochs
        # DDP: batches that only accumulate skip the gradient all-reduce (the group's last batch does it)
        accumulating = (i + 1) % accum and i + 1 != n and isinstance(model, DDP)
        with amp(), (model.no_sync() if accumulating else nullcontext()):
            out = model(batch, epoch=epoch, image_on=image_on)
        loss = out["loss"].float()
        if not all_finite(loss):
            opt.zero_grad(set_to_none=True)
            skip_bad_step(bad_run, config, epoch, "losses")
            continue
        (scaler.scale(loss / group) if scaler else loss / group).backward()
        for k, v in out["parts"].items():
            sums[k] = sums.get(k, 0.0) + v.item()
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        seen += 1
        if (i + 1) % accum and i + 1 != n:
            continue
        if scaler:
            scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad if config.clip_grad > 0 else float("inf"))
        if not torch.isfinite(norm):
            opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.update()
            skip_bad_step(bad_run, config, epoch, "gradients")
            continue
        bad_run[0] = 0
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log = {f"train/{k}": float(v) for k, v in out["parts"].items()}
        log.update({"train/loss": loss.item(), "train/grad_norm": norm.item()})
        log.update({f"lr/{g['name']}": g["lr"] for g in opt.param_groups})
        tracker.log(log, step)
        tracker.log_step({k[6:]: v for k, v in log.items() if k.startswith("train/")}, step)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    if world() > 1:  # the epoch's mean losses over the batches of every rank
        parts = all_gather((sums, seen))
        seen = sum(n for _, n in parts)
        sums = {k: sum(p.get(k, 0.0) for p, _ in parts) for k in {k for p, _ in parts for k in p}}
    return {k: v / max(1, seen) for k, v in sums.items()}, step


def main(argv=None):
    try:
        return _main(argv)
    finally:
        teardown()  # under torchrun: leave the process group (no-op otherwise)


def _main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config = get_config(argv)
    resume = None
    if config.continue_train_name:
        src = Path(config.save_dir) / config.continue_train_name
        if not (src / "last.pt").is_file():
            raise ConfigError(f"--continue_train_name {config.continue_train_name}: {src / 'last.pt'} not found; "
                              f"runs in {config.save_dir}: {runs_with(config.save_dir, 'last.pt')}")
        for f in ("config.json", "label_map.json"):
            if not (src / f).is_file():
                raise ConfigError(f"--continue_train_name {config.continue_train_name}: {src / f} is missing; it is "
                                  "written with every run, so this run directory is damaged: start a new run")
        saved = config_from_dict(read_run_json(src / "config.json"))
        given = given_flags(argv)
        for k in given - {"continue_train_name"}:
            if k not in RESUME_MAY_CHANGE and getattr(config, k) != getattr(saved, k):
                raise ConfigError(f"--{k} differs from the run being resumed ({getattr(saved, k)!r}); "
                                  "the model structure comes from that run: drop the flag or start a new run")
            setattr(saved, k, getattr(config, k))
        saved.continue_train_name, saved.save_name = config.continue_train_name, config.continue_train_name
        config = saved
        check_encoders(config, src / "config.json")
        resume = load_checkpoint(src / "last.pt")
        missing = [k for k in RESUME_KEYS if k not in resume] if isinstance(resume, dict) else list(RESUME_KEYS)
        if missing:
            raise ConfigError(f"{src / 'last.pt'}: not a resumable checkpoint (no {', '.join(missing)}); last.pt is "
                              "written after every epoch, model.pt holds the best weights only: score the run with "
                              "test.py or start a new one")
    device = setup_device(config.device)
    lead = is_main()  # rank 0 (or the only process): the one that prints, logs and writes the run directory
    say = print if lead else (lambda *a, **k: None)
    seed_everything(config.seed)  # the same seed on every rank: identical inits, each rank its own data shard

    # data -> labels -> tokenize/align
    with main_first():  # rank 0 first: it may generate the demo set
        train_posts = D.load_split(config, "train")
        dev_posts = D.load_split(config, "valid")
        test_posts = D.load_split(config, "test")
    run_src = Path(config.save_dir) / config.continue_train_name
    label_map = D.LabelMap.load(run_src / "label_map.json") if resume else D.LabelMap.from_posts(train_posts)
    tokenizer = load_tokenizer(config)

    # model (built on CPU with the run's seed so every init is repeatable), then the run dir, then its data
    torch.manual_seed(config.seed)
    model = build_model(config, len(label_map))
    run = Path(broadcast(str(new_run_dir(config, resume=resume is not None)) if lead else None))  # rank 0 names it (a generated name has a time)
    if lead:
        save_config(config, run / "config.json")
        label_map.save(run / "label_map.json")
    vision = model.vision.to(device) if model.uses_image and config.use_image else None
    teacher = build_teacher(config)  # --vision_distill_lambda: its cached features are the train split's targets
    with main_first():  # rank 0 builds the frozen-feature cache, the other ranks then read it
        ds = {s: D.make_dataset(config, s, posts, tokenizer, label_map, vision, train=s == "train",
                                teacher=teacher and teacher.to(device))
              for s, posts in (("train", train_posts), ("valid", dev_posts), ("test", test_posts))}
    for d in ds.values():
        say(d.describe())
    model.to(device)
    # under torchrun each rank gets every world-th batch, all ranks the same number of them
    train_loader = D.make_loader(ds["train"], config, train=True, rank=rank(), world=world())
    accum = config.gradient_accumulation_steps
    steps = config.epochs * math.ceil(len(train_loader) / accum)
    opt, sched = make_optimizer(model, config, steps)
    amp, scaler = amp_context(config, device)
    start_epoch, best, bad_epochs, step = 0, -1.0, 0, 0
    if resume:
        try:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"{run_src / 'last.pt'}: does not match the model in {run_src / 'config.json'} "
                              f"({str(e).splitlines()[0][:120]}); the files come from different runs") from None
        # learning-rate flags given now apply to the remaining steps
        lrs = {"text": config.fin_tuning_lr, "vision": config.clip_lr, "rest": config.downs_en_lr}
        sched.base_lrs = [lrs[g["base"]] for g in opt.param_groups]
        for g, base in zip(opt.param_groups, sched.base_lrs):
            g["lr"] = base * sched.lr_lambdas[0](sched.last_epoch)
        start_epoch, best, bad_epochs, step = resume["epoch"] + 1, resume["best"], resume["bad_epochs"], resume["step"]
        if resume["stopped"]:
            start_epoch = config.epochs  # it had stopped early: only the final test is redone
        ranks = resume.get("rng_ranks")  # a torchrun run keeps every rank's RNGs
        set_rng_state(ranks[rank()] if ranks and len(ranks) == world() else resume["rng"])
        # epochs logged after the checkpoint (a kill between the two writes) are redone, so drop their lines
        log = run / "metrics.jsonl"
        if lead and log.exists():
            keep = [l for l in log.read_text().splitlines() if json.loads(l)["epoch"] <= start_epoch]
            log.write_text("".join(l + "\n" for l in keep))
        say(f"resumed {run.name} after epoch {start_epoch} (best dev F1 {best:.4f})")
    core = model  # the model itself: checkpoints, decoding, parameter groups
    if world() > 1:
        # the image path is skipped for batches without a usable image (and in --text_only_epochs), so DDP has
        # to look for parameters that got no gradient; text-only models use every parameter every step
        model = DDP(core, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=core.uses_image)
    tracker = Tracker(config, run, active=lead)
    n_params = sum(p.numel() for p in core.parameters())
    n_train = sum(p.numel() for p in core.parameters() if p.requires_grad)
    procs = f" x {world()} processes (global batch {config.batch_size * world()})" if world() > 1 else ""
    say(f"run {run} | {config.model} on {config.dataset_name} | {n_train / 1e6:.2f}M of {n_params / 1e6:.2f}M parameters train | {device}{procs}")

    bad_run = [0, 0]  # non-finite steps skipped: in a row, in all
    for epoch in range(start_epoch, config.epochs):
        t0 = time.time()
        train_loader.batch_sampler.set_epoch(epoch)
        ds["train"].epoch = epoch
        skipped = bad_run[1]
        losses, step = train_epoch(model, train_loader, opt, sched, config, device, epoch, amp, scaler, tracker, step, bad_run)
        skipped = bad_run[1] - skipped
        dev = evaluate_gathered(core, ds["valid"], config, label_map, device, amp)[0]  # the same on every rank
        improved = dev["f1"] > best + config.patience
        if improved:
            best, bad_epochs = dev["f1"], 0
            if lead:
                atomic_save({"model": core.state_dict(), "config": vars(config), "labels": label_map.labels,
                             "epoch": epoch, "dev_f1": dev["f1"]}, run / "model.pt")
        else:
            bad_epochs += 1
        row = {"epoch": epoch + 1, "step": step, "time_s": round(time.time() - t0, 2), **{f"train_{k}": v for k, v in losses.items()},
               "dev_precision": dev["precision"], "dev_recall": dev["recall"], "dev_f1": dev["f1"],
               "dev_per_type": {t: {k: v[k] for k in ("precision", "recall", "f1")} for t, v in dev["per_type"].items()},
               "best_dev_f1": max(best, dev["f1"]),
               "improved": improved, "skipped_steps": skipped}
        if lead:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        tracker.log({"dev/f1": dev["f1"], "dev/precision": dev["precision"], "dev/recall": dev["recall"],
                     **{f"dev/{t}_f1": v["f1"] for t, v in dev["per_type"].items()}, "epoch": epoch + 1}, step)
        say(f"epoch {epoch + 1}/{config.epochs} loss {losses.get('loss', float('nan')):.4f} dev P/R/F1 "
            f"{dev['precision']:.4f}/{dev['recall']:.4f}/{dev['f1']:.4f}{' *' if improved else ''} ({row['time_s']:.1f}s)"
            + (f"; {skipped} step(s) with a non-finite loss or gradient skipped" if skipped else ""))
        stop = bad_epochs >= config.patience_num and epoch + 1 >= config.min_epoch_num
        rngs = all_gather(rng_state())
        if lead:
            atomic_save({"model": core.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "epoch": epoch, "best": best, "bad_epochs": bad_epochs, "step": step, "stopped": stop,
                         "rng": rngs[0], **({"rng_ranks": rngs} if world() > 1 else {})}, run / "last.pt")
        if stop:
            say(f"early stop: no dev gain > {config.patience} for {bad_epochs} epochs")
            break
    tracker.finish()
    barrier()  # rank 0's model.pt is complete before any rank reads it

    # the best-on-dev checkpoint is scored once on test
    core.load_state_dict(load_checkpoint(run / "model.pt")["model"])
    res, preds = evaluate_gathered(core, ds["test"], config, label_map, device, amp)
    if lead:
        (run / "test_report.json").write_text(json.dumps(res, indent=1))
        write_predictions(run / "test_predictions.conll", test_posts, preds)
        from metrics import format_report
        print(f"test ({config.eval_mode}), best dev epoch {load_checkpoint(run / 'model.pt')['epoch'] + 1}:")
        print(format_report(res))
    return run, res


if __name__ == "__main__":
    cli(main)
