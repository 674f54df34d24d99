"""Data for MANGO: posts -> label map -> sub-word alignment -> images -> batches.

The batch contract (every model consumes exactly this):
  input_ids      [B, T] long     sub-word ids, padded with the tokenizer's pad id
  attention_mask [B, T] long     1 on real sub-words
  word_index     [B, W] long     position in T of each word's first sub-word (0 on padding)
  word_mask      [B, W] bool     True on the window's words (not padding)
  labels         [B, W] long     word label ids (LabelMap.PAD = 0 on padding)
  case_ids       [B, W] long     word shape (`word_shape`: lower, Title, UPPER, ...; 0 on padding)
  has_image      [B]    bool     False when the post's image is missing or unusable
  pixel_values   [B, 3, S, S]    float, when images are read on the fly
  image_feats    [B, ...]        float, when a frozen backbone's cached features are used instead (pretrained
                                 backbone: region tokens [B, R, D]; dual granularity: its stem maps, flattened [B, F])
  teacher_feats  [B, R, 1280]    float, training with --vision_distill_lambda: EfficientNet-Lite0's features
  teacher_marg   [B, W, L]       float, training with --teacher_run: the teacher's tag marginals per word (0 on padding)
  labelled       [B]    bool     training with --teacher_run: False for unlabelled posts (no tag loss)
  index          [B]    long     the item's window in its dataset (dataset.windows[k].post is its post)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from config import ConfigError

# what the rest of MANGO reads as dataloader.X lives in the two modules it is split from
from readers import (DATA_DIR, DATASETS, ROOT, SPLIT_FILES, DataError, Post, ReadReport, _json_records,  # noqa: F401
                     _problem_fn, dataset_dir, dataset_spec, image_root, load_split, opens_with_i, read_conll,
                     split_hashes, split_overlaps)
from images import (EFFNET_PREP, IMAGE_EXTS, FeatureCache, ImagePrep, cached_features, file_digest,  # noqa: F401
                    find_image, grey_pixels, image_prep_for, image_sources, load_image)


# ----------------------------------------------------------------------------- labels

class LabelMap:
    """Tag <-> id: PAD (0) and O (1) first, then B-/I- of each type in sorted order. Built from train only and saved
    as label_map.json beside the run, so test time reuses the ids the model was trained with (rebuilding it from
    test data silently permutes classes)."""
    PAD, O = "<PAD>", "O"

    def __init__(self, labels: list[str]):
        if labels[:2] != [self.PAD, self.O]:
            raise ValueError(f"label map must start with {self.PAD}, {self.O}; got {labels[:2]}")
        pairs = list(zip(labels[2::2], labels[3::2]))
        if len(labels) % 2 or any(b[:2] != "B-" or i != "I-" + b[2:] for b, i in pairs):  # crf.bio_bans reads ids so
            raise ValueError(f"label map must go on with B-X, I-X pairs of each type; got {labels[2:]}")
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
        """Ids of tags; `where` ("file:line" of the post's first line) names the post in the error."""
        bad = next((k for k, t in enumerate(tags) if t not in self.ids), None)
        if bad is not None:
            raise DataError(f"{where}: word {bad + 1} of this post has tag {tags[bad]}, which is not in the train "
                            f"label map {self.labels[2:]}; train on data that has this type or map it to O")
        return [self.ids[t] for t in tags]

    def decode(self, ids) -> list[str]:
        return [self.labels[i] if i > 1 else "O" for i in ids]

    def save(self, path):
        Path(path).write_text(json.dumps({"labels": self.labels}, indent=1))

    @classmethod
    def load(cls, path) -> "LabelMap":
        """A run's label_map.json; one line (DataError) when it is missing or damaged."""
        try:
            return cls(json.loads(Path(path).read_text(encoding="utf-8"))["labels"])
        except FileNotFoundError:
            raise DataError(f"{path}: not found; it is written with every run, "
                            "so the run directory is damaged") from None
        except (ValueError, KeyError, TypeError) as e:  # bad JSON/UTF-8, no "labels", labels not a list of tags
            why = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0][:100]
            raise DataError(f"{path}: not a MANGO label map ({why}); the run directory is damaged: retrain, or "
                            "restore the file from a copy") from None


# ----------------------------------------------------------------------------- tokenize / align

def fast_tokenizer(path):
    """The fast tokenizer in directory `path` (a ConfigError without one: word alignment needs it). A byte-level BPE
    tokenizer (RoBERTa, GPT-2, BART, ...: its pre-tokenizer says so) is loaded with add_prefix_space, so that a word
    given on its own is split as it is inside a sentence, after a space."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if not tok.is_fast:
        raise ConfigError(f"{path}: needs a fast tokenizer (tokenizer.json) for word alignment")
    if "ByteLevel" in json.dumps(json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer")):
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True, add_prefix_space=True)
    return tok


@dataclass
class Encoded:
    input_ids: list[int]
    word_index: list[int]   # first sub-word position of each kept word (special tokens included)
    n_kept: int             # words that fit in max_len (encode_windows puts the rest in further windows)
    empty: list[int]        # words that tokenised to nothing and were replaced by the unknown token


def _special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer puts before and after a text ([CLS] / [SEP], <s> / </s>), read off a
    one-word probe: transformers 5 tokenizers have no build_inputs_with_special_tokens."""
    enc = tokenizer(["a"], is_split_into_words=True, add_special_tokens=True)
    wids = enc.word_ids()
    first, last = wids.index(0), len(wids) - 1 - wids[::-1].index(0)
    return list(enc["input_ids"][:first]), list(enc["input_ids"][last + 1:])


def encode_words(tokenizer, words: list[str], max_len: int) -> Encoded:
    """Sub-word ids of a word list and each kept word's first sub-word position, at most max_len with specials.
    Words that tokenise to nothing (U+FE0F, U+200B, "") become the unknown token: dropped, they would shift every
    later label."""
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    wids = enc.word_ids()
    present = {w for w in wids if w is not None}
    empty = [i for i in range(len(words)) if i not in present]
    if empty:
        unk = tokenizer.unk_token or tokenizer.pad_token
        words = [w if i in present else unk for i, w in enumerate(words)]
        enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
        wids = enc.word_ids()
    head, tail = _special_ids(tokenizer)
    budget = max_len - len(head) - len(tail)
    word_index, seen = [], -1
    for pos, w in enumerate(wids[:budget]):
        if w is not None and w != seen:
            word_index.append(pos + len(head))
            seen = w
    return Encoded(head + list(enc["input_ids"][:budget]) + tail, word_index, len(word_index), empty)


@dataclass
class Window:
    """One model input of a post: words [start, start + enc.n_kept) of post `post`; the tags of words [own_a, own_b)
    are read from this window (merge_windows)."""
    post: int
    start: int
    own_a: int
    own_b: int
    enc: Encoded


def encode_windows(tokenizer, words: list[str], max_len: int, post: int = 0) -> list[Window]:
    """A post as one window, or, when its sub-words do not fit in max_len, as windows of whole words, each starting
    half a window before the previous one ended. Merge rule: words two windows share are split at their middle (each
    read where it is farther from a cut edge)."""
    n, spans, s = len(words), [], 0
    while True:  # at most max_len words fit: every word has at least one sub-word
        enc = encode_words(tokenizer, words[s:s + max_len], max_len)
        e = s + max(1, enc.n_kept)
        spans.append((s, e, enc))
        if e >= n:
            break
        s = max(s + 1, e - (e - s) // 2)
    out = []
    for k, (s, e, enc) in enumerate(spans):
        a = 0 if k == 0 else out[-1].own_b
        b = n if k == len(spans) - 1 else (spans[k + 1][0] + e + 1) // 2
        out.append(Window(post, s, a, b, enc))
    return out


def _cut(x, a: int, b: int):
    """Words [a, b) of one window's output: lists and arrays sliced, dicts per key, anything else as it is."""
    if isinstance(x, dict):
        return {k: _cut(v, a, b) for k, v in x.items()}
    return x[a:b] if isinstance(x, (list, np.ndarray)) else x


def _join(parts: list):
    """The inverse of _cut over a post's windows, in word order."""
    if len(parts) == 1:
        return parts[0]
    x = parts[0]
    if isinstance(x, dict):
        return {k: _join([p[k] for p in parts]) for k in x}
    if isinstance(x, list):
        return [v for p in parts for v in p]
    if isinstance(x, np.ndarray):
        return np.concatenate(parts)
    return x


def merge_windows(windows: list[Window], outs: list, n_posts: int) -> list:
    """Per-window outputs (a word list, or a dict of per-word lists/arrays and per-post values) -> per post, each
    word from the window that owns it (encode_windows' merge rule). A post whose windows have no output stays None."""
    parts: list[list] = [[] for _ in range(n_posts)]
    for w, o in zip(windows, outs):
        if o is not None:
            parts[w.post].append(_cut(o, w.own_a - w.start, w.own_b - w.start))
    return [_join(p) if p else None for p in parts]


def iob2(tags: list[str]) -> tuple[list[str], int]:
    """(tags with every chunk that opens with I-X relabelled B-X, how many were): IOB1 or a stray I- to IOB2.
    conlleval reads the same chunks from both."""
    out = [("B-" + t[2:]) if opens_with_i(tags[i - 1] if i else "O", t) else t for i, t in enumerate(tags)]
    return out, sum(a != b for a, b in zip(out, tags))


CASE_SHAPES = ("pad", "lower", "title", "upper", "mixed", "no_letter", "mention_or_hashtag")


def word_shape(word: str) -> int:
    """Index into CASE_SHAPES: the case information an uncased encoder (MiniLM) throws away."""
    if word[:1] in ("@", "#") and len(word) > 1:
        return 6
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return 5
    if all(c.islower() for c in letters):
        return 1
    if all(c.isupper() for c in letters):
        return 2 if len(letters) == 1 else 3
    if letters[0].isupper() and all(c.islower() for c in letters[1:]):
        return 2
    return 4


# ----------------------------------------------------------------------------- dataset / batches

class MNERDataset(torch.utils.data.Dataset):
    """Posts ready for a model: encodings and label ids computed once, images per item. image_mode: None, "pixels"
    (decoded each time) or "features" ({path: tensor} from FeatureCache; `blank` the grey image's). `teacher`:
    {path: [R, 1280]}; `targets` (--teacher_run): each post's teacher marginals [n_words, L]."""

    def __init__(self, posts: list[Post], tokenizer, label_map: LabelMap, max_len: int, img_root=None,
                 image_mode: str | None = None, prep: ImagePrep | None = None, features=None,
                 feat_shape=None, train_aug: bool = False, seed: int = 0, name: str = "split", teacher=None,
                 control: str = "none", blank=None, iob2_labels: bool = False,
                 targets: list[torch.Tensor] | None = None):
        self.posts, self.label_map, self.image_mode, self.prep = posts, label_map, image_mode, prep
        self.features, self.feat_shape, self.train_aug, self.name = features, feat_shape, train_aug, name
        self.teacher, self.control, self.blank, self.targets = teacher, control, blank, targets
        # a post without a teacher entry gets zeros of the teacher's own shape (its distill term is never read)
        self.teacher_shape = next(iter(teacher.values())).shape if teacher else None
        self.seed, self.epoch = seed, 0  # augmentation draws from (seed, epoch, item): same in any worker or order
        self.windows = [w for i, p in enumerate(posts) for w in encode_windows(tokenizer, p.tokens, max_len, i)]
        # the loss's targets only: scoring reads p.tags as given
        fixed = [iob2(p.tags) if iob2_labels else (p.tags, 0) for p in posts]
        self.n_iob2 = sum(n for _, n in fixed)
        self.labels = [label_map.encode(t, p.source) for (t, _), p in zip(fixed, posts)]
        self.cases = [[word_shape(w) for w in p.tokens] for p in posts]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.n_windowed = len({w.post for w in self.windows if w.start > 0})
        self.n_empty = len({(w.post, w.start + j) for w in self.windows for j in w.enc.empty})  # windows overlap
        self.paths = [find_image(img_root, p.imgid) for p in posts] if image_mode else [None] * len(posts)
        # why each unused image is not used ("missing", "unreadable (OSError)", ...), counted by describe(). Pixels
        # are decoded once here too, so that --image_control pairs only pictures that decode, as with features
        if image_mode == "pixels":
            self.image_status = [load_image(p)[1] for p in self.paths]
            self.has_image = [s == "ok" for s in self.image_status]
        else:
            self.has_image = [p is not None and str(p) in features for p in self.paths] if image_mode else \
                [False] * len(posts)
            self.image_status = [("ok" if ok else load_image(p)[1]) for p, ok in zip(self.paths, self.has_image)
                                 ] if image_mode else []
        self.source = image_sources(self.has_image, control, seed)
        self.failed: set[str] = set()

    def describe(self) -> str:
        s = f"{self.name}: {len(self.posts)} posts"
        if self.image_mode:
            n_off = len(self.posts) - sum(self.has_image)
            s += f", images {sum(self.has_image)}/{len(self.posts)} usable ({n_off} missing/unusable -> text-only"
            why = Counter(w.split(" (")[0] for w in self.image_status if w != "ok")
            if why:
                s += ": " + ", ".join(f"{w} {k}" for w, k in sorted(why.items(), key=lambda x: (-x[1], x[0])))
            s += ")"
            if self.control != "none":
                s += f", image control {self.control}"
        if self.n_iob2:
            s += f", {self.n_iob2} chunk{'s' * (self.n_iob2 > 1)} opening with I- trained as B- (--bio_constraints)"
        if self.targets is not None:
            n_un = sum(not p.labelled for p in self.posts)
            s += f", teacher marginals on every post ({n_un} of them unlabelled)"
        if self.n_windowed:
            n_win = len(self.windows) - len(self.posts) + self.n_windowed
            posts = f"{self.n_windowed} post{'s' * (self.n_windowed > 1)}"
            s += f", {posts} longer than --max_len tagged in {n_win} overlapping windows"
        if self.n_empty:
            s += f", {self.n_empty} words with no sub-tokens mapped to the unknown token"
        return s

    def lengths(self) -> list[int]:
        return [len(w.enc.input_ids) for w in self.windows]

    def __len__(self):  # items are windows: one per post unless a post is longer than --max_len
        return len(self.windows)

    def merge(self, outs: list) -> list:
        """Per-item outputs -> per post (merge_windows)."""
        return merge_windows(self.windows, outs, len(self.posts))

    def _pixels(self, i: int, j: int):
        """[3, S, S] of post j's image shown to post i (-1: grey), or None when it cannot be decoded now."""
        if j < 0:
            return grey_pixels(self.prep)
        im, status = load_image(self.paths[j])
        if im is None:
            if str(self.paths[j]) not in self.failed:
                self.failed.add(str(self.paths[j]))
                print(f"warning: {self.paths[j]}: {status}; post {self.posts[i].source} runs text-only")
            return None
        return self.prep(im, random.Random(f"{self.seed}/{self.epoch}/{i}") if self.train_aug else None)

    def __getitem__(self, k):
        w = self.windows[k]
        e, i, a = w.enc, w.post, w.start
        item = {"input_ids": e.input_ids, "word_index": e.word_index,
                "labels": self.labels[i][a: a + e.n_kept], "case_ids": self.cases[i][a: a + e.n_kept],
                "has_image": self.has_image[i], "index": k}
        j = self.source[i]  # whose image this post is shown (--image_control)
        if self.image_mode == "pixels":
            x = self._pixels(i, j) if self.has_image[i] else None
            item["has_image"] = x is not None
            item["pixel_values"] = x if x is not None else torch.zeros(3, self.prep.size, self.prep.size)
        elif self.image_mode == "features":
            f = (self.blank if j < 0 else self.features.get(str(self.paths[j]))) if self.has_image[i] else None
            item["image_feats"] = f.float() if f is not None else torch.zeros(self.feat_shape)
        if self.teacher is not None:
            t = self.teacher.get(str(self.paths[j])) if self.has_image[i] and j >= 0 else None
            item["teacher_feats"] = t.float() if t is not None else torch.zeros(self.teacher_shape or (1, 1))
        if self.targets is not None:
            item["teacher_marg"] = self.targets[i][a: a + e.n_kept].float()
            item["labelled"] = self.posts[i].labelled
        return item


def collate(items: list[dict], pad_id: int = 0) -> dict:
    """Pad a list of items into the batch contract in this module's docstring."""
    def pad(rows, value=0, dtype=torch.long):  # [B, longest row]
        return pad_sequence([torch.tensor(r, dtype=dtype) for r in rows], batch_first=True, padding_value=value)
    ids, words = [it["input_ids"] for it in items], [it["word_index"] for it in items]
    batch = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(r) for r in ids]),
             "word_mask": pad([[True] * len(r) for r in words], dtype=torch.bool),
             **{k: pad([it[k] for it in items]) for k in ("word_index", "labels", "case_ids")},
             "has_image": torch.tensor([bool(it["has_image"]) for it in items]),
             "index": torch.tensor([it["index"] for it in items])}
    for k in ("pixel_values", "image_feats", "teacher_feats"):
        if k in items[0]:
            batch[k] = torch.stack([it[k] for it in items])
    if "teacher_marg" in items[0]:
        marg = torch.zeros(*batch["word_mask"].shape, items[0]["teacher_marg"].size(-1))
        for b, it in enumerate(items):
            marg[b, :len(it["teacher_marg"])] = it["teacher_marg"]
        batch["teacher_marg"] = marg
        batch["labelled"] = torch.tensor([bool(it["labelled"]) for it in items])
    return batch


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of similar sub-word length (less padding): indices shuffled, cut into pools of 50 batches, sorted by
    length inside each pool, batched, and the batch order shuffled again. The order is a function of (seed, epoch),
    so resumed runs match uninterrupted ones."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, bucket: bool = True,
                 shuffle: bool = True):
        self.lengths, self.batch_size, self.seed, self.bucket, self.shuffle = lengths, batch_size, seed, bucket, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
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
        return iter(batches)

    def __len__(self):
        return -(-len(self.lengths) // self.batch_size)


def any_image(config, posts: list[Post], split: str = "train") -> bool:
    """Whether any post's image file is there and not empty (the dataset's own test, before any feature is made)."""
    root = image_root(config, split)
    return root is not None and any(image_file(find_image(root, p.imgid)) for p in posts)


def image_file(p) -> bool:
    """A path that names a non-empty file (decoding is checked where the pixels are read)."""
    return p is not None and p.is_file() and p.stat().st_size > 0


def make_dataset(config, split: str, posts: list[Post], tokenizer, label_map: LabelMap, vision=None,
                 train: bool = False, image_dir=None, teacher=None, iob2_labels: bool = False,
                 targets=None) -> MNERDataset:
    """A split ready for the model. `vision` (duck-typed: `cacheable`, `features`, `feat_shape`, `backbone_id`,
    `weights_file`) or None: a frozen one's features come from FeatureCache, else pixels are read every step.
    `teacher` (--vision_distill_lambda): a frozen backbone. image_dir replaces the split's image folder (predict.py:
    "/" with absolute IMGIDs). iob2_labels and `targets` (distill.teacher_targets): train split only."""
    root = image_root(config, split) if image_dir is None else Path(image_dir)
    common = dict(seed=config.seed, name=split, iob2_labels=iob2_labels, targets=targets)
    if vision is None:
        return MNERDataset(posts, tokenizer, label_map, config.max_len, **common)
    prep, paths = image_prep_for(config), [find_image(root, p.imgid) for p in posts]
    common["control"] = config.image_control
    if teacher is not None and train:
        # framed as the student's view (--image_fit): distillation matches the two grids cell by cell
        common["teacher"] = cached_features(config, teacher, paths, f"{config.dataset_name}/{split} teacher",
                                            dataclasses.replace(EFFNET_PREP, fit=prep.fit))[0]
    if not vision.cacheable:
        return MNERDataset(posts, tokenizer, label_map, config.max_len, root, "pixels", prep,
                           train_aug=train and config.image_aug, **common)
    feats, blank = cached_features(config, vision, paths, f"{config.dataset_name}/{split}", prep)
    return MNERDataset(posts, tokenizer, label_map, config.max_len, root, "features", prep, feats,
                       feat_shape=vision.feat_shape, blank=blank, **common)


def make_loader(dataset: MNERDataset, config, train: bool):
    """Training: length-bucketed (flag) shuffled batches; evaluation: in order, sorted by length for speed."""
    sampler = LengthBucketSampler(dataset.lengths(), config.batch_size, seed=config.seed,
                                  bucket=config.length_bucketing if train else True, shuffle=train)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                       collate_fn=functools.partial(collate, pad_id=dataset.pad_id))
