"""The run's torch model behind bundle.Runtime's interface, and the graph modules export.py traces.

    Emissions / Vision    Tagger.forward up to the emissions, and pixels -> cached image features, tensors in and out
    Explain               the text -> image attention on a grid of image cells (serve.py's page overlay)
    crf_params            the CRF scores a bundle decodes with (crf.npz)
    bundle_meta, refusal  what meta.json says of a run, and why a run cannot be exported
    CheckpointRuntime     bundle.Runtime on the run's checkpoint: test.py, serve.py --save_name, and the
                          reference export.py checks a bundle against
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import bundle as BU
import dataloader as D
from config import ConfigError
from crf import CRFHead
from model import BYTE_LEVEL_TYPES, load_tokenizer
from explain import explain_side
from runner import load_run

TEXT_INPUTS = ["input_ids", "attention_mask", "word_index", "word_mask", "case_ids"]
MM_INPUTS = TEXT_INPUTS + ["image_feats", "has_image"]


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


class Explain(nn.Module):
    """The MNER / co-attention graph's text -> image attention with the same inputs as Emissions(image=True): word ->
    cell attention on the vision's finest grid [B, W, G*G] (explain.word_region_attention, then cell_attention),
    every post of the batch with an image; what serve.py's page draws over the picture."""

    def __init__(self, tagger):
        super().__init__()
        self.tagger = tagger  # shared with the tagging graphs: weights are kept only inside this forward

    def forward(self, input_ids, attention_mask, word_index, word_mask, case_ids, image_feats, has_image):
        from explain import cell_attention, explained_modules, keep_weights, word_region_attention
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "word_index": word_index,
                 "word_mask": word_mask, "case_ids": case_ids, "image_feats": image_feats, "has_image": has_image}
        mods = explained_modules(self.tagger)
        keep_weights(mods, True)
        try:
            self.tagger(batch, image_on=True)
            return cell_attention(word_region_attention(self.tagger), self.tagger.vision,
                                  getattr(self.tagger.vision, "last_cells", None)).float()
        finally:
            keep_weights(mods, False)


class Vision(nn.Module):
    """pixels [N, 3, S, S] -> image features [N, *vision.feat_shape]: what the feature cache keeps per image and
    Tagger.image_tokens reads back through vision.from_features (region tokens [N, R, D] of a pretrained backbone;
    the dual-granularity encoder's flattened stem maps [N, F])."""

    def __init__(self, vision):
        super().__init__()
        self.vision = vision

    def forward(self, pixels):
        return self.vision.features(pixels).float()


def crf_params(model) -> dict | None:
    """start [L], end [L], transitions [L, L] the CRF head decodes with (CRFHead.scores) as float32 numpy; None for
    the softmax head."""
    if not isinstance(model.head, CRFHead):
        return None
    start, end, trans = (x.detach().float().numpy() for x in model.head.scores())  # with the BIO bans if on
    out = {"start": start, "end": end, "transitions": trans}
    if model.head.bioes:
        out["to_bio"] = model.head.to_bio.numpy()
    return out


def refusal(config, model) -> str:
    """Why this run cannot be exported; '' when it can."""
    if model.lstm is not None:
        return f"model {config.model} has a BiLSTM (packed sequences), which the bundle does not support yet"
    return ""


def bundle_meta(config, model, label_map, run: Path, fmt: str, int8: bool, opset: int) -> dict:
    uses_image = model.uses_image and config.use_image
    prep = D.image_prep_for(config) if uses_image else None
    return {"bundle_version": BU.BUNDLE_VERSION, "model": config.model, "run": str(run), "format": fmt, "int8": int8,
            "opset": opset if fmt == "onnx" else None, "head": "crf" if crf_params(model) is not None else "softmax",
            "max_len": config.max_len, "eval_mode": config.eval_mode, "text_encoder": config.text_encoder,
            "bio_constraints": config.bio_constraints,  # crf.npz holds the banned scores when on
            "image_encoder": config.image_encoder if uses_image else None,
            "add_prefix_space": model.text.model.config.model_type in BYTE_LEVEL_TYPES,
            "image_prep": {"size": prep.size, "mean": list(prep.mean), "std": list(prep.std)} if prep else None,
            "image_feats": list(model.vision.feat_shape) if uses_image else None,
            "cached_features": bool(model.vision.cacheable) if uses_image else None,
            "text": f"text.{'onnx' if fmt == 'onnx' else 'pt'}",
            "mm": f"mm.{'onnx' if fmt == 'onnx' else 'pt'}" if uses_image else None,
            "vision": f"vision.{'onnx' if fmt == 'onnx' else 'pt'}" if uses_image else None,
            "explain": f"explain.{'onnx' if fmt == 'onnx' else 'pt'}" if uses_image else None,  # fp32 even with int8
            "explain_side": explain_side(model.vision) if uses_image else None,
            "inputs": {"text": TEXT_INPUTS, "mm": MM_INPUTS, "vision": ["pixels"], "explain": MM_INPUTS}}


class CheckpointRuntime(BU.Runtime):
    """The run's torch model behind bundle.Runtime's interface (same batching, CRF in numpy): test.py's scoring,
    serve.py --save_name, and the reference an export is checked against.

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
        self.graphs = {"vision": Vision(model.vision)} if meta["vision"] else {}
        if meta["explain"]:
            self.graphs["explain"] = Explain(model)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    @torch.inference_mode()
    def _run(self, name: str, inputs: dict) -> np.ndarray:
        return self.graphs[name](*(self._tensor(inputs[k]) for k in self.meta["inputs"][name])).cpu().numpy()

    @torch.inference_mode()
    def _emissions(self, batch: dict, feats: list | None) -> np.ndarray:
        """The model on the whole collated batch."""
        x = {k: self._tensor(batch[k]) for k in TEXT_INPUTS}
        if feats is not None:
            x["image_feats"] = self._tensor(np.stack(feats).astype(np.float32))
            x["has_image"] = torch.ones(len(feats), dtype=torch.bool, device=self.device)
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
            if it["has_image"]:
                if "image_feats" in it:
                    feats[i] = it["image_feats"].numpy()
                else:
                    pixels[i] = it["pixel_values"].numpy()
        if pixels:
            for i, f in zip(pixels, self.vision_features(np.stack(list(pixels.values())))):
                feats[i] = f
        return feats

    def info(self) -> dict:
        m = self.meta
        return {"model": m["model"], "labels": self.label_map.labels[2:], "types": self.label_map.types,
                "text_encoder": m["text_encoder"], "image_encoder": m["image_encoder"],
                "source": f"checkpoint {m['run']}/model.pt", "run": m["run"], "format": "torch", "int8": False}
