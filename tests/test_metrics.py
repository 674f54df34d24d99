"""metrics.py: chunking in both modes, P/R/F1, agreement with seqeval on the real test sets, report format."""
from __future__ import annotations

import random
import re

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.scheme import IOB2

import dataloader
from conftest import real_split
from metrics import evaluate, format_report, get_entities


@pytest.mark.parametrize("tags,conlleval,strict", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["I-PER", "I-PER", "O"], [("PER", 0, 2)], []),                                    # orphan I- chunk
    (["O", "I-ORG", "B-ORG"], [("ORG", 1, 2), ("ORG", 2, 3)], [("ORG", 2, 3)]),
    (["B-PER", "I-LOC", "I-LOC", "O"], [("PER", 0, 1), ("LOC", 1, 3)], [("PER", 0, 1)]),  # type change inside
    (["B-PER", "I-PER", "I-LOC"], [("PER", 0, 2), ("LOC", 2, 3)], [("PER", 0, 2)]),
    (["B-PER", "B-PER", "B-LOC"], [("PER", 0, 1), ("PER", 1, 2), ("LOC", 2, 3)],
     [("PER", 0, 1), ("PER", 1, 2), ("LOC", 2, 3)]),                                   # B-B
    (["O", "B-MISC", "I-MISC"], [("MISC", 1, 3)], [("MISC", 1, 3)]),                    # trailing entity
    (["I-LOC"], [("LOC", 0, 1)], []),
    (["O", "O"], [], []),
    ([], [], []),
])
def test_get_entities(tags, conlleval, strict):
    assert get_entities(tags) == conlleval
    assert get_entities(tags, "conlleval") == conlleval
    assert get_entities(tags, "strict") == strict


def test_get_entities_unknown_mode():
    with pytest.raises(ValueError, match="eval mode"):
        get_entities(["O"], "lenient")


def test_evaluate_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    r = evaluate(gold, pred)
    assert (r["correct"], r["pred_support"], r["gold_support"]) == (2, 3, 3)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3) and r["accuracy"] == pytest.approx(5 / 6)
    pt = r["per_type"]
    assert list(pt) == ["LOC", "ORG", "PER"]
    assert (pt["PER"]["precision"], pt["PER"]["recall"], pt["PER"]["f1"]) == (1.0, 1.0, 1.0)
    assert (pt["LOC"]["precision"], pt["LOC"]["recall"], pt["LOC"]["f1"], pt["LOC"]["pred_support"]) == (0, 0, 0, 0)
    assert pt["ORG"]["precision"] == 0.5 and pt["ORG"]["recall"] == 1.0 and pt["ORG"]["f1"] == pytest.approx(2 / 3)
    assert r["mode"] == "conlleval"


def test_evaluate_modes_differ_on_orphans():
    gold = [["I-PER", "O", "B-LOC"]]
    assert evaluate(gold, gold)["f1"] == 1.0 and evaluate(gold, gold)["gold_support"] == 2
    s = evaluate(gold, gold, mode="strict")
    assert s["gold_support"] == 1 and s["f1"] == 1.0 and s["mode"] == "strict"


def test_evaluate_empty_and_no_predictions():
    r = evaluate([["O", "O"]], [["O", "O"]])
    assert (r["precision"], r["recall"], r["f1"], r["accuracy"]) == (0.0, 0.0, 0.0, 1.0)
    r = evaluate([["B-PER"]], [["O"]])
    assert (r["precision"], r["recall"], r["f1"]) == (0.0, 0.0, 0.0)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 gold posts but 1"):
        evaluate([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="post 1: 2 gold tags but 1"):
        evaluate([["O"], ["O", "B-PER"]], [["O"], ["O"]])


def _gold(name):
    return [p.tags for p in dataloader.read_conll(real_split(name, "test"))]


def _perturb(gold, seed, p=0.12):
    """Seeded noisy copy: random tags (orphan I- and type changes included), dropped and shifted entities."""
    rng = random.Random(seed)
    types = sorted({t[2:] for s in gold for t in s if t != "O"})
    choices = ["O"] + [f"{b}-{t}" for t in types for b in "BI"]
    out = []
    for s in gold:
        s = list(s)
        for i in range(len(s)):
            if rng.random() < p:
                s[i] = rng.choice(choices)
        out.append(s)
    return out


@pytest.fixture(scope="module")
def t2015():
    gold = _gold("twitter2015")
    return gold, _perturb(gold, 0)


def test_gold_supports():
    g15 = _gold("twitter2015")
    assert evaluate(g15, g15)["gold_support"] == 5207
    assert evaluate(g15, g15, mode="strict")["gold_support"] == 5072
    g17 = _gold("twitter2017")
    assert evaluate(g17, g17)["gold_support"] == evaluate(g17, g17, mode="strict")["gold_support"] == 1351


@pytest.mark.parametrize("mode", ["conlleval", "strict"])
def test_against_seqeval(t2015, mode):
    gold, pred = t2015
    kw = {} if mode == "conlleval" else dict(mode="strict", scheme=IOB2)
    r = evaluate(gold, pred, mode)
    assert 0.3 < r["f1"] < 0.95  # a real, imperfect prediction
    assert abs(r["precision"] - precision_score(gold, pred, **kw)) < 1e-9
    assert abs(r["recall"] - recall_score(gold, pred, **kw)) < 1e-9
    assert abs(r["f1"] - f1_score(gold, pred, **kw)) < 1e-9
    rep = classification_report(gold, pred, output_dict=True, zero_division=0, **kw)
    types = {k for k in rep if not k.endswith(" avg")}
    assert types == set(r["per_type"]) == {"LOC", "MISC", "ORG", "PER"}
    for t in types:
        ours = r["per_type"][t]
        for a, b in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert abs(ours[a] - rep[t][b]) < 1e-9, (t, a)
        assert ours["gold_support"] == rep[t]["support"]


def test_against_seqeval_twitter2017():
    gold = _gold("twitter2017")
    pred = _perturb(gold, 1)
    for mode, kw in (("conlleval", {}), ("strict", dict(mode="strict", scheme=IOB2))):
        assert abs(evaluate(gold, pred, mode)["f1"] - f1_score(gold, pred, **kw)) < 1e-9


_LINE = re.compile(r"^\[(\w+)\] (?:Acc=(?P<acc>[\d.]+), )?P=(?P<p>[\d.]+), R=(?P<r>[\d.]+), F1=(?P<f1>[\d.]+)")


def parse_report(text: str) -> dict:
    """The numbers format_report prints: {"Overall": {acc, p, r, f1}, "PER": {p, r, f1}, ...}."""
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            out[m.group(1)] = {k: float(v) for k, v in m.groupdict().items() if v is not None}
    return out


def test_report_round_trip(t2015):
    gold, pred = t2015
    for mode in ("conlleval", "strict"):
        r = evaluate(gold, pred, mode)
        text = format_report(r)
        assert f"[Mode] {mode}, gold entities={r['gold_support']}" in text
        back = parse_report(text)
        assert set(back) == set(r["per_type"]) | {"Overall"}
        assert back["Overall"] == pytest.approx({"acc": r["accuracy"], "p": r["precision"], "r": r["recall"],
                                                 "f1": r["f1"]}, abs=5e-5)
        for t, v in r["per_type"].items():
            assert back[t] == pytest.approx({"p": v["precision"], "r": v["recall"], "f1": v["f1"]}, abs=5e-5)
