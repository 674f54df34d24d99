"""What a model looks at: the text -> image attention behind predict.py --explain, test.py --explain_hits and the
bundle's explain graph (explain.Explain).

    explained_modules / keep_weights   the attention (and gate) modules whose weights are kept for one forward
    kept_map / window_map / rollout    one attention step as explanations read it; the dual encoder's traced back
    word_region_attention              word -> image-token attention of the last forward [n, W, R]
    region_grids / cell_attention      where the tokens lie on the picture; word -> cell attention [n, W, G*G]
    region_heat                        region weights -> attention mass per pixel of the model's view
    attention_rows                     per post of a dataset: its attention, relevance and gate (the overlays)
    read_boxes / attention_hits        the generators' object boxes, and how often the attention peak is inside

model.py is imported inside the functions that need it, so predict.py --bundle never loads the training code.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dataloader as D
from config import ConfigError, UserError


class ExplainRefused(UserError):
    """--explain asked of a model that cannot look at images: nothing honest to draw."""


def explained_modules(model) -> list:
    """The attention (and gate) modules whose kept weights explanations read."""
    import model as M
    if model.coattn is not None:
        mods = [model.coattn.t2i]
    elif model.stack is not None:
        mods = [m for m in (model.resampler.attn, *(b.cross for b in model.stack.blocks), model.gate) if m is not None]
    else:
        return []
    v = model.vision
    if isinstance(v, M.DualGranularityEncoder):  # its token mixing, traced back to the cells by rollout
        mods += [*(b.attn for b in v.swin), v.delegate.attn, *(b.attn for b in v.fine)]
    return mods


def keep_weights(mods: list, on: bool):
    """Switch weight keeping on/off and forget the last batch's weights (a text-only batch leaves them unset)."""
    import model as M
    for m in mods:
        m.keep_weights = on
        if isinstance(m, M.GatedConcatFusion):
            m.last_gate = None
        else:
            m.last_weights = m.last_values = None


def kept_map(attn) -> torch.Tensor:
    """The kept attention of a model.Attention as explanations read it, [B, Q, K] (rows sum to 1): each key's weight
    times the norm of what its value adds to the output (through that head's slice of the output projection),
    renormalised, then averaged over heads. A key can draw weight yet move the output little (a near-empty background
    cell often does); the weight alone would show it as looked at (Kobayashi et al., 2020)."""
    wo = attn.o.weight.float().view(attn.o.out_features, attn.h, -1)                       # [D, h, d]
    moved = torch.einsum("bhkd,ehd->bhke", attn.last_values.float(), wo).norm(dim=-1)      # [B, h, K]
    w = attn.last_weights.float() * moved[:, :, None, :]
    return (w / w.sum(-1, keepdim=True).clamp_min(1e-12)).mean(1)


def window_map(blk) -> torch.Tensor:
    """A model.SwinBlock's last window attention (kept_map) on its whole grid: [B, G*G, G*G]."""
    nW, S, _ = blk.slot_onehot.shape
    w = kept_map(blk.attn).reshape(-1, nW, S, S)                                           # [B, nW, w*w, w*w]
    return torch.einsum("nsc,bnst,ntd->bcd", blk.slot_onehot, w, blk.slot_onehot)


def rollout(enc) -> torch.Tensor | None:
    """How much each output token of a model.DualGranularityEncoder's last forward draws on each input cell, [B, T, T]
    in its token layout (slot 0, the summary, is no cell and gets nothing; rows sum to 1), from the kept attention
    (explained_modules); None without them. Attention rollout (Abnar & Zuidema, 2020) through the Swin, delegate and
    fine blocks, each residual branch weighted by its LayerScale: (I + g A) / (1 + g), g = mean |gamma|. The summary
    token (an MLP over both views' means) draws half on each view's mean. FFNs, norms and the parent cell added to each
    fine token are left out (a fine cell lies inside its parent)."""
    import model as M
    mixes = [*(b.attn for b in enc.swin), enc.delegate.attn, *(b.attn for b in enc.fine)]
    if any(m.last_weights is None for m in mixes):
        return None
    Nc = enc.Gc * enc.Gc

    def step(r, a, ls):  # no batch size is read: the graph stays batch-free for export (Explain)
        g = ls.gamma.detach().abs().mean() if isinstance(ls, M.LayerScale) else 1.0
        return (r + g * (a @ r)) / (1 + g)

    rc = torch.eye(Nc, device=enc.parent_index.device)
    for blk in enc.swin:
        rc = step(rc, window_map(blk), blk.ls1)
    w = kept_map(enc.delegate.attn)                                                        # [B, Nc, topk]
    rc = step(rc, w @ F.one_hot(enc.delegate.last_idx, Nc).float(), enc.delegate.ls)  # [B, Nc, Nc]
    rf = torch.eye(enc.k, device=rc.device) + 0 * rc[:, :1, :1]                            # [B, k, k]
    for blk in enc.fine:
        rf = step(rf, kept_map(blk.attn), blk.ls1)
    summary = torch.cat([rc.mean(1, keepdim=True), rf.mean(1, keepdim=True)], -1) / 2      # [B, 1, Nc + k]
    return torch.cat([F.pad(summary, (1, 0)), F.pad(rc, (1, enc.k)), F.pad(rf, (1 + Nc, 0))], 1)


def word_region_attention(model) -> torch.Tensor | None:
    """Text-word -> image-region attention of the last forward pass, [n, W, R] (rows sum to 1), or None; n = the
    posts of the batch that had an image, in batch order (only they go through the image path).

    Each attention step is read as kept_map(): its weights scaled by how much each key's value moves the output.
    roberta_clip_coattn: the text->image co-attention (exact for that layer).
    MNER: words reach the image only through the resampler's K learned queries, so the map is composed:
    (word -> query attention of the stack's cross-attention, averaged over layers) @ (query -> region attention of
    the resampler). Approximations: what the stack's self-attention passes between words, the FFNs and residuals,
    and the queries' own (image-independent) content are left out. Dual granularity: its tokens mixed inside the
    encoder, so each is traced back to the input cells it drew on (rollout).
    """
    if model.coattn is not None:
        if model.coattn.t2i.last_weights is None:
            return None
        t2x = kept_map(model.coattn.t2i)
    elif model.stack is None or model.stack.blocks[0].cross.last_weights is None:
        return None
    else:
        t2x = torch.stack([kept_map(b.cross) for b in model.stack.blocks]).mean(0)
        if model.resampler.attn is not None:  # else (--resampler_tokens 0) the stack's keys are the regions
            t2x = t2x @ kept_map(model.resampler.attn)  # [B, W, K] @ [B, K, R]
    import model as M
    # dual: [B, R, R], its tokens traced back to their input cells
    roll = rollout(model.vision) if isinstance(model.vision, M.DualGranularityEncoder) else None
    return t2x if roll is None else t2x @ roll


def region_grids(vision) -> list[tuple[int, int, int]]:
    """Where the vision module's region tokens lie: [(first, end, grid side)], side 0 = a whole-image token, a
    negative side = tokens at the cells (of a |side| x |side| grid) each image's explanation names ("cells").

    EfficientNet-Lite0: its S/32 x S/32 final map (9x9 = 81 tokens at 288 px); CLIP: its patch grid (CLS dropped);
    dual granularity: the summary token, the coarse Gc x Gc grid (row-major), then the k kept fine tokens at the
    cells kept in that image (word_region_attention has already traced the mixed tokens back to these cells).
    """
    import model as M
    if isinstance(vision, M.DualGranularityEncoder):
        c = vision.Gc ** 2
        return [(0, 1, 0), (1, 1 + c, vision.Gc), (1 + c, 1 + c + vision.k, -vision.Gf)]
    side = round(vision.n_tokens ** 0.5)
    if side * side != vision.n_tokens:
        raise ExplainRefused(f"--explain: {vision.n_tokens} region tokens do not form a square grid")
    return [(0, vision.n_tokens, side)]


def cell_attention(att: torch.Tensor, vision, cells: torch.Tensor | None = None) -> torch.Tensor:
    """Word -> region attention [n, W, R] -> word -> cell attention on the vision's finest grid [n, W, G*G]
    (G = explain_side(vision); row sums kept): a grid token's weight spread evenly over the finest cells it covers,
    a kept fine token's (dual; cells [n, k], row-major on the fine grid) on its cell, the summary token's evenly."""
    import model as M
    if not isinstance(vision, M.DualGranularityEncoder):
        return att
    Nc, Gf = vision.Gc ** 2, vision.Gf
    spread = F.one_hot(vision.parent_index, Nc).T.float()                       # [Nc, Gf*Gf]
    spread = spread / spread.sum(1, keepdim=True)
    fine = att[..., 1 + Nc:] @ F.one_hot(cells, Gf * Gf).float()          # [n, W, k] @ [n, k, Gf*Gf]
    return att[..., :1] / (Gf * Gf) + att[..., 1:1 + Nc] @ spread + fine


def explain_side(vision) -> int:
    """The side of the grid cell_attention maps to: the dual encoder's fine grid, else the region grid's."""
    import model as M
    return vision.Gf if isinstance(vision, M.DualGranularityEncoder) else round(vision.n_tokens ** 0.5)


def region_heat(w: np.ndarray, grids, size: int, cells=None) -> np.ndarray:
    """Attention mass per pixel of a size x size view [size, size] from region weights w [R].

    Each grid cell spreads its weight over its patch (bilinear between cell centres; the grids all cover the
    whole view, so coarse and fine tokens add up), a whole-image token evenly over every pixel. Tokens of a
    negative-side grid sit at `cells` (their row-major cell indices; without them they are spread evenly).
    """
    import cv2
    heat = np.zeros((size, size), np.float32)
    for a, b, side in grids:
        if side == 0 or (side < 0 and cells is None):
            heat += w[a:b].sum() / size ** 2
            continue
        if side < 0:
            side = -side
            g = np.zeros(side * side, np.float32)
            np.add.at(g, np.asarray(cells), w[a:b])
            g = g.reshape(side, side) * side ** 2 / size ** 2
        else:
            g = w[a:b].reshape(side, side).astype(np.float32) * side ** 2 / size ** 2
        heat += cv2.resize(g, (size, size), interpolation=cv2.INTER_LINEAR)
    return heat


def read_boxes(path: Path) -> dict[str, dict]:
    """A generator's <split>_boxes.jsonl -> {imgid: {"type", "box": [x0, y0, x1, y1], "size": [W, H]}}; a line that
    is not such an object, or a box not inside its image, is an error naming the line."""
    out = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            (x0, y0, x1, y1), (w, h) = r["box"], r["size"]
            ok = isinstance(r["imgid"], str) and isinstance(r["type"], str) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ConfigError(f"{path}:{n}: expected {{\"imgid\", \"type\", \"box\": [x0, y0, x1, y1] inside \"size\": "
                              "[W, H]}; fix or remove the line")
        out[r["imgid"]] = r
    return out


def image_to_view(x: float, y: float, size: tuple[int, int], prep: D.ImagePrep) -> tuple[float, float]:
    """A point of a W x H image -> the same point in the model's S x S view (ImagePrep's resize, then its centre crop
    or the centring on the padded canvas); a point the crop cut off falls outside [0, S]."""
    rw, rh, left, top = prep.placed(*size)
    return x * rw / size[0] + left, y * rh / size[1] + top


def attention_hits(model, ds: D.MNERDataset, config, label_map: D.LabelMap, device, amp, boxes: dict) -> dict:
    """Does the text->image attention point at the object the picture cues? For each post whose image reached the
    model and has a box: the attention of the words of the cued type's gold entities, averaged, drawn as the
    --explain overlay does (region_heat); a hit when its peak pixel lies inside the box, mapped into the view.
    "chance" is the rate a peak drawn uniformly over the view would reach: the mean share of the view the box covers.
    With more than one grid of tokens (dual granularity's coarse and fine views), "views" gives each grid's rate
    when its tokens alone are drawn: which view's attention lands on the object.
    Returns {"hits", "posts", "rate", "chance", "no_box", "no_entity", "views"}."""
    out = attention_rows(model, ds, config, device, amp)
    grids, prep = region_grids(model.vision), ds.prep
    grid_tokens = [(a, b) for a, b, side in grids if side]  # the whole-image token (side 0) is no view
    views = dict(zip(("coarse", "fine"), grid_tokens)) if len(grid_tokens) > 1 else {}
    hits, view_hits = 0, dict.fromkeys(views, 0)
    posts = no_box = no_entity = 0
    cover = 0.0
    for p, ex in zip(ds.posts, out):
        if not ex:
            continue
        b = boxes.get(p.imgid or "")
        if b is None:
            no_box += 1
            continue
        words = [k for k, t in enumerate(p.tags) if t != "O" and t[2:] == b["type"]]
        if not words:
            no_entity += 1
            continue
        x0, y0, x1, y1 = b["box"]
        box = (*image_to_view(x0, y0, b["size"], prep), *image_to_view(x1, y1, b["size"], prep))
        w = ex["att"][words].mean(0)
        posts += 1
        hits += peak_in_box(region_heat(w, grids, prep.size, ex["cells"]), box)
        for name, (a, e) in views.items():
            alone = np.zeros_like(w)
            alone[a:e] = w[a:e]
            view_hits[name] += peak_in_box(region_heat(alone, grids, prep.size, ex["cells"]), box)
        ax, ay, bx, by = (min(max(v, 0.0), prep.size) for v in box)
        cover += (bx - ax) * (by - ay) / prep.size ** 2
    rate = lambda n: n / posts if posts else 0.0  # noqa: E731
    return {"hits": hits, "posts": posts, "rate": rate(hits), "chance": rate(cover), "no_box": no_box,
            "no_entity": no_entity, "views": {k: rate(n) for k, n in view_hits.items()}}


def peak_in_box(heat: np.ndarray, box) -> int:
    """1 when the centre of heat's peak pixel lies inside box (x0, y0, x1, y1) in view pixels, else 0."""
    py, px = np.unravel_index(heat.argmax(), heat.shape)
    ax, ay, bx, by = box
    return int(ax <= px + 0.5 <= bx and ay <= py + 0.5 <= by)


def image_path_off(model, config) -> str:
    """Why the model cannot look at images (and so --explain has no text->image attention to draw); '' when it can."""
    if not model.uses_image:
        return (f"model {config.model} of this run has no image path"
                + ("" if config.use_image else " (trained with --no-use_image)"))
    if not config.use_image:
        return "--no-use_image turns its image path off"
    return ""


@torch.no_grad()
def attention_rows(model, ds: D.MNERDataset, config, device, amp) -> list[dict]:
    """Per post whose image reached the model: {"att" [n, R] (word -> image-token attention, word_region_attention),
    "rel" [n], "gate" [n] or None, "cells"} for the --explain overlays and attention_hits; {} for the other posts.
    The tags come from the runtime (test.py, predict.py main); this reads the model's attention modules only."""
    from runner import run_batches
    mods = explained_modules(model)

    def each(batch) -> list[dict]:
        keep_weights(mods, True)
        with amp():  # the model only: attention maps are composed in fp32
            res = model(batch)
        att = word_region_attention(model)
        gate = model.gate.last_gate if model.gate is not None else None
        cells = getattr(model.vision, "last_cells", None)  # dual: the kept fine tokens' cells
        img_row = {b: k for k, b in enumerate(batch["has_image"].nonzero().squeeze(1).tolist())}  # att/gate rows
        rows = []
        for b, n in enumerate(batch["word_mask"].sum(1).tolist()):
            k = img_row.get(b)
            rows.append({} if att is None or k is None else
                        {"att": att[k, :n].cpu().numpy(), "rel": res["rel"][b, :n].float().tolist(),
                         "gate": gate[k, :n].float().mean(-1).tolist() if gate is not None else None,
                         "cells": tuple(cells[k].tolist()) if cells is not None else None})
        return rows

    try:
        return run_batches(model, ds, config, device, each)
    finally:
        keep_weights(mods, False)


class Explain(nn.Module):
    """The MNER / co-attention graph's text -> image attention with the same inputs as Emissions(image=True): word ->
    cell attention on the vision's finest grid [B, W, G*G] (explain.word_region_attention, then cell_attention),
    every post of the batch with an image; what serve.py's page draws over the picture."""

    def __init__(self, tagger):
        super().__init__()
        self.tagger = tagger  # shared with the tagging graphs: weights are kept only inside this forward

    def forward(self, input_ids, attention_mask, word_index, word_mask, case_ids, image_feats, has_image):
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


def report_hits(model, ds, config, label_map, device, amp, split: str) -> dict:
    """--explain_hits: explain.attention_hits over the split's posts with a box, printed in one line."""
    off = image_path_off(model, config)
    path = D.dataset_dir(config) / f"{split}_boxes.jsonl"
    if off or not path.is_file():
        why = off or f"{path} not found: data/make_heldout.py and make_demo.py write it (a demo folder made before: " \
                     "python data/make_demo.py --force)"
        raise ConfigError(f"--explain_hits: {why}")
    h = attention_hits(model, ds, config, label_map, device, amp or nullcontext, read_boxes(path))
    views = "".join(f"; {k} view alone {r:.1%}" for k, r in h["views"].items())
    print(f"attention peak inside the cued object's box: {h['hits']}/{h['posts']} posts ({h['rate']:.1%}; "
          f"a uniform peak: {h['chance']:.1%}{views}); skipped: {h['no_box']} with an image but no box, "
          f"{h['no_entity']} with no entity of the cued type")
    return h
