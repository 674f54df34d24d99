"""Data for MANGO: CoNLL+IMGID files -> posts -> label map -> sub-word alignment -> images -> batches.

Reading order follows the data's own path:
  read_conll      one file -> list[Post]           (errors name file:line)
  read_mnre / read_hacred   relation data (MNRE dict lines, HacRED DocRED JSON) converted to BIO posts
  DATASETS        the registry: --dataset_name -> folder, split files, reader, types, images; load_split reads one
  LabelMap        tags <-> ids, built from train, saved with every run
  encode_words    words -> sub-word ids + first-sub-token index per word (+ truncation mask)
  encode_windows  a post longer than --max_len -> overlapping windows that each fit; merge_windows joins their outputs
  load_image      a path -> RGB PIL image, or None with the reason (placeholder + has_image = 0)
  ImagePrep       PIL -> normalised [3, S, S] tensor (short side resized, centre crop S)
  FeatureCache    frozen-backbone features computed once per image, keyed by image bytes+backbone+weights+prep
  image_sources   --image_control: which post's image each post shows (shuffle) or a constant grey one (blank)
  MNERDataset     posts + tokenizer + images -> items; `collate` pads them into a batch
  LengthBucketSampler  batches of similar length for training

The batch contract (every model consumes exactly this):
  input_ids      [B, T] long     sub-word ids, padded with the tokenizer's pad id
  attention_mask [B, T] long     1 on real sub-words
  word_index     [B, W] long     position in T of each word's first sub-word (0 on padding)
  word_end       [B, W] long     one past its last sub-word (1 on padding): --word_pooling mean averages [index, end)
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

import argparse
import ast
import functools
import hashlib
import json
import os
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from config import ConfigError, UserError
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")  # tried in this order for an IMGID without one
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
    labelled: bool = True  # False: an unlabelled post (--distill_unlabelled), learned from the teacher only


@dataclass
class ReadReport:
    """What the reader repaired or skipped in lenient mode; nothing is dropped without a count."""
    path: str
    problems: list[str] = field(default_factory=list)
    posts: int = 0
    tokens: int = 0
    counts: dict = field(default_factory=dict)  # converters (MNRE, HacRED): what was converted, resolved, dropped
    note: str = ""                              # the same counts as one readable phrase

    def summary(self) -> str:
        s = f"{self.path}: {self.posts} posts, {self.tokens} tokens"
        if self.note:
            s += f"; {self.note}"
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
        raise DataError(f"{path}:{line}: NUL byte in text; the file is binary or corrupted, re-export it as plain "
                        "UTF-8 text")
    # \n, \r\n or \r only: str.splitlines would also break inside tokens at U+2028, U+0085, \f, \v, ...
    lines = _LINE_BREAK.split(text)
    return lines[:-1] if lines[-1] == "" else lines  # a missing final newline reads the same


def _problem_fn(path, lenient: bool, report: ReadReport, action: str = "skip"):
    """`problem(line, msg, fix)`: DataError("file:line: msg; fix"), or under lenient a problem counted in report
    (the reader then does `action` to the line: "skip" it, or "repair" it)."""
    def problem(lineno: int, msg: str, fix: str):
        where = f"{path}:{lineno}"
        if not lenient:
            raise DataError(f"{where}: {msg}; {fix} (or pass --lenient_data to {action} and count)")
        report.problems.append(f"{where}: {msg}")
    return problem


def read_conll(path, lenient: bool = False, keep_raw_types: bool = False,
               report: ReadReport | None = None) -> list[Post]:
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
    problem = _problem_fn(path, lenient, report, "repair")

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
        token, tag = _conll_token_line(line, lineno, problem, keep_raw_types)
        tokens.append(token)
        tags.append(tag)
    close(len(lines) + 1)
    if not posts:
        raise DataError(f"{path}:1: no posts found; the file is empty or has no `token<TAB>tag` lines")
    report.posts, report.tokens = len(posts), sum(len(p.tokens) for p in posts)
    if report.problems:
        print(f"warning: {report.summary()}")
    notes = conll_notes(posts)
    if notes:
        print(f"note: {path}: {notes}")
    return posts


def _conll_token_line(line: str, lineno: int, problem, keep_raw_types: bool) -> tuple[str, str]:
    """One `token<TAB>tag` line -> (token, tag), problems reported (and repaired when lenient)."""
    parts = line.split("\t")
    if len(parts) != 2:
        what = "no tab" if len(parts) == 1 else f"{len(parts)} tab-separated columns"
        problem(lineno, f"expected `token<TAB>tag`, found {what}",
                "write one token and one tag per line separated by a single tab")
        parts = line.rsplit(None, 1) if len(parts) == 1 else [parts[0], parts[-1]]
        if len(parts) != 2:
            parts = [parts[0], "O"]
    token, tag = parts[0], parts[1].strip()
    if not TAG_RE.match(tag):
        problem(lineno, f"unknown tag {tag!r}", "use O, B-<TYPE> or I-<TYPE>")
        tag = "O"
    if tag != "O" and not keep_raw_types:
        tag = tag[:2] + RAW_TYPE_MAP.get(tag[2:], tag[2:])
    return token, tag


def opens_with_i(prev: str, tag: str) -> bool:
    """True for an I- tag that begins a chunk: after O (or at a post's start, prev = "O") or after another type."""
    return tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:])


def conll_notes(posts: list[Post]) -> str:
    """Valid but unusual things in a read file, counted (one phrase; '' when there are none).

    I- tags that begin a chunk (after O or after another type) are kept as they are in the posts, which the scorer
    reads: the conlleval evaluator as entity starts, --eval_mode strict as no entity (with --bio_constraints the
    training targets read them as B-, see iob2). IMGIDs shared by several posts are kept too (the posts
    share one image); the count shows a file that was concatenated twice.
    """
    orphans, first_orphan, seen, dups = 0, "", {}, {}
    for p in posts:
        prev = "O"
        for k, t in enumerate(p.tags):
            if opens_with_i(prev, t):
                orphans += 1
                if not first_orphan:
                    path, _, line = p.source.rpartition(":")
                    first_orphan = f"{path}:{int(line) + k + (p.imgid is not None)}" if line.isdigit() else p.source
            prev = t
        if p.imgid is not None:
            if p.imgid in seen:
                dups.setdefault(p.imgid, (seen[p.imgid], p.source))
            else:
                seen[p.imgid] = p.source
    out = []
    if orphans:
        out.append(f"{orphans} I- tag(s) begin a chunk (first: {first_orphan}); kept: --eval_mode conlleval reads "
                   "them as entity starts, strict as no entity")
    if dups:
        imgid, (a, b) = next(iter(dups.items()))
        out.append(f"{len(dups)} IMGID(s) name more than one post (first: {imgid} at {a} and {b}); those posts share "
                   "one image")
    return "; ".join(out)


# ----------------------------------------------------------------------------- relation data -> BIO

def _majority(votes: Counter) -> str:
    """The most frequent type; a tie goes to the alphabetically first one."""
    return min(votes, key=lambda t: (-votes[t], t))


def spans_to_bio(n: int, spans: dict) -> tuple[list[str], int]:
    """BIO tags over n tokens from {(start, end): type}, end exclusive.

    Overlap rule: two spans sharing a token cannot both be tagged, so the longer one is kept (on equal length,
    the one that starts first). Returns (tags, number of spans dropped by this rule).
    """
    tags, dropped = ["O"] * n, 0
    for (s, e), t in sorted(spans.items(), key=lambda kv: (kv[0][0] - kv[0][1], kv[0][0])):
        if any(x != "O" for x in tags[s:e]):
            dropped += 1
            continue
        tags[s:e] = [f"B-{t}"] + [f"I-{t}"] * (e - s - 1)
    return tags, dropped


def _entity_counts(posts: list[Post]) -> dict:
    return dict(sorted(Counter(t[2:] for p in posts for t in p.tags if t.startswith("B-")).items()))


# MNRE relation paths are /<head type>/<tail type>/<relation>. The release uses per, org, loc and misc;
# "other" (Twitter-2015's name for MISC) is accepted too. The relation 'None' relates two spans without typing them.
MNRE_TYPES = {"per": "PER", "org": "ORG", "loc": "LOC", "misc": "MISC", "other": "MISC"}


def _mnre_line(line: str):
    """One MNRE line -> (tokens, img_id, [(span, type or None)] for head and tail, name mismatches).

    Raises ValueError(why). Parsed with ast.literal_eval: literals only, nothing is executed.
    """
    try:
        d = ast.literal_eval(line.strip())
    except (SyntaxError, ValueError, TypeError, RecursionError) as e:
        raise ValueError(f"not a Python dict literal ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise ValueError(f"expected a dict, found {type(d).__name__}")
    missing = [k for k in ("token", "h", "t", "img_id", "relation") if k not in d]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    tokens = d["token"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(w, str) for w in tokens):
        raise ValueError("'token' must be a non-empty list of strings")
    img = d["img_id"]
    if not isinstance(img, str) or not img.strip():
        raise ValueError("'img_id' must be an image file name")
    rel = d["relation"]
    if rel is None or rel == "None":
        types = (None, None)
    else:
        parts = rel.split("/") if isinstance(rel, str) else []
        if len(parts) != 4 or parts[0] or parts[1].lower() not in MNRE_TYPES or parts[2].lower() not in MNRE_TYPES:
            raise ValueError(f"relation {rel!r} is neither 'None' nor /<head type>/<tail type>/<name> with types "
                             f"{', '.join(MNRE_TYPES)}")
        types = (MNRE_TYPES[parts[1].lower()], MNRE_TYPES[parts[2].lower()])
    spans, mismatch = [], 0
    for key, typ in zip("ht", types):
        ent = d[key]
        pos = ent.get("pos") if isinstance(ent, dict) else None
        if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and all(type(i) is int for i in pos)
                and 0 <= pos[0] < pos[1] <= len(tokens)):
            raise ValueError(f"'{key}' needs pos = [start, end) word indices within its {len(tokens)} tokens, "
                             f"found {pos!r}")
        mismatch += ent.get("name") != " ".join(tokens[pos[0]:pos[1]])
        spans.append(((pos[0], pos[1]), typ))
    return tokens, img.strip(), spans, mismatch


def _mnre_posts(groups: dict, path: Path, c: Counter) -> list[Post]:
    """read_mnre's grouped spans -> posts: each span typed by its relations' majority, else by the majority type of
    the same words typed elsewhere in the file, else left out; counts go to c."""
    surface: dict[str, Counter] = {}  # words of a typed span -> one vote per post it is typed in
    for (tokens, _), (_, votes) in groups.items():
        for (s, e), v in votes.items():
            if v:
                surface.setdefault(" ".join(tokens[s:e]), Counter())[_majority(v)] += 1
    posts = []
    for (tokens, img), (lineno, votes) in groups.items():
        typed = {}
        for (s, e), v in votes.items():
            words = " ".join(tokens[s:e])
            if v:
                typed[(s, e)] = _majority(v)
                c["by_relation"] += 1
                c["type_conflicts"] += len(v) > 1
            elif words in surface:
                typed[(s, e)] = _majority(surface[words])
                c["by_surface"] += 1
            else:
                c["left_out"] += 1
        tags, dropped = spans_to_bio(len(tokens), typed)
        c["overlap_dropped"] += dropped
        posts.append(Post(list(tokens), tags, img, f"{path}:{lineno}"))
    return posts


def read_mnre(path, lenient: bool = False, report: ReadReport | None = None) -> list[Post]:
    """MNRE relation lines -> word-level BIO posts, one per distinct (tokens, img_id), in file order.

    Every head and tail span is an entity typed by its relation path (/per/org/member_of: head PER, tail ORG;
    a span typed differently by two relations of one post takes the majority). A span seen only in 'None'
    relations takes the majority type of the same words typed elsewhere in this file, else it is left out (O).
    Overlapping spans: the longer is kept (spans_to_bio). Counts go to report.counts; a malformed line raises
    DataError("file:line: ...") unless lenient (then it is skipped and counted).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; put the MNRE split file there or pass --data_dir")
    report = report if report is not None else ReadReport(str(path))
    problem = _problem_fn(path, lenient, report)
    groups: dict = {}  # (tokens, img_id) -> (first line, {span: Counter(type)})
    c = Counter()
    for lineno, line in enumerate(_decode_lines(path), 1):
        if not line.strip():
            continue
        c["lines"] += 1
        try:
            tokens, img, spans, mismatch = _mnre_line(line)
        except ValueError as e:
            problem(lineno, str(e), "write one dict per line: {'token': [...], 'h': {'name', 'pos'}, 't': {...}, "
                    "'img_id': ..., 'relation': ...}")
            continue
        c["name_mismatch"] += mismatch
        _, votes = groups.setdefault((tuple(tokens), img), (lineno, {}))
        for span, typ in spans:
            v = votes.setdefault(span, Counter())
            if typ:
                v[typ] += 1
    if not groups:
        raise DataError(f"{path}:1: no relation lines found; the file is empty or holds no MNRE dict lines")
    posts = _mnre_posts(groups, path, c)
    report.posts, report.tokens = len(posts), sum(len(p.tokens) for p in posts)
    report.counts = {**{k: c[k] for k in ("lines", "by_relation", "by_surface", "left_out", "overlap_dropped",
                                          "type_conflicts", "name_mismatch")}, "entities": _entity_counts(posts)}
    ents = report.counts["entities"]
    report.note = (f"from {c['lines']} relation lines; {sum(ents.values())} entities "
                   f"({', '.join(f'{t} {n}' for t, n in ents.items()) or 'none'}); "
                   f"spans typed by relation {c['by_relation']}, by same-words majority {c['by_surface']}, left out "
                   f"untyped {c['left_out']}; "
                   f"{c['overlap_dropped']} overlapping spans dropped (longer kept)")
    return posts


def _json_records(path: Path, problem):
    """(line, record) for each record of a JSON-lines file or of a file holding one JSON list.

    A bad JSON line is a problem (skippable under lenient); a syntax error inside a JSON list is always an error.
    """
    lines = _decode_lines(path)
    text = "\n".join(lines)
    if not text.lstrip().startswith("["):
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    problem(lineno, f"invalid JSON ({e.msg}, column {e.colno})", "write one JSON document per line")
        return
    dec, n, line, at = json.JSONDecoder(), len(text), 1, 0
    space = re.compile(r"\s*")

    def line_of(k):
        nonlocal line, at
        line, at = line + text.count("\n", at, k), k
        return line
    i = space.match(text, text.index("[") + 1).end()
    if i < n and text[i] == "]" and space.match(text, i + 1).end() == n:
        return
    while True:
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); the file must be JSON "
                            "lines or one JSON list of documents") from None
        yield line_of(i), obj
        i = space.match(text, j).end()
        if i < n and text[i] == ",":
            i = space.match(text, i + 1).end()
        elif i < n and text[i] == "]" and space.match(text, i + 1).end() == n:
            return
        else:
            raise DataError(f"{path}:{line_of(i)}: expected ',' or the closing ']' of the JSON list")


def _hacred_mention(m, sents) -> tuple[int, tuple[int, int], str, bool]:
    """A `vertex_char` mention -> (sent_id, (start, end), type, name matches); ValueError(why)."""
    if not isinstance(m, dict):
        raise ValueError(f"mention is a {type(m).__name__}, not an object")
    k, pos, typ = m.get("sent_id"), m.get("pos"), m.get("type")
    if type(k) is not int or not 0 <= k < len(sents):
        raise ValueError(f"sent_id {k!r} is not a sentence index (0..{len(sents) - 1})")
    if not (isinstance(pos, list) and len(pos) == 2 and all(type(i) is int for i in pos)
            and 0 <= pos[0] < pos[1] <= len(sents[k])):
        raise ValueError(f"pos {pos!r} is not [start, end) within sentence {k} ({len(sents[k])} characters)")
    if not isinstance(typ, str) or not typ.strip():
        raise ValueError(f"type {typ!r} is not a type name")
    return k, (pos[0], pos[1]), "_".join(typ.split()), m.get("name") == "".join(sents[k][pos[0]:pos[1]])


def read_hacred(path, lenient: bool = False, report: ReadReport | None = None) -> list[Post]:
    """HacRED (DocRED layout, JSON lines or one JSON list) -> one character-level BIO post per sentence.

    Tokens are the characters of `sents_char`; entities are the `vertex_char` mentions {name, sent_id, type,
    pos: [start, end) within the sentence}, typed by `type` (inner whitespace -> _). A span given two types takes
    the majority; overlapping spans: the longer is kept. Text-only: imgid is None. Empty sentences are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; put the HacRED split file there or pass --data_dir")
    report = report if report is not None else ReadReport(str(path))
    problem = _problem_fn(path, lenient, report)
    posts, c = [], Counter()
    for lineno, doc in _json_records(path, problem):
        sents = doc.get("sents_char") if isinstance(doc, dict) else None
        ents = doc.get("vertex_char") if isinstance(doc, dict) else None
        if not (isinstance(sents, list)
                and all(isinstance(s, list) and all(isinstance(ch, str) for ch in s) for s in sents)):
            problem(lineno, "document has no `sents_char` list of sentences (lists of characters)",
                    "give every document its sents_char")
            continue
        if not (isinstance(ents, list) and all(isinstance(e, list) for e in ents)):
            problem(lineno, "document has no `vertex_char` list of entities (lists of mentions)",
                    "give every document its vertex_char ([] when it has no entities)")
            continue
        c["documents"] += 1
        votes = [{} for _ in sents]
        for i, ent in enumerate(ents):
            for j, m in enumerate(ent):
                try:
                    k, span, typ, same_name = _hacred_mention(m, sents)
                except ValueError as e:
                    problem(lineno, f"vertex_char[{i}][{j}]: {e}", "fix the mention")
                    continue
                c["name_mismatch"] += not same_name
                votes[k].setdefault(span, Counter())[typ] += 1
        for k, chars in enumerate(sents):
            if not chars:
                c["empty_sentences"] += 1
                continue
            c["type_conflicts"] += sum(len(v) > 1 for v in votes[k].values())
            tags, dropped = spans_to_bio(len(chars), {span: _majority(v) for span, v in votes[k].items()})
            c["overlap_dropped"] += dropped
            posts.append(Post(list(chars), tags, None, f"{path}:{lineno} (sentence {k})"))
    if not posts:
        raise DataError(f"{path}:1: no sentences found; the file is empty or its documents have no sents_char")
    report.posts, report.tokens = len(posts), sum(len(p.tokens) for p in posts)
    report.counts = {**{k: c[k] for k in ("documents", "overlap_dropped", "type_conflicts", "empty_sentences",
                                          "name_mismatch")}, "entities": _entity_counts(posts)}
    ents = report.counts["entities"]
    report.note = (f"from {c['documents']} documents; {sum(ents.values())} entities "
                   f"({', '.join(f'{t} {n}' for t, n in ents.items()) or 'none'}); {c['overlap_dropped']} overlapping "
                   f"spans dropped (longer kept), {c['type_conflicts']} spans with two types (majority kept)")
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
        pairs = list(zip(labels[2::2], labels[3::2]))
        if len(labels) % 2 or any(b[:2] != "B-" or i != "I-" + b[2:] for b, i in pairs):  # model.bio_bans reads ids so
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

@dataclass
class Encoded:
    input_ids: list[int]
    word_index: list[int]   # first sub-word position of each kept word (special tokens included)
    word_end: list[int]     # one past its last kept sub-word (word_index[i] < word_end[i])
    n_kept: int             # words that fit in max_len (encode_windows puts the rest in further windows)
    empty: list[int]        # words that tokenised to nothing and were replaced by the unknown token

    @property
    def n_empty(self) -> int:
        return len(self.empty)


def _special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer puts before and after a text ([CLS] / [SEP], <s> / </s>).

    Read off a one-word probe, since transformers 5 tokenizers have no build_inputs_with_special_tokens.
    """
    enc = tokenizer(["a"], is_split_into_words=True, add_special_tokens=True)
    wids = enc.word_ids()
    first, last = wids.index(0), len(wids) - 1 - wids[::-1].index(0)
    return list(enc["input_ids"][:first]), list(enc["input_ids"][last + 1:])


def encode_words(tokenizer, words: list[str], max_len: int, context: list[list[str]] | None = None) -> Encoded:
    """Sub-word encode a word list and record each word's first sub-word position.

    `context` (--context_k) is a list of retrieved posts' word lists, appended after the post as
    [SEP] ctx1 [SEP] ctx2 ... in whatever room max_len leaves; the post itself is never cut for them, and their
    sub-words are not words of the post (not in word_index), so nothing scores or labels them.

    Words that tokenise to nothing (U+FE0F, U+200B, a lone combining mark, "") would shift every later
    label when aligned by position, so they are replaced by the unknown token. Truncation keeps whole
    sub-word prefixes up to max_len (specials included); words whose first sub-word falls off are not kept
    (encode_windows starts the next window before them).
    """
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    wids = enc.word_ids()
    present = set(w for w in wids if w is not None)
    empty = [i for i in range(len(words)) if i not in present]
    if empty:
        unk = tokenizer.unk_token or tokenizer.pad_token
        words = [w if i in present else unk for i, w in enumerate(words)]
        enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
        wids = enc.word_ids()
    head, tail = _special_ids(tokenizer)
    budget = max_len - len(head) - len(tail)
    ids = enc["input_ids"][:budget]
    wids = wids[:budget]
    prefix = len(head)
    if context:
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        ids = list(ids)
        for ctx in context:
            room = budget - len(ids) - 1
            if room <= 0 or not ctx:
                break
            ids += [sep] + tokenizer(ctx, is_split_into_words=True, add_special_tokens=False)["input_ids"][:room]
    word_index, word_end, seen = [], [], -1
    for pos, w in enumerate(wids):
        if w is not None and w != seen:
            word_index.append(pos + prefix)
            word_end.append(pos + prefix + 1)
            seen = w
        elif w is not None:
            word_end[-1] = pos + prefix + 1
    return Encoded(head + list(ids) + tail, word_index, word_end, len(word_index), empty)


@dataclass
class Window:
    """One model input of a post: words [start, start + enc.n_kept) of post `post`; the tags of words [own_a, own_b)
    are read from this window (merge_windows)."""
    post: int
    start: int
    own_a: int
    own_b: int
    enc: Encoded


def encode_windows(tokenizer, words: list[str], max_len: int, context: list[list[str]] | None = None,
                   post: int = 0) -> list[Window]:
    """A post as one window, or, when its sub-words do not fit in max_len, as overlapping windows of whole words.

    Each window holds as many words as fit from its start; the next one starts half a window (in words) before
    the previous one ended, so every word lies in one or two windows. The merge rule: a word's tag comes from the
    window in which it is farther from a cut edge, i.e. the words two windows share are split at their middle;
    the first half is read from the earlier window, the second from the later one.
    """
    n, budget = len(words), max_len  # at most max_len words can fit: every word has at least one sub-word
    spans, s = [], 0
    while True:
        enc = encode_words(tokenizer, words[s:s + budget], max_len, context)
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
    word from the window that owns it (encode_windows' merge rule). A post whose windows have no output (another
    rank's share) stays None."""
    parts: list[list] = [[] for _ in range(n_posts)]
    for w, o in zip(windows, outs):
        if o is not None:
            parts[w.post].append(_cut(o, w.own_a - w.start, w.own_b - w.start))
    return [_join(p) if p else None for p in parts]


def iob2(tags: list[str]) -> tuple[list[str], int]:
    """(tags with every chunk that opens with I-X relabelled B-X, how many were): IOB1 or a stray I- to IOB2.
    conlleval reads the same chunks from both; Twitter-2015 has 186 such chunks in train."""
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


# ----------------------------------------------------------------------------- images

def find_image(image_root, imgid: str | None) -> Path | None:
    """`<image_root>/<imgid>`; the imgid may be a sub-path (NewsMKG: a/b/c) and may carry its extension.

    Without an extension IMAGE_EXTS (.jpg, .jpeg, .png, .gif, .webp, .bmp) are tried in that order; with one, the
    file as named, else the same stem with another image extension. When nothing exists the first candidate is
    returned (reported missing).
    """
    if not imgid or image_root is None:
        return None
    base = Path(image_root) / imgid.lstrip("/")  # a sub-path stays below the image folder
    has_ext = base.suffix.lower() in IMAGE_EXTS
    if has_ext and base.exists():
        return base
    cands = [base.with_suffix(ext) if has_ext else base.with_name(base.name + ext) for ext in IMAGE_EXTS]
    return next((p for p in cands if p.exists()), base if has_ext else cands[0])


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
    """PIL image -> normalised float tensor [3, size, size]: the short side resized to `short` (bicubic, the
    aspect ratio kept), a centre crop of size x size, (x / 255 - mean) / std.

    short = 0 means round(size * 256 / 224), the ImageNet convention EfficientNet-Lite0 and the dual-granularity
    encoder are fed with; a CLIP directory gives its processor's shortest_edge (image_prep_for). truncate: the long
    side is int(short * long / short side), as transformers' CLIPImageProcessor computes it (else it is rounded).
    With an rng (training with --image_aug), a random crop position and a horizontal flip replace the centre crop.
    """
    size: int = 224
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    short: int = 0
    truncate: bool = False

    def __post_init__(self):
        if not self.short:
            object.__setattr__(self, "short", round(self.size * 256 / 224))

    def resized(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) of a w x h image after the short-side resize."""
        if self.truncate:  # transformers' get_resize_output_image_size, operation for operation
            return (self.short, int(self.short * h / w)) if w <= h else (int(self.short * w / h), self.short)
        scale = self.short / min(w, h)
        return max(self.short, round(w * scale)), max(self.short, round(h * scale))

    def __call__(self, im: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        im = im.resize(self.resized(*im.size), Image.BICUBIC)
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
        return (f"size={self.size},short={self.short},mean={self.mean},std={self.std},bicubic"
                + (",truncate" if self.truncate else ""))


EFFNET_PREP = ImagePrep(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite0 as trained (mean = std = 0.5)


def image_prep_for(config) -> ImagePrep:
    """The preprocessing each vision backbone was trained with (the model file owns no data code).

    A CLIP directory: its preprocessor_config.json as CLIPImageProcessor reads it (size.shortest_edge, crop_size,
    image_mean, image_std); without one, CLIPImageProcessor's defaults at the model's image_size.
    """
    if config.use_dual_granularity and config.vision_stem == "conv":
        return ImagePrep(config.vision_img_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if config.use_dual_granularity:  # EfficientNet-Lite0's own normalisation, at the encoder's input size
        return ImagePrep(config.vision_img_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    if config.image_encoder == "efficientnet_lite0":
        return EFFNET_PREP
    cfg_file = Path(config.image_encoder) / "preprocessor_config.json"
    size, mean, std = 224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    short = None
    if cfg_file.exists():
        pc = json.loads(cfg_file.read_text())
        crop = pc.get("crop_size", size)
        size = crop.get("height", size) if isinstance(crop, dict) else crop
        mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
        edge = pc.get("size", size)
        if isinstance(edge, dict) and "shortest_edge" not in edge:
            raise DataError(f"{cfg_file}: size {edge} is not a shortest_edge resize; MANGO feeds CLIP as "
                            "CLIPImageProcessor does with size {\"shortest_edge\": N}: write that there")
        short = edge["shortest_edge"] if isinstance(edge, dict) else edge
    else:
        vcfg = Path(config.image_encoder) / "config.json"
        if vcfg.exists():
            c = json.loads(vcfg.read_text())
            size = c.get("vision_config", c).get("image_size", size)
    return ImagePrep(int(size), mean, std, short=int(short or size), truncate=True)


# ----------------------------------------------------------------------------- feature cache

# Bump when the code that turns an image into cached features changes (decoding, ImagePrep, a backbone's forward):
# every entry written by older code is then recomputed.
FEATURE_CODE_VERSION = "3"


def file_digest(path) -> str:
    """sha1 of a file's bytes: the cache key of its features (an image overwritten in place gets new features)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FeatureCache:
    """Features of a frozen vision backbone, computed once per image and reused by later runs.

    One file per image: <cache_dir>/<key>/<d[:2]>/<d>.pt, an fp16 tensor (any shape the backbone's `features`
    gives), where d is the sha1 of the image file's bytes. The key hashes the backbone identity, the weights file
    (path, size, mtime), the preprocessing and FEATURE_CODE_VERSION. So an image overwritten in place, a new
    weights file, other preprocessing or new feature code all recompute. Images that cannot be read are never
    stored: they are retried (and counted again) on the next run. Each entry is written to a temporary file of
    its own and renamed, so runs that share a cache directory at the same time never see half-written entries;
    a damaged entry is recomputed.
    """

    def __init__(self, cache_dir, backbone_id: str, weights_file, prep: ImagePrep):
        wf = Path(weights_file) if weights_file else None
        wsig = f"{wf.resolve()}:{wf.stat().st_size}:{wf.stat().st_mtime_ns}" if wf and wf.exists() else "none"
        self.key = hashlib.sha1(f"{backbone_id}|{wsig}|{prep.key()}|v{FEATURE_CODE_VERSION}".encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / self.key
        self.prep = prep
        self.write_ok = True

    def entry(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.pt"

    def get(self, paths: list[Path | None], encode, batch_size: int = 32, desc: str = "features"):
        """Features of each readable image ({str(path): fp16 tensor}); `encode` maps [B,3,S,S] -> [B, ...]."""
        feats: dict[str, torch.Tensor] = {}
        todo: dict[str, list[str]] = {}  # digest -> paths holding those bytes, still to compute
        for p in sorted({str(p) for p in paths if p is not None}):
            if not os.path.isfile(p):
                continue
            d = file_digest(p)
            f = self.entry(d)
            if d not in todo and f.exists():
                try:
                    feats[p] = torch.load(f, weights_only=True)
                    continue
                except Exception as e:  # a damaged entry (disk trouble, a copy cut short): recompute it
                    print(f"warning: {f}: unreadable feature cache entry ({type(e).__name__}); recomputing it")
            todo.setdefault(d, []).append(p)
        batch: list[tuple[str, Image.Image]] = []
        for d, ps in tqdm(list(todo.items()), desc=f"extract {desc}", unit="img", leave=False, disable=not todo):
            im, _ = load_image(ps[0])
            if im is None:  # not stored: the next run tries again (MNERDataset reports why it is unused)
                continue
            batch.append((d, im))
            if len(batch) == batch_size:
                self._run(batch, encode, todo, feats)
                batch = []
        if batch:
            self._run(batch, encode, todo, feats)
        return feats

    def _run(self, batch, encode, todo, feats):
        with torch.no_grad():
            out = encode(torch.stack([self.prep(im) for _, im in batch])).to(torch.float16).cpu()
        for (d, _), o in zip(batch, out):
            o = o.clone()
            for p in todo[d]:
                feats[p] = o
            self._write(self.entry(d), o)

    def _write(self, f: Path, t: torch.Tensor):
        if not self.write_ok:
            return
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")  # one temp file per process: concurrent writers never mix
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                torch.save(t, fh)
            os.replace(tmp, f)
        except (OSError, RuntimeError) as e:  # the features are in memory: the run goes on without caching them
            if tmp.is_file():
                tmp.unlink()
            self.write_ok = False
            print(f"warning: could not write the feature cache under {self.dir} "
                  f"({getattr(e, 'strerror', None) or e}); features are recomputed next time")


# ----------------------------------------------------------------------------- datasets

CONLL_LAYOUT = "CoNLL+IMGID: an `IMGID:<id>` line, then `token<TAB>BIO-tag` lines, a blank line between posts"


@dataclass(frozen=True)
class DatasetSpec:
    """A folder under --data_dir and how to read it (one reader per file format)."""
    description: str
    folder: str
    reader: object = read_conll                 # read_conll, read_mnre or read_hacred
    files: str = "{split}.txt"                  # a split's file name; {split} is one of split_names
    split_names: tuple = ("train", "valid", "test")  # this release's words for train / valid / test
    images: str | None = "{folder}_images"      # image folder in the dataset folder ({split} allowed); None: text-only
    types: tuple | None = ("PER", "LOC", "ORG", "MISC")  # entity types; None = whatever train holds
    layout: str = CONLL_LAYOUT
    source: str = ""                            # where the files come from

    def split_name(self, split: str) -> str:
        return self.split_names[list(SPLIT_FILES).index(split)]

    def file(self, split: str) -> str:
        return self.files.format(split=self.split_name(split))

    def image_dir(self, split: str | None = None) -> str | None:
        """Image folder relative to the dataset folder (split None: a pattern such as img_org/<train|val|test>)."""
        if self.images is None:
            return None
        sub = self.split_name(split) if split else "<" + "|".join(self.split_names) + ">"
        return self.images.format(folder=self.folder, split=sub)


DATASETS = {
    "twitter2015": DatasetSpec("Twitter-2015 MNER (UMT release); OTHER read as MISC", "twitter2015",
                               source="copies in ../shared/datasets/twitter2015/"),
    "twitter2017": DatasetSpec("Twitter-2017 MNER (UMT release)", "twitter2017",
                               source="copies in ../shared/datasets/twitter2017/"),
    "demo": DatasetSpec("synthetic visual-disambiguation set made by data/make_demo.py", "demo",
                        source="generated on first use"),
    "heldout": DatasetSpec("synthetic held-out picture set made by data/make_heldout.py (vision designs are chosen "
                           "on its dev split)", "heldout", source="generated on first use"),
    "MNRE": DatasetSpec("MNRE v2 relation data (ICME 2021) as word-level BIO; types from relation paths", "MNRE",
                        read_mnre, "mnre_{split}.txt", ("train", "val", "test"), "img_org/{split}",
                        layout="one Python-dict literal per line: token, h/t {name, pos [start, end)}, img_id, "
                               "relation",
                        source="copies in ../shared/datasets/MNRE/"),
    "HacRED": DatasetSpec("HacRED Chinese relation data as character-level BIO, one post per sentence; text-only",
                          "HacRED", read_hacred, "{split}.json", ("train", "dev", "test"), None, None,
                          layout="DocRED-style JSON lines or one JSON list: sents_char, vertex_char mentions "
                                 "{name, sent_id, type, pos [start, end) in the sentence}",
                          source="from the HacRED release (not shipped)"),
    "MORE": DatasetSpec("MORE multimodal object-entity data (ACM MM 2023) converted to CoNLL+IMGID", "MORE",
                        types=None, source="converted from the MORE release (not obtainable here)"),
    "NewsMKG": DatasetSpec("NewsMKG multimodal news entities converted to CoNLL+IMGID; IMGID may be a sub-path",
                           "NewsMKG", types=None,
                           layout=CONLL_LAYOUT + "; IMGID may be a sub-path a/b/c (image <images>/a/b/c.jpg)",
                           source="converted from the NewsMKG release (not obtainable here)"),
}


def dataset_spec(config) -> tuple[DatasetSpec, Path]:
    """(spec, folder) of --dataset_name: a registered dataset or any CoNLL+IMGID folder under --data_dir."""
    if config.dataset_name in DATASETS:
        spec = DATASETS[config.dataset_name]
        return spec, Path(config.data_dir) / spec.folder
    d = Path(config.data_dir) / config.dataset_name
    if (d / SPLIT_FILES["train"]).is_file():
        return DatasetSpec("custom CoNLL+IMGID folder", config.dataset_name, types=None), d
    raise DataError(f"--dataset_name {config.dataset_name!r}: not a known dataset ({', '.join(DATASETS)}) and "
                    f"{d / SPLIT_FILES['train']} does not exist; pick one of those or put train/valid/test.txt there")


def dataset_dir(config) -> Path:
    return dataset_spec(config)[1]


def image_root(config, split: str = "train") -> Path | None:
    """Folder of a split's images; None for a text-only dataset.

    Default: the registry's folder (data/<name>/<name>_images; MNRE: data/MNRE/img_org/<train|val|test>).
    --image_root replaces it; for a dataset with one image folder per split, its <split> sub-folder is used
    when it exists there.
    """
    spec, d = dataset_spec(config)
    if spec.images is None:
        return None
    if config.image_root:
        root = Path(config.image_root)
        sub = root / spec.split_name(split)
        return sub if "{split}" in spec.images and sub.is_dir() else root
    return d / spec.image_dir(split)


def missing_files_message(name: str, spec: DatasetSpec, d: Path, path: Path) -> str:
    files = ", ".join(spec.file(s) for s in SPLIT_FILES)
    img = f"images in {d / spec.image_dir()}/" if spec.images else "no images (text-only)"
    src = f"; {spec.source}" if spec.source else ""
    return f"{path} not found: dataset {name} expects {files} in {d}/ ({spec.layout}), {img}{src}"


def load_split(config, split: str, report: ReadReport | None = None) -> list[Post]:
    """The posts of one split of --dataset_name, read by its registry reader: the one entry point for training.

    Converted datasets (MNRE, HacRED) print one line with their sizes and what was resolved or dropped.
    """
    spec, d = dataset_spec(config)
    path = d / spec.file(split)
    if config.dataset_name == "demo" and not path.exists():
        from data.make_demo import make_demo  # the demo set is generated, not shipped
        make_demo(d)
    if config.dataset_name == "heldout" and not path.exists():
        from data.make_heldout import make_heldout  # generated too
        make_heldout(d)
    if not path.is_file():
        raise DataError(missing_files_message(config.dataset_name, spec, d, path))
    if spec.reader is read_conll:
        return read_conll(path, lenient=config.lenient_data, keep_raw_types=config.keep_raw_types, report=report)
    report = report if report is not None else ReadReport(str(path))
    posts = spec.reader(path, lenient=config.lenient_data, report=report)
    print(f"{config.dataset_name}/{split}: {report.summary()}")
    return posts


def split_hashes(config) -> dict[str, str]:
    """{split: first 16 hex digits of the sha256 of its file}: which version of the data a run used."""
    spec, d = dataset_spec(config)
    return {s: hashlib.sha256((d / spec.file(s)).read_bytes()).hexdigest()[:16]
            for s in SPLIT_FILES if (d / spec.file(s)).is_file()}


def split_overlaps(posts: dict[str, list[Post]]) -> list[str]:
    """One line per pair of splits that share posts (the same words and image id): a release whose test split
    repeats its dev split, or leaks training posts, scores what it trained on."""
    keys = {s: {(tuple(p.tokens), p.imgid) for p in ps} for s, ps in posts.items()}
    out = []
    for a, b in ((a, b) for i, a in enumerate(keys) for b in list(keys)[i + 1:]):
        n = len(keys[a] & keys[b])
        if n:
            same = " (the same posts)" if keys[a] == keys[b] else ""
            out.append(f"{a} and {b} share {n} of {len(keys[a])} / {len(keys[b])} distinct posts{same}")
    return out


def check_dataset(config) -> str:
    """What `python dataloader.py --check DATASET` prints: per split its posts, entities per type, images found /
    missing / unreadable and its content hash, then any posts shared between splits."""
    from metrics import get_entities
    hashes = split_hashes(config)
    posts = {s: load_split(config, s) for s in hashes}
    lines = [f"{config.dataset_name} in {dataset_dir(config)}"]
    for s, ps in posts.items():
        types = Counter(t for p in ps for t, _, _ in get_entities(p.tags, config.eval_mode))
        root = image_root(config, s)
        seen: dict[str, str] = {}
        for p in tqdm(ps, desc=f"images {s}", leave=False, disable=root is None):
            if root is not None and p.imgid and p.imgid not in seen:
                seen[p.imgid] = load_image(find_image(root, p.imgid))[1]
        found = sum(v == "ok" for v in seen.values())
        missing = sum(v == "missing" for v in seen.values())
        imgs = "text-only dataset" if root is None else \
            f"images {found} found / {missing} missing / {len(seen) - found - missing} unreadable in {root}"
        ents = ", ".join(f"{t} {n}" for t, n in sorted(types.items()))
        lines.append(f"  {s}: {len(ps)} posts, {sum(types.values())} entities ({ents}); {imgs}; sha256 {hashes[s]}")
    overlaps = split_overlaps(posts)
    lines += [f"  error: {o}" for o in overlaps] or ["  no post is shared between splits"]
    return "\n".join(lines)


def describe_datasets(data_dir=DATA_DIR) -> str:
    """What `python dataloader.py --list` prints: each dataset, its split sizes and where its files go."""
    def show(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(p)
    out = []
    for name, spec in DATASETS.items():
        d = Path(data_dir) / spec.folder
        sizes, lines = [], []
        for split in SPLIT_FILES:
            f = d / spec.file(split)
            if not f.is_file():
                sizes.append(f"{split}=absent")
            elif spec.reader is read_conll:
                try:
                    n = sum(1 for l in _decode_lines(f) if l.startswith("IMGID:"))
                    sizes.append(f"{split}={n}")
                except DataError:
                    sizes.append(f"{split}=unreadable")
            else:
                r = ReadReport(str(f))
                try:
                    sizes.append(f"{split}={len(spec.reader(f, lenient=True, report=r))}")
                    lines.append(str(r.counts.get("lines", r.counts.get("documents"))))
                except DataError:
                    sizes.append(f"{split}=unreadable")
        what = 'lines' if spec.reader is read_mnre else 'documents'
        unit = " posts" + (f" (from {'/'.join(lines)} {what})" if lines else "")
        pattern = spec.files.format(split="{" + ",".join(spec.split_names) + "}")
        images = f"images {show(d / spec.image_dir())}/" if spec.images else "text-only"
        types = " ".join(spec.types) if spec.types else "from train"
        out.append(f"{name:12s}{spec.description}\n{'':12s}{' '.join(sizes)}{unit} | types: {types}\n"
                   f"{'':12s}files {show(d)}/{pattern} ({spec.layout}) | {images}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- dataset / batches

GREY = (128, 128, 128)  # the --image_control blank picture


def image_sources(has_image: list[bool], control: str, seed: int) -> list[int]:
    """For each post, the post whose image it is shown (--image_control); -1 = the constant grey image.

    none: itself. shuffle: the posts with an image are put in a random order (from seed) and each is shown the
    image of the next one in that cycle, so no post keeps its own image where the split has >= 2 images.
    blank: -1 for every post with an image. Posts without an image keep the text-only path under every control.
    """
    src = list(range(len(has_image)))
    have = [i for i, h in enumerate(has_image) if h]
    if control == "blank":
        for i in have:
            src[i] = -1
    elif control == "shuffle" and len(have) > 1:
        random.Random(f"image_control/{seed}").shuffle(have)
        for i, j in zip(have, have[1:] + have[:1]):
            src[i] = j
    return src


class MNERDataset(torch.utils.data.Dataset):
    """Posts ready for a model: encodings and label ids are computed once, images per item.

    image_mode: None (text-only model), "pixels" (decode + ImagePrep each time) or "features" (look up
    `features`, a {path: tensor} dict from FeatureCache; `feat_shape` gives its shape for placeholders).
    `teacher` ({path: [R, 1280]}) adds the distillation targets of each post's image. `control` is
    --image_control; `blank` is the grey image's features (features mode). iob2_labels: the loss targets (not the
    posts' tags, which the scorer reads) open every chunk with B- (iob2). `targets` (--teacher_run) holds each
    post's teacher marginals [n_words, L].
    """

    def __init__(self, posts: list[Post], tokenizer, label_map: LabelMap, max_len: int, img_root=None,
                 image_mode: str | None = None, prep: ImagePrep | None = None, features=None,
                 feat_shape=None, train_aug: bool = False, seed: int = 0, name: str = "split", teacher=None,
                 control: str = "none", blank=None, context=None, word_mask_prob: float = 0.0,
                 mask_id: int | None = None,
                 iob2_labels: bool = False, targets: list[torch.Tensor] | None = None):
        self.posts, self.label_map, self.image_mode, self.prep = posts, label_map, image_mode, prep
        self.features, self.feat_shape, self.train_aug, self.name = features, feat_shape, train_aug, name
        self.teacher, self.control, self.blank, self.targets = teacher, control, blank, targets
        # a post without a teacher entry gets zeros of the teacher's own shape (its distill term is never read)
        self.teacher_shape = next(iter(teacher.values())).shape if teacher else None
        self.seed, self.epoch = seed, 0  # augmentation draws from (seed, epoch, item): same in any worker or order
        self.word_mask_prob, self.mask_id = word_mask_prob, mask_id
        self.windows = [w for i, p in enumerate(posts)
                        for w in encode_windows(tokenizer, p.tokens, max_len, context[i] if context else None, i)]
        self.context_k = max((len(c) for c in context), default=0) if context else 0
        # the loss's targets only: scoring reads p.tags as given
        fixed = [iob2(p.tags) if iob2_labels else (p.tags, 0) for p in posts]
        self.n_iob2 = sum(n for _, n in fixed)
        self.labels = [label_map.encode(t, p.source) for (t, _), p in zip(fixed, posts)]
        self.cases = [[word_shape(w) for w in p.tokens] for p in posts]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.n_windowed = len({w.post for w in self.windows if w.start > 0})
        self.n_empty = len({(w.post, w.start + j) for w in self.windows for j in w.enc.empty})  # windows overlap
        self.paths = [find_image(img_root, p.imgid) for p in posts] if image_mode else [None] * len(posts)
        self.has_image = [self._usable(p) for p in self.paths]
        # why each unused image is not used ("missing", "unreadable (OSError)", ...), counted by describe()
        self.image_status = [("ok" if ok else self._why(p)) for p, ok in zip(self.paths, self.has_image)
                             ] if image_mode else []
        self.source = image_sources(self.has_image, control, seed)
        self.failed: set[str] = set()

    def _usable(self, p) -> bool:
        if p is None:
            return False
        if self.image_mode == "features":
            return str(p) in self.features
        return p.is_file() and p.stat().st_size > 0

    def _why(self, p) -> str:
        return load_image(p)[1]  # cheap for the usual reasons (missing, zero bytes); decodes only broken files

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
        if self.context_k:
            post = sum(w.enc.word_end[-1] if w.enc.word_end else 0 for w in self.windows)
            total = sum(len(w.enc.input_ids) for w in self.windows)
            n = max(1, len(self.windows))
            s += f", retrieved context: {self.context_k} neighbours, sub-words per input {total / n:.1f} " \
                 f"(post alone {post / n + 1:.1f})"
        if self.n_iob2:
            s += f", {self.n_iob2} chunks opening with I- trained as B- (--bio_constraints)"
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

    @property
    def enc(self) -> list[Encoded]:  # each item's sub-word encoding
        return [w.enc for w in self.windows]

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
            return self.prep(Image.new("RGB", (self.prep.size, self.prep.size), GREY))
        im, status = load_image(self.paths[j])
        if im is None:
            if str(self.paths[j]) not in self.failed:
                self.failed.add(str(self.paths[j]))
                print(f"warning: {self.paths[j]}: {status}; post {self.posts[i].source} runs text-only")
            return None
        return self.prep(im, random.Random(f"{self.seed}/{self.epoch}/{i}") if self.train_aug else None)

    def masked_ids(self, i: int) -> list[int]:
        """Item i's sub-word ids with each of its words, with probability word_mask_prob, replaced by the mask
        token on all its sub-words (drawn from seed, epoch, item; special tokens and context words never)."""
        e = self.windows[i].enc
        rng = random.Random(f"word_mask/{self.seed}/{self.epoch}/{i}")
        ids = list(e.input_ids)
        for s, t in zip(e.word_index, e.word_end):
            if rng.random() < self.word_mask_prob:
                ids[s:t] = [self.mask_id] * (t - s)
        return ids

    def __getitem__(self, k):
        w = self.windows[k]
        e, i, a = w.enc, w.post, w.start
        ids = self.masked_ids(k) if self.word_mask_prob > 0 else e.input_ids
        item = {"input_ids": ids, "word_index": e.word_index, "word_end": e.word_end,
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
    B = len(items)
    T = max(len(it["input_ids"]) for it in items)
    W = max(len(it["word_index"]) for it in items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    word_index = torch.zeros(B, W, dtype=torch.long)
    word_end = torch.ones(B, W, dtype=torch.long)
    word_mask = torch.zeros(B, W, dtype=torch.bool)
    labels = torch.zeros(B, W, dtype=torch.long)
    case_ids = torch.zeros(B, W, dtype=torch.long)
    for b, it in enumerate(items):
        n, w = len(it["input_ids"]), len(it["word_index"])
        input_ids[b, :n] = torch.tensor(it["input_ids"])
        attention_mask[b, :n] = 1
        word_index[b, :w] = torch.tensor(it["word_index"], dtype=torch.long)
        word_end[b, :w] = torch.tensor(it["word_end"], dtype=torch.long)
        word_mask[b, :w] = True
        labels[b, :w] = torch.tensor(it["labels"], dtype=torch.long)
        case_ids[b, :w] = torch.tensor(it["case_ids"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "word_index": word_index, "word_end": word_end,
             "word_mask": word_mask, "labels": labels, "case_ids": case_ids,
             "has_image": torch.tensor([bool(it["has_image"]) for it in items]),
             "index": torch.tensor([it["index"] for it in items])}
    for k in ("pixel_values", "image_feats", "teacher_feats"):
        if k in items[0]:
            batch[k] = torch.stack([it[k] for it in items])
    if "teacher_marg" in items[0]:
        marg = torch.zeros(B, W, items[0]["teacher_marg"].size(-1))
        for b, it in enumerate(items):
            marg[b, :len(it["teacher_marg"])] = it["teacher_marg"]
        batch["teacher_marg"] = marg
        batch["labelled"] = torch.tensor([bool(it["labelled"]) for it in items])
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


def cached_features(config, vision, paths, desc: str, prep: ImagePrep | None = None):
    """FeatureCache.get for a frozen vision module (duck-typed: `features` on pixels [B,3,S,S], `backbone_id`,
    `weights_file`); also returns the features of the constant grey image (--image_control blank)."""
    prep = prep or image_prep_for(config)
    cache = FeatureCache(config.cache_dir, vision.backbone_id, vision.weights_file, prep)
    param = next(vision.parameters())

    def encode(x):
        return vision.features(x.to(param.device, param.dtype))
    feats = cache.get(paths, encode, desc=desc)
    with torch.no_grad():
        blank = encode(prep(Image.new("RGB", (prep.size, prep.size), GREY))[None])[0].to(torch.float16).cpu()
    return feats, blank


def split_context(config, split: str, posts: list[Post]):
    """--context_k's retrieved words for each post (context.context_words), or None when it is off. The pool is the
    training split: the posts themselves for split "train", else the training split of config's dataset."""
    if getattr(config, "context_k", 0) <= 0:
        return None
    from context import context_words
    return context_words(config, split, posts, posts if split == "train" else load_split(config, "train"))


def make_dataset(config, split: str, posts: list[Post], tokenizer, label_map: LabelMap, vision=None,
                 train: bool = False, image_dir=None, teacher=None, iob2_labels: bool = False,
                 targets=None) -> MNERDataset:
    """A split ready for the model. `vision` is the model's vision module (duck-typed: `cacheable`, `features`,
    `feat_shape`, `backbone_id`, `weights_file`, callable on pixels) or None for text-only models. A cacheable
    (frozen) module's features come from FeatureCache; otherwise pixels are read every step. `teacher` (training
    with --vision_distill_lambda) is a frozen backbone whose cached features become each post's distillation target.
    image_dir replaces the split's image folder (predict.py: "/" with absolute image paths as IMGIDs). iob2_labels:
    the loss targets open every chunk with B- (the caller's model.iob2_targets for the train split). `targets`: the
    teacher marginals of each post (distill.teacher_targets) for the train split.
    """
    root = image_root(config, split) if image_dir is None else Path(image_dir)
    context = split_context(config, split, posts)
    opts = {}
    if train and config.word_mask_prob > 0:
        mid = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
        if mid is None:
            raise ConfigError(f"--word_mask_prob {config.word_mask_prob}: --text_encoder {config.text_encoder}'s "
                              "tokenizer has neither a mask nor an unknown token; use --word_mask_prob 0")
        opts = {"word_mask_prob": config.word_mask_prob, "mask_id": mid}
    opts.update(iob2_labels=iob2_labels, targets=targets)
    if vision is None:
        return MNERDataset(posts, tokenizer, label_map, config.max_len, name=split, context=context,
                           seed=config.seed, **opts)
    prep = image_prep_for(config)
    paths = [find_image(root, p.imgid) for p in posts]
    common = dict(seed=config.seed, name=split, control=config.image_control, context=context, **opts)
    if teacher is not None and train:
        common["teacher"] = cached_features(config, teacher, paths, f"{config.dataset_name}/{split} teacher",
                                            EFFNET_PREP)[0]
    if not vision.cacheable:
        return MNERDataset(posts, tokenizer, label_map, config.max_len, root, "pixels", prep,
                           train_aug=train and config.image_aug, **common)
    feats, blank = cached_features(config, vision, paths, f"{config.dataset_name}/{split}", prep)
    return MNERDataset(posts, tokenizer, label_map, config.max_len, root, "features", prep, feats,
                       feat_shape=vision.feat_shape, blank=blank, **common)


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
    ap.add_argument("--check", default="", metavar="DATASET",
                    help="per split: posts, entities per type, images found / missing / unreadable, content hash, "
                         "and posts shared between splits")
    ap.add_argument("--data_dir", default=str(DATA_DIR), help="folder holding one sub-folder per dataset")
    ap.add_argument("--image_root", default="", help="with --check: the image folder, if not the dataset's own")
    args = ap.parse_args()
    if args.check:
        from config import cli, get_config
        cfg = get_config(["--dataset_name", args.check, "--data_dir", args.data_dir, "--image_root", args.image_root])
        cli(lambda: print(check_dataset(cfg)))
    elif args.list:
        print(describe_datasets(args.data_dir))
    else:
        ap.print_help()
