"""Export a trained run as a self-contained inference bundle (onnxruntime, or TorchScript), optionally int8.

    python export.py --save_name NAME [--int8] [--export_format onnx|torch] [--opset 18]

writes save_models/NAME/bundle[_int8][_torch]/ (layout in bundle.py) and checks it: the bundle tags the run's
own dev posts and the tags are compared with the checkpoint's (fp32: they must be identical; int8: the
agreement is printed). Run it with `python predict.py --bundle DIR --input posts.jsonl` or
`python serve.py --bundle DIR`; neither imports model.py or train.py on that path.

What goes where:
  text.onnx / mm.onnx  the text encoder, case features, fusion and emission layer: Tagger.forward itself,
                       traced with the image path off (text) and on (mm), up to the emissions.
  vision.onnx          pixels -> vision.features (what training caches for a frozen vision part): a pretrained
                       backbone's region tokens (EfficientNet-Lite0 or CLIP), or the dual-granularity encoder's two
                       stem maps, flattened (frozen or --vision_stem conv); the dual encoder's Swin / delegate /
                       saliency / transformer part learns with the tagger, so it sits in mm.onnx (from_features).
  explain.onnx         the same inputs as mm.onnx -> the text -> image attention on the finest grid of image cells
                       (explain.Explain; fp32 always), for serve.py's page overlay.
  crf.npz              the CRF's start/end/transition scores; Viterbi and marginals run in numpy (bundle.py),
                       since the CRF's loops over words are data-dependent and cost nothing at L = 10 labels.
ONNX comes from torch's TorchScript-based exporter (dynamo=False): Tagger.forward runs the image path on the posts
that have an image (`has_image.nonzero()`, then `if rows.numel()`), a data-dependent branch torch.export refuses;
the tracer records it taken with every post illustrated, and the runtimes send a batch's posts with an image to
mm.onnx (has_image all on) and the others to text.onnx. --int8: onnxruntime's static quantisation of the
MatMul (linear) layers of the text graphs (for a dual-granularity run, mm.onnx holds its encoder's linear layers
too): weights per channel, activations with scales calibrated once on training posts and stored in the graph (so
a post's scores do not depend on its batch), but for the emission layer and the linear layers whose inputs
quantise worst (quantize_int8; meta.json lists them under int8_fp32); vision.onnx is convolutional (or CLIP,
frozen) and stays fp32. --export_format torch writes the same graphs as TorchScript (torch.jit.trace), for
a model part ONNX cannot express; it has no int8 (torch's int8 Linear takes each batch's own activation range).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import bundle as BU
import dataloader as D
from config import ConfigError, cli, get_config, given_flags
from model import load_tokenizer
from runner import RUNTIME_FLAGS, load_run
from explain import Explain
from runtime import MM_INPUTS, TEXT_INPUTS, CheckpointRuntime, bundle_meta, crf_params, refusal


class Emissions(nn.Module):
    """Tagger.forward up to the emissions with tensors in and out (what the exporters need).

    (input_ids [B,T], attention_mask [B,T], word_index [B,W], word_mask [B,W] bool, case_ids [B,W]
     [, image_feats [B, *vision.feat_shape], has_image [B] bool]) -> emissions [B, W, L] float32
    """

    def __init__(self, tagger, image: bool):
        super().__init__()
        self.tagger, self.image = tagger, image

    def forward(self, input_ids, attention_mask, word_index, word_mask, case_ids, image_feats=None, has_image=None):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "word_index": word_index,
                 "word_mask": word_mask, "case_ids": case_ids}
        if self.image:
            batch.update(image_feats=image_feats, has_image=has_image)
        return self.tagger(batch, image_on=self.image)["emissions"].float()


class Vision(nn.Module):
    """pixels [N, 3, S, S] -> image features [N, *vision.feat_shape]: what the feature cache keeps per image and
    Tagger.image_tokens reads back through vision.from_features (region tokens [N, R, D] of a pretrained backbone;
    the dual-granularity encoder's flattened stem maps [N, F])."""

    def __init__(self, vision):
        super().__init__()
        self.vision = vision

    def forward(self, pixels):
        return self.vision.features(pixels).float()


def example_inputs(model, tokenizer, label_map, config) -> dict:
    """A padded batch of two posts of different lengths (so the traced attention masks are real), as tensors."""
    posts = [D.Post(["Kevin", "Durant", "enters", "Oracle", "Arena", "tonight", "!"], ["O"] * 7, None, "a"),
             D.Post(["@NBA", "rocks"], ["O"] * 2, None, "b")]
    ds = D.MNERDataset(posts, tokenizer, label_map, config.max_len)
    b = D.collate([ds[0], ds[1]], ds.pad_id)
    x = {k: b[k] for k in TEXT_INPUTS}
    if model.uses_image and config.use_image:
        size = D.image_prep_for(config).size
        x["pixels"] = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        # features of real (if random) pixels: the int8 rule judges the fused graph's inputs on them
        x["image_feats"] = model.vision.features(x["pixels"]).float()
        x["has_image"] = torch.tensor([True, True])
    return x


def onnx_inputs(path: Path) -> set[str]:
    """The inputs a saved graph kept (the exporter drops unused ones, e.g. word_mask of the text graph)."""
    import onnx
    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


def export_onnx(module, args: tuple, names: list[str], dyn: dict, path: Path, opset: int) -> None:
    """One graph through the TorchScript-based exporter (see the module docstring for why not dynamo)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the recorded has_image branch, deprecation notes
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["out"], dynamic_axes=dyn,
                          opset_version=opset, dynamo=False, do_constant_folding=True)


# share of a graph's linear-layer work (sum of K*N over its weighted MatMuls) that --int8 may leave in fp32 for
# the MatMuls whose inputs quantise worst; the emission layer comes on top (it is ~0.1% of the work)
INT8_FP32_BUDGET = 0.06


def weighted_matmuls(model) -> list[tuple]:
    """(node, K, N) of each MatMul whose B is a 2-D initializer [K, N] (the linear layers), in graph order:
    the nodes quantize_dynamic quantises (it leaves activation x activation MatMuls alone)."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [(n, *inits[n.input[1]]) for n in model.graph.node  # unnamed nodes could not be excluded by name
            if n.op_type == "MatMul" and n.name and len(inits.get(n.input[1], ())) == 2]


def output_matmuls(model, weighted: list[tuple]) -> list[str]:
    """The weighted MatMuls nearest the graph outputs (no other weighted MatMul in between): the emission layer."""
    mm = {n.name for n, _, _ in weighted}
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, found, todo = set(), [], [o.name for o in model.graph.output]
    while todo:
        n = producer.get(todo.pop())
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.name in mm:
            found.append(n.name)
        else:
            todo.extend(n.input)
    return found


def input_snr_db(model, feed: dict, nodes: list) -> dict[str, float]:
    """Per node: the signal-to-noise ratio (dB) of its input under per-tensor uint8 quantisation, which is what
    quantize_dynamic's DynamicQuantizeLinear applies at run time (step = range / 255, range spanning 0; noise
    step^2 / 12), with the fp32 graph (an onnx ModelProto, left as it is) run once on `feed`."""
    import onnx
    import onnxruntime as ort
    model, src = onnx.ModelProto(), model
    model.CopyFrom(src)
    given = {k: np.asarray(v) for k, v in feed.items()}
    wanted = [t for t in dict.fromkeys(n.input[0] for n in nodes) if t not in given]
    del model.graph.output[:]
    for t in wanted:
        model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    vals = dict(given)
    if wanted:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        vals.update(zip(wanted, sess.run(wanted, {i.name: given[i.name] for i in sess.get_inputs()})))
    out = {}
    for n in nodes:
        x = np.asarray(vals[n.input[0]], np.float64)
        span = max(x.max(), 0.0) - min(x.min(), 0.0)
        rms = float(np.sqrt((x ** 2).mean()))
        out[n.name] = float("inf") if span == 0 or rms == 0 else 20 * np.log10(rms * 255 * np.sqrt(12) / span)
    return out


def fp32_matmuls(path: Path, feed: dict, budget: float = INT8_FP32_BUDGET) -> list[str]:
    """The linear layers quantize_int8 leaves in fp32: the emission layer, then the MatMuls with the worst input
    SNR (input_snr_db on `feed`), worst first, while their K*N stays within `budget` of the graph's total."""
    import onnx
    model = onnx.load(str(path))
    weighted = weighted_matmuls(model)
    keep = output_matmuls(model, weighted)
    rest = [(n, k, m) for n, k, m in weighted if n.name not in keep]
    if not rest:
        return keep
    total, used = sum(k * m for _, k, m in rest), 0
    snr = input_snr_db(model, feed, [n for n, _, _ in rest])
    for n, k, m in sorted(rest, key=lambda r: snr[r[0].name]):
        if used + k * m > budget * total:
            break
        keep.append(n.name)
        used += k * m
    return keep


def quantize_int8(path: Path, feed: dict | None = None, calib: list[dict] | None = None) -> list[str]:
    """Static int8 quantisation (onnxruntime, QDQ) of a graph's linear layers (MatMul with a constant B), in place:
    int8 weights, symmetric per output channel; each activation quantised to uint8 with one scale calibrated on
    `calib` (input feeds of one shape; `feed` when None) and stored in the graph, so a post's scores never depend on
    what shares its batch (a dynamic quantiser takes each batch's own range). Returns the linear layers left in fp32
    (`fp32_matmuls`; none without `feed`, an example batch of the graph's inputs):

    - the emission layer: the scores the CRF decodes come straight out of it, and it is ~0.1% of the work;
    - the MatMuls whose inputs lose most to a per-tensor uint8 step, judged by input_snr_db on `feed`, worst
      first, within INT8_FP32_BUDGET (6%) of the linear-layer work. In BERT-like encoders these are FFN
      down-projections: their GELU input has a few outlier channels that stretch the quantisation step.
    The scales are calibrated by entropy (KL divergence between the fp32 and the quantised histogram), which
    clips the rare outliers a min-max range would keep; docs/export.md gives the measured F1 and speed."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    keep = fp32_matmuls(path, feed) if feed is not None else []
    feeds = calib or ([feed] if feed is not None else [])
    if not feeds:
        raise ValueError("quantize_int8 needs example inputs (feed or calib) to calibrate the activation scales")

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    tmp = path.with_suffix(".int8.onnx")
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # its advice to pre-process (shape inference) changes nothing here
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the entropy calibrator prints its histogram settings
            quantize_static(str(path), str(tmp), Feeds(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            nodes_to_exclude=keep, calibrate_method=CalibrationMethod.Entropy,
                            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
    finally:
        root.setLevel(level)
    tmp.replace(path)
    for f in path.parent.glob(path.stem + "*-augmented*"):  # the calibrator's scratch graph, if it left one
        f.unlink()
    return keep


def calibration_feeds(model, config, tokenizer, label_map, names: list[str], n_posts: int = 320,
                      batch: int = 16) -> list[dict]:
    """Input feeds of the first n_posts training posts in batches, all padded to one shape [batch, T] / [batch, W]
    (the entropy calibrator stacks them), image features for the fused graph from the posts' own images where the
    split has them (calibration_pixels)."""
    posts = D.load_split(config, "train")[:n_posts]
    ds = D.MNERDataset(posts, tokenizer, label_map, config.max_len)
    T, W = max(len(w.enc.input_ids) for w in ds.windows), max(w.enc.n_kept for w in ds.windows)
    feeds = []
    for k in range(0, len(ds) - batch + 1, batch):
        b = D.collate([ds[i] for i in range(k, k + batch)], ds.pad_id)
        f = {}
        for name in ("input_ids", "attention_mask", "word_index", "word_mask", "case_ids"):
            v = b[name].numpy()
            fill = ds.pad_id if name == "input_ids" else 0
            f[name] = np.pad(v, ((0, 0), (0, (T if name in ("input_ids", "attention_mask") else W) - v.shape[1])),
                             constant_values=fill)
        if "image_feats" in names:
            px = calibration_pixels(config, [posts[ds.windows[i].post] for i in range(k, k + batch)], k)
            with torch.no_grad():
                f["image_feats"] = model.vision.features(px).float().numpy()
            f["has_image"] = np.ones(batch, bool)
        feeds.append({x: f[x] for x in names})
    return feeds


def calibration_pixels(config, posts: list, seed: int) -> torch.Tensor:
    """[n, 3, S, S]: each training post's own picture as the model reads it; random pixels (as example_inputs) stand
    in for a post without a usable one, so a split without images still calibrates the fused graph."""
    prep, root = D.image_prep_for(config), D.image_root(config, "train")
    g = torch.Generator().manual_seed(seed)
    ims = [D.load_image(D.find_image(root, p.imgid))[0] if root else None for p in posts]
    return torch.stack([prep(im) if im is not None else torch.randn(3, prep.size, prep.size, generator=g)
                        for im in ims])


def bundle_dir(out: Path) -> Path:
    """out (absolute), when export may write there: a new folder or an earlier bundle (its meta.json), never anything
    else."""
    out = out.resolve()  # "." has no name to put the scratch folder beside
    if out.exists() and not (out / "meta.json").is_file():
        raise ConfigError(f"--bundle {out}: already there and not a bundle (no meta.json); name a new folder, an "
                          "earlier bundle replaces itself")
    return out


def export(save_dir, name: str, fmt: str = "onnx", int8: bool = False, opset: int = 18, overrides=None,
           out: Path | None = None) -> Path:
    """Write the bundle of run `name`; returns its directory."""
    if fmt not in ("onnx", "torch"):
        raise ConfigError(f"--export_format {fmt}: choose onnx or torch")
    if int8 and fmt == "torch":
        raise ConfigError("--int8 --export_format torch: torch's int8 layers quantise each batch with its own range, "
                          "so a post's scores would depend on its batch; export int8 as onnx")
    config, label_map, model, _ = load_run(save_dir, name, overrides or {})
    why = refusal(config, model)
    if why:
        raise ConfigError(f"export.py --save_name {name}: {why}")
    model.eval()
    run = Path(save_dir) / name
    out = bundle_dir(Path(out or run / ("bundle" + ("_int8" if int8 else "") + ("_torch" if fmt == "torch" else ""))))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = load_tokenizer(config)
    meta = bundle_meta(config, model, label_map, run, fmt, int8, opset)
    x = example_inputs(model, tokenizer, label_map, config)
    word_dyn = {"input_ids": {0: "B", 1: "T"}, "attention_mask": {0: "B", 1: "T"}, "word_index": {0: "B", 1: "W"},
                "word_mask": {0: "B", 1: "W"}, "case_ids": {0: "B", 1: "W"}, "image_feats": {0: "B"},
                "has_image": {0: "B"}, "out": {0: "B", 1: "W"}}
    graphs = [("text", Emissions(model, False), TEXT_INPUTS)]
    if meta["mm"]:
        graphs += [("mm", Emissions(model, True), MM_INPUTS), ("vision", Vision(model.vision), ["pixels"]),
                   ("explain", Explain(model), MM_INPUTS)]
    for key, module, names in graphs:
        module.eval()
        args = tuple(x[k] for k in names)
        f = tmp / meta[key]
        if fmt == "onnx":
            export_onnx(module, args, names, {k: v for k, v in word_dyn.items() if k in names or k == "out"}
                        if key != "vision" else {"pixels": {0: "N"}, "out": {0: "N"}}, f, opset)
            if int8 and key in ("text", "mm"):
                feed = {k: v.numpy() for k, v in zip(names, args)}
                graph_in = onnx_inputs(f)
                calib = [{k: v for k, v in c.items() if k in graph_in}
                         for c in calibration_feeds(model, config, tokenizer, label_map, names)]
                meta.setdefault("int8_fp32", {})[key] = quantize_int8(
                    f, {k: v for k, v in feed.items() if k in graph_in}, calib)
        else:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.trace(module, args, check_trace=False), str(f))
    crf = crf_params(model)
    if crf is not None:
        np.savez(tmp / "crf.npz", **crf)
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    label_map.save(tmp / "label_map.json")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def check_bundle(out: Path, save_dir, name: str, overrides=None, n: int = 64) -> dict:
    """Tag the run's first n dev posts (with their images where present) with the checkpoint and the bundle;
    returns {"posts", "words", "agree_words", "same_posts"}."""
    loaded = load_run(save_dir, name, overrides or {})[:3]  # the split is read as the run read it
    ref, cfg = CheckpointRuntime(save_dir, name, loaded=loaded), loaded[0]
    try:
        posts = D.load_split(cfg, "valid")[:n]
    except D.DataError:
        return {}
    words = [p.tokens for p in posts]
    bnd = BU.Bundle(out)
    from concurrent.futures import ThreadPoolExecutor
    feats = [None] * len(posts), [None] * len(posts)
    if ref.uses_image:
        root = D.image_root(cfg, "valid")
        paths = [D.find_image(root, p.imgid) for p in posts]
        with ThreadPoolExecutor(2) as pool:
            feats = (BU.features_from_paths(paths, ref.prep, ref.vision_features, pool)[0],
                     BU.features_from_paths(paths, bnd.prep, bnd.vision_features, pool)[0])
    a, b = ref.tag(words, feats[0]), bnd.tag(words, feats[1])
    agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra["tags"], rb["tags"]))
    return {"posts": len(posts), "words": sum(map(len, words)), "agree_words": agree,
            "same_posts": sum(ra["tags"] == rb["tags"] for ra, rb in zip(a, b))}


def main(argv=None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = get_config(argv, check=False, tool="export")
    if not args.save_name:
        raise ConfigError("--save_name is required: the run directory under --save_dir to export")
    given = given_flags(argv)
    overrides = {k: getattr(args, k) for k in given & RUNTIME_FLAGS}
    t0 = time.time()
    out = export(args.save_dir, args.save_name, args.export_format, args.int8, args.opset, overrides,
                 Path(args.bundle) if args.bundle else None)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2 ** 20
    print(f"wrote {out} ({args.export_format}{', int8' if args.int8 else ''}, {size:.1f} MiB) "
          f"in {time.time() - t0:.1f} s")
    chk = check_bundle(out, args.save_dir, args.save_name, overrides)
    if not chk:
        print("note: no dev split to check the bundle against the checkpoint (test.py --bundle scores it)")
        return out
    print(f"check on {chk['posts']} dev posts: {chk['agree_words']}/{chk['words']} word tags and "
          f"{chk['same_posts']}/{chk['posts']} posts identical to the checkpoint")
    if not args.int8 and chk["agree_words"] != chk["words"]:  # fp32 graphs compute what the model does
        raise ConfigError(f"{out}: the fp32 bundle tags {chk['words'] - chk['agree_words']} dev words otherwise than "
                          "the checkpoint; it is kept for inspection, but do not serve it (please report this)")
    return out


if __name__ == "__main__":
    cli(main)
