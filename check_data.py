"""The data tool: what datasets MANGO knows and what a dataset's files hold.

    python check_data.py --list                  each dataset, its split sizes and where its files go
    python check_data.py --check twitter2017     per split: posts, entities per type, images found / missing /
                                                 unreadable, content hash, and posts shared between splits
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from config import cli, get_config
from images import find_image, load_image
from metrics import get_entities
from readers import (DATA_DIR, DATASETS, SPLIT_FILES, DataError, DatasetSpec, ReadReport, _decode_lines, dataset_dir,
                     image_root, load_split, split_hashes, split_overlaps)


def check_dataset(config) -> str:
    """What `python check_data.py --check DATASET` prints: per split its posts, entities per type, images found /
    missing / unreadable and its content hash, then any posts shared between splits."""
    hashes = split_hashes(config)
    posts = {s: load_split(config, s) for s in hashes}
    lines = [f"{config.dataset_name} in {dataset_dir(config)}"]
    spec = DATASETS.get(config.dataset_name)
    lines += [f"  {s}: no {spec.file(s) if spec else SPLIT_FILES[s]} there; train.py needs train, valid and test"
              for s in SPLIT_FILES if s not in hashes]
    for s, ps in posts.items():
        types = Counter(t for p in ps for t, _, _ in get_entities(p.tags, config.eval_mode))
        root = image_root(config, s)
        seen: dict[str, str] = {}
        for p in tqdm(ps, desc=f"images {s}", leave=False, disable=root is None):
            if root is not None and p.imgid and p.imgid not in seen:
                seen[p.imgid] = load_image(find_image(root, p.imgid))[1]
        found = sum(v == "ok" for v in seen.values())
        missing = sum(v == "missing" for v in seen.values())
        imgs = "text-only dataset" if root is None else \
            f"images {found} found / {missing} missing / {len(seen) - found - missing} unreadable in {root}"
        ents = ", ".join(f"{t} {n}" for t, n in sorted(types.items()))
        lines.append(f"  {s}: {len(ps)} posts, {sum(types.values())} entities ({ents}); {imgs}; sha256 {hashes[s]}")
    overlaps = split_overlaps(posts)
    lines += [f"  error: {o}" for o in overlaps] or ["  no post is shared between splits"]
    return "\n".join(lines)


def describe_datasets(data_dir=DATA_DIR) -> str:
    """What `python check_data.py --list` prints: each dataset, its split sizes and where its files go."""
    def show(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(p)
    out, known = [], {spec.folder for spec in DATASETS.values()}
    custom = [(d.name, DatasetSpec("custom CoNLL+IMGID folder", d.name, types=None))
              for d in sorted(f.parent for f in Path(data_dir).glob("*/train.txt")) if d.name not in known]
    for name, spec in [*DATASETS.items(), *custom]:
        d = Path(data_dir) / spec.folder
        sizes, lines = [], []
        for split in SPLIT_FILES:
            f = d / spec.file(split)
            if not f.is_file():
                sizes.append(f"{split}=absent")
            elif not spec.converter:
                try:
                    n = sum(1 for l in _decode_lines(f) if l.startswith("IMGID:"))
                    sizes.append(f"{split}={n}")
                except DataError:
                    sizes.append(f"{split}=unreadable")
            else:
                r = ReadReport(str(f))
                try:
                    sizes.append(f"{split}={len(spec.reader()(f, lenient=True, report=r))}")
                    lines.append(str(r.counts.get("lines", r.counts.get("documents"))))
                except DataError:
                    sizes.append(f"{split}=unreadable")
        what = 'lines' if spec.converter == 'read_mnre' else 'documents'
        unit = " posts" + (f" (from {'/'.join(lines)} {what})" if lines else "")
        pattern = spec.files.format(split="{" + ",".join(spec.split_names) + "}")
        images = f"images {show(d / spec.image_dir())}/" if spec.images else "text-only"
        types = " ".join(spec.types) if spec.types else "from train"
        out.append(f"{name:12s}{spec.description}\n{'':12s}{' '.join(sizes)}{unit} | types: {types}\n"
                   f"{'':12s}files {show(d)}/{pattern} ({spec.layout}) | {images}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="MANGO datasets", allow_abbrev=False)
    ap.add_argument("--list", action="store_true", help="list the datasets with split sizes and file locations")
    ap.add_argument("--check", default="", metavar="DATASET",
                    help="per split: posts, entities per type, images found / missing / unreadable, content hash, "
                         "and posts shared between splits")
    ap.add_argument("--data_dir", default=str(DATA_DIR), help="folder holding one sub-folder per dataset")
    ap.add_argument("--image_root", default="", help="with --check: the image folder, if not the dataset's own")
    args = ap.parse_args(argv)
    if args.check:
        cfg = get_config([f"--dataset_name={args.check}", f"--data_dir={args.data_dir}",
                          f"--image_root={args.image_root}"])
        out = check_dataset(cfg)
        print(out)
        if "\n  error: " in out:  # posts shared between splits: a script checking a release should stop
            raise SystemExit(1)
    elif args.list:
        print(describe_datasets(args.data_dir))
    else:
        ap.print_help()


if __name__ == "__main__":
    cli(main)
