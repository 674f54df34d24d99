"""Domain-adaptive masked-LM pre-training of a text encoder on the shipped tweet text, saved as a local encoder
directory that --text_encoder can name.

    python pretrain_mlm.py                                   # MiniLM -> save_models/encoders/minilm_tweets
    python train.py --model roberta_crf --text_encoder save_models/encoders/minilm_tweets

Corpus: the training posts of Twitter-2015 and Twitter-2017 and the MNRE training text (their words joined by
spaces). Dev and test text is never used: every corpus sentence whose words equal a Twitter-2015 or
Twitter-2017 dev or test post (any case) is dropped, and the count is reported (the two Twitter sets share
posts across their splits). Dev posts are left out too, so the dev F1 that selects the fine-tuned epoch is
measured on text the encoder has never read.

The shipped MiniLM is a sentence-embedding model without an MLM head: the head starts random and trains alone
for --head_warmup_steps (so its first random gradients do not disturb the encoder), then everything trains.
Written next to the encoder: mlm_report.json (corpus counts, leak check, loss per epoch, the resolved args).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

import dataloader as D
from config import ROOT, cli, get_config, resolve_text_encoder
from distill import post_key  # letters and digits only: a re-tokenised copy of a tweet is the same post

TWITTER = ("twitter2015", "twitter2017")


def build_corpus(data_dir: str, sources: list[str]) -> tuple[list[list[str]], dict]:
    """Training sentences of `sources` (dataset names) minus any that match a Twitter dev or test post; the report
    counts what was read, what the leak check dropped (per source) and duplicates removed."""
    held_out = set()
    for name in TWITTER:
        for split in ("valid", "test"):
            cfg = get_config(["--dataset_name", name, "--data_dir", data_dir])
            held_out |= {post_key(p.tokens) for p in D.load_split(cfg, split)}
    corpus, seen, report = [], set(), {"held_out_posts": len(held_out), "sources": {}}
    for name in sources:
        posts = D.load_split(get_config(["--dataset_name", name, "--data_dir", data_dir]), "train")
        leaked = dup = 0
        for p in posts:
            k = post_key(p.tokens)
            if k in held_out:
                leaked += 1
            elif k in seen:
                dup += 1
            else:
                seen.add(k)
                corpus.append(p.tokens)
        report["sources"][name] = {"read": len(posts), "dropped_leak": leaked, "dropped_duplicate": dup}
    report["sentences"] = len(corpus)
    report["dropped_leak"] = sum(s["dropped_leak"] for s in report["sources"].values())
    return corpus, report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--text_encoder", default="minilm", help="encoder to adapt: 'minilm' (shipped) or a local BERT-style directory")
    a("--out", default=str(ROOT / "save_models" / "encoders" / "minilm_tweets"), help="output encoder directory")
    a("--data_dir", default=str(ROOT / "data"), help="folder holding the dataset sub-folders")
    a("--sources", default="twitter2015,twitter2017,MNRE", help="datasets whose training text is the corpus")
    a("--epochs", type=int, default=2, help="passes over the corpus")
    a("--batch_size", type=int, default=32, help="sentences per step")
    a("--lr", type=float, default=1e-4, help="peak learning rate (linear warm-up 6%%, linear decay)")
    a("--mask_prob", type=float, default=0.15,
      help="share of sub-words chosen for prediction (80/10/10 mask/random/keep)")
    a("--head_warmup_steps", type=int, default=200, help="first steps train only the (new) MLM head")
    a("--max_len", type=int, default=64, help="sub-words per sentence, specials included")
    a("--max_sentences", type=int, default=0, help="use only the first N corpus sentences (0 = all; for tests)")
    a("--seed", type=int, default=0, help="random seed (masking, order)")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    corpus, report = build_corpus(args.data_dir, [s for s in args.sources.split(",") if s])
    if args.max_sentences:
        corpus = corpus[: args.max_sentences]
    print(f"corpus: {len(corpus)} sentences; leak check: {report['dropped_leak']} dropped as equal to a Twitter "
          f"dev/test post ({json.dumps(report['sources'])})", flush=True)
    src = resolve_text_encoder(args.text_encoder)
    tok = AutoTokenizer.from_pretrained(src)
    model = BertForMaskedLM.from_pretrained(src)  # bert.* from the encoder; the MLM transform is new
    model.train()
    enc = [tok(s, is_split_into_words=True, truncation=True, max_length=args.max_len)["input_ids"] for s in corpus]
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=args.mask_prob, return_tensors="pt")
    steps = args.epochs * math.ceil(len(enc) / args.batch_size)
    warm = max(1, int(0.06 * steps))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else max(0.0, (steps - t) / max(1, steps - warm)))
    head_only = [q for n, q in model.named_parameters() if not n.startswith("cls.")]
    losses, step, t0 = [], 0, time.time()
    for epoch in range(args.epochs):
        order = list(range(len(enc)))
        random.shuffle(order)
        # similar lengths per batch (pools of 50 batches sorted by length): little padding
        pool = args.batch_size * 50
        order = [i for k in range(0, len(order), pool) for i in sorted(order[k:k + pool], key=lambda j: len(enc[j]))]
        batches = [order[k:k + args.batch_size] for k in range(0, len(order), args.batch_size)]
        random.shuffle(batches)
        total = n = 0
        for b in batches:
            for q in head_only:
                q.requires_grad_(step >= args.head_warmup_steps)
            x = collate([{"input_ids": enc[i]} for i in b])
            loss = model(**x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total, n, step = total + loss.item(), n + 1, step + 1
            if step % 100 == 0:
                print(f"epoch {epoch + 1} step {step}/{steps} mlm loss {total / n:.3f} ({time.time() - t0:.0f} s)",
                      flush=True)
        losses.append(round(total / max(1, n), 4))
        print(f"epoch {epoch + 1}: mlm loss {losses[-1]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.bert.save_pretrained(out)
    tok.save_pretrained(out)
    report.update({"args": vars(args), "from": src, "epoch_loss": losses, "steps": steps,
                   "seconds": round(time.time() - t0)})
    (out / "mlm_report.json").write_text(json.dumps(report, indent=1))
    print(f"saved {out} (use --text_encoder {out})")


if __name__ == "__main__":
    cli(main)
