"""Reading datasets: CoNLL+IMGID files -> posts, and the dataset registry.

  read_conll      one file -> list[Post]           (errors name file:line)
  DATASETS        the registry: --dataset_name -> folder, split files, reader, types, images; load_split reads one
                  (the converters of relation-extraction releases, MNRE and HacRED, live in data/convert.py)
  split_hashes / split_overlaps   which version of the data a run used; posts shared between splits
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from config import ROOT, UserError

DATA_DIR = ROOT / "data"
SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
# a type name opens with a letter and ends in a word character (WNUT-17's B-creative-work, B-GPE2, B-WORK_OF_ART)
TAG_RE = re.compile(r"^(O|[BI]-[^\W\d_](?:[\w.-]*\w)?)$")
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
    counts: dict = field(default_factory=dict)  # data/convert.py: what was converted, resolved, dropped
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
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
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


def _open(path, kind: str, lenient: bool, report: ReadReport | None, action: str = "skip"):
    """A reader's (path, report, problem); the file must exist (`kind` names its format in the message)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; put the {kind}split file there or pass --data_dir")
    report = report if report is not None else ReadReport(str(path))
    return path, report, _problem_fn(path, lenient, report, action)


def read_conll(path, lenient: bool = False, keep_raw_types: bool = False,
               report: ReadReport | None = None) -> list[Post]:
    """Read a CoNLL+IMGID file: `IMGID:<id>` line, `token<TAB>tag` lines, a blank line between posts.

    Strict by default: a line without exactly one tab, a tag that is not O/B-X/I-X, a post without an IMGID line or
    an IMGID with no tokens raises DataError("file:line: ...; fix"). Lenient: repaired or skipped and counted in
    `report` (tag -> O, token line whitespace-split, post kept without image, empty post skipped).
    """
    path, report, problem = _open(path, "", lenient, report, "repair")
    posts: list[Post] = []
    tokens, tags, imgid, start = [], [], None, 0  # the post being read, its IMGID and first line

    def close():
        nonlocal tokens, tags, imgid
        if tokens:
            if imgid is None:
                problem(start, "post has no IMGID line", "add `IMGID:<id>` before its first token")
            posts.append(Post(tokens, tags, imgid, f"{path}:{start}"))
        elif imgid is not None:
            problem(start, f"IMGID:{imgid} has no tokens", "remove the line or add the post's tokens")
        tokens, tags, imgid = [], [], None

    for lineno, line in enumerate(_decode_lines(path), 1):
        line = line.rstrip(" \r")
        if not line.strip():
            close()
            continue
        if line.startswith("IMGID:"):
            if tokens or imgid is not None:
                problem(lineno, "IMGID line inside a post", "add a blank line before it")
                close()
            imgid, start = line[len("IMGID:"):].strip(), lineno
            continue
        if not tokens and imgid is None:
            start = lineno
        token, tag = _conll_token_line(line, lineno, problem, keep_raw_types)
        tokens.append(token)
        tags.append(tag)
    close()
    if not posts:
        raise DataError(f"{path}:1: no posts found; the file is empty or has no `token<TAB>tag` lines")
    report.posts, report.tokens = len(posts), sum(len(p.tokens) for p in posts)
    if report.problems:
        print(f"warning: {report.summary()}")
    if notes := conll_notes(posts):
        print(f"note: {path}: {notes}")
    return posts


def _conll_token_line(line: str, lineno: int, problem, keep_raw_types: bool) -> tuple[str, str]:
    """One `token<TAB>tag` line -> (token, tag), problems reported (and repaired when lenient)."""
    parts = line.split("\t")
    if len(parts) != 2:
        what = "no tab" if len(parts) == 1 else f"{len(parts)} tab-separated columns"
        problem(lineno, f"expected `token<TAB>tag`, found {what}",
                "write one token and one tag per line separated by a single tab")
        if len(parts) == 1:
            parts = line.rsplit(None, 1)
        else:  # the first and last non-empty columns: a trailing tab leaves an empty last one, not the tag
            cols = [c for c in parts if c.strip()]
            parts = cols[:1] + cols[-1:] if len(cols) > 1 else cols
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

    I- tags that begin a chunk are kept in the posts, which the scorer reads (conlleval: entity starts, strict: no
    entity; --bio_constraints trains them as B-, see iob2). Posts sharing an IMGID share one image; the count shows
    a file that was concatenated twice.
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
        if p.imgid in seen:
            dups.setdefault(p.imgid, (seen[p.imgid], p.source))
        elif p.imgid is not None:
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


def _json_records(path: Path, problem):
    """(line, record) for each record of a JSON-lines file or of a file holding one JSON list. A bad JSON line is a
    problem (skippable under lenient); a syntax error inside a JSON list is always an error."""
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
    dec, line, at = json.JSONDecoder(), 1, 0
    space = re.compile(r"\s*")

    def line_of(k):  # counted on from the last call: records come in order
        nonlocal line, at
        line, at = line + text.count("\n", at, k), k
        return line

    def closes(k):  # the list's closing ']' at k, only whitespace after it
        return text.startswith("]", k) and space.match(text, k + 1).end() == len(text)
    i = space.match(text, text.index("[") + 1).end()
    if closes(i):
        return
    while True:  # after a ',' another record must follow
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); the file must be JSON "
                            "lines or one JSON list of documents") from None
        yield line_of(i), obj
        i = space.match(text, j).end()
        if closes(i):
            return
        if not text.startswith(",", i):
            raise DataError(f"{path}:{line_of(i)}: expected ',' or the closing ']' of the JSON list")
        i = space.match(text, i + 1).end()


# ----------------------------------------------------------------------------- datasets

CONLL_LAYOUT = "CoNLL+IMGID: an `IMGID:<id>` line, then `token<TAB>BIO-tag` lines, a blank line between posts"


@dataclass(frozen=True)
class DatasetSpec:
    """A folder under --data_dir and how to read it (one reader per file format)."""
    description: str
    folder: str
    converter: str = ""                         # a reader in data/convert.py for a non-CoNLL release; "": CoNLL
    files: str = "{split}.txt"                  # a split's file name; {split} is one of split_names
    split_names: tuple = ("train", "valid", "test")  # this release's words for train / valid / test
    images: str | None = "{folder}_images"      # image folder in the dataset folder ({split} allowed); None: text-only
    types: tuple | None = ("PER", "LOC", "ORG", "MISC")  # entity types; None = whatever train holds
    layout: str = CONLL_LAYOUT
    source: str = ""                            # where the files come from
    raw_types: bool = True                      # False: its types are read through RAW_TYPE_MAP (Twitter-2015)

    def reader(self):
        """read_conll, or the named converter of data/convert.py: (path, lenient, report) -> list[Post]."""
        return getattr(importlib.import_module("data.convert"), self.converter) if self.converter else read_conll

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
                               source="copies in ../shared/datasets/twitter2015/", raw_types=False),
    "twitter2017": DatasetSpec("Twitter-2017 MNER (UMT release)", "twitter2017",
                               source="copies in ../shared/datasets/twitter2017/"),
    "demo": DatasetSpec("synthetic visual-disambiguation set made by data/make_demo.py", "demo",
                        source="generated on first use"),
    "heldout": DatasetSpec("synthetic held-out picture set made by data/make_heldout.py (vision designs are chosen "
                           "on its dev split)", "heldout", source="generated on first use"),
    "heldout2": DatasetSpec("second synthetic held-out picture set made by data/make_heldout2.py (its dev split "
                            "checks vision choices too)", "heldout2", source="generated on first use"),
    "MNRE": DatasetSpec("MNRE v2 relation data (ICME 2021) as word-level BIO; types from relation paths", "MNRE",
                        "read_mnre", "mnre_{split}.txt", ("train", "val", "test"), "img_org/{split}",
                        layout="one Python-dict literal per line: token, h/t {name, pos [start, end)}, img_id, "
                               "relation",
                        source="copies in ../shared/datasets/MNRE/"),
    "HacRED": DatasetSpec("HacRED Chinese relation data as character-level BIO, one post per sentence; text-only",
                          "HacRED", "read_hacred", "{split}.json", ("train", "dev", "test"), None, None,
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
    """Folder of a split's images (the registry's, e.g. data/MNRE/img_org/val); None for a text-only dataset.
    --image_root replaces it; for a dataset with one image folder per split, by its <split> sub-folder if it has one."""
    spec, d = dataset_spec(config)
    if spec.images is None:
        return None
    if config.image_root:
        root = Path(config.image_root)
        sub = root / spec.split_name(split)
        return sub if "{split}" in spec.images and sub.is_dir() else root
    return d / spec.image_dir(split)


def load_split(config, split: str, report: ReadReport | None = None) -> list[Post]:
    """The posts of one split of --dataset_name, read by its registry reader: the one entry point for training.
    Converted datasets (MNRE, HacRED) print one line with their sizes and what was resolved or dropped."""
    spec, d = dataset_spec(config)
    path = d / spec.file(split)
    if config.dataset_name in ("demo", "heldout", "heldout2") and not path.exists():  # generated, not shipped
        make = f"make_{config.dataset_name}"
        getattr(importlib.import_module(f"data.{make}"), make)(d)
    if not path.is_file():
        files = ", ".join(spec.file(s) for s in SPLIT_FILES)
        img = f"images in {d / spec.image_dir()}/" if spec.images else "no images (text-only)"
        raise DataError(f"{path} not found: dataset {config.dataset_name} expects {files} in {d}/ ({spec.layout}), "
                        f"{img}{f'; {spec.source}' if spec.source else ''}")
    if not spec.converter:
        keep = spec.raw_types if config.keep_raw_types is None else config.keep_raw_types  # None: the dataset's rule
        return read_conll(path, lenient=config.lenient_data, keep_raw_types=keep, report=report)
    report = report if report is not None else ReadReport(str(path))
    posts = spec.reader()(path, lenient=config.lenient_data, report=report)
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
    for a, b in combinations(keys, 2):
        n = len(keys[a] & keys[b])
        if n:
            same = " (the same posts)" if keys[a] == keys[b] else ""
            out.append(f"{a} and {b} share {n} of {len(keys[a])} / {len(keys[b])} distinct posts{same}")
    return out
