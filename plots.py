"""Pictures of one post and of one run, drawn with Pillow and OpenCV (PNG; no plotting library).

Per post (predict.py --explain):
  attention_overlay(view, panels, path)          the model's view of the image, one heat overlay per panel
  relevance_strip(words, tags, rel, gate, path)  the sentence with per-word rel and gate as coloured cells
Per run (test.py --plots, from the files train.py and test.py write in the run directory):
  dev_f1_curve(rows, path)            dev P/R/F1 per epoch (metrics.jsonl), best epoch marked
  loss_curves(steps, epochs, path)    each loss term over optimiser steps (steps.jsonl)
  per_type_bars(report, path)         P/R/F1 per entity type and overall (<split>_report.json)
  confusion_matrix(gold, pred, path)  word-level gold type x predicted type (<split>_predictions.conll)
  run_plots(run, split, out_dir)      all four, returns the paths written
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from config import UserError

WHITE, BLACK, GRID, MUTED = (255, 255, 255), (20, 20, 20), (225, 225, 225), (120, 120, 120)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
TYPE_COLOURS = {"PER": (214, 39, 40), "LOC": (44, 160, 44), "ORG": (31, 119, 180), "MISC": (148, 103, 189)}


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans where the system has it (accented, Greek and Cyrillic words drawn as written), else Pillow's own
    Latin-only font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


@functools.cache
def colormap(name: str) -> np.ndarray:
    """OpenCV's colour map `name` (e.g. VIRIDIS, JET) as an RGB lookup table [256, 3] uint8."""
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], getattr(cv2, f"COLORMAP_{name}"))
    return lut[0, :, ::-1].copy()


def value_colour(v: float, name: str = "VIRIDIS") -> tuple:
    """v in [0, 1] -> an RGB colour of the map."""
    return tuple(int(c) for c in colormap(name)[round(min(max(v, 0.0), 1.0) * 255)])


def type_colour(t: str) -> tuple:
    if t in TYPE_COLOURS:
        return TYPE_COLOURS[t]
    return PALETTE[sum(map(ord, t)) % len(PALETTE)]


def text_width(s: str, size: int) -> int:
    return int(font(size).getlength(s))


def fit(s: str, width: int, size: int) -> str:
    """s, cut with an ellipsis so that it is at most width pixels wide in font(size)."""
    if text_width(s, size) <= width:
        return s
    while s and text_width(s + "…", size) > width:
        s = s[:-1]
    return s + "…"


def save(img: Image.Image, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi] with about n ticks."""
    span = hi - lo if hi > lo else 1.0
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step - 1e-9) * step
    return [round(start + k * step, 10) for k in range(int((hi - start) / step + 1e-9) + 1)]


# ----------------------------------------------------------------------------- charts

def line_chart(draw: ImageDraw.ImageDraw, box, series, title: str, xlabel: str = "", ylim=None, vlines=(),
               marks=(), integer_x: bool = False) -> None:
    """Axes inside box (x0, y0, x1, y1) of a canvas.

    series: [(name, xs, ys, colour, width)], NaN ys are gaps; ylim: (lo, hi) or None (from the data); vlines:
    x values drawn as dotted separators; marks: [(x, y, label)] circled points; integer_x: x ticks on whole
    numbers only (epochs). The legend is drawn when there are 2+ named series.
    """
    x0, y0, x1, y1 = box
    px0, py0, px1, py1 = x0 + 52, y0 + 26, x1 - 10, y1 - (34 if xlabel else 20)
    xs_all = [x for _, xs, *_ in series for x in xs]
    ys_all = [y for _, _, ys, *_ in series for y in ys if math.isfinite(y)]
    xlo, xhi = (min(xs_all), max(xs_all)) if xs_all else (0, 1)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    xpad = 0.03 * (xhi - xlo)  # first and last points off the frame
    xlo, xhi = xlo - xpad, xhi + xpad
    ylo, yhi = ylim if ylim else ((min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0))
    if yhi == ylo:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    if not ylim:
        pad = 0.05 * (yhi - ylo)
        ylo, yhi = ylo - pad, yhi + pad

    def X(x):
        return px0 + (x - xlo) / (xhi - xlo) * (px1 - px0)

    def Y(y):
        return py1 - (y - ylo) / (yhi - ylo) * (py1 - py0)
    draw.text((x0 + 4, y0 + 2), title, fill=BLACK, font=font(15))
    for t in ticks(ylo, yhi):
        if ylo <= t <= yhi:
            draw.line([(px0, Y(t)), (px1, Y(t))], fill=GRID)
            draw.text((px0 - 6, Y(t)), f"{t:g}", fill=MUTED, font=font(11), anchor="rm")
    for t in ticks(xlo, xhi, 6):
        if xlo <= t <= xhi and (not integer_x or t == int(t)):
            draw.line([(X(t), py1), (X(t), py1 + 4)], fill=MUTED)
            draw.text((X(t), py1 + 6), f"{t:g}", fill=MUTED, font=font(11), anchor="mt")
    for v in vlines:
        for y in range(int(py0), int(py1), 6):
            draw.line([(X(v), y), (X(v), y + 2)], fill=(190, 190, 190))
    draw.rectangle([px0, py0, px1, py1], outline=MUTED)
    if xlabel:
        draw.text(((px0 + px1) / 2, y1 - 4), xlabel, fill=MUTED, font=font(12), anchor="mb")
    for name, xs, ys, colour, width in series:
        pts = [(X(x), Y(y)) if math.isfinite(y) else None for x, y in zip(xs, ys)]
        runs, cur = [], []
        for pt in pts + [None]:  # a NaN breaks the line
            if pt is None:
                runs, cur = runs + [cur] if cur else runs, []
            else:
                cur.append(pt)
        for run in runs:
            if len(run) > 1:
                draw.line(run, fill=colour, width=width, joint="curve")
        if len(pts) <= 30:  # few points: show each one
            for pt in filter(None, pts):
                draw.ellipse([pt[0] - 3, pt[1] - 3, pt[0] + 3, pt[1] + 3], fill=colour)
    for x, y, label in marks:
        draw.ellipse([X(x) - 7, Y(y) - 7, X(x) + 7, Y(y) + 7], outline=BLACK, width=2)
        near_right = X(x) + text_width(label, 11) / 2 > px1
        draw.text((X(x) + (8 if not near_right else -8), Y(y) - 10), label, fill=BLACK, font=font(11),
                  anchor="rb" if near_right else "lb")
    named = [(n, c) for n, _, _, c, _ in series if n]
    if len(named) > 1:
        lx = px1 - 8 - max(text_width(n, 12) for n, _ in named) - 18
        for k, (n, c) in enumerate(named):
            ly = py0 + 8 + 16 * k
            draw.rectangle([lx, ly + 2, lx + 10, ly + 12], fill=c)
            draw.text((lx + 16, ly), n, fill=BLACK, font=font(12))


def dev_f1_curve(rows: list[dict], path) -> Path:
    """Dev precision, recall and F1 per epoch from metrics.jsonl rows; the epoch model.pt holds circled (the last
    that counted as a gain, --min_gain)."""
    img = Image.new("RGB", (720, 420), WHITE)
    ep = [r["epoch"] for r in rows]
    series = [(name, ep, [r[f"dev_{k}"] for r in rows], c, w)
              for name, k, c, w in (("precision", "precision", PALETTE[0], 1), ("recall", "recall", PALETTE[1], 1),
                                    ("F1", "f1", PALETTE[3], 3))]
    kept = [r for r in rows if r.get("improved")]
    best = kept[-1] if kept else max(rows, key=lambda r: r["dev_f1"])  # rows of older versions lack "improved"
    line_chart(ImageDraw.Draw(img), (0, 0, 720, 420), series, "dev entity P / R / F1 per epoch", "epoch", (0.0, 1.0),
               marks=[(best["epoch"], best["dev_f1"], f"best {best['dev_f1']:.3f}")], integer_x=True)
    return save(img, path)


# computed only on a batch's posts with an image
IMAGE_TERMS = ("residual", "preserve", "nce", "sparsity", "image_types", "distill")


def smooth(ys: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (what training dashboards draw over noisy per-step losses); NaNs are skipped."""
    out, s = [], None
    for y in ys:
        if math.isfinite(y):
            s = y if s is None else alpha * y + (1 - alpha) * s
        out.append(s if s is not None else float("nan"))
    return out


def loss_curves(steps: list[dict], epoch_ends: list[int], path) -> Path:
    """One small chart per loss term over optimiser steps (steps.jsonl rows {step, loss, tag, ...}).

    Terms that are zero at every step (e.g. residual/nce of a text-only model) are listed, not drawn. A batch
    without any image post logs exactly 0 for the image terms (IMAGE_TERMS): not a value, so a gap. Long runs
    get the raw values in a light line and their moving average on top; dotted lines mark epoch ends.
    """
    terms = [k for k in steps[0] if k not in ("step", "epoch")]
    drawn = [k for k in terms if any(r.get(k, 0.0) for r in steps)]
    zero = [k for k in terms if k not in drawn]
    cols, ph, pw = 2, 250, 430
    rows_n = max(1, math.ceil(len(drawn) / cols))
    img = Image.new("RGB", (cols * pw, 36 + rows_n * ph), WHITE)
    d = ImageDraw.Draw(img)
    title = "training loss terms (unweighted) and gradient norm per optimiser step"
    d.text((8, 6), title + (f"; always 0: {', '.join(zero)}" if zero else ""), fill=BLACK, font=font(16))
    xs = [r["step"] for r in steps]
    for k, term in enumerate(drawn):
        ys = [float(r.get(term, float("nan"))) for r in steps]
        if term in IMAGE_TERMS:
            ys = [y if y != 0 else float("nan") for y in ys]
        c = PALETTE[k % len(PALETTE)]
        series = [(None, xs, ys, c, 2)]
        if len(ys) > 30:
            light = tuple(int(v + (255 - v) * 0.65) for v in c)
            series = [(None, xs, ys, light, 1), (None, xs, smooth(ys), c, 2)]
        box = ((k % cols) * pw, 36 + (k // cols) * ph, (k % cols + 1) * pw, 36 + (k // cols + 1) * ph)
        line_chart(d, box, series, term, "step", vlines=epoch_ends[:-1])
    return save(img, path)


def per_type_bars(report: dict, path, split: str = "test") -> Path:
    """Grouped P/R/F1 bars for each entity type and the overall micro scores, supports under the names."""
    groups = [(t, v) for t, v in report["per_type"].items()]
    groups.append(("Overall", {"precision": report["precision"], "recall": report["recall"], "f1": report["f1"],
                               "gold_support": report["gold_support"]}))
    gw = 150
    W, H = 70 + gw * len(groups) + 20, 420
    img = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(img)
    px0, py0, py1 = 60, 60, H - 60
    d.text((8, 6), f"{split}: entity P / R / F1 per type ({report.get('mode', '')} mode)", fill=BLACK, font=font(16))
    for t in ticks(0, 1):
        y = py1 - t * (py1 - py0)
        d.line([(px0, y), (W - 20, y)], fill=GRID)
        d.text((px0 - 6, y), f"{t:g}", fill=MUTED, font=font(11), anchor="rm")
    keys = (("precision", "P"), ("recall", "R"), ("f1", "F1"))
    for k, (name, short) in enumerate(keys):
        d.rectangle([W - 200 + 60 * k, 32, W - 190 + 60 * k, 42], fill=PALETTE[k if k < 2 else 3])
        d.text((W - 186 + 60 * k, 30), short, fill=BLACK, font=font(12))
    for g, (name, v) in enumerate(groups):
        gx = px0 + 15 + g * gw
        for k, (key, _) in enumerate(keys):
            x = gx + k * 40
            y = py1 - v[key] * (py1 - py0)
            d.rectangle([x, y, x + 32, py1], fill=PALETTE[k if k < 2 else 3])
            d.text((x + 16, y - 3), f"{v[key]:.2f}", fill=BLACK, font=font(11), anchor="mb")
        d.text((gx + 56, py1 + 8), name, fill=BLACK, font=font(14), anchor="mt")
        d.text((gx + 56, py1 + 28), f"gold {v['gold_support']}", fill=MUTED, font=font(11), anchor="mt")
    d.line([(px0, py1), (W - 20, py1)], fill=MUTED)
    return save(img, path)


def confusion_matrix(gold: list[str], pred: list[str], path, split: str = "test") -> Path:
    """Word-level confusion of entity types (B-/I- dropped, O kept): rows gold, columns predicted.

    Cells are coloured by the row share (recall of the gold type) and show the word counts.
    """
    strip = lambda t: t[2:] if t != "O" else "O"
    g, p = [strip(t) for t in gold], [strip(t) for t in pred]
    labels = ["O"] + sorted(set(g + p) - {"O"})
    idx = {t: i for i, t in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for a, b in zip(g, p):
        m[idx[a], idx[b]] += 1
    cell, left, top = 74, 90, 86
    n = len(labels)
    img = Image.new("RGB", (left + n * cell + 30, top + n * cell + 40), WHITE)
    d = ImageDraw.Draw(img)
    acc = np.trace(m) / max(1, m.sum())
    d.text((8, 6), f"{split}: word-level type confusion (accuracy {acc:.3f})", fill=BLACK, font=font(16))
    d.text((left + n * cell / 2, top - 34), "predicted", fill=MUTED, font=font(13), anchor="mb")
    d.text((8, top - 18), "gold", fill=MUTED, font=font(13))
    share = m / np.maximum(1, m.sum(1, keepdims=True))
    for i, t in enumerate(labels):
        d.text((left + i * cell + cell / 2, top - 6), t, fill=BLACK, font=font(13), anchor="mb")
        d.text((left - 8, top + i * cell + cell / 2), t, fill=BLACK, font=font(13), anchor="rm")
        for j in range(n):
            c = value_colour(share[i, j], "VIRIDIS")
            x, y = left + j * cell, top + i * cell
            d.rectangle([x, y, x + cell - 2, y + cell - 2], fill=c)
            ink = WHITE if sum(c) < 380 else BLACK
            d.text((x + cell / 2, y + cell / 2 - 8), str(m[i, j]), fill=ink, font=font(14), anchor="mm")
            d.text((x + cell / 2, y + cell / 2 + 10), f"{share[i, j]:.0%}", fill=ink, font=font(10), anchor="mm")
    return save(img, path)


# ----------------------------------------------------------------------------- a run

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def read_conll_tags(path: Path) -> tuple[list[str], list[str]]:
    """Gold and predicted tags of every word of a `word<TAB>gold<TAB>pred` file written by test.py."""
    gold, pred = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("IMGID:"):
            cols = line.split("\t")
            gold.append(cols[-2])
            pred.append(cols[-1])
    return gold, pred


def read_steps(run: Path, rows: list[dict]) -> list[dict]:
    """steps.jsonl in step order; a resumed run redoes the steps after its checkpoint, so a step's last line wins.
    A run from before steps.jsonl gets one row per epoch (its mean losses, at the epoch's last step)."""
    f = run / "steps.jsonl"
    if f.is_file():
        return sorted({r["step"]: r for r in read_jsonl(f)}.values(), key=lambda r: r["step"])
    return [{"step": r["step"], **{k[6:]: v for k, v in r.items() if k.startswith("train_") and k != "train_s"}}
            for r in rows]


def run_plots(run, split: str, out_dir, tag: str = "") -> list[Path]:
    """The four run pictures from the files in the run directory -> PNGs in out_dir.

    dev_f1.png and losses.png need metrics.jsonl (losses.png: steps.jsonl; a run trained before steps.jsonl
    existed gets its per-epoch mean losses instead); <split>_per_type<tag>.png and <split>_confusion<tag>.png need
    <split>_report<tag>.json and <split>_predictions<tag>.conll (test.py writes them just before; `tag` names a
    control, decoding or bundle scoring, as test.py does).
    """
    run, out_dir = Path(run), Path(out_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics} is missing: the run has no training log to plot")
    rows = read_jsonl(metrics)
    out = [dev_f1_curve(rows, out_dir / "dev_f1.png")]
    out.append(loss_curves(read_steps(run, rows), [r["step"] for r in rows], out_dir / "losses.png"))
    report = json.loads((run / f"{split}_report{tag}.json").read_text())
    out.append(per_type_bars(report, out_dir / f"{split}_per_type{tag}.png", split + tag))
    gold, pred = read_conll_tags(run / f"{split}_predictions{tag}.conll")
    out.append(confusion_matrix(gold, pred, out_dir / f"{split}_confusion{tag}.png", split + tag))
    return out


# ----------------------------------------------------------------------------- a post

OVERLAY_TOP = 4.0  # attention at 4x uniform or more is drawn full red


def attention_overlay(view: np.ndarray, panels: list[tuple[str, np.ndarray]], path, title: str = "") -> Path:
    """The image as the model sees it, once per panel, with a heat map blended over it.

    view: [S, S, 3] uint8 RGB; panels: [(caption, heat [S, S] float >= 0, summing to 1)]. One colour scale for every
    map, in multiples of uniform attention (1/S^2 per pixel): 0 is blue, and red is OVERLAY_TOP x uniform or the
    map's own peak if higher, so near-uniform attention stays blue-green instead of being stretched to look focused.
    The caption's second line gives the map's range and where red sits.
    """
    S = view.shape[0]
    pad, cap = 12, 44
    img = Image.new("RGB", (max(pad + len(panels) * (S + pad), text_width(title, 15) + 2 * pad), 30 + S + cap), WHITE)
    d = ImageDraw.Draw(img)
    d.text((pad, 6), title, fill=BLACK, font=font(15))
    for k, (caption, heat) in enumerate(panels):
        u = heat * S * S                                                   # 1 = uniform attention
        top = max(OVERLAY_TOP, float(u.max()))
        h = u / top
        caption = f"{caption}\n{u.min():.2f}-{u.max():.2f}x uniform (red = {top:.1f}x)"
        colour = cv2.applyColorMap(np.uint8(np.clip(h, 0, 1) * 255), cv2.COLORMAP_JET)[..., ::-1]
        blend = cv2.addWeighted(view, 0.55, colour, 0.45, 0)
        x = pad + k * (S + pad)
        img.paste(Image.fromarray(blend), (x, 30))
        for i, line in enumerate(caption.split("\n")[:2]):
            d.text((x + S / 2, 36 + S + 16 * i), fit(line, S, 13), fill=BLACK, font=font(13), anchor="mt")
    return save(img, path)


def relevance_strip(words: list[str], tags: list[str], rel: list[float], gate: list[float], path,
                    title: str = "") -> Path:
    """The sentence, each word over its predicted tag and two cells coloured by rel and gate (viridis, 0..1).

    rel: how much of the image context the word takes; gate: mean of its per-dimension gate. Long posts wrap.
    """
    size, row_h, label_w, max_w = 16, 26, 54, 1100
    widths = [max(text_width(w, size), text_width(t, 12), 40) + 14 for w, t in zip(words, tags)]
    lines, cur, x = [], [], 0
    for i, w in enumerate(widths):
        if cur and x + w > max_w - label_w:
            lines.append(cur)
            cur, x = [], 0
        cur.append(i)
        x += w
    lines.append(cur)
    block = 4 * row_h + 14
    W = label_w + max(sum(widths[i] for i in line) for line in lines) + 16
    img = Image.new("RGB", (max(W, 420), 34 + block * len(lines) + 40), WHITE)
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill=BLACK, font=font(15))
    for li, line in enumerate(lines):
        y = 34 + li * block
        for r, name in enumerate(("word", "tag", "rel", "gate")):
            d.text((8, y + r * row_h + row_h / 2), name, fill=MUTED, font=font(12), anchor="lm")
        x = label_w
        for i in line:
            w = widths[i]
            d.text((x + w / 2, y + row_h / 2), words[i], fill=BLACK, font=font(size), anchor="mm")
            t = tags[i]
            d.text((x + w / 2, y + row_h * 1.5), t, fill=type_colour(t[2:]) if t != "O" else MUTED, font=font(12),
                   anchor="mm")
            for r, v in ((2, rel[i]), (3, gate[i])):
                c = value_colour(v)
                d.rectangle([x + 1, y + r * row_h + 2, x + w - 2, y + (r + 1) * row_h - 2], fill=c)
                d.text((x + w / 2, y + r * row_h + row_h / 2), f"{v:.2f}", fill=WHITE if sum(c) < 380 else BLACK,
                       font=font(11), anchor="mm")
            x += w
    y = img.height - 28  # colour key
    for k in range(200):
        d.line([(label_w + k, y), (label_w + k, y + 12)], fill=value_colour(k / 199))
    d.text((label_w - 6, y + 6), "0", fill=MUTED, font=font(11), anchor="rm")
    d.text((label_w + 206, y + 6), "1", fill=MUTED, font=font(11), anchor="lm")
    return save(img, path)
