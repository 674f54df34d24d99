"""Run an exported inference bundle: onnxruntime (or TorchScript) graphs, CRF decoding in numpy.

    rt = Bundle("save_models/<run>/bundle_int8")
    feats, why = features_from_paths(paths, rt.prep, rt.vision_features, pool)   # new images, decoded in a pool
    out = rt.tag([["Kevin", "Durant", "enters", "Oracle", "Arena"]], [None])       # [{"tags", "probs", "image_used"}]

A bundle directory (written by export.py) holds:
    meta.json        model, labels, head, max_len, image preprocessing, graph files, int8 or not, source run
    tokenizer/       the run's tokenizer files
    label_map.json   the run's label map (dataloader.LabelMap)
    text.onnx        sub-words -> emissions with the image path off          (input_ids, attention_mask, word_index,
    mm.onnx          the same with image features (MNER / co-attention)         word_mask, case_ids[, image_feats,
    vision.onnx      pixels [N,3,S,S] -> image features [N, *meta["image_feats"]]  has_image] -> emissions [B,W,L])
                     (a frozen backbone's regions [R,D]; a dual-granularity run's flattened stem maps [F], whose
                     encoder is in mm.onnx)
    explain.onnx     mm.onnx's inputs -> word -> image-cell attention [B, W, G*G], G = meta["explain_side"]
    crf.npz          CRF start [S], end [S], transitions [S,S] over the tags it scores (absent for a softmax head);
                     with --tag_scheme bioes also to_bio [S]: each scored BIOES tag's BIO label id
(.pt TorchScript files instead of .onnx with --export_format torch.)

Nothing here imports model.py or train.py: the training code is not on this path. The text side reuses the
training preprocessing (dataloader.MNERDataset: encode_words, word shapes; dataloader.collate) and the image
side images.load_image (with its decompression-bomb guard) and ImagePrep, so a bundle sees exactly the
inputs the checkpoint saw. Image features are rounded to fp16, as the training feature cache stores them.
"""
from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import dataloader as D
from config import ConfigError
from crf import crf_tags, pin_pad

BUNDLE_VERSION = 1


# ----------------------------------------------------------------------------- softmax head in numpy

def softmax_probs(em: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax head: p(label) over the labels other than PAD [B, W, L] (PAD column 0, padding rows 0)."""
    x = em[..., 1:] - em[..., 1:].max(-1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    return np.concatenate([np.zeros_like(p[..., :1]), p], -1) * mask[..., None]


# ----------------------------------------------------------------------------- images

def prep_image(src, prep: D.ImagePrep) -> tuple[np.ndarray | None, str]:
    """One image file -> (pixels [3, S, S] float32, "ok") or (None, why): images.load_image (missing, empty,
    unreadable, decompression bomb) then the run's ImagePrep."""
    im, why = D.load_image(src)
    return (None, why) if im is None else (prep(im).numpy(), "ok")


def features_from_paths(paths: list, prep: D.ImagePrep, encode, pool, batch: int = 32, ahead: int = 4):
    """Image features of image files: decoded and preprocessed in `pool` (a concurrent.futures executor) while
    `encode` (np [N,3,S,S] -> np [N, *feat_shape], e.g. Runtime.vision_features) runs on full batches. At most
    `ahead` batches are decoded in advance, so memory stays bounded for long inputs. Returns (feat_shape float32
    array or None per path, why per path ("ok", "missing", ..., "no image" for a None path))."""
    feats: list = [None] * len(paths)
    why = ["no image"] * len(paths)
    todo = [i for i, p in enumerate(paths) if p is not None]
    pending: deque = deque()
    nxt = 0

    def refill():
        nonlocal nxt
        while nxt < len(todo) and len(pending) < batch * ahead:
            i = todo[nxt]
            pending.append((i, pool.submit(prep_image, paths[i], prep)))
            nxt += 1

    refill()
    while pending:
        got = []
        while pending and len(got) < batch:
            i, fut = pending.popleft()
            x, why[i] = fut.result()
            if x is not None:
                got.append((i, x))
            refill()  # keep the pool busy while this batch runs
        if got:
            out = encode(np.stack([x for _, x in got]))
            for (i, _), f in zip(got, out):
                feats[i] = f
    return feats, why


def fp16_round(x: np.ndarray) -> np.ndarray:
    """Features as the training cache stores them (fp16), back in float32."""
    return x.astype(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------- runtime

class Runtime:
    """Posts -> tags, per-word probabilities and whether the image was used, from three graphs: `text`, `mm`
    (optional) and `vision` (optional), each called through _run(name, inputs) -> np.ndarray.

    Subclasses: Bundle (onnxruntime / TorchScript files, below) and runtime.CheckpointRuntime (the run's torch
    model, for serve.py --save_name and for checking an export).
    """
    meta: dict
    label_map: D.LabelMap
    tokenizer: object
    crf: dict | None

    def _setup(self, meta: dict, label_map: D.LabelMap, tokenizer, crf: dict | None):
        self.meta, self.label_map, self.tokenizer, self.crf = meta, label_map, tokenizer, crf
        self.prep = D.ImagePrep(**meta["image_prep"]) if meta.get("image_prep") else None
        self.uses_image = bool(meta.get("mm")) and bool(meta.get("vision"))

    def _run(self, name: str, inputs: dict) -> np.ndarray:
        raise NotImplementedError

    def vision_features(self, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
        """[N, 3, S, S] float32 -> image features [N, *feat_shape], fp16-rounded like the training cache when the
        run's vision is cached in training (a frozen backbone or stem; meta "cached_features"), else as computed."""
        out = [self._run("vision", {"pixels": np.ascontiguousarray(pixels[k:k + batch], np.float32)})
               for k in range(0, len(pixels), batch)]
        if not out:
            return np.zeros((0,), np.float32)
        out = np.concatenate(out)
        return fp16_round(out) if self.meta.get("cached_features", True) else out

    @staticmethod
    def _inputs(batch: dict, feats: list | None) -> dict:
        """One collated batch (dataloader.collate, as numpy) and its posts' image features (or None) -> graph inputs."""
        x = {k: batch[k] for k in ("input_ids", "attention_mask", "word_index", "word_mask", "case_ids")}
        if feats is not None:
            x["image_feats"] = np.stack(feats).astype(np.float32)
            x["has_image"] = np.ones(len(feats), bool)
        return x

    def _emissions(self, batch: dict, feats: list | None) -> np.ndarray:
        """One collated batch -> emissions [B, W, L] (float32): the fused graph when feats are given."""
        return self._run("text" if feats is None else "mm", self._inputs(batch, feats))

    def tag(self, words: list[list[str]], feats: list | None = None, batch_size: int = 32) -> list[dict]:
        """Per post: "tags" and "probs" (probability of each word's tag), every word (posts longer than max_len
        in overlapping windows, dataloader.encode_windows), and "image_used". feats: per post image features
        (vision_features) or None (text-only path)."""
        posts = [D.Post(list(w), ["O"] * len(w), None, f"post {i}") for i, w in enumerate(words)]
        ds = D.MNERDataset(posts, self.tokenizer, self.label_map, self.meta["max_len"])
        return self.tag_dataset(ds, feats, batch_size)

    def tag_dataset(self, ds: D.MNERDataset, feats: list | None = None, batch_size: int = 32) -> list[dict]:
        """tag() for a dataset already made (test.py: a split with its windows and context): one result per post of
        ds.posts, windows merged (ds.merge). feats: per post image features or None, as in tag."""
        feats = feats if feats is not None and self.uses_image else [None] * len(ds.posts)
        lengths, post_of = ds.lengths(), [w.post for w in ds.windows]
        out: list[dict | None] = [None] * len(ds)
        for with_img in (False, True):  # posts with an image go through the fused graph, the rest text-only
            idx = sorted((k for k in range(len(ds)) if (feats[post_of[k]] is not None) == with_img),
                         key=lambda k: lengths[k])
            for j in range(0, len(idx), batch_size):
                part = idx[j:j + batch_size]
                batch = {n: v.numpy() for n, v in D.collate([ds[k] for k in part], ds.pad_id).items()}
                em = self._emissions(batch, [feats[post_of[k]] for k in part] if with_img else None)
                for k, r in zip(part, self.decode(em, batch["word_mask"])):
                    r["image_used"] = with_img
                    out[k] = r
        return ds.merge(out)

    def info(self) -> dict:
        """What serve.py's /info and predict.py print about the runtime."""
        m = self.meta
        return {"model": m["model"], "labels": self.label_map.labels[2:], "types": self.label_map.types,
                "text_encoder": m["text_encoder"], "image_encoder": m.get("image_encoder") if self.uses_image else None,
                "source": "", "run": m["run"], "format": m["format"], "int8": m["int8"]}

    @property
    def explains(self) -> bool:
        return "explain" in getattr(self, "graphs", {})

    def explain(self, words: list[str], feat: np.ndarray) -> np.ndarray:
        """One post and its image features -> each word's attention over the image cells [W, G*G] (rows sum to 1;
        G = meta["explain_side"], row-major over the model's square view), every word (windows merged as in tag)."""
        ds = D.MNERDataset([D.Post(list(words), ["O"] * len(words), None, "post")], self.tokenizer, self.label_map,
                           self.meta["max_len"])
        outs = []
        for k in range(len(ds)):
            batch = {n: v.numpy() for n, v in D.collate([ds[k]], ds.pad_id).items()}
            att = self._run("explain", self._inputs(batch, [feat]))
            outs.append({"att": att[0, : int(batch["word_mask"][0].sum())]})
        return ds.merge(outs)[0]["att"]

    def decode(self, em: np.ndarray, mask: np.ndarray) -> list[dict]:
        """Emissions [B, W, L] + word mask [B, W] -> per post {"tags" (scored words), "probs"}: CRF Viterbi and
        forward-backward marginals, or the softmax head's argmax and probabilities."""
        if self.crf is not None:
            ids, p = crf_tags(pin_pad(em), mask, self.crf)
        else:
            am = em[..., 1:].argmax(-1) + 1
            ids, p = [am[b, : int(mask[b].sum())].tolist() for b in range(len(em))], softmax_probs(em, mask)
        return [{"tags": self.label_map.decode(row), "probs": [float(p[b, t, j]) for t, j in enumerate(row)]}
                for b, row in enumerate(ids)]


def session_threads() -> int:
    """Intra-op threads for onnxruntime: OMP_NUM_THREADS when set, else the cores this process may use."""
    n = os.environ.get("OMP_NUM_THREADS")
    return int(n) if n and n.isdigit() and int(n) > 0 else len(os.sched_getaffinity(0))


class Bundle(Runtime):
    """An export.py bundle directory, run with onnxruntime (or torch.jit for --export_format torch)."""

    def __init__(self, path, threads: int | None = None):
        self.dir = Path(path)
        meta_file = self.dir / "meta.json"
        if not meta_file.is_file():
            raise ConfigError(f"--bundle {path}: no meta.json there; "
                              "make a bundle with python export.py --save_name <run>")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"{meta_file}: not valid JSON; export the bundle again") from None
        if meta.get("bundle_version") != BUNDLE_VERSION:
            raise ConfigError(f"{meta_file}: bundle version {meta.get('bundle_version')}, this code reads "
                              f"{BUNDLE_VERSION}; export the bundle again")
        for f in [meta["text"], meta.get("mm"), meta.get("vision"), "label_map.json", "tokenizer"]:
            if f and not (self.dir / f).exists():
                raise ConfigError(f"--bundle {path}: {f} is missing; export the bundle again")
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        tok = D.fast_tokenizer(self.dir / "tokenizer")
        crf = dict(np.load(self.dir / "crf.npz")) if meta["head"] == "crf" else None
        self._setup(meta, D.LabelMap.load(self.dir / "label_map.json"), tok, crf)
        self.threads = threads or session_threads()
        self.graphs = {k: self._load(meta[k]) for k in ("text", "mm", "vision", "explain")
                       if meta.get(k) and (self.dir / meta[k]).exists()}  # bundles made before explain.onnx lack it

    def _load(self, name: str):
        f = str(self.dir / name)
        if self.meta["format"] == "torch":
            import warnings

            import torch
            torch.set_num_threads(self.threads)
            with warnings.catch_warnings():
                # torch.jit is deprecated, still the format asked for
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(f, map_location="cpu").eval()
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # no busy-waiting between ops: on a shared 2-core box spinning threads steal the cores the work needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            sess = ort.InferenceSession(f, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # a damaged or foreign file
            raise ConfigError(f"{f}: onnxruntime cannot load it ({str(e).splitlines()[0][:120]}); export the bundle "
                              "again") from None
        sess.wanted = [i.name for i in sess.get_inputs()]  # the exporter drops inputs a model never reads
        return sess

    def _run(self, name: str, inputs: dict) -> np.ndarray:
        g = self.graphs[name]
        if self.meta["format"] == "torch":
            import torch
            with torch.inference_mode():
                return g(*(torch.from_numpy(np.ascontiguousarray(inputs[k]))
                           for k in self.meta["inputs"][name])).numpy()
        return g.run(None, {k: inputs[k] for k in g.wanted})[0]

    def info(self) -> dict:
        return {**super().info(), "source": f"bundle {self.dir}"}


def split_features(rt, config, split: str, posts: list) -> list | None:
    """The split's image features from a bundle's own vision graph (images decoded in a pool), --image_control
    applied as images.image_sources does; None for a post without a usable image."""
    root = D.image_root(config, split)
    if not rt.uses_image or root is None:
        return None
    with ThreadPoolExecutor(2) as pool:
        feats, _ = features_from_paths([D.find_image(root, p.imgid) for p in posts], rt.prep, rt.vision_features,
                                       pool)
    src = D.image_sources([f is not None for f in feats], config.image_control, config.seed)
    grey = None
    if config.image_control == "blank":
        grey = rt.vision_features(D.grey_pixels(rt.prep)[None].numpy())[0]
    return [None if f is None else (feats[j] if j >= 0 else grey) for f, j in zip(feats, src)]
