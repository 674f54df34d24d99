"""Speed and memory benchmark: train posts/s, seconds per epoch, eval posts/s and peak memory.

    python bench.py                                   # Twitter-2017, every case below, 3 repeats
    python bench.py --cases text,mner_cached --amp_modes fp32 --repeats 5
    python bench.py --sizes base --device cuda        # RoBERTa-base / CLIP-B/32-sized random encoders
    bash script/bench.sh                              # the same, with the scripts' env-var overrides
    python bench.py --cases text,mner_dual --amp_modes fp32 --bucketing on --paired --steps 60   # one process
    python bench.py --cases text,text+--amp --amp_modes fp32 --bucketing on --paired   # a flag against the defaults

Cases (each measured in a fresh child process, so peak memory is that case's own):
    hf_recipe     the peer: Hugging Face's token-classification recipe (run_ner_no_trainer) as a plain loop on the
                  same --text_encoder: AutoModelForTokenClassification, first-sub-word labels (-100 elsewhere),
                  AdamW at --text_lr, linear warm-up then decay, shuffled batches of --batch_size
                  tokenised per batch, the model's own dropout; eval: tokenise, forward, argmax per first sub-word
    text          the text path: --model roberta_crf (the MNER text encoder + CRF, no image path)
    mner_cached   MNER reading cached frozen-backbone features (what training does with a frozen backbone)
    mner_pixels   MNER running the frozen EfficientNet-Lite0 (or --sizes base: CLIP-B/32) on pixels every step
    mner_dual     MNER with the dual-granularity encoder on cached EfficientNet-Lite0 stem maps (what training does)
    mner_dual_pixels  the same encoder with its frozen stem run on pixels every step (nothing cached)
crossed with fp32 / --amp (bf16) and length bucketing on / off (--bucketing), optionally --grad_checkpointing.

What is timed: train.train_step itself (forward, finite checks, backward, clipping, fused AdamW step, schedule,
the --ema_decay weight average where on;
one batch per step, as with --gradient_accumulation_steps 1) on the real Twitter-2017
posts, batched exactly as train.py batches them (same sampler, --batch_size), `--steps` batches spread
evenly over the epoch; epoch seconds = train posts / train posts/s (the train pass only: train.py's
metrics.jsonl `train_s`; its `eval_s` is the dev pass and `time_s` the whole epoch). Eval: model.decode over the
first --eval_posts dev posts.
The Twitter images are not on this machine, so the image cases feed random pixels / random features
with has_image = 1 for every post: the compute of a fully illustrated data set, minus JPEG decoding.
Memory: CPU peak resident set of the child (ru_maxrss) and its growth during training steps; CUDA:
torch.cuda.max_memory_allocated. Figures are medians over --repeats. Each train pass is also given in CPU
seconds of the case's process (train CPU s/epoch), which a busy neighbour on the machine moves less than wall
clock; --rounds N runs the case list N times in alternation and prints each ratio's median over the rounds.
--paired times the cases in one process instead, one train step each in turn on the same batches, and prints each
case's step time against the first case's: the median ratio over the batches and its interquartile range (the way
to show a few-percent effect on a noisy machine; no memory or eval figures). There a case may carry flags of its own
after "+" (text+--amp), so a speed option is paired against the same model without it.
Distance to the hardware: each case's train GFLOP/s (torch's FlopCounterMode count of matrix products,
convolutions and attention over 4 train steps, per post, times train posts/s; on CPU it counts no fused attention
kernel, about 1 % of a text step) beside the machine's fp32 matmul peak at the same thread count (a 1024 x 1024
product in a loop).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

CASES = {
    "hf_recipe": [],  # its own loop (run_recipe), not train.py's
    "text": ["--model", "roberta_crf"],
    "mner_cached": ["--model", "MNER"],
    "mner_pixels": ["--model", "MNER"],
    "mner_dual": ["--model", "MNER", "--use_dual_granularity"],
    "mner_dual_pixels": ["--model", "MNER", "--use_dual_granularity"],
}
CACHED = {"mner_cached", "mner_dual"}  # cases fed cached features (image_feats) instead of pixels


def bench_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--cases", default="hf_recipe,text,mner_cached,mner_pixels,mner_dual,mner_dual_pixels",
      help=f"comma list of {', '.join(CASES)}")
    a("--amp_modes", default="fp32,amp", help="comma list of fp32, amp")
    a("--bucketing", default="on,off", help="length bucketing of training batches: comma list of on, off")
    a("--grad_ckpt", default="off", help="--grad_checkpointing: comma list of off, on")
    a("--repeats", type=int, default=3, help="timed repeats per case (medians are reported)")
    a("--steps", type=int, default=20, help="training steps timed per repeat")
    a("--rounds", type=int, default=1,
      help="run the whole case list this many times, alternating, and report each ratio's median over the rounds "
           "(a slow spell of the machine then hits every case, not one)")
    a("--eval_posts", type=int, default=320, help="dev posts decoded per eval repeat")
    a("--sizes", default="embedded", choices=["embedded", "base"],
      help="embedded = MiniLM + EfficientNet-Lite0; base = random BERT-base-sized text and CLIP-B/32-sized vision")
    a("--paired", action="store_true",
      help="time the cases in one process instead, one train step each in turn on the same batches, and print each "
           "case's step time against the first case's (median ratio and interquartile range over --steps batches); "
           "a case may carry its own flags after '+' (text+--amp); takes one value of --amp_modes, --bucketing and "
           "--grad_ckpt")
    a("--json", default="", help="also write every figure to this JSON file")
    a("--one", default="", help=argparse.SUPPRESS)  # internal: run one case in this process, print JSON
    return p.parse_known_args(argv)


# ----------------------------------------------------------------------------- one case (child process)

def base_sized_encoders(root: Path) -> list[str]:
    """Random BERT-base-sized text (12x768, RoBERTa-base compute) and CLIP-B/32-sized vision, saved locally."""
    from transformers import AutoTokenizer, BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel
    from config import resolve_text_encoder
    text, vision = root / "bert_base_random", root / "clip_b32_random"
    if not text.exists():
        BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             vocab_size=30522)).save_pretrained(text)
        AutoTokenizer.from_pretrained(resolve_text_encoder("minilm")).save_pretrained(text)
    if not vision.exists():
        CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, patch_size=32, image_size=224)).save_pretrained(vision)
        (vision / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": [0.4815, 0.4578, 0.4082], "image_std": [0.2686, 0.2613, 0.2758], "crop_size": 224}))
    return ["--text_encoder", str(text), "--image_encoder", str(vision)]


def seconds(x: float) -> float:
    """x to 4 significant digits: a tiny case's epoch on a fast machine stays above 0 (a ratio divides by it)."""
    return float(f"{x:.4g}")


def timed_steps(step, batches: list, spec: dict, size, prepare=lambda b: b, sync=lambda: None):
    """spec["repeats"] timed runs of spec["steps"] batches spread evenly over the epoch (after the caller's
    warm-up): (posts/s of each run, posts per CPU second of each run, peak RSS in KiB before and after).
    size(batch) = posts in a prepared batch. CPU seconds (the process's, all threads) leave out the time another
    tenant of the machine held the cores, which moves wall-clock figures by up to 25% here."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tps, cps, n = [], [], len(batches)
    for r in range(spec["repeats"]):
        pick = [prepare(batches[(r + i * n // spec["steps"]) % n]) for i in range(spec["steps"])]
        sync()
        t, c = time.perf_counter(), time.process_time()
        for b in pick:
            step(b)
        sync()
        posts = sum(size(b) for b in pick)
        tps.append(posts / (time.perf_counter() - t))
        cps.append(posts / (time.process_time() - c))
    return tps, cps, rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def matmul_peak(device, sync=lambda: None, n: int = 1024, seconds: float = 0.5) -> float:
    """GFLOP/s of a square fp32 matrix product on this device and thread count: the ceiling a case is read against."""
    import torch
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):  # warm-up
        a @ b
    sync()
    k, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        k += 1
    sync()
    return 2 * n ** 3 * k / (time.perf_counter() - t) / 1e9


def flops_per_post(step, batches: list, size) -> float:
    """Floating-point operations per post of train steps (forward and backward) as torch's FlopCounterMode counts
    them: matrix products and convolutions, the work that can approach the matmul peak (on CPU it counts no fused
    attention kernel: about 1 % of the text path's step)."""
    from torch.utils.flop_counter import FlopCounterMode
    total = posts = 0
    for b in batches:
        with FlopCounterMode(display=False) as fc:
            step(b)
        total, posts = total + fc.get_total_flops(), posts + size(b)
    return total / posts


def achieved(step, batches: list, size, posts_per_s: float, device, sync=lambda: None, prepare=lambda b: b) -> dict:
    """{"train_gflops": GFLOP/s the timed train steps achieved, "matmul_peak_gflops"} (FLOPs counted on 4 batches
    spread over the epoch, after the timing: counting slows a step down)."""
    pick = [prepare(batches[i * len(batches) // 4]) for i in range(4)]
    gflops = flops_per_post(step, pick, size) * posts_per_s / 1e9  # 3 significant digits: tiny models too
    return {"train_gflops": float(f"{gflops:.3g}"),
            "matmul_peak_gflops": round(matmul_peak(device, sync), 1)}


def timed_eval(decode_all, n_posts: int, repeats: int, sync=lambda: None) -> float:
    """Median posts/s of `repeats` runs of decode_all() (which decodes n_posts posts) under inference mode."""
    import torch
    tps = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            decode_all()
        sync()
        tps.append(n_posts / (time.perf_counter() - t))
    return statistics.median(tps)


def run_recipe(spec: dict, argv: list[str]) -> dict:
    """The hf_recipe case: the Hugging Face token-classification loop (peer.Recipe), timed like run_case times
    train_step."""
    import torch
    import dataloader as D
    from config import get_config
    from peer import Recipe
    from train import seed_everything
    config = get_config(argv + ["--model", "roberta_crf"])
    seed_everything(config.seed)
    posts = D.load_split(config, "train")
    dev = D.load_split(config, "valid")[: spec["eval_posts"]]
    r = Recipe(config, posts)
    batches = r.batches(posts, config.seed)
    opt, sched = r.optimizer(len(batches) * config.epochs)

    def step(batch):
        x, y = r.encode(batch)
        r.model(**x, labels=y).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    def sync():
        if r.device.type == "cuda":
            torch.cuda.synchronize()

    r.model.train()
    for b in batches[:2]:  # warm-up, not timed
        step(b)
    train_tps, train_cps, rss0, rss1 = timed_steps(step, batches, spec, len, sync=sync)
    flops = achieved(step, batches, len, statistics.median(train_tps), r.device, sync)

    def decode_all():  # tokenise, forward, each word's first sub-word argmax, read out per post
        for k in range(0, len(dev), config.batch_size):
            r.tag(dev[k:k + config.batch_size])

    r.model.eval()
    eval_tps = timed_eval(decode_all, len(dev), spec["repeats"], sync)
    tps = statistics.median(train_tps)
    n_sub = {id(p): len(r.tok(p.tokens, is_split_into_words=True)["input_ids"]) for p in posts}
    pad = 1 - sum(n_sub.values()) / sum(len(b) * max(n_sub[id(p)] for p in b) for b in batches)
    return {"case": "hf_recipe", "amp": False, "bucketing": False, "grad_ckpt": False,
            "train_posts_per_s": round(tps, 1), "train_posts_per_s_all": [round(x, 1) for x in train_tps],
            "epoch_s": seconds(len(posts) / tps), "epoch_cpu_s": seconds(len(posts) / statistics.median(train_cps)),
            "eval_posts_per_s": round(eval_tps, 1),
            "peak_rss_mib": round(rss1 / 1024), "train_rss_growth_mib": round((rss1 - rss0) / 1024),
            "peak_cuda_mib": None, "n_train": len(posts), "batch_size": config.batch_size, "device": str(r.device),
            "threads": torch.get_num_threads(), "pad_share": round(pad, 3), **flops}


def with_image(b: dict, case: str, config, model, g) -> dict:
    """Batch b with random image inputs of the case's kind (every post has one); the text case as it is."""
    import torch
    import dataloader as D
    if case == "text":
        return b
    B = b["input_ids"].size(0)
    b["has_image"] = torch.ones(B, dtype=torch.bool)
    if case in CACHED:  # what the feature cache holds: region tokens, or the dual stem's maps
        b["image_feats"] = torch.randn(B, *model.vision.feat_shape, generator=g)
    else:
        S = config.vision_img_size if config.use_dual_granularity else D.image_prep_for(config).size
        b["pixel_values"] = torch.randn(B, 3, S, S, generator=g)
    return b


def case_setup(case: str, eval_posts: int, argv: list[str], own: list[str] = ()) -> SimpleNamespace:
    """A MANGO case ready to time: its model, `step` (one train.train_step on a prepared batch), `prepare` (a
    loader batch -> the case's inputs on the device), the epoch's batches, the dev batches and `sync`. `own`: the
    case's own flags (--paired's "case+--flag"), last, so they win."""
    import torch
    import dataloader as D
    from config import get_config
    from model import build_model, load_tokenizer
    from runner import amp_context, pick_device
    from train import WeightEMA, make_optimizer, seed_everything, train_step

    config = get_config(argv + CASES[case] + list(own))
    device = pick_device(config.device)
    seed_everything(config.seed)
    posts = D.load_split(config, "train")
    dev = D.load_split(config, "valid")[:eval_posts]
    label_map = D.LabelMap.from_posts(posts)
    tok = load_tokenizer(config)
    model = build_model(config, len(label_map)).to(device)
    ds = D.make_dataset(config, "train", posts, tok, label_map, train=True,  # text items; image inputs added below
                        iob2_labels=model.iob2_targets)
    loader = D.make_loader(ds, config, train=True)
    batches = list(loader)
    opt, sched = make_optimizer(model, config, steps=10**6)
    amp, scaler = amp_context(config, device)
    g = torch.Generator().manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    bad_run = [0, 0]
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay > 0 else None

    def step(b):  # the very step train.py runs: forward, finite checks, backward, clipping, AdamW, schedule, average
        train_step(model, [b], opt, sched, config, device, 1, amp, scaler, bad_run, ema)

    def prepare(b):
        return {k: v.to(device) for k, v in with_image(dict(b), case, config, model, g).items()}

    ebatches = [prepare(b) for b in D.make_loader(D.make_dataset(config, "valid", dev, tok, label_map), config,
                                                  train=False)]
    model.train()
    for b in batches[:2]:  # warm-up (allocator, kernels), not timed
        step(prepare(b))
    sync()
    return SimpleNamespace(config=config, model=model, device=device, amp=amp, step=step, prepare=prepare,
                           batches=batches, ebatches=ebatches, posts=posts, dev=dev, sync=sync)


def run_case(spec: dict, argv: list[str]) -> dict:
    if spec["case"] == "hf_recipe":
        return run_recipe(spec, argv)
    import torch
    s = case_setup(spec["case"], spec["eval_posts"], argv)
    config, model, device, batches, sync = s.config, s.model, s.device, s.batches, s.sync
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    posts_of = lambda b: b["input_ids"].size(0)  # noqa: E731
    train_tps, train_cps, rss0, rss1 = timed_steps(s.step, batches, spec, posts_of, s.prepare, sync)
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    flops = achieved(s.step, batches, posts_of, statistics.median(train_tps), device, sync, s.prepare)

    def decode_all():
        with s.amp():
            for b in s.ebatches:
                model.decode(b)

    model.eval()
    eval_tps = timed_eval(decode_all, len(s.dev), spec["repeats"], sync)
    tps = statistics.median(train_tps)
    return {"case": spec["case"], "amp": config.amp, "bucketing": config.length_bucketing,
            "grad_ckpt": config.grad_checkpointing, "train_posts_per_s": round(tps, 1),
            "train_posts_per_s_all": [round(x, 1) for x in train_tps],
            "epoch_s": seconds(len(s.posts) / tps),
            "epoch_cpu_s": seconds(len(s.posts) / statistics.median(train_cps)),
            "eval_posts_per_s": round(eval_tps, 1),
            "peak_rss_mib": round(rss1 / 1024), "train_rss_growth_mib": round((rss1 - rss0) / 1024),
            "peak_cuda_mib": round(peak_cuda) if peak_cuda is not None else None,
            "n_train": len(s.posts), "batch_size": config.batch_size, "device": str(device),
            "threads": torch.get_num_threads(), "pad_share": round(pad_share(batches), 3), **flops}


def run_paired(cases: list[str], steps: int, argv: list[str]) -> dict:
    """Every case in this one process (a case may carry its own flags after "+": "text+--amp",
    "mner_dual+--vision_depth=1"), one train step each in turn on the same batch (`steps` batches spread over the
    epoch; the order rotates every batch), so a slow spell of the machine hits every case alike: {case: {ratio:
    median over the batches of its step time / the first case's, q1, q3 (interquartile range of those ratios),
    step_s: its median step time}}. Separate child processes cannot show a few-percent difference on a noisy
    machine; this can."""
    setups = {c: case_setup(c.split("+")[0], 1, argv, c.split("+")[1:]) for c in cases}
    posts = {c: [b["index"].tolist() for b in s.batches] for c, s in setups.items()}
    for c in cases[1:]:
        if posts[c] != posts[cases[0]]:
            raise SystemExit(f"error: --paired: {c} batches the posts otherwise than {cases[0]} (a flag that changes "
                             "batching, such as --batch_size or --length_bucketing, cannot be paired)")
    n = len(setups[cases[0]].batches)
    times = {c: [] for c in cases}
    for k in range(steps):
        i = k * n // steps
        for c in cases[k % len(cases):] + cases[:k % len(cases)]:
            s = setups[c]
            b = s.prepare(s.batches[i])
            s.sync()
            t = time.perf_counter()
            s.step(b)
            s.sync()
            times[c].append(time.perf_counter() - t)
    out = {}
    for c in cases:
        q = statistics.quantiles([x / r for x, r in zip(times[c], times[cases[0]])], n=4, method="inclusive")
        out[c] = {"ratio": round(q[1], 3), "q1": round(q[0], 3), "q3": round(q[2], 3),
                  "step_s": round(statistics.median(times[c]), 4)}
    return out


def pad_share(batches) -> float:
    """Share of padded sub-word slots in the epoch's batches (what bucketing saves)."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1 - real / sum(b["attention_mask"].numel() for b in batches)


# ----------------------------------------------------------------------------- driver

def hardware(threads: bool = True) -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    s = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    s += f", {torch.get_num_threads()} threads" if threads else ""
    if torch.cuda.is_available():
        s += f", {torch.cuda.get_device_name(0)}"
    return s


def table(rows: list[dict]) -> str:
    head = ("| round | case | precision | bucketing | grad ckpt | train posts/s | train s/epoch | train CPU s/epoch | "
            "eval posts/s | peak RSS MiB | train RSS growth MiB | peak CUDA MiB | train GFLOP/s (matmul peak) |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        key = f"| {r.get('round', 1)} | {r['case']} | {'bf16' if r['amp'] else 'fp32'} |"
        if "error" in r:
            out.append(f"{key} {r['bucketing']} | {r['grad_ckpt']} | failed: {r['error']} ||||||||")
            continue
        out.append(f"{key} {'on' if r['bucketing'] else 'off'} | "
                   f"{'on' if r['grad_ckpt'] else 'off'} | {r['train_posts_per_s']} | {r['epoch_s']} | "
                   f"{r['epoch_cpu_s']} | "
                   f"{r['eval_posts_per_s']} | {r['peak_rss_mib']} | {r['train_rss_growth_mib']} | "
                   f"{r['peak_cuda_mib'] or '-'} | "
                   f"{r.get('train_gflops', '-')} ({r.get('matmul_peak_gflops', '-')}) |")
    return "\n".join(out)


def round_ratios(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """The figures the targets are stated in, from one round's rows: {what: (wall-clock ratio, CPU-time ratio)}:
    MANGO's fp32 text path against the recipe (train pass per epoch; eval posts/s, wall clock only), each image
    case against the text path of the same precision and bucketing (train pass)."""
    ok = [r for r in rows if "error" not in r]
    rec = next((r for r in ok if r["case"] == "hf_recipe"), None)
    key = lambda r: (r["amp"], r["bucketing"], r["grad_ckpt"])
    out = {}
    for r in ok:
        if r["case"] == "text" and not r["amp"] and rec:
            what = (f"text (bucketing {'on' if r['bucketing'] else 'off'}, "
                    f"grad ckpt {'on' if r['grad_ckpt'] else 'off'}) vs hf_recipe")
            out[f"{what}: train pass"] = (r["epoch_s"] / rec["epoch_s"], r["epoch_cpu_s"] / rec["epoch_cpu_s"])
            out[f"{what}: eval posts/s"] = (r["eval_posts_per_s"] / rec["eval_posts_per_s"], None)
    for r in ok:
        t = next((x for x in ok if x["case"] == "text" and key(x) == key(r)), None)
        if r["case"] not in ("text", "hf_recipe") and t:
            what = f"{r['case']} ({'bf16' if r['amp'] else 'fp32'}, bucketing {'on' if r['bucketing'] else 'off'}" \
                   + (", grad ckpt on" if r["grad_ckpt"] else "") + ") vs text"
            out[f"{what}: train pass"] = (r["epoch_s"] / t["epoch_s"], r["epoch_cpu_s"] / t["epoch_cpu_s"])
    return out


def ratios(rows: list[dict]) -> list[str]:
    """round_ratios of each round (--rounds: the case list run again, alternating), then the median over rounds."""
    rounds = sorted({r.get("round", 1) for r in rows})
    per = [round_ratios([r for r in rows if r.get("round", 1) == k]) for k in rounds]
    out = []
    for what in dict.fromkeys(w for p in per for w in p):  # every ratio any round has, in first-seen order
        wall = [p[what][0] for p in per if what in p]
        cpu = [p[what][1] for p in per if what in p and p[what][1] is not None]
        line = f"{what}: {statistics.median(wall):.2f}x wall clock"
        if cpu:
            line += f", {statistics.median(cpu):.2f}x CPU time"
        if len(rounds) > 1:
            line += (f" (median of {len(wall)} rounds; wall " + " ".join(f"{x:.2f}" for x in wall)
                     + ("; CPU " + " ".join(f"{x:.2f}" for x in cpu) if cpu else "") + ")")
        out.append(line)
    return out


def run_child(spec: dict, flags: list[str], failed: dict) -> dict:
    """One case in a fresh child process (its own peak memory): its RESULT row, or `failed` plus the child's last
    stderr line as "error"."""
    p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec), *flags], capture_output=True, text=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return {**failed, "error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[7:])


def case_flags(amp: str, bucket: str, ck: str, rest: list[str]) -> list[str]:
    """The train flags of one precision / bucketing / checkpointing combination."""
    flags = ["--swanlab_mode", "disabled"] + rest
    flags += ["--amp"] if amp == "amp" else []
    flags += ["--length_bucketing"] if bucket == "on" else ["--no-length_bucketing"]
    return flags + (["--grad_checkpointing"] if ck == "on" else [])


def main_paired(args, cases: list[str], rest: list[str]):
    combo = (args.amp_modes, args.bucketing, args.grad_ckpt)
    if args.steps < 2:
        raise SystemExit(f"error: --steps {args.steps}: --paired needs 2 or more for its ratios' quartiles")
    if any("," in x for x in combo):
        raise SystemExit("error: --paired compares cases at one setting: give one value each of --amp_modes, "
                         "--bucketing and --grad_ckpt")
    if any(c.split("+")[0] == "hf_recipe" for c in cases):
        raise SystemExit("error: --paired times MANGO's train step; the recipe (hf_recipe) has its own loop")
    if len(set(cases)) < len(cases):
        raise SystemExit(f"error: --cases {','.join(cases)}: a case named twice; give each once")
    figures = run_paired(cases, args.steps, case_flags(*combo, rest))
    print(f"hardware: {hardware()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"paired: {args.steps} train steps per case, one process, {'/'.join(combo)} (precision/bucketing/ckpt)")
    for c, f in figures.items():
        print(f"{c} vs {cases[0]}: train step {f['ratio']:.2f}x (interquartile {f['q1']:.2f}-{f['q3']:.2f}); "
              f"median step {f['step_s']:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware(), "args": vars(args), "flags": rest,
                                               "paired": figures}, indent=1))


def main(argv=None):
    args, rest = bench_args(argv)
    if args.one:
        spec = json.loads(args.one)
        print("RESULT " + json.dumps(run_case(spec, rest)))
        return
    if args.rounds < 1:
        raise SystemExit(f"error: --rounds {args.rounds}: give 1 or more")
    if args.sizes == "base":
        rest = base_sized_encoders(Path(tempfile.gettempdir()) / "mango_bench") + rest
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c.split("+")[0] not in CASES or ("+" in c and not args.paired)]
    if bad:
        raise SystemExit(f"error: --cases {','.join(bad)}: unknown; choose from {', '.join(CASES)} (with --paired, "
                         "a case may carry its own flags: text+--amp)")
    if args.paired:
        return main_paired(args, cases, rest)
    rows = []
    for rnd, case in itertools.product(range(1, args.rounds + 1), cases):
        # the recipe is what it is: fp32, its own batching, measured once per round
        combos = [("fp32", "off", "off")] if case == "hf_recipe" else itertools.product(
            args.amp_modes.split(","), args.bucketing.split(","), args.grad_ckpt.split(","))
        for amp, bucket, ck in combos:
            flags = case_flags(amp, bucket, ck, rest)
            spec = {"case": case, "repeats": args.repeats, "steps": args.steps, "eval_posts": args.eval_posts}
            print(f"bench round {rnd}: {case} {amp} bucketing={bucket} grad_ckpt={ck} ...",
                  file=sys.stderr, flush=True)
            failed = {"case": case, "amp": amp == "amp", "bucketing": bucket, "grad_ckpt": ck}
            rows.append({**run_child(spec, flags, failed), "round": rnd})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"hardware: {hardware()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{args.rounds} round(s) of {args.repeats} repeats x {args.steps} steps, medians; sizes: {args.sizes}")
    print(table(rows))
    for line in ratios(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware(), "args": vars(args), "flags": rest,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    from config import cli
    cli(main)
