"""Load a running serve.py: N concurrent clients send single posts (with their images) for D seconds.

    python script/serve_bench.py --url http://127.0.0.1:8000 --posts posts.jsonl [--clients 8] [--seconds 60]

posts.jsonl: predict.py --input lines ({"text"|"tokens", "image": path}); each request carries one post, its
image as image_b64 (read and encoded once, before the clock starts). Clients cycle through the posts, each
from its own offset. Prints requests, failures (non-200 or transport errors), p50/p95/max latency and
posts/s, and writes them as JSON to --out when given. Bounded: every request has a timeout and the run
stops after --seconds.
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import threading
import time
from pathlib import Path

import httpx


def load_posts(path) -> list[dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        img = rec.pop("image", None)
        if img:
            rec["image_b64"] = base64.b64encode(Path(img).read_bytes()).decode()
        out.append(rec)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--posts", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    posts = load_posts(a.posts)
    lat: list[float] = []
    fails: list[str] = []
    lock = threading.Lock()
    stop = time.perf_counter() + a.seconds

    def client(k: int):
        with httpx.Client(base_url=a.url, timeout=30) as c:
            i = k * len(posts) // a.clients
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = c.post("/predict", json=posts[i % len(posts)])
                    ok = r.status_code == 200 and "entities" in r.json()
                    why = "" if ok else f"HTTP {r.status_code}: {r.text[:100]}"
                except httpx.HTTPError as e:
                    why = f"{type(e).__name__}: {e}"
                with lock:
                    (fails.append(why) if why else lat.append(time.perf_counter() - t0))
                i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    res = {"clients": a.clients, "seconds": round(wall, 1), "requests": len(lat) + len(fails), "failed": len(fails),
           "posts_per_s": round(len(lat) / wall, 1),
           "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
           "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1) if lat else None,
           "max_ms": round(1000 * lat[-1], 1) if lat else None, "first_failures": fails[:3]}
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
