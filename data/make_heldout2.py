"""Deterministic generator of MANGO's second held-out picture set (`--dataset_name heldout2`).

Written after the dual-granularity encoder's design, to check it on pictures it was never shaped on, and left as it
is since; its dev split decides vision choices together with data/make_heldout.py's. Layout and rule as
make_heldout.py (the picture shows the type of the post's ambiguous mention, else of its first), other names,
templates and pictures: face close-ups or waving stick people (PER); skylines, arrow road signs or round
mountain-lake vignettes (LOC); storefronts or shield crests (ORG); trophies, open books, game controllers or music
notes (MISC). 200-480 px per side, landscape or portrait; gradient, polygon or photo-noise backdrops; the object
anywhere at 25-65 % of the short side, slightly rotated; in 40 % of the pictures a far smaller distractor of another
type; saved as JPEG (quality 70-95) or PNG. Same seed and Pillow version => identical files (the letters on shop
signs and shields come from Pillow's default font).

    python data/make_heldout2.py [--out_dir data/heldout2] [--seed 41] [--n_train 800 --n_dev 200 --n_test 200]
"""
from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

try:  # run as a script (data/ on the path) or imported as data.make_heldout2
    from make_demo import TYPES, generate, generator_main, write_splits
    from make_heldout import Words, colour, make_post, name_pools
except ImportError:
    from data.make_demo import TYPES, generate, generator_main, write_splits
    from data.make_heldout import Words, colour, make_post, name_pools

STREAM = "setc"  # names the random streams (the set's working name when it was made): another name, other posts
WORDS = Words(
    amb_rate=0.68,  # with 1.33 mentions per post, about half the mentions are ambiguous
    ambiguous=[
        "wow , {X} !", "{X} is trending again", "cannot stop scrolling past {X}", "today's highlight : {X}",
        "{X} never disappoints", "just look at {X}", "rate {X} out of ten", "{X} , again and again",
        "a quick shout for {X}", "nobody talks about {X} enough", "{X} vibes only",
        "unpopular opinion : {X} is underrated",
    ],
    cued={
        "PER": ["{X} gave a speech at the rally", "my grandmother {X} turns ninety", "coach {X} praised his players",
                "actress {X} won the award", "{X} married her longtime partner", "senator {X} voted against it"],
        "LOC": ["storm warning issued for {X}", "visiting the old town of {X}", "the population of {X} keeps growing",
                "sunrise over {X} harbour", "the train to {X} is late", "living in {X} since 2019"],
        "ORG": ["{X} shares jumped after earnings", "{X} is hiring engineers", "union talks with {X} collapsed",
                "{X} opened a branch downtown", "the CEO of {X} stepped down", "{X} acquired a small startup"],
        "MISC": ["the {X} soundtrack is on repeat", "preordered the {X} console", "finished the {X} trilogy last night",
                 "{X} season two premieres friday", "streaming the {X} album tonight", "who won the {X} trophy ?"],
    },
    joiners=[";", "also", "plus", "&"],
    tags=["#instadaily", "#explore", "#weekendmood", "#nowtrending", "#snapshot"],
    tag_rate=0.25,
    syllables="gro yal ced umb vik tass jor plin oss quen zel brak hil dun mep sorv aul ith".split(),
    tails=["", "", "ard", "wyn", "eth", "ock", "ine"],
)
INK, WHITE = (22, 20, 30), (250, 248, 240)


# ----------------------------------------------------------------------------- objects, drawn on an L x L layer
def rel(L, *xy):  # flat coordinates in units of the layer side -> pixels (boxes, lines and polygons alike)
    return [v * L for v in xy]


def per_face(img, d, rng, L):  # a head filling the frame: hair, eyes, brows, nose, smile; no shoulders
    skin, w = colour(rng, 140, 240), max(2, int(.02 * L))
    hair = colour(rng, 0, 140) if rng.random() < .8 else colour(rng)
    if rng.random() < .5:
        d.ellipse(rel(L, .12, .06, .88, .96), fill=hair)  # long hair behind the face
    d.ellipse(rel(L, .2, .12, .8, .94), fill=skin, outline=INK, width=w)
    if rng.random() < .4:  # spiky hair, else a cap of hair (with a bun on top, sometimes)
        tips = [.42] + [.05 if i % 2 else .25 for i in range(1, 10)] + [.42]
        d.polygon([v * L for i, y in enumerate(tips) for v in (.18 + .064 * i, y)], fill=hair)
    else:
        d.chord(rel(L, .18, .08, .82, .66), 180, 360, fill=hair)
    iris = colour(rng, 0, 160)
    for x in (.36, .64):
        d.ellipse(rel(L, x - .08, .45, x + .08, .55), fill=WHITE, outline=INK, width=w)
        d.ellipse(rel(L, x - .035, .465, x + .035, .535), fill=iris)
        d.line(rel(L, x - .08, .4, x + .08, .39), fill=hair, width=2 * w)
    d.line(rel(L, .5, .55, .46, .68, .52, .69), fill=INK, width=w)
    d.arc(rel(L, .37, .66, .63, .82), 20, 160, fill=(150, 30, 40), width=2 * w)


def per_stick(img, d, rng, L):  # a thin-lined stick person waving one raised arm; round head with a face
    c, w, s = colour(rng, 0, 110), max(3, int(.035 * L)), rng.choice((-1, 1))
    d.line(rel(L, .5 - s * rng.uniform(.14, .22), .97, .5, .66, .5 + s * rng.uniform(.14, .22), .97), fill=c, width=w)
    d.line(rel(L, .5, .66, .5, .33), fill=c, width=w)
    d.line(rel(L, .5 - s * .22, .6, .5, .42, .5 + s * .2, .36, .5 + s * .3, .1), fill=c, width=w)  # waving arm
    for r in (.08, .14):  # motion strokes by the waving hand
        d.arc(rel(L, .5 + s * .3 - r, .1 - r, .5 + s * .3 + r, .1 + r), 200 + 50 * (s > 0), 290 + 50 * (s > 0),
              fill=c, width=max(2, w // 2))
    d.ellipse(rel(L, .37, .04, .63, .32), fill=colour(rng, 150, 250), outline=c, width=w)
    for x in (.45, .55):
        d.ellipse(rel(L, x - .02, .14, x + .02, .18), fill=INK)
    d.arc(rel(L, .43, .16, .57, .26), 20, 160, fill=INK, width=max(2, w // 2))


def loc_skyline(img, d, rng, L):  # dark tower silhouettes with a few lit windows, a moon, a river band
    shade, lit, x = colour(rng, 15, 80), (255, rng.randint(200, 240), rng.randint(80, 160)), .04
    d.ellipse(rel(L, .72, .04, .86, .18), fill=(245, 240, rng.randint(180, 230)))
    while x < .92:
        x1, top = min(x + rng.uniform(.07, .16), .96), .8 - rng.uniform(.25, .72)
        d.rectangle(rel(L, x, top, x1, .8), fill=shade)
        for wy in np.arange(top + .04, .76, .06):
            for wx in np.arange(x + .015, x1 - .03, .04):
                if rng.random() < .35:
                    d.rectangle(rel(L, wx, wy, wx + .02, wy + .025), fill=lit)
        x = x1 + rng.uniform(0, .02)
    d.rectangle(rel(L, .02, .8, .98, .92), fill=(rng.randint(20, 60), rng.randint(60, 110), rng.randint(120, 180)))


def loc_sign(img, d, rng, L):  # a direction sign on two posts: a big arrow and "place name" bars
    s = rng.choice((-1, 1))  # -1: the arrow points left
    for x in (.3, .66):
        d.rectangle(rel(L, x, .5, x + .04, 1), fill=(140, 140, 150), outline=INK)
    d.rounded_rectangle(rel(L, .04, .12, .96, .6), radius=int(.05 * L), outline=WHITE, width=max(2, int(.02 * L)),
                        fill=rng.choice([(0, 110, 60), (20, 70, 160), (120, 70, 30)]))
    d.polygon([((.5 + s * (u - .5)) * L, v * L) for u, v in ((.12, .3), (.55, .3), (.55, .2), (.86, .36), (.55, .52),
                                                                (.55, .42), (.12, .42))], fill=WHITE)
    for y in (.18, .49):
        d.rectangle(rel(L, .14, y, rng.uniform(.35, .5), y + .02), fill=WHITE)


def loc_lake(img, d, rng, L):  # a round vignette: sky, snowy peaks, a lake with ripples
    scene = Image.new("RGBA", img.size, (*colour(rng, 120, 230), 255))
    sd = ImageDraw.Draw(scene)
    for _ in range(rng.randint(2, 3)):
        px, ph, hw = rng.uniform(.2, .8), rng.uniform(.25, .45), rng.uniform(.2, .35)
        sd.polygon(rel(L, px - hw, .62, px, .62 - ph, px + hw, .62), fill=colour(rng, 60, 130))
        sd.polygon(rel(L, px - hw / 4, .62 - .75 * ph, px, .62 - ph, px + hw / 4, .62 - .75 * ph), fill=WHITE)
    sd.rectangle(rel(L, 0, .62, 1, 1), fill=(rng.randint(20, 70), rng.randint(80, 150), rng.randint(150, 230)))
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).ellipse(rel(L, .02, .02, .98, .98), fill=255)
    img.paste(scene, (0, 0), mask)
    d.ellipse(rel(L, .02, .02, .98, .98), outline=colour(rng), width=max(3, int(.03 * L)))


def org_store(img, d, rng, L):  # a shop front: sign board with a name, striped scalloped awning, window, door
    w, a, n = max(2, int(.012 * L)), colour(rng), rng.randint(5, 8)
    d.rectangle(rel(L, .08, .3, .92, .96), fill=colour(rng, 80, 220), outline=INK, width=w)
    d.rectangle(rel(L, .12, .06, .88, .26), fill=colour(rng), outline=INK, width=w)
    d.text((.5 * L, .16 * L), "".join(rng.choice("ABCDEFGHKLMNPRSTUWZ") for _ in range(rng.randint(3, 5))), fill=INK,
           font=ImageFont.load_default(size=max(10, int(.13 * L))), anchor="mm", stroke_width=1, stroke_fill=WHITE)
    for i in range(n):
        x0, x1 = .04 + .92 * i / n, .04 + .92 * (i + 1) / n
        d.rectangle(rel(L, x0, .28, x1, .4), fill=a if i % 2 else WHITE)
        d.chord(rel(L, x0, .35, x1, .46), 0, 180, fill=a if i % 2 else WHITE)
    d.rectangle(rel(L, .15, .52, .52, .84), fill=(170, 210, 235), outline=INK, width=w)
    d.rectangle(rel(L, .6, .52, .84, .96), fill=colour(rng, 40, 140), outline=INK, width=w)


def org_shield(img, d, rng, L):  # a crest: shield outline, sometimes a diagonal band, one big letter
    fill, rim = colour(rng), colour(rng)
    curve = [(.86 - .36 * t, .48 + .46 * math.sin(t * math.pi / 2)) for t in np.linspace(0, 1, 8)[1:]]
    pts = [(.14, .06), (.86, .06), (.86, .48)] + curve + [(1 - x, y) for x, y in reversed(curve[:-1])] + [(.14, .48)]
    d.polygon([(x * L, y * L) for x, y in pts], fill=fill, outline=rim, width=max(3, int(.04 * L)))
    if rng.random() < .5:
        d.line(rel(L, .2, .12, .8, .7), fill=rim, width=int(.08 * L))
    d.text((.5 * L, .44 * L), rng.choice("ABDEFGHKMNPRSTVWXZ"), fill=INK if sum(fill) > 380 else WHITE, anchor="mm",
           stroke_width=2, stroke_fill=rim, font=ImageFont.load_default(size=max(10, int(.45 * L))))


def misc_trophy(img, d, rng, L):  # a gold/silver/bronze cup with two handles on a stepped base
    g, w = rng.choice([(212, 175, 55), (192, 192, 204), (205, 127, 50)]), max(2, int(.02 * L))
    for x in (.06, .66):
        d.arc(rel(L, x, .16, x + .28, .44), 0, 360, fill=g, width=int(.04 * L))
    d.chord(rel(L, .22, -.3, .78, .62), 0, 180, fill=g, outline=INK, width=w)
    for box in ((.46, .6, .54, .76), (.3, .76, .7, .84)):
        d.rectangle(rel(L, *box), fill=g, outline=INK, width=w)
    d.rectangle(rel(L, .24, .84, .76, .95), fill=colour(rng, 30, 110), outline=INK, width=w)


def misc_book(img, d, rng, L):  # an open book: cover, two pages with text lines, the gutter
    d.polygon(rel(L, .02, .2, .5, .28, .98, .2, .98, .84, .5, .92, .02, .84), fill=colour(rng, 0, 200), outline=INK)
    for s in (-1, 1):
        d.polygon(rel(L, .5, .3, .5 + s * .44, .22, .5 + s * .44, .8, .5, .88), fill=WHITE, outline=INK)
        for y in np.arange(.3, .78, .07):
            d.line(rel(L, .5 + s * .06, y + .03, .5 + s * .38, y - .02), fill=(120, 120, 130), width=max(1, L // 120))
    d.line(rel(L, .5, .3, .5, .88), fill=INK, width=max(2, int(.015 * L)))


def misc_pad(img, d, rng, L):  # a game controller: body with grips, d-pad, four coloured buttons, two sticks
    body, w = colour(rng, 30, 230), max(2, int(.015 * L))
    for x in (.06, .6):
        d.ellipse(rel(L, x, .36, x + .34, .86), fill=body, outline=INK, width=w)
    d.rounded_rectangle(rel(L, .12, .26, .88, .64), radius=int(.12 * L), fill=body, outline=INK, width=w)
    d.rectangle(rel(L, .24, .37, .32, .55), fill=INK)
    d.rectangle(rel(L, .19, .42, .37, .5), fill=INK)
    for dx, dy, c in ((0, -.07, (230, 60, 60)), (.07, 0, (60, 90, 220)), (0, .07, (60, 180, 80)),
                      (-.07, 0, (240, 200, 40))):
        d.ellipse(rel(L, .685 + dx, .425 + dy, .755 + dx, .495 + dy), fill=c, outline=INK)


def misc_note(img, d, rng, L):  # two beamed eighth notes
    c = colour(rng, 0, 120) if rng.random() < .6 else colour(rng)
    for x, y, top in ((.12, .72, .2), (.6, .64, .06)):
        d.ellipse(rel(L, x, y, x + .28, y + .2), fill=c)
        d.rectangle(rel(L, x + .22, top, x + .28, y + .1), fill=c)
    d.polygon(rel(L, .34, .2, .88, .06, .88, .18, .34, .32), fill=c)


DRAW = {"PER": (per_face, per_stick), "LOC": (loc_skyline, loc_sign, loc_lake), "ORG": (org_store, org_shield),
        "MISC": (misc_trophy, misc_book, misc_pad, misc_note)}


# ----------------------------------------------------------------------------- pictures
def background(rng: random.Random, nrng, W: int, H: int) -> Image.Image:
    """Vertical or diagonal gradient, flat colour under random polygons, or a muted photo-like blotchy field."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    a, b = np.array(colour(rng, 20, 235), np.float32), np.array(colour(rng, 20, 235), np.float32)
    kind, ang = rng.choice(("vertical", "diagonal", "polygons", "photo")), rng.uniform(.3, 1.27) * rng.choice((1, -1))
    if kind == "photo":  # a base colour, low-frequency colour blotches and grain
        small = (a + nrng.uniform(-70, 70, (rng.randint(3, 7), rng.randint(3, 7), 3))).clip(0, 255).astype(np.uint8)
        arr = np.asarray(Image.fromarray(small, "RGB").resize((W, H), Image.BICUBIC), np.float32)
        arr = arr + nrng.normal(0, rng.uniform(6, 16), arr.shape)
    else:
        t = y if kind == "vertical" else x * math.cos(ang) + y * math.sin(ang) if kind == "diagonal" else 0 * x
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        arr = a * (1 - t[..., None]) + b * t[..., None]
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    if kind == "polygons" or rng.random() < .25:
        d = ImageDraw.Draw(img)
        for _ in range(rng.randint(3, 9)):
            cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(.08, .45) * min(W, H)
            angs = sorted(rng.uniform(0, 2 * math.pi) for _ in range(rng.randint(3, 6)))
            d.polygon([(cx + r * math.cos(t), cy + r * math.sin(t)) for t in angs], fill=colour(rng, 20, 235))
    return img


def render(rng: random.Random, typ: str, size: int) -> Image.Image:
    """One object of `typ` as an RGBA layer of side `size` (drawn at 2x, then reduced), rotated by up to 15 deg."""
    layer = Image.new("RGBA", (2 * size, 2 * size), (0, 0, 0, 0))
    rng.choice(DRAW[typ])(layer, ImageDraw.Draw(layer), rng, 2 * size)
    return layer.resize((size, size), Image.LANCZOS).rotate(rng.uniform(-15, 15), Image.BICUBIC, expand=True)


def draw_picture(rng: random.Random, typ: str) -> tuple[Image.Image, list[int]]:
    """(RGB picture, the cued object's box [x0, y0, x1, y1] in its pixels)."""
    W, H = (rng.randint(300, 480), rng.randint(200, 360)) if rng.random() < .7 else \
        (rng.randint(200, 300), rng.randint(300, 480))  # about 30 % portrait
    nrng = np.random.default_rng(rng.getrandbits(64))
    img = background(rng, nrng, W, H)
    size = int(rng.uniform(.25, .65) * min(W, H))  # the object's side before rotation
    main = render(rng, typ, size)
    px, py = rng.randint(0, W - main.width), rng.randint(0, H - main.height)
    x0, y0, x1, y1 = main.getchannel("A").point(lambda v: 255 if v > 40 else 0).getbbox()  # its opaque part
    box = [px + x0, py + y0, px + x1, py + y1]
    if rng.random() < .4 and size >= 60:  # a distractor of another type, 18-30 % the cued one's size, clear of it
        small = render(rng, rng.choice([t for t in TYPES if t != typ]), int(size * rng.uniform(.18, .3)))
        for _ in range(30):
            qx, qy = rng.randint(0, W - small.width), rng.randint(0, H - small.height)
            if qx > box[2] + 4 or qx + small.width < box[0] - 4 or qy > box[3] + 4 or qy + small.height < box[1] - 4:
                img.paste(small, (qx, qy), small)
                break
    img.paste(main, (px, py), main)
    if rng.random() < .25:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(.4, 1.0)))
    arr = np.asarray(img, np.float32) + nrng.normal(0, rng.uniform(2, 7), (H, W, 3))
    return Image.fromarray(arr.clip(0, 255).round().astype(np.uint8), "RGB"), box


# ----------------------------------------------------------------------------- driver
def picture(pid: str, typ: str, seed: int):
    """The post's picture and box, drawn with an RNG of the id's own, which also picks how it is saved (save)."""
    irng = random.Random(f"{STREAM}-img-{seed}-{pid}")
    img, box = draw_picture(irng, typ)
    img.info["jpeg_quality"] = irng.randint(70, 95) if irng.random() < .5 else None
    return img, box


def save(img: Image.Image, stem: Path) -> None:  # the IMGID names no extension: images.find_image tries each
    quality = img.info.pop("jpeg_quality")
    if quality:
        img.save(stem.with_suffix(".jpg"), quality=quality)
    else:
        img.save(stem.with_suffix(".png"), compress_level=3)


def make_heldout2(out_dir, seed: int = 41, n_train: int = 800, n_dev: int = 200, n_test: int = 200,
                  force: bool = False) -> Path:
    """Write the set to out_dir (via a scratch folder, then rename) and return its path."""
    def write(tmp: Path) -> None:
        sizes = [n_train, n_dev, n_test]
        ents, amb_n, ment_n = write_splits(
            tmp, "heldout2_images", "sc", sizes, name_pools(random.Random(f"{STREAM}-names-{seed}"), sizes, WORDS),
            f"{STREAM}-text-{seed}", partial(make_post, words=WORDS), lambda pid, typ: picture(pid, typ, seed), save)
        share = amb_n / max(1, ment_n)
        counts = " ".join(f"{t}={ents[t]}" for t in TYPES)
        (tmp / "README.md").write_text(f"""# MANGO second held-out picture set

Made by `python data/make_heldout2.py --seed {seed}`; see that file's docstring for its pictures. Its dev split
(valid.txt) decides vision choices beside data/heldout's; its test split is scored once per design. Splits:
train={n_train}, valid={n_dev}, test={n_test} posts; pictures (JPEG or PNG) in heldout2_images/, the cued
object's box per picture in <split>_boxes.jsonl. Entities: {counts}; {share:.1%} of the mentions are ambiguous.
""", encoding="utf-8", newline="\n")
        print(f"second held-out set -> {out_dir} | posts {n_train}/{n_dev}/{n_test} | entities {counts} | "
              f"ambiguous {share:.1%}")

    return generate(out_dir, force, write)


def main() -> None:
    generator_main(make_heldout2, __doc__, "heldout2", seed=41, n_train=800, n_dev=200, n_test=200)


if __name__ == "__main__":
    main()
