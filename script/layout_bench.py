"""Paired timing of EfficientNet-Lite0's forward with channels-last input (what model.py feeds it) against the
default contiguous layout, on one model in one process, the order swapped every pair. Two steps are timed:
the frozen forward (feature caching, images on the fly) and forward + backward with the last two blocks trainable
(--vision_trainable). Prints the median ratio channels-last / contiguous and its interquartile range.

    python script/layout_bench.py [--pairs 12] [--batch 16] [--threads 1]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from efficientnet import load_efficientnet_lite0  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=12, help="timed pairs per step")
    p.add_argument("--batch", type=int, default=16, help="images per forward (224 px)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    net = load_efficientnet_lite0().eval().requires_grad_(False)
    for blk in list(net._blocks)[-2:]:
        blk.requires_grad_(True)
    x = torch.randn(args.batch, 3, 224, 224)

    def seconds(channels_last: bool, grad: bool) -> float:
        xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        t = time.perf_counter()
        with torch.set_grad_enabled(grad):
            y = net.forward_features(xi)
            if grad:
                y.mean().backward()
        return time.perf_counter() - t

    for grad, step in ((False, "frozen forward"), (True, "forward + backward, last two blocks trainable")):
        seconds(True, grad), seconds(False, grad)  # warm-up
        ratios = []
        for i in range(args.pairs):
            order = (True, False) if i % 2 else (False, True)
            t = {cl: seconds(cl, grad) for cl in order}
            ratios.append(t[True] / t[False])
        q = statistics.quantiles(ratios, n=4)
        print(f"{step}: channels-last / contiguous = {statistics.median(ratios):.2f}x (interquartile "
              f"{q[0]:.2f}-{q[2]:.2f}, {args.pairs} pairs, batch {args.batch}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
