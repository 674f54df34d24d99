"""The run's torch model behind bundle.Runtime's interface (CheckpointRuntime), and what a bundle holds of a run:
the CRF scores it decodes with (crf_params: crf.npz), its meta.json (bundle_meta) and why it cannot be made (refusal).
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import bundle as BU
import dataloader as D
from config import ConfigError
from crf import CRFHead
from model import load_tokenizer
from explain import Explain, explain_side
from runner import load_run

TEXT_INPUTS = ["input_ids", "attention_mask", "word_index", "word_mask", "case_ids"]
MM_INPUTS = TEXT_INPUTS + ["image_feats", "has_image"]


def crf_params(model) -> dict | None:
    """start [L], end [L], transitions [L, L] the CRF head decodes with (CRFHead.scores: with the BIO bans if on) as
    float32 numpy; None for the softmax head."""
    if not isinstance(model.head, CRFHead):
        return None
    out = dict(zip(("start", "end", "transitions"), (x.detach().float().cpu().numpy() for x in model.head.scores())))
    if model.head.bioes:
        out["to_bio"] = model.head.to_bio.cpu().numpy()
    return out


def refusal(config, model) -> str:
    """Why this run cannot be exported; '' when it can."""
    if model.lstm is not None:
        return f"model {config.model} has a BiLSTM (packed sequences), which the bundle does not support yet"
    return ""


def bundle_meta(config, model, label_map, run: Path, fmt: str, int8: bool, opset: int) -> dict:
    uses_image = model.uses_image and config.use_image
    prep = D.image_prep_for(config) if uses_image else None
    ext = "onnx" if fmt == "onnx" else "pt"
    return {"bundle_version": BU.BUNDLE_VERSION, "model": config.model, "run": str(run), "format": fmt, "int8": int8,
            "opset": opset if fmt == "onnx" else None, "head": "crf" if crf_params(model) is not None else "softmax",
            "max_len": config.max_len, "eval_mode": config.eval_mode, "text_encoder": config.text_encoder,
            "bio_constraints": config.bio_constraints,  # crf.npz holds the banned scores when on
            "image_encoder": config.image_encoder if uses_image else None,
            "image_prep": dataclasses.asdict(prep) if prep else None,
            "image_feats": list(model.vision.feat_shape) if uses_image else None,
            "cached_features": bool(model.vision.cacheable) if uses_image else None, "text": f"text.{ext}",
            "mm": f"mm.{ext}" if uses_image else None, "vision": f"vision.{ext}" if uses_image else None,
            "explain": f"explain.{ext}" if uses_image else None,  # fp32 even with int8
            "explain_side": explain_side(model.vision) if uses_image else None,
            "inputs": {"text": TEXT_INPUTS, "mm": MM_INPUTS, "vision": ["pixels"], "explain": MM_INPUTS}}


class CheckpointRuntime(BU.Runtime):
    """bundle.Runtime on the run's checkpoint (same batching, CRF in numpy): test.py's scoring, serve.py --save_name,
    and the reference an export is checked against.

    loaded: (config, label_map, model) already built by runner.load_run (test.py), else the run is loaded here.
    strict: refuse a run whose inputs a post's words alone cannot give (refusal: serve.py and export.py tag raw
    words); test.py scores its own datasets (tag_dataset), which carry them. device / amp: where and under which
    autocast context the model runs."""

    def __init__(self, save_dir, name: str, overrides=None, loaded=None, strict: bool = True, device="cpu",
                 amp=None):
        config, label_map, model = loaded or load_run(save_dir, name, overrides or {})[:3]
        why = refusal(config, model)
        if strict and why:
            raise ConfigError(f"--save_name {name}: {why}")
        self.model, self.device, self.amp = model.to(device).eval(), torch.device(device), amp or nullcontext
        meta = bundle_meta(config, model, label_map, Path(save_dir) / name, "checkpoint", False, 0)
        self._setup(meta, label_map, load_tokenizer(config), crf_params(model))
        self.graphs = {"vision": lambda px: model.vision.features(px).float(),
                       "explain": Explain(model)} if meta["vision"] else {}  # both or neither: the image path

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    @torch.inference_mode()
    def _run(self, name: str, inputs: dict) -> np.ndarray:
        return self.graphs[name](*(self._tensor(inputs[k]) for k in self.meta["inputs"][name])).cpu().numpy()

    @torch.inference_mode()
    def _emissions(self, batch: dict, feats: list | None) -> np.ndarray:
        """The model on the whole collated batch."""
        x = {k: self._tensor(v) for k, v in self._inputs(batch, feats).items()}
        with self.amp():
            em = self.model(x, image_on=feats is not None)["emissions"]
        return em.float().cpu().numpy()

    def dataset_features(self, ds: D.MNERDataset) -> list | None:
        """Each post's image features as the model reads them in training (the feature cache, --image_control
        applied), or this runtime's vision on the dataset's pixels for a vision trained with the tagger; None for a
        post without a usable image, and for a dataset or runtime without an image path."""
        if not ds.image_mode or not self.uses_image:
            return None
        first: dict[int, int] = {}
        for k, w in enumerate(ds.windows):
            first.setdefault(w.post, k)
        feats: list = [None] * len(ds.posts)
        pixels = {}  # a vision trained with the tagger: its pixels, run through the vision graph in batches below
        for i, k in first.items():
            it = ds[k] if ds.has_image[i] else {"has_image": False}
            if it["has_image"] and "image_feats" in it:
                feats[i] = it["image_feats"].numpy()
            elif it["has_image"]:
                pixels[i] = it["pixel_values"].numpy()
        if pixels:
            for i, f in zip(pixels, self.vision_features(np.stack(list(pixels.values())))):
                feats[i] = f
        return feats

    def info(self) -> dict:
        return {**super().info(), "source": f"checkpoint {self.meta['run']}/model.pt", "format": "torch"}
