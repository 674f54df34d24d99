"""The flair peer: flair's SequenceTagger fine-tuning the same text encoder, scored with MANGO's scorer.

    bash script/peer_flair.sh --dataset_name twitter2017 --seed 1 --json results/flair_twitter2017_s1.json

Runs in its own environment (script/peer_flair.sh makes it: flair pins transformers < 5, MANGO does not). The recipe
is flair's own for fine-tuning a transformer tagger, at flair's defaults: TransformerWordEmbeddings on --text_encoder
(first sub-word, last layer, fine-tuned), SequenceTagger with a CRF over BIOES tags, no RNN, no reprojection, word
dropout 0.05 and locked dropout 0.5; ModelTrainer.fine_tune: AdamW at --lr for every weight, batch --batch_size,
--epochs, linear warm-up over 10 % of the steps then decay, gradients clipped at 5, the best dev epoch kept (flair's
span F1). Its dev and test predictions are then scored with metrics.evaluate, as MANGO's runs are. It reports the
train pass per epoch (flair's training loop, no dev pass) and the test set's posts/s when tagging.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dataloader as D
from config import get_config, resolve_text_encoder
from metrics import evaluate, format_report, get_entities


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--dataset_name", default="twitter2017",
                   help="a dataset dataloader.py knows (python check_data.py --list)")
    p.add_argument("--data_dir", default=str(D.DATA_DIR), help="folder holding one sub-folder per dataset")
    p.add_argument("--text_encoder", default="minilm", help="'minilm' (the shipped MiniLM) or a local model directory")
    p.add_argument("--seed", type=int, default=1, help="flair.set_seed")
    p.add_argument("--epochs", type=int, default=6, help="training epochs")
    p.add_argument("--batch_size", type=int, default=16, help="posts per batch")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of every weight")
    p.add_argument("--eval_mode", default="conlleval", choices=["conlleval", "strict"], help="MANGO scorer's chunking")
    p.add_argument("--eval_batch_size", type=int, default=32, help="posts per batch when tagging dev and test")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out_dir", default="", help="flair's training folder (best-model.pt); empty = a temporary one")
    p.add_argument("--json", default="", help="write epochs, dev and test reports and timings to this file")
    return p


def sentences(posts: list[D.Post], eval_mode: str):
    """flair Sentences with the posts' own words and their gold entity spans under label type 'ner'."""
    from flair.data import Sentence
    out = []
    for p in posts:
        s = Sentence(list(p.tokens))
        for typ, a, b in get_entities(p.tags, eval_mode):
            s[a:b].add_label("ner", typ)
        out.append(s)
    return out


def predicted_tags(sentence) -> list[str]:
    """BIO tags of the 'predicted' spans of one tagged Sentence. The type is the span's 'predicted' label: flair
    keeps one Span object per position, so a span the gold also has carries the gold label too, and span.tag (its
    first label) would read the gold type."""
    tags = ["O"] * len(sentence)
    for span in sentence.get_spans("predicted"):
        typ = span.get_label("predicted").value
        first = span.tokens[0].idx - 1  # flair's token idx starts at 1
        tags[first] = f"B-{typ}"
        for k in range(first + 1, first + len(span.tokens)):
            tags[k] = f"I-{typ}"
    return tags


def tag(tagger, posts: list[D.Post], eval_mode: str, batch_size: int) -> tuple[list[list[str]], float]:
    """(predicted BIO tags per post, posts/s) for tagging the posts from scratch."""
    sents = sentences(posts, eval_mode)
    t0 = time.perf_counter()
    tagger.predict(sents, mini_batch_size=batch_size, label_name="predicted")
    dt = time.perf_counter() - t0
    return [predicted_tags(s) for s in sents], len(sents) / dt


def main(argv=None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    import flair
    import torch
    from flair.data import Corpus
    from flair.datasets import FlairDatapointDataset
    from flair.embeddings import TransformerWordEmbeddings
    from flair.models import SequenceTagger
    from flair.trainers import ModelTrainer
    from flair.trainers.plugins.base import TrainerPlugin

    if args.threads:
        torch.set_num_threads(args.threads)
    flair.device = torch.device("cpu") if not torch.cuda.is_available() else flair.device
    config = get_config(["--dataset_name", args.dataset_name, "--data_dir", args.data_dir])
    posts = {s: D.load_split(config, s) for s in ("train", "valid", "test")}
    flair.set_seed(args.seed)
    corpus = Corpus(FlairDatapointDataset(sentences(posts["train"], args.eval_mode)),
                    FlairDatapointDataset(sentences(posts["valid"], args.eval_mode)), None, sample_missing_splits=False)
    labels = corpus.make_label_dictionary("ner", add_unk=False)
    emb = TransformerWordEmbeddings(resolve_text_encoder(args.text_encoder), layers="-1", subtoken_pooling="first",
                                    fine_tune=True)
    tagger = SequenceTagger(hidden_size=256, embeddings=emb, tag_dictionary=labels, tag_type="ner", use_crf=True,
                            use_rnn=False, reproject_embeddings=False)

    class Clock(TrainerPlugin):
        """Seconds of each epoch's training loop (no dev pass) and flair's dev score after it."""
        def __init__(self):
            super().__init__()
            self.train_s, self.dev, self.t0 = [], [], 0.0

        @TrainerPlugin.hook
        def before_training_epoch(self, **kw):
            self.t0 = time.perf_counter()

        @TrainerPlugin.hook
        def after_training_epoch(self, **kw):
            self.train_s.append(round(time.perf_counter() - self.t0, 1))

        @TrainerPlugin.hook
        def after_evaluation(self, validation_scores=(), **kw):
            self.dev.append(round(float(validation_scores[0]), 4) if validation_scores else None)

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out_dir or tmp)
        ModelTrainer(tagger, corpus).fine_tune(
            out, learning_rate=args.lr, mini_batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
            max_epochs=args.epochs, use_final_model_for_eval=False, create_file_logs=False, create_loss_file=False,
            plugins=[clock])
        # no dev epoch scored above 0 (a tiny model): flair keeps no best model, the last one stands
        best = SequenceTagger.load(out / ("best-model.pt" if (out / "best-model.pt").is_file() else "final-model.pt"))
    best.eval()
    dev_tags, _ = tag(best, posts["valid"], args.eval_mode, args.eval_batch_size)
    test_tags, test_pps = tag(best, posts["test"], args.eval_mode, args.eval_batch_size)
    dev = evaluate([p.tags for p in posts["valid"]], dev_tags, args.eval_mode)
    test = evaluate([p.tags for p in posts["test"]], test_tags, args.eval_mode)
    best_epoch = max(range(len(clock.dev)), key=lambda i: (clock.dev[i] or 0.0, -i)) + 1
    print(f"flair {flair.__version__}: best dev epoch {best_epoch}, dev F1 {dev['f1']:.4f}, train pass "
          f"{statistics.median(clock.train_s)} s/epoch (median), test {test_pps:.1f} posts/s\n"
          f"test ({args.eval_mode}):\n{format_report(test)}")
    result = {"recipe": "flair_sequence_tagger", "flair": flair.__version__, "dataset": args.dataset_name,
              "seed": args.seed, "epochs": [{"epoch": i + 1, "flair_dev_f1": d, "train_s": s}
                                            for i, (d, s) in enumerate(zip(clock.dev, clock.train_s))],
              "best_epoch": best_epoch, "dev_f1": dev["f1"], "dev": dev, "test": test,
              "test_posts_per_s": round(test_pps, 1), "text_encoder": args.text_encoder,
              "threads": torch.get_num_threads(), "batch_size": args.batch_size, "lr": args.lr}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from config import cli
    cli(main)
