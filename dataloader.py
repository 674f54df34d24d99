"""Data for MANGO: CoNLL+IMGID files -> posts -> label map -> sub-word alignment -> images -> batches.

Reading order follows the data's own path:
  read_conll      one file -> list[Post]           (errors name file:line)
  LabelMap        tags <-> ids, built from train, saved with every run
  encode_words    words -> sub-word ids + first-sub-token index per word (+ truncation mask)
  load_image      a path -> RGB PIL image, or None with the reason (placeholder + has_image = 0)
  ImagePrep       PIL -> normalised [3, S, S] tensor (short side to S*256/224, centre crop S)
  FeatureCache    frozen-backbone features computed once per image, keyed by backbone+weights+prep
  MNERDataset     posts + tokenizer + images -> items; `collate` pads them into a batch
  LengthBucketSampler  batches of similar length for training

The batch contract (every model consumes exactly this):
  input_ids      [B, T] long     sub-word ids, padded with the tokenizer's pad id
  attention_mask [B, T] long     1 on real sub-words
  word_index     [B, W] long     position in T of each word's first sub-word (0 on padding)
  word_mask      [B, W] bool     True on words that are scored by the model (not padding, not truncated)
  labels         [B, W] long     word label ids (LabelMap.PAD = 0 on padding)
  has_image      [B]    bool     False when the post's image is missing or unusable
  pixel_values   [B, 3, S, S]    float, when images are read on the fly
  image_feats    [B, R, D]       float, when a frozen backbone's cached features are used instead
  index          [B]    long     position of the post in its dataset (to map predictions back)
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from config import UserError
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
TAG_RE = re.compile(r"^(O|[BI]-[A-Za-z][A-Za-z_]*)$")
RAW_TYPE_MAP = {"OTHER": "MISC"}  # Twitter-2015 calls MISC "OTHER"; papers score them as one type


class DataError(UserError):
    """A problem in an input file; its message is one line naming file:line and the fix."""


# ----------------------------------------------------------------------------- reading

@dataclass
class Post:
    tokens: list[str]
    tags: list[str]
    imgid: str | None
    source: str = ""  # "file:line" of the post's first line, for messages


@dataclass
class ReadReport:
    """What the reader repaired or skipped in lenient mode; nothing is dropped without a count."""
    path: str
    problems: list[str] = field(default_factory=list)
    posts: int = 0
    tokens: int = 0

    def summary(self) -> str:
        s = f"{self.path}: {self.posts} posts, {self.tokens} tokens"
        if self.problems:
            s += f"; {len(self.problems)} problem(s) repaired/skipped under --lenient_data (first: {self.problems[0]})"
        return s


_LINE_BREAK = re.compile(r"\r\n?|\n")


def _decode_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 byte 0x{raw[e.start]:02x}; re-save the file as UTF-8") from None
    if "\x00" in text:
        line = len(_LINE_BREAK.split(text[: text.index("\x00")]))
        raise DataError(f"{path}:{line}: NUL byte in text; the file is binary or corrupted, re-export it as plain UTF-8 text")
    # \n, \r\n or \r only: str.splitlines would also break inside tokens at U+2028, U+0085, \f, \v, ...
    lines = _LINE_BREAK.split(text)
    return lines[:-1] if lines[-1] == "" else lines  # a missing final newline reads the same


def read_conll(path, lenient: bool = False, keep_raw_types: bool = False, report: ReadReport | None = None) -> list[Post]:
    """Read a CoNLL+IMGID file: `IMGID:<id>` line, `token<TAB>tag` lines, a blank line between posts.

    Strict by default: a line without exactly one tab, a tag that is not O/B-X/I-X, a post without an IMGID
    line, or an IMGID with no tokens raises DataError("file:line: ...; fix"). With lenient=True each of
    these is repaired or skipped and counted in `report` (tag -> O, token line kept whitespace-split,
    post kept without image, empty post skipped).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; put the split file there or pass --data_dir")
    report = report if report is not None else ReadReport(str(path))
    lines = _decode_lines(path)
    posts: list[Post] = []
    tokens: list[str] = []
    tags: list[str] = []
    imgid: str | None = None
    start = 0

    def problem(lineno: int, msg: str, fix: str):
        where = f"{path}:{lineno}"
        if not lenient:
            raise DataError(f"{where}: {msg}; {fix} (or pass --lenient_data to repair and count)")
        report.problems.append(f"{where}: {msg}")

    def close(lineno: int):
        nonlocal tokens, tags, imgid
        if tokens:
            if imgid is None:
                problem(start, "post has no IMGID line", "add `IMGID:<id>` before its first token")
            posts.append(Post(tokens, tags, imgid, f"{path}:{start}"))
        elif imgid is not None:
            problem(start, f"IMGID:{imgid} has no tokens", "remove the line or add the post's tokens")
        tokens, tags, imgid = [], [], None

    for lineno, line in enumerate(lines, 1):
        line = line.rstrip(" \r")
        if not line.strip():
            close(lineno)
            continue
        if line.startswith("IMGID:"):
            if tokens or imgid is not None:
                problem(lineno, "IMGID line inside a post", "add a blank line before it")
                close(lineno)
            imgid, start = line[len("IMGID:"):].strip(), lineno
            continue
        if not tokens and imgid is None:
            start = lineno
        parts = line.split("\t")
        if len(parts) != 2:
            what = "no tab" if len(parts) == 1 else f"{len(parts)} tab-separated columns"
            problem(lineno, f"expected `token<TAB>tag`, found {what}", "write one token and one tag per line separated by a single tab")
            parts = line.rsplit(None, 1) if len(parts) == 1 else [parts[0], parts[-1]]
            if len(parts) != 2:
                parts = [parts[0], "O"]
        token, tag = parts[0], parts[1].strip()
        if not TAG_RE.match(tag):
            problem(lineno, f"unknown tag {tag!r}", "use O, B-<TYPE> or I-<TYPE>")
            tag = "O"
        if tag != "O" and not keep_raw_types:
            tag = tag[:2] + RAW_TYPE_MAP.get(tag[2:], tag[2:])
        tokens.append(token)
        tags.append(tag)
    close(len(lines) + 1)
    if not posts:
        raise DataError(f"{path}:1: no posts found; the file is empty or has no `token<TAB>tag` lines")
    report.posts, report.tokens = len(posts), sum(len(p.tokens) for p in posts)
    if report.problems:
        print(f"warning: {report.summary()}")
    return posts


# ----------------------------------------------------------------------------- labels

class LabelMap:
    """Tag <-> id. PAD (0) and O (1) first, then B-/I- of each type in sorted order.

    Built from the train split only and saved as label_map.json beside the run, so test time reuses the
    exact ids the model was trained with (rebuilding it from test data silently permutes classes).
    """
    PAD, O = "<PAD>", "O"

    def __init__(self, labels: list[str]):
        if labels[:2] != [self.PAD, self.O]:
            raise ValueError(f"label map must start with {self.PAD}, {self.O}; got {labels[:2]}")
        self.labels = list(labels)
        self.ids = {l: i for i, l in enumerate(self.labels)}

    @classmethod
    def from_posts(cls, posts: list[Post]) -> "LabelMap":
        types = sorted({t[2:] for p in posts for t in p.tags if t != "O"})
        return cls([cls.PAD, cls.O] + [f"{bi}-{t}" for t in types for bi in ("B", "I")])

    @property
    def types(self) -> list[str]:
        return sorted({l[2:] for l in self.labels[2:]})

    def __len__(self):
        return len(self.labels)

    def encode(self, tags: list[str], where: str = "") -> list[int]:
        try:
            return [self.ids[t] for t in tags]
        except KeyError as e:
            raise DataError(f"{where}: tag {e.args[0]} is not in the train label map {self.labels[2:]}; "
                            "train on data that has this type or map it to O") from None

    def decode(self, ids) -> list[str]:
        return [self.labels[i] if i > 1 else "O" for i in ids]

    def save(self, path):
        Path(path).write_text(json.dumps({"labels": self.labels}, indent=1))

    @classmethod
    def load(cls, path) -> "LabelMap":
        return cls(json.loads(Path(path).read_text())["labels"])


# ----------------------------------------------------------------------------- tokenize / align

@dataclass
class Encoded:
    input_ids: list[int]
    word_index: list[int]   # first sub-word position of each kept word (special tokens included)
    n_kept: int             # words scored by the model; words past max_len are predicted O
    n_empty: int            # words that tokenised to nothing and were replaced by the unknown token


def _special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer puts before and after a text ([CLS] / [SEP], <s> / </s>).

    Read off a one-word probe, since transformers 5 tokenizers have no build_inputs_with_special_tokens.
    """
    enc = tokenizer(["a"], is_split_into_words=True, add_special_tokens=True)
    wids = enc.word_ids()
    first, last = wids.index(0), len(wids) - 1 - wids[::-1].index(0)
    return list(enc["input_ids"][:first]), list(enc["input_ids"][last + 1:])


def encode_words(tokenizer, words: list[str], max_len: int) -> Encoded:
    """Sub-word encode a word list and record each word's first sub-word position.

    Words that tokenise to nothing (U+FE0F, U+200B, a lone combining mark, "") would shift every later
    label when aligned by position, so they are replaced by the unknown token. Truncation keeps whole
    sub-word prefixes up to max_len (specials included); the words whose first sub-word falls off are not
    scored by the model and count as predicted O at evaluation, so every gold word is still scored.
    """
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    wids = enc.word_ids()
    present = set(w for w in wids if w is not None)
    n_empty = len(words) - len(present)
    if n_empty:
        unk = tokenizer.unk_token or tokenizer.pad_token
        words = [w if i in present else unk for i, w in enumerate(words)]
        enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
        wids = enc.word_ids()
    head, tail = _special_ids(tokenizer)
    budget = max_len - len(head) - len(tail)
    ids = enc["input_ids"][:budget]
    wids = wids[:budget]
    prefix = len(head)
    word_index, seen = [], -1
    for pos, w in enumerate(wids):
        if w is not None and w != seen:
            word_index.append(pos + prefix)
            seen = w
    return Encoded(head + list(ids) + tail, word_index, len(word_index), n_empty)


# ----------------------------------------------------------------------------- images

def find_image(image_root, imgid: str | None) -> Path | None:
    """`<image_root>/<imgid>` with .jpg/.jpeg/.png tried in that order (an imgid may carry its extension)."""
    if not imgid or image_root is None:
        return None
    base = Path(image_root) / imgid
    if base.suffix.lower() in IMAGE_EXTS:
        return base
    for ext in IMAGE_EXTS:
        p = base.with_name(base.name + ext)
        if p.exists():
            return p
    return base.with_name(base.name + IMAGE_EXTS[0])


MAX_IMAGE_PIXELS = 64_000_000  # above this a file is treated as a decompression bomb, not decoded


def load_image(path) -> tuple[Image.Image | None, str]:
    """Open an image as RGB. Returns (image, "ok") or (None, reason) for the placeholder path.

    Convertible modes (CMYK, palette, RGBA, L, 16-bit, animated -> first frame) become RGB; transparency
    is composited on white. Missing, zero-byte, unreadable, truncated and oversized files give None.
    """
    if path is None:
        return None, "no image id"
    path = Path(path)
    if not path.exists():
        return None, "missing"
    if not path.is_file():
        return None, "not a file"
    if path.stat().st_size == 0:
        return None, "zero bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    return None, f"too large ({im.width}x{im.height})"
                im.seek(0)
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im) if im.format == "JPEG" else im), "ok"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "decompression bomb"
    except (OSError, SyntaxError, ValueError) as e:
        return None, f"unreadable ({type(e).__name__})"


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return bg
    return im.convert("RGB")


@dataclass(frozen=True)
class ImagePrep:
    """Deterministic eval transform: short side to round(size*256/224), centre crop size, normalise.

    With train_aug, a random crop position and a horizontal flip replace the centre crop.
    Output: float tensor [3, size, size].
    """
    size: int = 224
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)

    def __call__(self, im: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        short = round(self.size * 256 / 224)
        w, h = im.size
        scale = short / min(w, h)
        im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        if rng is None:
            left, top = (w - self.size) // 2, (h - self.size) // 2
        else:
            left, top = rng.randint(0, w - self.size), rng.randint(0, h - self.size)
        im = im.crop((left, top, left + self.size, top + self.size))
        if rng is not None and rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def key(self) -> str:
        return f"size={self.size},short={round(self.size * 256 / 224)},mean={self.mean},std={self.std},bicubic"


def image_prep_for(config) -> ImagePrep:
    """The preprocessing each vision backbone was trained with (the model file owns no data code)."""
    if config.use_dual_granularity:
        return ImagePrep(config.vision_img_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if config.image_encoder == "efficientnet_lite0":
        return ImagePrep(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    cfg_file = Path(config.image_encoder) / "preprocessor_config.json"
    size, mean, std = 224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    if cfg_file.exists():
        pc = json.loads(cfg_file.read_text())
        crop = pc.get("crop_size", size)
        size = crop.get("height", size) if isinstance(crop, dict) else crop
        mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
    else:
        vcfg = Path(config.image_encoder) / "config.json"
        if vcfg.exists():
            c = json.loads(vcfg.read_text())
            size = c.get("vision_config", c).get("image_size", size)
    return ImagePrep(int(size), mean, std)


# ----------------------------------------------------------------------------- feature cache

class FeatureCache:
    """Features of a frozen vision backbone, computed once per image and reused by later runs.

    Stored as <cache_dir>/<key>/<image-set hash>.pt: {image path: fp16 tensor [R, D]}. The key hashes the
    backbone identity, the weights file (path, size, mtime) and the preprocessing, so any change of those
    recomputes. Missing images are not stored (the model bypasses the image path for them).
    """

    def __init__(self, cache_dir, backbone_id: str, weights_file, prep: ImagePrep):
        wf = Path(weights_file) if weights_file else None
        wsig = f"{wf.resolve()}:{wf.stat().st_size}:{wf.stat().st_mtime_ns}" if wf and wf.exists() else "none"
        self.key = hashlib.sha1(f"{backbone_id}|{wsig}|{prep.key()}".encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / self.key
        self.prep = prep

    def get(self, paths: list[Path | None], encode, batch_size: int = 32, desc: str = "features"):
        """Features for each path ({str(path): [R, D] fp16}); `encode` maps [B,3,S,S] -> [B, R, D]."""
        wanted = sorted({str(p) for p in paths if p is not None})
        f = self.dir / (hashlib.sha1("\n".join(wanted).encode()).hexdigest()[:16] + ".pt")
        if f.exists():
            return torch.load(f, weights_only=True)
        feats: dict[str, torch.Tensor] = {}
        todo = []
        for p in tqdm(wanted, desc=f"extract {desc}", unit="img", leave=False):
            im, _ = load_image(p)
            if im is not None:
                todo.append((p, im))
            if len(todo) == batch_size:
                self._run(todo, encode, feats)
                todo = []
        if todo:
            self._run(todo, encode, feats)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        torch.save(feats, tmp)
        os.replace(tmp, f)
        return feats

    def _run(self, todo, encode, feats):
        with torch.no_grad():
            x = torch.stack([self.prep(im) for _, im in todo])
            out = encode(x).to(torch.float16).cpu()
        for (p, _), o in zip(todo, out):
            feats[p] = o.clone()


# ----------------------------------------------------------------------------- datasets

DATASETS = {
    # name: (one-line description, folder under data/)
    "twitter2015": ("Twitter-2015 MNER (UMT release); OTHER read as MISC", "twitter2015"),
    "twitter2017": ("Twitter-2017 MNER (UMT release)", "twitter2017"),
    "demo": ("synthetic visual-disambiguation set made by data/make_demo.py", "demo"),
}


def dataset_dir(config) -> Path:
    """data/<folder> of a registered dataset, or any folder under --data_dir in the CoNLL+IMGID layout."""
    if config.dataset_name in DATASETS:
        return Path(config.data_dir) / DATASETS[config.dataset_name][1]
    d = Path(config.data_dir) / config.dataset_name
    if (d / SPLIT_FILES["train"]).is_file():
        return d
    raise DataError(f"--dataset_name {config.dataset_name!r}: not a known dataset ({', '.join(DATASETS)}) and "
                    f"{d / SPLIT_FILES['train']} does not exist; pick one of those or put train/valid/test.txt there")


def image_root(config) -> Path:
    """--image_root, else data/<name>/<name>_images."""
    if config.image_root:
        return Path(config.image_root)
    d = dataset_dir(config)
    return d / f"{d.name}_images"


def load_split(config, split: str, report: ReadReport | None = None) -> list[Post]:
    path = dataset_dir(config) / SPLIT_FILES[split]
    if config.dataset_name == "demo" and not path.exists():
        from data.make_demo import make_demo  # the demo set is generated, not shipped
        make_demo(dataset_dir(config))
    return read_conll(path, lenient=config.lenient_data, keep_raw_types=config.keep_raw_types, report=report)


# ----------------------------------------------------------------------------- dataset / batches

class MNERDataset(torch.utils.data.Dataset):
    """Posts ready for a model: encodings and label ids are computed once, images per item.

    image_mode: None (text-only model), "pixels" (decode + ImagePrep each time) or "features" (look up
    `features`, a {path: [R, D]} dict from FeatureCache; `feat_shape` gives (R, D) for placeholders).
    """

    def __init__(self, posts: list[Post], tokenizer, label_map: LabelMap, max_len: int, img_root=None,
                 image_mode: str | None = None, prep: ImagePrep | None = None, features=None,
                 feat_shape=None, train_aug: bool = False, seed: int = 0, name: str = "split"):
        self.posts, self.label_map, self.image_mode, self.prep = posts, label_map, image_mode, prep
        self.features, self.feat_shape, self.train_aug, self.name = features, feat_shape, train_aug, name
        self.seed, self.epoch = seed, 0  # augmentation draws from (seed, epoch, item): same in any worker or order
        self.enc = [encode_words(tokenizer, p.tokens, max_len) for p in posts]
        self.labels = [label_map.encode(p.tags, p.source) for p in posts]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.n_truncated = sum(len(p.tokens) - e.n_kept for p, e in zip(posts, self.enc))
        self.n_empty = sum(e.n_empty for e in self.enc)
        self.paths = [find_image(img_root, p.imgid) for p in posts] if image_mode else [None] * len(posts)
        self.has_image = [self._usable(p) for p in self.paths]
        self.failed: set[str] = set()

    def _usable(self, p) -> bool:
        if p is None:
            return False
        if self.image_mode == "features":
            return str(p) in self.features
        return p.is_file() and p.stat().st_size > 0

    def describe(self) -> str:
        s = f"{self.name}: {len(self.posts)} posts"
        if self.image_mode:
            s += f", images {sum(self.has_image)}/{len(self.posts)} usable ({len(self.posts) - sum(self.has_image)} missing/unusable -> text-only)"
        if self.n_truncated:
            s += f", {self.n_truncated} words past --max_len (scored as O)"
        if self.n_empty:
            s += f", {self.n_empty} words with no sub-tokens mapped to the unknown token"
        return s

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.enc]

    def __len__(self):
        return len(self.posts)

    def __getitem__(self, i):
        e = self.enc[i]
        item = {"input_ids": e.input_ids, "word_index": e.word_index, "labels": self.labels[i][: e.n_kept],
                "has_image": self.has_image[i], "index": i}
        if self.image_mode == "pixels":
            x = None
            if self.has_image[i]:
                im, status = load_image(self.paths[i])
                if im is None:
                    if str(self.paths[i]) not in self.failed:
                        self.failed.add(str(self.paths[i]))
                        print(f"warning: {self.paths[i]}: {status}; post {self.posts[i].source} runs text-only")
                    item["has_image"] = False
                else:
                    x = self.prep(im, random.Random(f"{self.seed}/{self.epoch}/{i}") if self.train_aug else None)
            item["pixel_values"] = x if x is not None else torch.zeros(3, self.prep.size, self.prep.size)
        elif self.image_mode == "features":
            f = self.features.get(str(self.paths[i])) if self.has_image[i] else None
            item["image_feats"] = f.float() if f is not None else torch.zeros(self.feat_shape)
        return item


def collate(items: list[dict], pad_id: int = 0) -> dict:
    """Pad a list of items into the batch contract in this module's docstring."""
    B = len(items)
    T = max(len(it["input_ids"]) for it in items)
    W = max(len(it["word_index"]) for it in items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    word_index = torch.zeros(B, W, dtype=torch.long)
    word_mask = torch.zeros(B, W, dtype=torch.bool)
    labels = torch.zeros(B, W, dtype=torch.long)
    for b, it in enumerate(items):
        n, w = len(it["input_ids"]), len(it["word_index"])
        input_ids[b, :n] = torch.tensor(it["input_ids"])
        attention_mask[b, :n] = 1
        word_index[b, :w] = torch.tensor(it["word_index"], dtype=torch.long)
        word_mask[b, :w] = True
        labels[b, :w] = torch.tensor(it["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "word_index": word_index,
             "word_mask": word_mask, "labels": labels,
             "has_image": torch.tensor([bool(it["has_image"]) for it in items]),
             "index": torch.tensor([it["index"] for it in items])}
    for k in ("pixel_values", "image_feats"):
        if k in items[0]:
            batch[k] = torch.stack([it[k] for it in items])
    return batch


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of similar sub-word length (less padding), shuffled per epoch with a fixed seed.

    Indices are shuffled, cut into pools of 50 batches, sorted by length inside each pool, batched, and the
    batch order shuffled again, so batches vary between epochs while padding stays low. `set_epoch` makes
    the order a function of (seed, epoch), which keeps resumed runs identical to uninterrupted ones.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, bucket: bool = True,
                 shuffle: bool = True, rank: int = 0, world: int = 1):
        self.lengths, self.batch_size, self.seed, self.bucket, self.shuffle = lengths, batch_size, seed, bucket, shuffle
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1000003 + self.epoch)
        idx = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(idx)
        if self.bucket:
            pool = self.batch_size * 50
            idx = [i for k in range(0, len(idx), pool)
                   for i in sorted(idx[k:k + pool], key=lambda j: self.lengths[j])]
        batches = [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        if self.shuffle and self.bucket:
            rng.shuffle(batches)
        # every rank gets the same number of batches (DDP steps in lock-step); the tail wraps around
        n = -(-len(batches) // self.world)
        batches = batches + batches[: n * self.world - len(batches)]
        return batches[self.rank::self.world]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self):
        return -(-(-(-len(self.lengths) // self.batch_size)) // self.world)


def make_dataset(config, split: str, posts: list[Post], tokenizer, label_map: LabelMap, vision=None,
                 train: bool = False) -> MNERDataset:
    """A split ready for the model. `vision` is the model's vision module (duck-typed: `trainable`,
    `backbone_id`, `weights_file`, `out_dim`, `n_tokens`, callable on pixels) or None for text-only models.
    A frozen backbone's features come from FeatureCache; a trainable one reads pixels every step.
    """
    root = image_root(config)
    if vision is None:
        return MNERDataset(posts, tokenizer, label_map, config.max_len, name=split)
    prep = image_prep_for(config)
    if vision.trainable:
        return MNERDataset(posts, tokenizer, label_map, config.max_len, root, "pixels", prep,
                           train_aug=train and config.image_aug, seed=config.seed, name=split)
    cache = FeatureCache(config.cache_dir, vision.backbone_id, vision.weights_file, prep)
    paths = [find_image(root, p.imgid) for p in posts]
    param = next(vision.parameters())

    def encode(x):
        return vision(x.to(param.device, param.dtype))
    feats = cache.get(paths, encode, desc=f"{config.dataset_name}/{split}")
    return MNERDataset(posts, tokenizer, label_map, config.max_len, root, "features", prep, feats,
                       feat_shape=(vision.n_tokens, vision.out_dim), name=split)


def make_loader(dataset: MNERDataset, config, train: bool, rank: int = 0, world: int = 1):
    """Training: length-bucketed (flag) shuffled batches; evaluation: in order, sorted by length for speed."""
    sampler = LengthBucketSampler(dataset.lengths(), config.batch_size, seed=config.seed,
                                  bucket=config.length_bucketing if train else True, shuffle=train,
                                  rank=rank, world=world)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                       collate_fn=functools.partial(collate, pad_id=dataset.pad_id))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="MANGO datasets")
    ap.add_argument("--list", action="store_true", help="list the datasets with split sizes and file locations")
    args = ap.parse_args()
    for name, (desc, folder) in DATASETS.items():
        d = DATA_DIR / folder
        sizes = []
        for split, fname in SPLIT_FILES.items():
            f = d / fname
            sizes.append(f"{split}={sum(1 for l in f.read_text(encoding='utf-8-sig').splitlines() if l.startswith('IMGID:'))}" if f.exists() else f"{split}=absent")
        print(f"{name:12s} {desc}\n{'':12s} {d}  {' '.join(sizes)}  images: {d / (folder + '_images')}")
