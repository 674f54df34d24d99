"""Deterministic generator of MANGO's held-out picture set: visual-disambiguation MNER unlike the demo set.

Vision designs are chosen on this set's dev split, never on demo (whose pictures they were first built on). It was
written and committed before any design was tuned on it, and is left as it is since: its pictures differ from
demo's in every way that was thought of:

    demo                                       held-out
    160 x 160 squares                          non-square, 176-320 wide, 144-256 high, varying per picture
    full-body figure / landscape /             bust portrait / island map with a pin / flag on a pole or a
    office block or letter badge / ball-cup-car  factory with chimneys / guitar, bicycle or desk lamp
    object near the centre, large              anywhere (edges included), 22-60 % of the short side
    flat or gradient backdrop, 0-4 dots        textures (stripes, checks, blotches), 3-12 clutter shapes, lines
                                               and scribbled strokes, 15 % grey-scale pictures
    luminance noise                            per-channel noise, a random blur or JPEG-like blockiness

Each post is a short sentence with 1-2 invented names (other templates, other syllables than demo's); about half
of the mentions sit in neutral templates, where only the picture tells their type. Beside each split's CoNLL file,
`<split>_boxes.jsonl` gives each picture's cued object: {"imgid", "type", "box": [x0, y0, x1, y1] in pixels,
"size": [W, H]} (for explanation hit rates; the CoNLL files stay plain).

    python data/make_heldout.py [--out_dir data/heldout] [--seed 29] [--n_train 800 --n_dev 200 --n_test 200]
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

try:  # run as a script (data/ on the path) or imported as data.make_heldout
    from make_demo import TYPES, generate, generator_main, write_splits
except ImportError:
    from data.make_demo import TYPES, generate, generator_main, write_splits

@dataclass(frozen=True)
class Words:
    """What a generated set's posts are made of: the share of posts with an ambiguous mention, the neutral and the
    type-cued templates, what joins two mentions, the closing hashtags and how often one ends a post, and the
    syllables and endings of the invented names."""
    amb_rate: float
    ambiguous: list
    cued: dict
    joiners: list
    tags: list
    tag_rate: float
    syllables: list
    tails: list


HELDOUT = Words(
    amb_rate=0.7,
    ambiguous=[
        "{X} again , cannot believe it", "so this is {X}", "honestly {X} made my week", "posting {X} before I forget",
        "{X} , that is all", "anyone else seen {X} ?", "my view of {X} right now", "{X} in the flesh",
        "guess who : {X}", "obsessed with {X} lately", "saving this one : {X}", "{X} 🔥",
    ],
    cued={
        "PER": ["{X} told reporters she is staying", "lunch with my cousin {X}", "{X} scored twice for them",
                "say hi to {X} , our new teacher", "{X} will sign books at noon"],
        "LOC": ["hiking around {X} island", "landed in {X} airport", "snow closes roads near {X}",
                "the mayor of {X} resigned", "beaches of {X} are packed"],
        "ORG": ["{X} recalls 2000 vehicles", "{X} posted record profits", "I applied for a job at {X}",
                "the {X} board meets monday", "{X} factory cuts shifts"],
        "MISC": ["tickets for the {X} tour sold out", "the {X} update broke my laptop", "reading {X} , the novel",
                 "{X} cup final tonight", "practising {X} chords all day"],
    },
    joiners=["and", "/", "+", "then"],
    tags=["#nofilter", "#throwback", "#random", "#viral", "#fyp"],
    tag_rate=0.3,
    syllables="ka mo ri ve lu xa no pe qui zo ha te wy fi ju ol em ar".split(),
    tails=["", "", "ov", "ez", "ia", "ton", "ski", "um"],
)


# ----------------------------------------------------------------------------- text

def name_pools(rng: random.Random, sizes: list[int], words: Words = HELDOUT) -> list[list[str]]:
    """Disjoint per-split pools of invented names (no name word shared across splits)."""
    names: dict[str, None] = {}
    while len(names) < 3 * sum(sizes):
        w = "".join(rng.choice(words.syllables) for _ in range(rng.randint(2, 3))) + rng.choice(words.tails)
        names[w.capitalize()] = None
    names_l, pools, start = list(names), [], 0
    for n in sizes:
        ws = names_l[start:start + 3 * n]
        start += 3 * n
        pools.append(sorted({" ".join(rng.sample(ws, rng.choice((1, 2, 2)))) for _ in range(2 * n)}))
    return pools


def make_post(rng: random.Random, names: list[str], img_type: str, words: Words = HELDOUT) -> tuple[list, int]:
    """([(word, tag)], 1 if a mention is ambiguous); the picture's type goes to the ambiguous mention, else the
    first."""
    n = rng.choice((1, 1, 2))
    amb = rng.randrange(n) if rng.random() < words.amb_rate else None
    types = [rng.choice(TYPES) for _ in range(n)]
    types[0 if amb is None else amb] = img_type
    pairs: list[tuple[str, str]] = []
    for k, (name, typ) in enumerate(zip(rng.sample(names, n), types)):
        if k:
            pairs.append((rng.choice(words.joiners), "O"))
        for tok in rng.choice(words.ambiguous if k == amb else words.cued[typ]).split():
            if tok == "{X}":
                pairs += [(w, ("I-" if j else "B-") + typ) for j, w in enumerate(name.split())]
            else:
                pairs.append((tok, "O"))
    if rng.random() < words.tag_rate:
        pairs.append((rng.choice(words.tags), "O"))
    return pairs, int(amb is not None)


# ----------------------------------------------------------------------------- pictures

def colour(rng: random.Random, lo: int = 0, hi: int = 255) -> tuple:
    return tuple(rng.randint(lo, hi) for _ in range(3))


def texture(rng: random.Random, W: int, H: int) -> Image.Image:
    """A busy backdrop: stripes, checks or soft blotches in two random colours."""
    a, b = np.array(colour(rng, 30, 225), np.float32), np.array(colour(rng, 30, 225), np.float32)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    kind = rng.choice(("stripes", "checks", "blotches"))
    if kind == "stripes":
        ang, per = rng.uniform(0, np.pi), rng.uniform(8, 40)
        t = 0.5 + 0.5 * np.sin((x * np.cos(ang) + y * np.sin(ang)) * 2 * np.pi / per)
    elif kind == "checks":
        c = rng.randint(10, 40)
        t = ((x // c + y // c) % 2).astype(np.float32)
    else:
        t = np.zeros((H, W), np.float32)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0.1, 0.4) * max(W, H)
            t += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        t = t / t.max()
    arr = a * (1 - t[..., None]) + b * t[..., None]
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def clutter(d: ImageDraw.ImageDraw, rng: random.Random, W: int, H: int) -> None:
    """Distractors every class shares: polygons, rings, lines and scribbled strokes."""
    for _ in range(rng.randint(3, 12)):
        x, y, s = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0.02, 0.1) * min(W, H)
        k = rng.random()
        if k < 0.3:
            d.polygon([(x + s * np.cos(t), y + s * np.sin(t)) for t in np.linspace(0, 2 * np.pi, rng.randint(3, 7),
                                                                                  endpoint=False)], fill=colour(rng))
        elif k < 0.5:
            d.ellipse([x - s, y - s, x + s, y + s], outline=colour(rng), width=max(1, int(s / 4)))
        elif k < 0.75:
            d.line([x, y, x + rng.uniform(-4, 4) * s, y + rng.uniform(-4, 4) * s], fill=colour(rng), width=2)
        else:
            pts = [(x, y)]
            for _ in range(6):
                pts.append((pts[-1][0] + rng.uniform(-s, s), pts[-1][1] + rng.uniform(-s, s)))
            d.line(pts, fill=colour(rng), width=1)


def draw_bust(d, rng, x, y, s):  # PER: head, eyes, neck and shoulders
    skin, top, ink = colour(rng, 110, 235), colour(rng), (15, 15, 15)
    d.polygon([(x - 0.5 * s, y + 0.5 * s), (x + 0.5 * s, y + 0.5 * s), (x + 0.3 * s, y + 0.12 * s),
               (x - 0.3 * s, y + 0.12 * s)], fill=top, outline=ink)
    d.rectangle([x - 0.07 * s, y, x + 0.07 * s, y + 0.14 * s], fill=skin)
    d.ellipse([x - 0.2 * s, y - 0.5 * s, x + 0.2 * s, y + 0.02 * s], fill=skin, outline=ink, width=2)
    for e in (-1, 1):
        d.ellipse([x + e * 0.08 * s - 0.03 * s, y - 0.3 * s, x + e * 0.08 * s + 0.03 * s, y - 0.24 * s], fill=ink)
    d.line([x - 0.06 * s, y - 0.12 * s, x + 0.06 * s, y - 0.12 * s], fill=ink, width=2)


def draw_island(d, rng, x, y, s):  # LOC: an island on a patch of sea, with a map pin
    d.rectangle([x - 0.5 * s, y - 0.5 * s, x + 0.5 * s, y + 0.5 * s], fill=(rng.randint(20, 70), rng.randint(90, 160),
                                                                            rng.randint(170, 240)))
    n = rng.randint(7, 12)
    pts = [(x + rng.uniform(0.2, 0.4) * s * np.cos(t), y + rng.uniform(0.2, 0.4) * s * np.sin(t))
           for t in np.linspace(0, 2 * np.pi, n, endpoint=False)]
    d.polygon(pts, fill=(rng.randint(170, 230), rng.randint(160, 210), rng.randint(90, 140)), outline=(60, 50, 30))
    d.ellipse([x - 0.07 * s, y - 0.3 * s, x + 0.07 * s, y - 0.16 * s], fill=(220, 30, 40))
    d.polygon([(x - 0.06 * s, y - 0.2 * s), (x + 0.06 * s, y - 0.2 * s), (x, y - 0.05 * s)], fill=(220, 30, 40))


def draw_org(d, rng, x, y, s):  # ORG: a striped flag on a pole, or a factory with chimneys and smoke
    ink = (25, 25, 25)
    if rng.random() < 0.5:
        d.line([x - 0.35 * s, y - 0.5 * s, x - 0.35 * s, y + 0.5 * s], fill=ink, width=max(2, int(0.04 * s)))
        n, h = rng.randint(2, 4), 0.45 * s
        for k in range(n):
            d.rectangle([x - 0.33 * s, y - 0.48 * s + k * h / n, x + 0.45 * s, y - 0.48 * s + (k + 1) * h / n],
                        fill=colour(rng))
    else:
        d.rectangle([x - 0.5 * s, y, x + 0.5 * s, y + 0.4 * s], fill=colour(rng, 60, 180), outline=ink, width=2)
        for cx in (x - 0.3 * s, x + 0.05 * s):
            d.rectangle([cx, y - 0.35 * s, cx + 0.12 * s, y], fill=colour(rng, 60, 140), outline=ink)
            for k in range(3):
                r = 0.05 * s * (k + 1)
                d.ellipse([cx + 0.06 * s - r, y - 0.42 * s - 0.1 * s * k - r, cx + 0.06 * s + r,
                           y - 0.42 * s - 0.1 * s * k + r], fill=(200, 200, 205))


def draw_thing(d, rng, x, y, s):  # MISC: a guitar, a bicycle or a desk lamp
    ink, col = (20, 20, 20), colour(rng)
    kind = rng.choice(("guitar", "bicycle", "lamp"))
    w = max(2, int(0.04 * s))
    if kind == "guitar":
        d.ellipse([x - 0.25 * s, y + 0.05 * s, x + 0.25 * s, y + 0.5 * s], fill=col, outline=ink, width=w)
        d.ellipse([x - 0.18 * s, y - 0.2 * s, x + 0.18 * s, y + 0.15 * s], fill=col, outline=ink, width=w)
        d.rectangle([x - 0.04 * s, y - 0.5 * s, x + 0.04 * s, y], fill=(90, 60, 30))
        d.ellipse([x - 0.07 * s, y + 0.12 * s, x + 0.07 * s, y + 0.26 * s], fill=ink)
    elif kind == "bicycle":
        for cx in (x - 0.3 * s, x + 0.3 * s):
            d.ellipse([cx - 0.2 * s, y - 0.2 * s + 0.2 * s, cx + 0.2 * s, y + 0.2 * s + 0.2 * s], outline=ink, width=w)
        d.line([x - 0.3 * s, y + 0.2 * s, x, y - 0.05 * s, x + 0.3 * s, y + 0.2 * s, x - 0.05 * s, y + 0.2 * s,
                x - 0.3 * s, y + 0.2 * s], fill=col, width=w)
        d.line([x, y - 0.05 * s, x - 0.05 * s, y - 0.2 * s], fill=ink, width=w)
    else:
        d.rectangle([x - 0.25 * s, y + 0.4 * s, x + 0.25 * s, y + 0.5 * s], fill=col, outline=ink)
        d.line([x, y + 0.4 * s, x - 0.15 * s, y, x + 0.1 * s, y - 0.3 * s], fill=ink, width=w)
        d.polygon([(x + 0.1 * s, y - 0.45 * s), (x + 0.4 * s, y - 0.2 * s), (x + 0.05 * s, y - 0.1 * s)], fill=col,
                  outline=ink)


DRAW = {"PER": draw_bust, "LOC": draw_island, "ORG": draw_org, "MISC": draw_thing}


def object_box(typ: str, rng: random.Random, x: float, y: float, s: float, W: int, H: int) -> list[int]:
    """[x0, y0, x1, y1] of the object DRAW[typ] is about to draw with rng (left as it was): the s x s square it is
    drawn in, widened to any part drawn outside it (a factory's smoke), found by drawing it once on an empty layer."""
    shadow, layer = random.Random(), Image.new("RGBA", (W, H), (0, 0, 0, 0))
    shadow.setstate(rng.getstate())
    DRAW[typ](ImageDraw.Draw(layer), shadow, x, y, s)
    reach = layer.getchannel("A").getbbox() or (W, H, 0, 0)
    return [max(0, min(int(x - 0.5 * s), reach[0])), max(0, min(int(y - 0.5 * s), reach[1])),
            min(W, max(int(x + 0.5 * s) + 1, reach[2])), min(H, max(int(y + 0.5 * s) + 1, reach[3]))]


def draw_picture(rng: random.Random, typ: str) -> tuple[Image.Image, list[int]]:
    """(RGB picture of a random size, the cued object's box [x0, y0, x1, y1] in its pixels)."""
    W, H = rng.randint(176, 320), rng.randint(144, 256)
    img = texture(rng, W, H)
    d = ImageDraw.Draw(img)
    clutter(d, rng, W, H)
    s = rng.uniform(0.22, 0.6) * min(W, H)  # the object spans about s x s
    x, y = rng.uniform(0.5 * s, W - 0.5 * s), rng.uniform(0.5 * s, H - 0.5 * s)
    box = object_box(typ, rng, x, y, s, W, H)
    DRAW[typ](d, rng, x, y, s)
    if rng.random() < 0.5:
        clutter(d, rng, W, H)  # some distractors in front of the object too
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    elif rng.random() < 0.3:
        q = rng.randint(4, 8)
        img = img.resize((W // q, H // q), Image.BILINEAR).resize((W, H), Image.NEAREST)  # blocky, like a bad JPEG
    arr = np.asarray(img, np.float32)
    arr = arr + np.random.default_rng(rng.getrandbits(64)).normal(0, rng.uniform(2, 10), arr.shape)
    if rng.random() < 0.15:
        arr = np.repeat(arr.mean(-1, keepdims=True), 3, -1)
    return Image.fromarray(arr.clip(0, 255).round().astype(np.uint8), "RGB"), box


# ----------------------------------------------------------------------------- driver

def make_heldout(out_dir, seed: int = 29, n_train: int = 800, n_dev: int = 200, n_test: int = 200,
                 force: bool = False) -> Path:
    """Write the held-out set to out_dir (via a scratch folder, then rename) and return its path."""
    def write(tmp: Path) -> None:
        sizes = [n_train, n_dev, n_test]
        ents, amb_n, ment_n = write_splits(
            tmp, "heldout_images", "ho", sizes, name_pools(random.Random(f"heldout-names-{seed}"), sizes),
            f"heldout-text-{seed}", make_post,
            lambda pid, typ: draw_picture(random.Random(f"heldout-img-{seed}-{pid}"), typ))
        share = amb_n / max(1, ment_n)
        counts = " ".join(f"{t}={ents[t]}" for t in TYPES)
        (tmp / "README.md").write_text(f"""# MANGO held-out picture set

Made by `python data/make_heldout.py --seed {seed}` (same seed => byte-identical files); see that file's docstring
for how it differs from the demo set. Vision designs are chosen on its dev split (valid.txt); its test split is
scored once per design. Splits: train={n_train}, valid={n_dev}, test={n_test} posts; pictures in
heldout_images/, the cued object's box per picture in <split>_boxes.jsonl. Entities: {counts}; {share:.1%} of the
mentions are ambiguous (only the picture tells their type), so text alone should stay near
{(1 - share) + share * 0.25:.2f} entity F1.
""", encoding="utf-8", newline="\n")
        print(f"held-out set -> {out_dir} | posts {n_train}/{n_dev}/{n_test} | entities {counts} | "
              f"ambiguous {share:.1%}")

    return generate(out_dir, force, write)


def main() -> None:
    generator_main(make_heldout, __doc__, "heldout", seed=29, n_train=800, n_dev=200, n_test=200)


if __name__ == "__main__":
    main()
