"""Write a dataset split as predict.py --input lines with absolute image paths (for the benchmarks).

    python script/demo_posts.py [--dataset_name demo] [--split test] [--out scratch/demo_test_posts.jsonl]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataloader as D  # noqa: E402
from config import get_config  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path("scratch/demo_test_posts.jsonl")
    if "--out" in argv:
        k = argv.index("--out")
        argv = argv[:k] + argv[k + 2:]
    split = argv[argv.index("--split") + 1] if "--split" in argv else "test"
    config = get_config([a for a in argv if a not in ("--split", split)] or ["--dataset_name", "demo"], check=False)
    root = D.image_root(config, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for p in D.load_split(config, split):
            img = D.find_image(root, p.imgid)
            f.write(json.dumps({"tokens": p.tokens,
                                "image": str(img.resolve()) if img and img.exists() else None}) + "\n")
    print(f"wrote {out}")
