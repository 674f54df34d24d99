"""Unlabelled posts for distillation (--distill_unlabelled): the training posts of one dataset, tags dropped, minus
every post that is a dev or test post of any dataset under --data_dir, registered or a CoNLL folder (compared by
words lower-cased, letters and digits only, so another release's tokenisation of one tweet is caught), one per line.

    python data/make_unlabelled.py [--source MNRE[,twitter2015,...]] [--out data/unlabelled/mnre_train.txt]
                                   [--data_dir data]

The default source, MNRE's training split (Twitter posts of a relation-extraction release), shares no post with the
Twitter-2015/2017 training splits. Several sources (comma-separated) are read in turn, a post repeated across them
kept once. It says how many posts it removed and why.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dataloader as D  # noqa: E402
from config import cli, get_config  # noqa: E402
from distill import post_key  # noqa: E402


def held_out_keys(data_dir: str) -> dict[str, str]:
    """post_key -> "dataset split" of every dev and test post of the datasets whose files are under data_dir."""
    keys = {}
    registered = {s.folder for s in D.DATASETS.values()}
    custom = sorted(d.name for d in Path(data_dir).iterdir() if d.is_dir() and d.name not in registered) \
        if Path(data_dir).is_dir() else []
    for name in [*D.DATASETS, *custom]:
        cfg = get_config(["--dataset_name", name, "--data_dir", data_dir])
        try:
            spec, d = D.dataset_spec(cfg)
        except D.DataError:  # a folder that is not a dataset
            continue
        for split in ("valid", "test"):
            if (d / spec.file(split)).is_file():
                for p in D.load_split(cfg, split):
                    keys.setdefault(post_key(p.tokens), f"{name} {split}")
    return keys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="MNRE",
                    help="dataset(s), comma-separated, whose training posts become unlabelled posts")
    ap.add_argument("--out", default=str(ROOT / "data" / "unlabelled" / "mnre_train.txt"), help="file to write")
    ap.add_argument("--data_dir", default=str(ROOT / "data"), help="folder holding one sub-folder per dataset")
    a = ap.parse_args(argv)
    held = held_out_keys(a.data_dir)
    sources = [s for s in a.source.split(",") if s]
    posts = [p for s in sources
             for p in D.load_split(get_config(["--dataset_name", s, "--data_dir", a.data_dir]), "train")]
    kept, removed, seen = [], Counter(), set()
    for p in posts:
        k = post_key(p.tokens)
        if k in held:
            removed[held[k]] += 1
        elif k in seen:
            removed["repeated in the sources" if len(sources) > 1 else "repeated in the source"] += 1
        else:
            seen.add(k)
            kept.append(" ".join(p.tokens))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    why = ", ".join(f"{n} {w}" for w, n in sorted(removed.items())) or "none"
    print(f"{out}: {len(kept)} of {len(posts)} {' + '.join(sources)} training posts; removed: {why}")


if __name__ == "__main__":
    cli(main)
