"""Entity-level evaluation for BIO-tagged word sequences.

Entities are (type, start, end) word spans, end exclusive. Two explicit chunking modes:
  conlleval  an I- after O, or after a different type, starts a new chunk (conlleval / seqeval default)
  strict     IOB2: a chunk starts only at B-; an I- that does not continue a same-type chunk is no entity
The modes differ on orphan I- chunks; every report says which mode produced it.
"""
from __future__ import annotations

MODES = ("conlleval", "strict")


def get_entities(tags: list[str], mode: str = "conlleval") -> list[tuple[str, int, int]]:
    """[(type, start, end)] for one BIO sequence; end is exclusive."""
    if mode not in MODES:
        raise ValueError(f"eval mode {mode!r} is unknown; choose one of {MODES}")
    out, start, typ = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        bi, t = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        continues = bi == "I" and typ == t and start is not None
        if start is not None and not continues:
            out.append((typ, start, i))
            start, typ = None, None
        if bi == "B" or (bi == "I" and not continues and mode == "conlleval"):
            start, typ = i, t
    return out


def _prf(correct: int, pred: int, gold: int) -> tuple[float, float, float]:
    p = correct / pred if pred else 0.0
    r = correct / gold if gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def evaluate(gold: list[list[str]], pred: list[list[str]], mode: str = "conlleval") -> dict:
    """Micro P/R/F1 over entities, per-type P/R/F1, word accuracy and supports.

    gold, pred: one tag list per post, same lengths (a length mismatch is a bug upstream, so it raises).
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold posts but {len(pred)} predicted posts")
    per: dict[str, list[int]] = {}  # type -> [correct, pred, gold]
    right = total = 0
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"post {i}: {len(g)} gold tags but {len(p)} predicted tags")
        right += sum(a == b for a, b in zip(g, p))
        total += len(g)
        ge, pe = set(get_entities(g, mode)), set(get_entities(p, mode))
        for k, ents in ((2, ge), (1, pe), (0, ge & pe)):
            for t, *_ in ents:
                per.setdefault(t, [0, 0, 0])[k] += 1
    c, np_, ng = (sum(v[k] for v in per.values()) for k in range(3))
    P, R, F = _prf(c, np_, ng)
    return {"mode": mode, "precision": P, "recall": R, "f1": F, "accuracy": right / total if total else 0.0,
            "correct": c, "pred_support": np_, "gold_support": ng,
            "per_type": {t: dict(zip(("precision", "recall", "f1"), _prf(*v)), correct=v[0], pred_support=v[1],
                                 gold_support=v[2]) for t, v in sorted(per.items())}}


def format_report(res: dict) -> str:
    """The lines batch_test.sh parses: one `[TYPE] P=, R=, F1=` per type, then `[Overall] ...`."""
    lines = [f"[{t}] P={v['precision']:.4f}, R={v['recall']:.4f}, F1={v['f1']:.4f}, "
             f"gold={v['gold_support']}, pred={v['pred_support']}"
             for t, v in res["per_type"].items()]
    lines.append(f"[Overall] Acc={res['accuracy']:.4f}, P={res['precision']:.4f}, R={res['recall']:.4f}, "
                 f"F1={res['f1']:.4f}")
    lines.append(f"[Mode] {res['mode']}, gold entities={res['gold_support']}, predicted={res['pred_support']}, "
                 f"correct={res['correct']}")
    return "\n".join(lines)
