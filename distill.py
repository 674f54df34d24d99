"""Distillation from a trained teacher run: its CRF tag marginals per word become the student's soft targets.

    read_unlabelled   a text file of posts (one per line, words split by spaces) -> Posts without tags
    post_key          a post's words lower-cased, letters and digits only: two releases' tokenisations of one tweet
                      meet here (used to keep dev and test posts out of the unlabelled ones)
    unlabelled_posts  --distill_unlabelled, refused when it holds a dev or test post of the run's dataset; posts that
                      repeat a training post are left out and counted
    TeacherCache      teacher marginals per post, keyed by the teacher run (weights, config, labels), the temperature
                      and each post's exact words
    teacher_targets   --teacher_run -> p(label at word | post) [n_words, L] of each post, windows merged

The student's side (the KL term, Tagger.forward) lives in model.py; the batches carry the targets as
`teacher_marg` [B, W, L] and which posts have tags as `labelled` [B] (dataloader.collate).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

import dataloader as D
from config import ConfigError, UserError
from crf import CRFHead
from model import load_tokenizer
from runner import load_run, read_run_json, run_batches, runs_with

TEACHER_CODE_VERSION = 1  # raised when what a cached marginal means changes


def read_unlabelled(path) -> list[D.Post]:
    """Posts of a text file, one per non-empty line, words split on whitespace; tags all O, labelled False."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--distill_unlabelled {path}: no such file; build one with python data/make_unlabelled.py")
    out = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            words = line.split()
            if words:
                out.append(D.Post(words, ["O"] * len(words), None, f"{p}:{i}", labelled=False))
    if not out:
        raise UserError(f"--distill_unlabelled {path}: no posts (one post per line, words split by spaces)")
    return out


def post_key(words: list[str]) -> str:
    return re.sub(r"[^a-z0-9]", "", "".join(words).lower())


def unlabelled_posts(config, posts: dict[str, list[D.Post]]) -> list[D.Post]:
    """--distill_unlabelled's posts: an error naming the first line that repeats a dev or test post of the run's
    dataset; posts repeating a training post are left out (they are there with their tags), counted in one line."""
    if not config.distill_unlabelled:
        return []
    extra = read_unlabelled(config.distill_unlabelled)
    held = {post_key(p.tokens): (s, p.source) for s in ("valid", "test") for p in posts[s]}
    keys = [post_key(p.tokens) for p in extra]
    bad = [(p, held[k]) for p, k in zip(extra, keys) if k in held]
    if bad:
        (p, (split, src)) = bad[0]
        raise UserError(f"--distill_unlabelled: {p.source} repeats {split} post {src} ({len(bad)} such posts); the "
                        "student would learn the scored posts from the teacher: rebuild the file with "
                        "data/make_unlabelled.py or remove them")
    seen = {post_key(p.tokens) for p in posts["train"]}
    kept = [p for p, k in zip(extra, keys) if k not in seen]
    print(f"unlabelled: {config.distill_unlabelled}: {len(kept)} posts learned from the teacher only"
          + (f" ({len(extra) - len(kept)} repeating a training post left out)" if len(kept) < len(extra) else ""))
    return kept


def teacher_dir(config) -> Path:
    """--teacher_run as a run folder: a path, or a name under --save_dir."""
    for p in (Path(config.teacher_run), Path(config.save_dir) / config.teacher_run):
        if (p / "model.pt").is_file():
            return p
    raise ConfigError(f"--teacher_run {config.teacher_run}: no run with a model.pt there or under --save_dir "
                      f"{config.save_dir} (runs: {runs_with(config.save_dir, 'model.pt')})")


class TeacherCache:
    """Teacher marginals of posts, one file per (teacher run, temperature): <cache_dir>/teacher/<key>.pt, a dict
    {sha1 of a post's words: fp16 [n_words, L]}. The key hashes the run's model.pt, config.json and label_map.json
    bytes, the temperature and TEACHER_CODE_VERSION, so a retrained or replaced teacher recomputes; posts not in
    the file yet are computed and added (written to a temporary file and renamed)."""

    def __init__(self, cache_dir, run: Path, temperature: float):
        h = hashlib.sha1(f"{temperature!r}|v{TEACHER_CODE_VERSION}".encode())
        for f in ("model.pt", "config.json", "label_map.json"):
            h.update(D.file_digest(run / f).encode())
        self.path = Path(cache_dir) / "teacher" / f"{h.hexdigest()[:16]}.pt"
        self.entries: dict[str, torch.Tensor] = {}
        if self.path.is_file():
            try:
                self.entries = torch.load(self.path, weights_only=True)
            except Exception as e:  # a damaged file (a copy cut short): recompute
                print(f"warning: {self.path}: unreadable teacher cache ({type(e).__name__}); recomputing it")

    @staticmethod
    def key(p: D.Post) -> str:
        return hashlib.sha1("\x1f".join(p.tokens).encode()).hexdigest()

    def save(self):
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.entries, tmp)
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as e:  # the targets are in memory: the run goes on without caching them
            tmp.unlink(missing_ok=True)
            print(f"warning: could not write the teacher cache {self.path} ({getattr(e, 'strerror', None) or e})")


@torch.no_grad()
def teacher_marginals(config, model, label_map, posts: list[D.Post], temperature: float, device) -> list[np.ndarray]:
    """The teacher's p(label at word | post) [n_words, L] of each post, read from its windows (text only)."""
    ds = D.make_dataset(config, "train", posts, load_tokenizer(config), label_map)

    def each(batch) -> list[np.ndarray]:
        em, mask = model(batch)["emissions"].float(), batch["word_mask"]
        p = model.head.log_marginals(em, mask, temperature).exp().cpu().numpy()
        return [p[b, :n] for b, n in enumerate(mask.sum(1).tolist())]

    return run_batches(model.to(device), ds, config, device, each, desc="teacher marginals")


def teacher_targets(config, posts: list[D.Post], label_map: D.LabelMap, device) -> list[torch.Tensor]:
    """--teacher_run's marginals [n_words, L] (fp16) of each post, from the cache where it has them."""
    run = teacher_dir(config)
    tconfig, tlabels, tmodel, _ = load_run(run.parent, run.name, {"device": config.device})
    if not isinstance(tmodel.head, CRFHead):
        raise ConfigError(f"--teacher_run {config.teacher_run}: its model {tconfig.model} has a softmax head; the "
                          "student learns CRF tag marginals: pick a CRF run")
    if tlabels.labels != label_map.labels:
        raise ConfigError(f"--teacher_run {config.teacher_run}: its labels {tlabels.labels[2:]} are not this run's "
                          f"{label_map.labels[2:]}; pick a teacher trained on --dataset_name {config.dataset_name}")
    theirs = (read_run_json(run / "config.json").get("data_hash") or {}).get("train")
    ours = (getattr(config, "data_hash", None) or {}).get("train")
    if theirs and ours and theirs != ours:  # a teacher of another release may have seen this run's dev or test posts
        raise ConfigError(f"--teacher_run {config.teacher_run}: it trained on another train split "
                          f"({tconfig.dataset_name}, sha256 {theirs}) than this run's ({ours}); pick a teacher trained "
                          f"on this --dataset_name")
    cache = TeacherCache(config.cache_dir, run, config.distill_temperature)
    keys = [cache.key(p) for p in posts]
    todo = {k: p for k, p in zip(keys, posts) if k not in cache.entries}  # each distinct post once
    print(f"teacher: {run} ({tconfig.model}, {tconfig.text_encoder}): marginals of {len(posts)} posts, "
          f"{sum(k in cache.entries for k in keys)} from {cache.path}")
    if todo:
        marg = teacher_marginals(tconfig, tmodel, tlabels, list(todo.values()), config.distill_temperature, device)
        for k, m in zip(todo, marg):
            cache.entries[k] = torch.from_numpy(m).to(torch.float16)
        cache.save()
    return [cache.entries[k] for k in keys]
