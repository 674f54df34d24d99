"""Relation-extraction releases read as NER posts: the converters behind --dataset_name MNRE and HacRED.

The registry (readers.DATASETS) names a converter here for a dataset whose files are not CoNLL+IMGID; load_split
calls it like read_conll, and each prints what it converted, resolved and dropped (ReadReport.counts / note).

  read_mnre    MNRE relation dict lines -> word-level BIO posts (entity types from the relation paths)
  read_hacred  HacRED (DocRED layout) -> character-level BIO posts, one per sentence, text-only
"""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from readers import DataError, Post, ReadReport, _decode_lines, _json_records, _open

def _majority(votes: Counter) -> str:
    """The most frequent type; a tie goes to the alphabetically first one."""
    return min(votes, key=lambda t: (-votes[t], t))


def spans_to_bio(n: int, spans: dict) -> tuple[list[str], int]:
    """(BIO tags over n tokens from {(start, end): type}, end exclusive; spans dropped). Of two spans sharing a
    token the longer is tagged (on equal length, the one that starts first), the other dropped."""
    tags, dropped = ["O"] * n, 0
    for (s, e), t in sorted(spans.items(), key=lambda kv: (kv[0][0] - kv[0][1], kv[0][0])):
        if any(x != "O" for x in tags[s:e]):
            dropped += 1
            continue
        tags[s:e] = [f"B-{t}"] + [f"I-{t}"] * (e - s - 1)
    return tags, dropped


def _converted(report: ReadReport, posts: list[Post], c: Counter, keys: tuple) -> str:
    """A converter's sizes, counts (`keys` of c) and entities per type into report; the entities as a phrase."""
    report.posts, report.tokens = len(posts), sum(len(p.tokens) for p in posts)
    ents = dict(sorted(Counter(t[2:] for p in posts for t in p.tags if t.startswith("B-")).items()))
    report.counts = {**{k: c[k] for k in keys}, "entities": ents}
    return f"{sum(ents.values())} entities ({', '.join(f'{t} {n}' for t, n in ents.items()) or 'none'})"


# MNRE relation paths are /<head type>/<tail type>/<relation>. The release uses per, org, loc and misc;
# "other" (Twitter-2015's name for MISC) is accepted too. The relation 'None' relates two spans without typing them.
MNRE_TYPES = {"per": "PER", "org": "ORG", "loc": "LOC", "misc": "MISC", "other": "MISC"}


def _mnre_line(line: str):
    """One MNRE line -> (tokens, img_id, [(span, type or None)] for head and tail, name mismatches), or
    ValueError(why). Parsed with ast.literal_eval: literals only, nothing is executed."""
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
    rel, types = d["relation"], (None, None)
    if rel is not None and rel != "None":
        parts = rel.lower().split("/") if isinstance(rel, str) else []
        if len(parts) != 4 or parts[0] or parts[1] not in MNRE_TYPES or parts[2] not in MNRE_TYPES:
            raise ValueError(f"relation {rel!r} is neither 'None' nor /<head type>/<tail type>/<name> with types "
                             f"{', '.join(MNRE_TYPES)}")
        types = (MNRE_TYPES[parts[1]], MNRE_TYPES[parts[2]])
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

    Every head and tail span is an entity typed by its relation path (/per/org/member_of: head PER, tail ORG), by
    majority when a post's relations disagree. A span seen only in 'None' relations takes the majority type of the
    same words typed elsewhere in this file, else it is left out (O). Overlapping spans: the longer is kept. Counts
    go to report.counts; a malformed line raises DataError("file:line: ...") unless lenient (skipped and counted).
    """
    path, report, problem = _open(path, "MNRE ", lenient, report)
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
    ents = _converted(report, posts, c, ("lines", "by_relation", "by_surface", "left_out", "overlap_dropped",
                                         "type_conflicts", "name_mismatch"))
    report.note = (f"from {c['lines']} relation lines; {ents}; spans typed by relation {c['by_relation']}, by "
                   f"same-words majority {c['by_surface']}, left out untyped {c['left_out']}; "
                   f"{c['overlap_dropped']} overlapping spans dropped (longer kept)")
    return posts


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
    path, report, problem = _open(path, "HacRED ", lenient, report)
    posts, c = [], Counter()
    for lineno, doc in _json_records(path, problem):
        sents, ents = (doc.get("sents_char"), doc.get("vertex_char")) if isinstance(doc, dict) else (None, None)
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
    ents = _converted(report, posts, c, ("documents", "overlap_dropped", "type_conflicts", "empty_sentences",
                                         "name_mismatch"))
    report.note = (f"from {c['documents']} documents; {ents}; {c['overlap_dropped']} overlapping spans dropped "
                   f"(longer kept), {c['type_conflicts']} spans with two types (majority kept)")
    return posts
