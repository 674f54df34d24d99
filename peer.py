"""The peer: the plain Hugging Face token-classification recipe (run_ner_no_trainer), trained and scored as MANGO is.

    python peer.py --dataset_name twitter2017 --epochs 6 --seed 1 [--text_encoder DIR] [--json results/peer.json]

AutoModelForTokenClassification on --text_encoder, each word's label on its first sub-word (-100 elsewhere), AdamW at
--text_lr, linear warm-up (--warmup_prop) then decay, shuffled batches of --batch_size tokenised per batch, the
model's own dropout. After every epoch it tags dev (a word's tag is its first sub-word's argmax; words cut by
--max_len are O: the peer recipe truncates as the Hugging Face example does) and scores it with metrics.evaluate
under --eval_mode; test is scored once, with the weights of the best dev epoch. bench.py times the same recipe (Recipe).
"""
from __future__ import annotations

import copy
import json
import random
import sys
import time
from pathlib import Path

import dataloader as D
from config import cli, get_config, resolve_text_encoder
from metrics import evaluate, format_report
from runner import pick_device


def first_subwords(word_ids) -> list[tuple[int, int]]:
    """(position, word) of each word's first sub-word, from a fast tokenizer's word_ids()."""
    out, prev = [], None
    for j, w in enumerate(word_ids):
        if w is not None and w != prev:
            out.append((j, w))
        prev = w
    return out


class Recipe:
    """The recipe's tokenizer, label list and model on config.text_encoder (labels: the train split's tags, sorted)."""

    def __init__(self, config, train_posts: list[D.Post]):
        from transformers import AutoModelForTokenClassification
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.config = config
        self.labels = sorted({t for p in train_posts for t in p.tags})
        self.lid = {t: i for i, t in enumerate(self.labels)}
        path = resolve_text_encoder(config.text_encoder)
        self.tok = D.fast_tokenizer(path)  # as the recipe: add_prefix_space for a byte-level BPE
        self.device = pick_device(config.device)
        self.model = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(self.labels)).to(self.device)

    def tokenise(self, batch: list[D.Post]):
        """The batch's inputs [B, T], tokenised per batch as the recipe does."""
        return self.tok([p.tokens for p in batch], is_split_into_words=True, truncation=True,
                        max_length=self.config.max_len, padding=True, return_tensors="pt").to(self.device)

    def encode(self, batch: list[D.Post]):
        """(inputs [B, T], labels [B, T] on each word's first sub-word, -100 elsewhere) for training."""
        import torch
        x = self.tokenise(batch)
        y = torch.full(x["input_ids"].shape, -100, device=self.device)
        for b, p in enumerate(batch):
            for j, w in first_subwords(x.word_ids(b)):
                y[b, j] = self.lid.get(p.tags[w], -100)  # a tag train never had is not learnt from
        return x, y

    def tag(self, batch: list[D.Post]) -> list[list[str]]:
        """Each post's word tags: the first sub-word's argmax; words past --max_len are O."""
        x = self.tokenise(batch)  # no labels: eval needs none
        pred = self.model(**x).logits.argmax(-1).tolist()
        out = []
        for b, p in enumerate(batch):
            tags = ["O"] * len(p.tokens)
            for j, w in first_subwords(x.word_ids(b)):
                tags[w] = self.labels[pred[b][j]]
            out.append(tags)
        return out

    def batches(self, posts: list[D.Post], seed: int) -> list[list[D.Post]]:
        order = list(range(len(posts)))
        random.Random(seed).shuffle(order)
        bs = self.config.batch_size
        return [[posts[i] for i in order[k:k + bs]] for k in range(0, len(order), bs)]

    def optimizer(self, steps: int):
        import torch
        from transformers import get_scheduler
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.config.text_lr)
        return opt, get_scheduler("linear", opt, num_warmup_steps=int(self.config.warmup_prop * steps),
                                  num_training_steps=steps)

    def score(self, posts: list[D.Post]) -> dict:
        import torch
        self.model.eval()
        with torch.inference_mode():
            pred = [t for k in range(0, len(posts), 64) for t in self.tag(posts[k:k + 64])]
        self.model.train()
        return evaluate([p.tags for p in posts], pred, self.config.eval_mode)


def main(argv=None):
    import argparse
    import torch
    from train import seed_everything
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                 epilog="Every other flag is train.py's (python train.py --help): --dataset_name, "
                                        "--epochs, --seed, --text_encoder, --text_lr, --batch_size, ...")
    ap.add_argument("--json", default="", help="also write the epochs, the dev F1 and the test report to this file")
    own, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = get_config(rest)
    seed_everything(config.seed)
    posts = {s: D.load_split(config, s) for s in ("train", "valid", "test")}
    r = Recipe(config, posts["train"])
    n = -(-len(posts["train"]) // config.batch_size)
    opt, sched = r.optimizer(n * config.epochs)
    r.model.train()
    epochs, best, best_state = [], None, None
    for epoch in range(config.epochs):
        t0 = time.time()
        for batch in r.batches(posts["train"], config.seed + epoch):
            x, y = r.encode(batch)
            r.model(**x, labels=y).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        dev = r.score(posts["valid"])
        epochs.append({"epoch": epoch + 1, "dev_f1": dev["f1"], "train_s": round(time.time() - t0, 1)})
        print(f"epoch {epoch + 1}/{config.epochs} dev F1 {dev['f1']:.4f} ({epochs[-1]['train_s']} s)", flush=True)
        if best is None or dev["f1"] > best["dev_f1"]:
            best, best_state = epochs[-1], copy.deepcopy(r.model.state_dict())
    r.model.load_state_dict(best_state)
    test = r.score(posts["test"])
    print(f"test ({config.eval_mode}), best dev epoch {best['epoch']}:\n{format_report(test)}")
    out = {"recipe": "hf_token_classification", "dataset": config.dataset_name, "seed": config.seed,
           "epochs": epochs, "best_epoch": best["epoch"], "dev_f1": best["dev_f1"], "test": test,
           "text_encoder": config.text_encoder, "threads": torch.get_num_threads()}
    if own.json:
        Path(own.json).parent.mkdir(parents=True, exist_ok=True)
        Path(own.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    cli(main)
