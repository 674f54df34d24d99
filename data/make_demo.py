"""Deterministic generator of MANGO's synthetic "visual disambiguation" MNER demo set.

Each post is a tweet-like sentence with 1-2 invented names plus one drawn picture (person=PER, landscape=LOC,
building/badge=ORG, object=MISC). About half of the mentions sit in neutral templates, so only the picture tells
their type: text-only models should stall near 0.6 entity F1, models that use the image can approach 1.0.

    python data/make_demo.py [--out_dir data/demo] [--seed 13] [--n_train 600 --n_dev 150 --n_test 150]
                             [--image_size 160] [--force]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@contextmanager
def staging(out_dir: Path, force: bool):
    """A scratch folder of this call's own beside out_dir, published as out_dir when the block completes. Runs
    started together (reproduce.sh's parallel jobs on a fresh clone) each generate, and the first complete set wins
    (the same seed writes the same bytes); a failed or interrupted block leaves nothing behind."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's folder is the owner's alone
        if out_dir.exists() and force:  # the new set is complete before the old one goes
            shutil.rmtree(out_dir)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not out_dir.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate(out_dir, force: bool, write) -> Path:
    """A generated set at out_dir: left as it is when it exists (unless force), else write(scratch folder) fills a
    folder that staging() then publishes as out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        print(f"{out_dir} already exists; pass --force to regenerate")
        return out_dir
    with staging(out_dir, force) as tmp:
        write(tmp)
    return out_dir


TYPES = ("PER", "LOC", "ORG", "MISC")
SPLITS = ("train", "valid", "test")  # file stems; "valid" holds the dev split


def save_png(img: Image.Image, stem: Path) -> None:
    img.save(stem.with_suffix(".png"), compress_level=1)  # noise defeats heavy compression


def write_splits(tmp: Path, images: str, ids: str, sizes: list[int], pools: list[list[str]], text_seed: str,
                 make_post, draw, save=save_png) -> tuple:
    """The splits of a generated set: sizes[k] posts each, whose picture types are exactly balanced, in an order an
    RNG of the split's own (text_seed-split) shuffles; make_post(rng, names, type) -> ([(word, tag)], ambiguous
    mentions) writes each post from the split's name pool, draw(post id, type) -> (picture, cued object's box or
    None) its picture (with an RNG of its own, so a picture depends only on the seed and the id). Writes
    <split>.txt, the pictures under tmp/images (save(picture, path without extension)) and
    <split>_boxes.jsonl; returns (entity types Counter, ambiguous mentions, mentions)."""
    (tmp / images).mkdir(parents=True)
    ents, amb_n, ment_n = Counter(), 0, 0
    for split, n, names in zip(SPLITS, sizes, pools):
        rng = random.Random(f"{text_seed}-{split}")
        kinds = [TYPES[i % 4] for i in range(n)]
        rng.shuffle(kinds)
        lines, boxes = [], []
        for i, typ in enumerate(kinds):
            pid = f"{ids}_{split}_{i + 1:04d}"
            pairs, amb = make_post(rng, names, typ)
            heads = [t[2:] for _, t in pairs if t.startswith("B-")]
            ents.update(heads)
            amb_n, ment_n = amb_n + amb, ment_n + len(heads)
            lines += [f"IMGID:{pid}"] + [f"{w}\t{t}" for w, t in pairs] + [""]
            img, obj = draw(pid, typ)
            save(img, tmp / images / pid)
            if obj is not None:
                boxes.append({"imgid": pid, "type": typ, "box": obj, "size": list(img.size)})
        (tmp / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
        (tmp / f"{split}_boxes.jsonl").write_text("".join(json.dumps(b) + "\n" for b in boxes), encoding="utf-8")
    return ents, amb_n, ment_n
AMB_RATE = 0.75  # P(post has an ambiguous mention); with 1.5 mentions/post -> ~50% of mentions

# Neutral templates: nothing in them hints at the type of {X}.
AMBIGUOUS = [
    "Can't stop thinking about {X} today", "Finally saw {X} #wow", "{X} is all over my feed",
    "Everyone is talking about {X} tonight", "Still not over {X} lol", "Throwback to {X} #tbt",
    "Big news about {X} this morning", "Who else loves {X} ?", "Nothing beats {X} honestly",
    "Here is {X} in one picture", "Look what I found : {X}", "Thoughts on {X} ?",
]
# Cue words stay outside the entity span (tagged O) so the span is always just the name.
CUED = {
    "PER": ["Mr. {X} said the plan works", "Congrats to {X} on her birthday", "Dr. {X} spoke at the meeting",
            "Interview with singer {X} tonight", "{X} and his brother are back", "Happy birthday to my friend {X}"],
    "LOC": ["Flying to {X} city next week", "Traffic is terrible in downtown {X}", "Rain again in the {X} valley",
            "Moving to {X} this summer", "The weather in {X} is perfect", "Road trip through {X} province"],
    "ORG": ["{X} Inc. announced new jobs", "Shares of {X} fell today", "{X} Corp. hires a new CEO",
            "Just signed a contract with {X} Ltd.", "Workers at {X} headquarters went on strike",
            "The {X} company opens a store"],
    "MISC": ["The new {X} album drops Friday", "Playing the {X} game all night", "Watching the {X} movie again",
             "Just bought the {X} phone", "The {X} festival starts tomorrow", "Learning the {X} language slowly"],
}
# Prefixes end in punctuation so the capitalised template that follows still reads naturally.
PREFIXES = [["RT", "@newsbot", ":"], ["Wow", "!"], ["Omg", "!!"], ["New", "post", ":"]]
HASHTAGS = ["#photo", "#mood", "#news", "#weekend", "#love", "#today", "#life"]
ONSETS = "b d f g k l m n p r s t v z br dr kr st th sh".split()
VOWELS = "a e i o u ai ou".split()
CODAS = ["", "", "", "n", "r", "l", "s", "th", "x"]


# ----------------------------------------------------------------------------- text
def pseudo_words(rng: random.Random, n: int) -> list[str]:
    out: dict[str, None] = {}  # a dict, not a set: its order does not depend on the hash seed
    while len(out) < n:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))
        out[(w + rng.choice(CODAS)).capitalize()] = None
    return list(out)


def name_pools(rng: random.Random, sizes: list[int]) -> list[list[str]]:
    """Per-split names built from per-split word pools, so no name or name word leaks across splits."""
    n_words = [max(16, n) for n in sizes]
    words, pools, start = pseudo_words(rng, sum(n_words)), [], 0
    for n in n_words:
        ws = words[start:start + n]
        start += n
        pools.append(sorted({" ".join(rng.sample(ws, rng.choice((1, 1, 2)))) for _ in range(2 * n)}))
    for a, b in combinations(pools, 2):
        assert not set(a) & set(b), "entity names leak across splits"
        assert not {w for n in a for w in n.split()} & {w for n in b for w in n.split()}, "name words leak"
    return pools


def make_post(rng: random.Random, names: list[str], img_type: str):
    """Return ([(token, tag)], n_ambiguous); the picture type goes to the ambiguous mention, else to the first."""
    n_ment = rng.choice((1, 2))
    amb = rng.randrange(n_ment) if rng.random() < AMB_RATE else None
    types = [rng.choice(TYPES) for _ in range(n_ment)]
    types[0 if amb is None else amb] = img_type
    pairs = []
    for k, (name, typ) in enumerate(zip(rng.sample(names, n_ment), types)):
        if k:
            pairs.append((rng.choice([".", "!", "|", "-", "..."]), "O"))
        for tok in rng.choice(AMBIGUOUS if k == amb else CUED[typ]).split():
            if tok == "{X}":
                pairs += [(w, ("I-" if j else "B-") + typ) for j, w in enumerate(name.split())]
            else:
                pairs.append((tok, "O"))
    if rng.random() < 0.2 and len(pairs) <= 17:
        pairs = [(w, "O") for w in rng.choice(PREFIXES)] + pairs
    while len(pairs) < 20 and (len(pairs) < 5 or rng.random() < 0.35):
        pairs.append((rng.choice(HASHTAGS), "O"))
    assert 5 <= len(pairs) <= 20, pairs
    return pairs, int(amb is not None)


# ----------------------------------------------------------------------------- images
def rc(rng: random.Random, lo: int = 0, hi: int = 255) -> tuple:
    return tuple(rng.randint(lo, hi) for _ in range(3))


def box(cx: float, cy: float, rx: float, ry: float | None = None) -> list[float]:
    return [cx - rx, cy - (rx if ry is None else ry), cx + rx, cy + (rx if ry is None else ry)]


def rel(cx: float, cy: float, s: float, *xy: float) -> list[float]:
    """Points given relative to an object's centre, in units of its size."""
    return [(cx if i % 2 == 0 else cy) + v * s for i, v in enumerate(xy)]


def gradient(a, b, W: int, horizontal: bool = False) -> Image.Image:
    t = np.linspace(0.0, 1.0, W, dtype=np.float32)[:, None, None]
    arr = np.clip((1 - t) * np.array(a, np.float32) + t * np.array(b, np.float32), 0, 255)
    arr = np.broadcast_to(arr, (W, W, 3))
    return Image.fromarray((arr.transpose(1, 0, 2) if horizontal else arr).astype(np.uint8))


def draw_person(img, d, rng, W):
    h = rng.uniform(0.6, 0.9) * W
    cx, top = rng.uniform(0.3, 0.7) * W, rng.uniform(0.03, 0.97 - h / W) * W
    r, lw, hip = 0.12 * h, max(2, int(0.07 * h)), top + 0.6 * h
    skin, shirt, pants, ink = rc(rng, 120, 240), rc(rng), rc(rng, 0, 150), (20, 20, 20)
    reach = top  # a waving hand may rise above the head
    for s in (-1, 1):  # legs, then arms (hanging or waving)
        d.line([cx + s * 0.07 * h, hip, cx + s * rng.uniform(0.08, 0.2) * h, top + h], fill=pants, width=lw)
        hy = top + (rng.uniform(0.0, 0.15) if rng.random() < 0.4 else rng.uniform(0.5, 0.65)) * h
        d.line([cx + s * 0.15 * h, top + 2.4 * r, cx + s * 0.32 * h, hy], fill=shirt, width=lw)
        d.ellipse(box(cx + s * 0.32 * h, hy, lw), fill=skin)
        reach = min(reach, hy - lw)
    # Dark outlines keep the figure visible when its colours happen to match the backdrop.
    d.rounded_rectangle([cx - 0.17 * h, top + 2.1 * r, cx + 0.17 * h, hip], radius=int(0.06 * h), fill=shirt,
                        outline=ink, width=2)
    d.ellipse(box(cx, top + r, r), fill=skin, outline=ink, width=2)
    if rng.random() < 0.7:
        d.chord(box(cx, top + r, r), 180, 360, fill=rc(rng, 0, 120))  # hair
    for s in (-1, 1):
        d.ellipse(box(cx + s * 0.4 * r, top + 1.1 * r, 0.1 * r), fill=ink)
    d.arc(box(cx, top + 1.35 * r, 0.45 * r, 0.25 * r), 20, 160, fill=ink, width=max(1, int(0.08 * r)))
    return [cx - 0.32 * h - lw, reach, cx + 0.32 * h + lw, top + h + lw / 2]  # the feet: half a line width below


def draw_landscape(img, d, rng, W):
    sky = rng.choice([(70, 130, 220), (250, 150, 80), (120, 80, 160), (150, 200, 240)])
    img.paste(gradient([c + rng.randint(-25, 25) for c in sky], rc(rng, 180, 250), W))
    hz = rng.uniform(0.45, 0.72) * W
    sun = (255, rng.randint(180, 240), rng.randint(40, 120))
    d.ellipse(box(rng.uniform(0.1, 0.9) * W, rng.uniform(0.1, 0.35) * W, rng.uniform(0.05, 0.1) * W), fill=sun)
    if rng.random() < 0.5:  # mountains with snow caps
        for _ in range(rng.randint(2, 4)):
            px, ph, hw = rng.uniform(0, 1) * W, rng.uniform(0.2, 0.4) * W, rng.uniform(0.2, 0.35) * W
            d.polygon([px - hw, hz, px, hz - ph, px + hw, hz], fill=rc(rng, 70, 140))
            d.polygon([px - hw / 4, hz - 0.75 * ph, px, hz - ph, px + hw / 4, hz - 0.75 * ph], fill=(245, 245, 250))
    else:  # rolling hills
        for _ in range(rng.randint(2, 3)):
            hx, hr = rng.uniform(0, 1) * W, rng.uniform(0.3, 0.6) * W
            green = (rng.randint(40, 110), rng.randint(120, 190), rng.randint(30, 80))
            d.ellipse([hx - hr, hz - 0.25 * hr, hx + hr, hz + 0.8 * hr], fill=green)
    d.rectangle([0, hz, W, W], fill=(rng.randint(60, 190), rng.randint(110, 190), rng.randint(40, 100)))
    if rng.random() < 0.5:  # lake / sea with light ripples
        wy = rng.uniform(hz + 0.05 * W, 0.85 * W)
        d.rectangle([0, wy, W, W], fill=(rng.randint(20, 80), rng.randint(90, 150), rng.randint(170, 230)))
        for _ in range(6):
            x, y = rng.uniform(0, 0.8) * W, rng.uniform(wy, W)
            d.line([x, y, x + 0.15 * W, y], fill=(200, 225, 250), width=2)
    return None  # the whole scene is the cue: no object box


def draw_org(img, d, rng, W):
    if rng.random() < 0.5:  # office block(s) with a window grid
        gy, xs, top = 0.88 * W, [], W
        d.rectangle([0, gy, W, W], fill=rc(rng, 90, 140))
        for _ in range(rng.randint(1, 2)):
            bw, bh = rng.uniform(0.3, 0.5) * W, rng.uniform(0.5, 0.8) * W
            x0, y0 = min(max(0, rng.uniform(0.05, 0.95) * W - bw / 2), W - bw), gy - bh
            d.rectangle([x0, y0, x0 + bw, gy], fill=rc(rng, 80, 200), outline=(40, 40, 40), width=2)
            cols, rows, glass = rng.randint(3, 5), rng.randint(4, 7), rc(rng, 150, 255)
            cw, ch = bw / cols, 0.8 * bh / rows
            for i in range(cols):
                for j in range(rows):
                    d.rectangle([x0 + (i + 0.2) * cw, y0 + (j + 0.25) * ch, x0 + (i + 0.8) * cw, y0 + (j + 0.8) * ch],
                                fill=glass)
            d.rectangle([x0 + 0.4 * bw, gy - 0.12 * bh, x0 + 0.6 * bw, gy], fill=(50, 40, 30))
            xs, top = xs + [x0, x0 + bw], min(top, y0)
        return [min(xs), top, max(xs), gy]
    else:  # logo badge: ring + big letter
        cx, cy, r = rng.uniform(0.4, 0.6) * W, rng.uniform(0.4, 0.6) * W, rng.uniform(0.28, 0.42) * W
        fill, lw = rc(rng), max(3, int(0.1 * r))
        ring = rc(rng, 0, 90) if sum(fill) > 380 else rc(rng, 170, 255)  # letter must contrast with its badge
        if rng.random() < 0.5:
            d.ellipse(box(cx, cy, r), fill=fill, outline=ring, width=lw)
        else:
            d.rounded_rectangle(box(cx, cy, r), radius=int(0.3 * r), fill=fill, outline=ring, width=lw)
        font = ImageFont.load_default(size=max(10, int(1.2 * r)))
        d.text((cx, cy), rng.choice("ABDEGHKMNRSTXZ"), fill=ring, font=font, anchor="mm", stroke_width=lw // 3)
        return box(cx, cy, r)


def draw_misc(img, d, rng, W):
    kind, col, ink = rng.choice(("ball", "cup", "car")), rc(rng), (20, 20, 20)
    cx, cy, s = rng.uniform(0.35, 0.65) * W, rng.uniform(0.4, 0.6) * W, rng.uniform(0.25, 0.38) * W
    lw = max(2, int(0.05 * s))
    if kind == "ball":  # basketball-style seams + floor shadow
        d.ellipse(box(cx, cy + 0.9 * s, 0.9 * s, 0.1 * s), fill=(60, 60, 60))
        d.ellipse(box(cx, cy, s), fill=col, outline=ink, width=lw)
        d.line(rel(cx, cy, s, 0, -1, 0, 1), fill=ink, width=lw)
        d.line(rel(cx, cy, s, -1, 0, 1, 0), fill=ink, width=lw)
        d.arc(box(cx - s, cy, 0.7 * s, s), -55, 55, fill=ink, width=lw)
        d.arc(box(cx + s, cy, 0.7 * s, s), 125, 235, fill=ink, width=lw)
        return [cx - s, cy - s, cx + s, cy + s]
    elif kind == "cup":  # mug on a saucer, with steam
        d.ellipse(box(cx, cy + 0.88 * s, 1.1 * s, 0.12 * s), fill=rc(rng, 180, 255))
        d.ellipse(box(cx + 0.7 * s, cy, 0.35 * s, 0.4 * s), outline=col, width=max(3, int(0.15 * s)))
        d.polygon(rel(cx, cy, s, -0.7, -0.7, 0.7, -0.7, 0.5, 0.85, -0.5, 0.85), fill=col, outline=ink, width=lw)
        d.ellipse(box(cx, cy - 0.7 * s, 0.7 * s, 0.1 * s), fill=(90, 50, 20))
        for dx in (-0.3, 0.0, 0.3):
            d.line(rel(cx, cy, s, dx, -0.9, dx + 0.1, -1.1, dx, -1.3), fill=(235, 235, 235), width=lw)
        return [cx - 1.1 * s, cy - 1.3 * s, cx + 1.1 * s, cy + s]
    else:  # car: cabin with window, body, two wheels
        s *= 0.8  # it is wide; keep it (mostly) inside the frame
        d.polygon(rel(cx, cy, s, -0.55, -0.1, -0.35, -0.55, 0.4, -0.55, 0.65, -0.1), fill=col)
        d.polygon(rel(cx, cy, s, -0.35, -0.15, -0.25, -0.45, 0.35, -0.45, 0.5, -0.15), fill=(170, 210, 240))
        d.rounded_rectangle(rel(cx, cy, s, -1.1, -0.15, 1.1, 0.35), radius=int(0.15 * s), fill=col, outline=ink,
                            width=lw)
        for wx in (cx - 0.6 * s, cx + 0.6 * s):
            d.ellipse(box(wx, cy + 0.35 * s, 0.25 * s), fill=ink)
            d.ellipse(box(wx, cy + 0.35 * s, 0.1 * s), fill=(170, 170, 170))
        return [cx - 1.1 * s, cy - 0.55 * s, cx + 1.1 * s, cy + 0.6 * s]


DRAW = {"PER": draw_person, "LOC": draw_landscape, "ORG": draw_org, "MISC": draw_misc}


def draw_image(rng: random.Random, typ: str, size: int) -> tuple[Image.Image, list[int] | None]:
    """(picture, its cued object's box [x0, y0, x1, y1] in pixels, or None for a landscape: the scene is the cue)."""
    W = 2 * size  # draw at 2x and box-downsample: cheap anti-aliasing
    # Every class gets a random flat or gradient backdrop so "has a gradient" is no landscape cue.
    a = rc(rng, 50, 235)
    img = gradient(a, a if rng.random() < 0.4 else rc(rng, 50, 235), W, horizontal=rng.random() < 0.5)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 4)):  # small clutter shapes shared by all classes
        shape = d.ellipse if rng.random() < 0.5 else d.rectangle
        shape(box(rng.uniform(0, W), rng.uniform(0, W), rng.uniform(0.01, 0.04) * W), fill=rc(rng))
    obj = DRAW[typ](img, d, rng, W)
    arr = np.asarray(img.reduce(2), dtype=np.float32)
    # Luminance noise (shared by R, G, B): hides exact pixel values, keeps the PNGs half as big and fast to write.
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, rng.uniform(3, 12), (size, size, 1))
    pic = Image.fromarray(np.clip(arr + noise, 0, 255).round().astype(np.uint8), "RGB")
    if obj is None:
        return pic, None
    x0, y0, x1, y1 = (min(max(v / 2, 0), size) for v in obj)  # drawn at 2x, clipped to the frame
    return pic, [int(x0), int(y0), max(int(x0) + 1, round(x1)), max(int(y0) + 1, round(y1))]


# ----------------------------------------------------------------------------- driver
def make_demo(out_dir, seed: int = 13, n_train: int = 600, n_dev: int = 150, n_test: int = 150,
              image_size: int = 160, force: bool = False) -> Path:
    """Write the demo set to out_dir (via a scratch folder, then rename) and return its path."""
    def write(tmp: Path) -> None:
        sizes = [n_train, n_dev, n_test]
        ents, amb_n, ment_n = write_splits(
            tmp, "demo_images", "demo", sizes, name_pools(random.Random(f"names-{seed}"), sizes), f"text-{seed}",
            make_post, lambda pid, typ: draw_image(random.Random(f"img-{seed}-{pid}"), typ, image_size))
        share = amb_n / max(1, ment_n)
        ceiling = (1 - share) + share * 0.25
        counts = " ".join(f"{t}={ents[t]}" for t in TYPES)
        (tmp / "README.md").write_text(f"""# MANGO demo set: synthetic visual-disambiguation MNER

Made by `python data/make_demo.py --seed {seed}` (same seed => byte-identical files). Splits: train={n_train},
valid (dev)={n_dev}, test={n_test} posts in CoNLL files with an `IMGID:<id>` line per post, and one
{image_size}x{image_size} RGB PNG per post in `demo_images/`. Entities: {counts}.

Posts are tweet-like sentences (5-20 tokens) with 1-2 invented names; name pools are disjoint across splits.
{share:.1%} of mentions are ambiguous: they sit in neutral templates ("{{X}} is all over my feed") and only the
picture tells their type: person=PER, landscape=LOC, office building or letter badge=ORG, ball/cup/car=MISC.
The rest carry text cues ("Mr. {{X}}", "{{X}} Inc."); posts without an ambiguous mention show their first
entity's type. Colours, positions, sizes and backgrounds vary, with clutter shapes and pixel noise.
`<split>_boxes.jsonl` gives each picture's cued object ({{"imgid", "type", "box": [x0, y0, x1, y1], "size"}}; none
for landscapes, where the whole scene is the cue), for `test.py --explain_hits`.

Expected text-only ceiling (an expectation, not a measurement): cued mentions ~1.0, ambiguous ones at chance
(1/4), so about {1 - share:.2f} + {share:.2f} x 0.25 = {ceiling:.2f} entity F1, and a text-only model should
stay <= 0.75. A model that uses the image should clearly beat it.
""", encoding="utf-8", newline="\n")
        print(f"demo set -> {out_dir} | posts train/dev/test={n_train}/{n_dev}/{n_test} | entities {counts} "
              f"| ambiguous {amb_n}/{ment_n}={share:.1%} | text-only ceiling ~{ceiling:.2f}")

    return generate(out_dir, force, write)


def generator_main(make, doc: str, folder: str, **defaults: int) -> None:
    """A set generator's command line: --out_dir (data/<folder>), an int flag per keyword of `defaults` and --force,
    each passed to make() by name."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--out_dir", default=str(Path(__file__).resolve().parent / folder))
    for k, v in defaults.items():
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--force", action="store_true", help="regenerate even if out_dir exists")
    a = vars(ap.parse_args())
    make(a.pop("out_dir"), **a)


def main() -> None:
    generator_main(make_demo, __doc__, "demo", seed=13, n_train=600, n_dev=150, n_test=150, image_size=160)


if __name__ == "__main__":
    main()
