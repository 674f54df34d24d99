"""Posts longer than --max_len: overlapping windows of whole words, every word tagged, the merge rule."""
from __future__ import annotations

import pytest
import torch

import dataloader as D
import runner

FILLER = "so we went down to the old market again and talked about nothing much at all today".split()


def long_words(n_filler: int, entity_at: int) -> tuple[list[str], list[str]]:
    """(words, BIO tags): filler words with "Kevin Durant visits Paris" starting at word entity_at."""
    words = [FILLER[i % len(FILLER)] for i in range(n_filler)]
    tags = ["O"] * n_filler
    words[entity_at:entity_at] = ["Kevin", "Durant", "visits", "Paris"]
    tags[entity_at:entity_at] = ["B-PER", "I-PER", "O", "B-LOC"]
    return words, tags


@pytest.mark.parametrize("n,max_len", [(5, 16), (40, 16), (153, 32), (300, 128), (60, 8)])
def test_windows_cover_every_word_once_and_fit(minilm_tok, n, max_len):
    words, _ = long_words(n, n // 2)
    ws = D.encode_windows(minilm_tok, words, max_len)
    assert all(len(w.enc.input_ids) <= max_len for w in ws)
    assert ws[0].own_a == 0 and ws[-1].own_b == len(words)
    assert all(a.own_b == b.own_a for a, b in zip(ws, ws[1:]))      # owned ranges partition the post
    assert all(w.start <= w.own_a < w.own_b <= w.start + w.enc.n_kept for w in ws)
    assert all(b.start < a.start + a.enc.n_kept for a, b in zip(ws, ws[1:]))  # consecutive windows overlap
    merged = D.merge_windows(ws, [list(range(w.start, w.start + w.enc.n_kept)) for w in ws], 1)[0]
    assert merged == list(range(len(words)))
    if len(minilm_tok(words, is_split_into_words=True)["input_ids"]) <= max_len:
        assert len(ws) == 1


def test_merge_reads_each_word_where_it_is_farthest_from_a_cut(minilm_tok):
    words, _ = long_words(120, 60)
    ws = D.encode_windows(minilm_tok, words, 24)
    assert len(ws) > 3

    def room(w, j):  # words between j and the nearest edge where the post was cut
        left = j - w.start if w.start > 0 else len(words)
        right = w.start + w.enc.n_kept - 1 - j if w.start + w.enc.n_kept < len(words) else len(words)
        return min(left, right)

    for j in range(len(words)):
        owner = next(w for w in ws if w.own_a <= j < w.own_b)
        assert all(room(owner, j) >= room(w, j) - 1 for w in ws if w.start <= j < w.start + w.enc.n_kept), j


def test_merge_joins_dicts_arrays_and_keeps_per_post_values():
    import numpy as np
    enc = D.Encoded([], [], 4, [])
    ws = [D.Window(0, 0, 0, 3, enc), D.Window(0, 2, 3, 6, enc), D.Window(1, 0, 0, 2, D.Encoded([], [], 2, []))]
    outs = [{"tags": list("abcd"), "att": np.arange(4), "image_used": True},
            {"tags": list("cdef"), "att": np.arange(2, 6), "image_used": True},
            {"tags": list("xy"), "att": np.arange(2), "image_used": False}]
    a, b = D.merge_windows(ws, outs, 2)
    assert a["tags"] == list("abcdef") and a["att"].tolist() == list(range(6)) and a["image_used"] is True
    assert b["tags"] == list("xy") and b["att"].tolist() == [0, 1] and b["image_used"] is False


class Oracle(torch.nn.Module):
    """Tags a word B-PER / I-PER / B-LOC from its first sub-word id alone: it finds the entity in whichever window
    the word lands, so the test sees what windowing and merging do, not what a tiny model learnt."""

    def __init__(self, tok, label_map):
        super().__init__()
        ids = {w: tok(w, add_special_tokens=False)["input_ids"][0] for w in ("kevin", "durant", "paris")}
        self.rule = {ids["kevin"]: "B-PER", ids["durant"]: "I-PER", ids["paris"]: "B-LOC"}
        self.label_map = label_map

    def decode(self, batch):
        out = []
        for ids, wi, m in zip(batch["input_ids"], batch["word_index"], batch["word_mask"]):
            tags = [self.rule.get(int(ids[i]), "O") for i in wi[m].tolist()]
            out.append(self.label_map.encode(tags))
        return out


@pytest.mark.parametrize("entity_at", [3, 150, 196])
def test_entities_past_the_first_window_are_found(minilm_tok, entity_at):
    words, tags = long_words(200, entity_at)
    short, short_tags = long_words(6, 2)
    posts = [D.Post(words, tags, None, "long"), D.Post(short, short_tags, None, "short")]
    lm = D.LabelMap.from_posts(posts)
    ds = D.MNERDataset(posts, minilm_tok, lm, 32)
    assert ds.n_windowed == 1 and len(ds) > 3 and "1 post longer than --max_len tagged in" in ds.describe()
    cfg = type("C", (), {"batch_size": 4, "seed": 1, "num_workers": 0, "length_bucketing": True,
                         "eval_mode": "conlleval"})
    res, preds = runner.evaluate_split(Oracle(minilm_tok, lm), ds, cfg, lm, "cpu")
    assert preds[0][entity_at:entity_at + 4] == ["B-PER", "I-PER", "O", "B-LOC"] and len(preds[0]) == len(words)
    assert res["f1"] == 1.0


def test_training_items_carry_each_windows_own_labels(minilm_tok):
    words, tags = long_words(120, 100)
    lm = D.LabelMap.from_posts([D.Post(words, tags, None)])
    ds = D.MNERDataset([D.Post(words, tags, None)], minilm_tok, lm, 24)
    for k, w in enumerate(ds.windows):
        item = ds[k]
        assert lm.decode(item["labels"]) == tags[w.start:w.start + w.enc.n_kept]
        assert len(item["case_ids"]) == len(item["word_index"]) == w.enc.n_kept
    assert any("B-PER" in lm.decode(ds[k]["labels"]) for k in range(1, len(ds)))  # the entity is trained on
