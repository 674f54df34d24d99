"""Every MANGO model, top to bottom: encoders, vision, fusion, heads, losses, registry.

One model class, `Tagger`, is assembled from parts by `build_model(config, num_labels)`:

    MNER                 text enc -> [vision -> resampler -> N-layer multimodal stack -> gated fusion]
                         -> (BiLSTM) -> CRF|CE
    roberta_clip_coattn  text enc -> [vision -> one text<->image co-attention block] -> CRF
    roberta_crf          text enc -> linear -> CRF
    bert_bilstm_crf      text enc -> BiLSTM -> CRF
    bert                 text enc -> linear -> softmax (token cross-entropy)

Any text encoder works with any of them (the names are the papers' names, not a restriction).

Forward contract (the batch is the dict described in dataloader.py):
    out = model(batch, epoch=0, image_on=True)
        out["loss"]        scalar (only when batch has labels)
        out["parts"]       {"tag", "residual", "preserve", "nce", "sparsity", "image_types", "distill", "tag_distill"}:
                           each term, unweighted, detached (tag_distill: KL from --teacher_run's tag marginals)
        out["emissions"]   [B, W, L]  word-level label scores
        out["rel"]         [B, W]     per-word image relevance (zeros without an image path)
    model.decode(batch) -> list of B lists of label ids, one per scored word (word_mask)
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from config import APPLIES, ConfigError, resolve_text_encoder
from crf import CRFHead, bioes_to_bio
import dataloader as D
from efficientnet import efficientnet_weights_file, load_efficientnet_lite0

# ============================================================================ encoders

def load_tokenizer(config):
    """The fast tokenizer of --text_encoder (dataloader.fast_tokenizer)."""
    return D.fast_tokenizer(resolve_text_encoder(config.text_encoder))


def text_positions(cfg) -> int | None:
    """Sub-word positions (special tokens included) an encoder with absolute position embeddings can take; None
    when its config sets no such limit. RoBERTa-style position ids start after the padding index."""
    n = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(n, int) or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return None
    if cfg.model_type in ("roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "longformer"):
        n -= (cfg.pad_token_id or 0) + 1
    return n


def text_depth(name: str, n_layers: int) -> int:
    """Depth of a text-encoder parameter: 0 = embeddings, i + 1 = transformer layer i, n_layers + 1 = above them."""
    m = re.search(r"\.layers?\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else 0 if "embeddings" in name else n_layers + 1


class TextEncoder(nn.Module):
    """Any Hugging Face encoder from a local directory; architecture from its config.json.
    forward(input_ids [B,T], attention_mask [B,T], word_index [B,W]) -> each word's first sub-word state [B, W, H]"""

    def __init__(self, config):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # the pooler we leave out is reported as "unexpected" otherwise
        hf_logging.disable_progress_bar()
        path = resolve_text_encoder(config.text_encoder)
        cfg = AutoConfig.from_pretrained(path)
        n_pos = text_positions(cfg)
        if n_pos and config.max_len > n_pos:  # longer inputs would index past the position table mid-run
            raise ConfigError(f"--max_len {config.max_len} is more than the {n_pos} positions of --text_encoder "
                              f"{config.text_encoder}; use --max_len {n_pos} or less")
        if hasattr(cfg, "attention_probs_dropout_prob"):  # skips a [B, heads, T, T] Bernoulli mask per layer
            cfg.attention_probs_dropout_prob = 0.0
        try:  # the pooler is never used; leaving it out keeps "every trainable parameter learns" true
            self.model = AutoModel.from_pretrained(path, config=cfg, add_pooling_layer=False)
        except TypeError:
            self.model = AutoModel.from_pretrained(path, config=cfg)
        if config.grad_checkpointing:  # recompute each layer in backward: less activation memory, ~30% more compute
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if config.freeze_word_embeddings:  # the largest matrix (vocab x H): no dense gradient or AdamW pass over it
            self.model.get_input_embeddings().weight.requires_grad_(False)
        n_layers = self.model.config.num_hidden_layers
        if config.freeze_text_layers > n_layers:
            raise ConfigError(f"--freeze_text_layers {config.freeze_text_layers}: --text_encoder {config.text_encoder} "
                              f"has {n_layers} layers; give at most {n_layers}")
        if config.freeze_text_layers:  # backward stops above the frozen stack: no gradient below it at all
            for n, prm in self.model.named_parameters():
                if text_depth(n, n_layers) <= config.freeze_text_layers:
                    prm.requires_grad_(False)
        self.hidden = self.model.config.hidden_size
        self.attn_impl = self.model.config._attn_implementation

    def forward(self, input_ids, attention_mask, word_index):
        # under CPU bf16 autocast torch's fused attention is several times slower than the plain product. The switch
        # is the model's state: one forward at a time per model (serve.py runs one worker thread)
        cpu_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        want = "eager" if cpu_bf16 else self.attn_impl
        if self.model.config._attn_implementation != want:
            self.model.set_attn_implementation(want)
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h.gather(1, word_index.unsqueeze(-1).expand(-1, -1, h.size(-1)))


# ============================================================================ vision
# -- shared attention pieces (also used by the fusion stack)

class Attention(nn.Module):
    """Multi-head attention. q [B,Q,D], kv [B,K,D], mask [B|1,H|1,Q|1,K] bool (True = may attend) -> [B,Q,D].
    With keep_weights set (explanations), `last_weights` keeps the attention map [B, heads, Q, K] and `last_values`
    the values [B, heads, K, D/heads] (explain.kept_map reads them)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.h = heads
        # no key bias: it adds the same amount to every score of a query, which softmax cancels
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False),
                                          nn.Linear(dim, dim), nn.Linear(dim, dim))
        self.keep_weights, self.last_weights, self.last_values = False, None, None

    def forward(self, q, kv, mask=None):
        B, Q, D = q.shape
        split = lambda x: x.view(B, -1, self.h, D // self.h).transpose(1, 2)
        qh, kh, vh = split(self.q(q)), split(self.k(kv)), split(self.v(kv))
        if self.keep_weights:
            s = qh @ kh.transpose(-1, -2) / math.sqrt(D // self.h)
            w = (s if mask is None else s.masked_fill(~mask, float("-inf"))).softmax(-1)
            self.last_weights, self.last_values = w.detach(), vh.detach()
            out = w @ vh
        else:
            # no dropout on attention maps: residual dropout regularises, and CPU mask sampling is costly
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(B, Q, D))

class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, out: int | None = None):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out or dim))


class LayerScale(nn.Module):
    """x * gamma, gamma [D] learned from a small start: a residual branch that begins nearly silent, so blocks
    stacked on pretrained features refine them rather than overwrite them in the first steps."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


def layer_scale(dim: int, init: float) -> nn.Module:
    return LayerScale(dim, init) if init else nn.Identity()


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention, FFN; `scale` > 0 puts a LayerScale on the
    self-attention and FFN branches. x [B,N,D], self_mask [B,1,1|N,N] bool, ctx [B,K,D] -> [B,N,D]"""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, cross: bool = False, ffn_mult: int = 4,
                 scale: float = 0.0):
        super().__init__()
        self.ls1, self.ls3 = layer_scale(dim, scale), layer_scale(dim, scale)
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.cross, self.ln2 = (Attention(dim, heads), nn.LayerNorm(dim)) if cross else (None, None)
        self.ln3, self.ffn = nn.LayerNorm(dim), MLP(dim, ffn_mult * dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, self_mask=None, ctx=None):
        h = self.ln1(x)
        x = x + self.ls1(self.drop(self.attn(h, h, self_mask)))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.ln2(x), ctx))
        return x + self.ls3(self.drop(self.ffn(self.ln3(x))))


class PretrainedVision(nn.Module):
    """A frozen-by-default pretrained backbone that returns region tokens, forward(pixels [B,3,S,S]) -> [B, R, D]:
    efficientnet_lite0: the final (S/32)^2 x 1280 map at --vision_img_size S (81 tokens of 1280 at 288 px).
    CLIP directory:     patch tokens without CLS (49 x 768 for ViT-B/32 at 224)."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.image_encoder
        if self.kind == "efficientnet_lite0":
            self.net = load_efficientnet_lite0()
            self.blocks = self.net._blocks
            self.out_dim, self.n_tokens = 1280, (config.vision_img_size // 32) ** 2  # the stride-32 map
            self.weights_file = efficientnet_weights_file()
        else:
            from transformers import CLIPVisionModel
            self.net = CLIPVisionModel.from_pretrained(config.image_encoder)
            self.blocks = self.net.encoder.layers
            self.out_dim = self.net.config.hidden_size
            self.n_tokens = (self.net.config.image_size // self.net.config.patch_size) ** 2
            wf = [f for ext in ("safetensors", "bin") for f in sorted(Path(self.kind).glob(f"*.{ext}"))]
            self.weights_file = str(wf[0]) if wf else None
        self.backbone_id = self.kind if self.kind == "efficientnet_lite0" else f"clip:{Path(self.kind).resolve()}"
        self.requires_grad_(False)
        n = config.unfreeze_last_vision_blocks if config.vision_trainable else 0
        for blk in list(self.blocks)[len(self.blocks) - n:] if n else []:
            blk.requires_grad_(True)
        self.trainable = n > 0
        self.cacheable = not self.trainable  # frozen: tokens are computed once per image (images.FeatureCache)
        self.feat_shape = (self.n_tokens, self.out_dim)

    def train(self, mode: bool = True):
        # BatchNorm statistics of a pretrained backbone are kept: batches of tweets are too small to re-estimate them
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pixels):
        if self.kind == "efficientnet_lite0":  # channels-last convolutions are faster on CPU
            feats = self.net.forward_features(pixels.contiguous(memory_format=torch.channels_last))
            return feats.flatten(2).transpose(1, 2)
        return self.net(pixel_values=pixels).last_hidden_state[:, 1:]

    @torch.no_grad()
    def features(self, pixels):  # what the feature cache keeps per image: the region tokens themselves
        return self.forward(pixels)

    def from_features(self, feats):
        return feats


# -- dual-granularity encoder (trained from scratch)

def _window_ids(G: int, w: int, shift: int) -> torch.Tensor:
    """Region id of each cell of a G x G grid padded to a multiple of w, after a cyclic shift: cells of different
    regions must not attend to each other inside a shifted window (Swin's mask); padding cells get id -1."""
    Gp = -(-G // w) * w
    valid = torch.zeros(Gp, Gp, dtype=torch.bool)
    valid[:G, :G] = True
    region = torch.zeros(Gp, Gp, dtype=torch.long)
    if shift:
        # the windows are cut in the rolled frame: padding moves with the roll, the region cuts do not
        valid = torch.roll(valid, (-shift, -shift), (0, 1))
        cuts = (slice(0, Gp - w), slice(Gp - w, Gp - shift), slice(Gp - shift, Gp))
        for i, rs in enumerate(cuts):
            for j, cs in enumerate(cuts):
                region[rs, cs] = 1 + 3 * i + j
    return torch.where(valid, region, -1)


class SwinBlock(nn.Module):
    """Window attention over a G x G token grid (shifted by window//2 when shift=True) + FFN (LayerScale as Block's).
    x [B, G*G, D] -> [B, G*G, D]"""

    def __init__(self, dim: int, heads: int, grid: int, window: int, shift: bool, scale: float = 0.0):
        super().__init__()
        self.ls1, self.ls2 = layer_scale(dim, scale), layer_scale(dim, scale)
        self.G, self.w = grid, min(window, grid)
        self.Gp = -(-grid // self.w) * self.w  # the grid padded to whole windows
        self.shift = self.w // 2 if shift and self.w < grid else 0
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2, self.ffn = nn.LayerNorm(dim), MLP(dim, 4 * dim)
        ids = self._windows(_window_ids(grid, self.w, self.shift)[None, :, :, None].float())[..., 0]  # [nW, w*w]
        eye = torch.eye(self.w * self.w, dtype=torch.bool)
        mask = ((ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)) | eye
        self.register_buffer("mask", mask[:, None], persistent=False)  # [nW, 1, w*w, w*w]
        slot_cell = self._partition(torch.arange(grid * grid).view(1, grid, grid, 1), -1)[..., 0]  # [nW, w*w]
        # one-hot of each window slot's grid cell (padding: a zero row): explanations put window attention back with it
        self.register_buffer("slot_onehot", F.one_hot(slot_cell + 1, grid * grid + 1)[..., 1:].float(),
                             persistent=False)                                          # [nW, w*w, G*G]

    def _windows(self, x):  # [B, Gp, Gp, D] -> [B*nW, w*w, D]
        B, Gp, _, D = x.shape
        n = Gp // self.w
        return x.view(B, n, self.w, n, self.w, D).transpose(2, 3).reshape(B * n * n, self.w * self.w, D)

    def _partition(self, x, fill=0):  # [B, G, G, D] -> padded (with fill), shifted -> [B*nW, w*w, D]
        p = self.Gp - self.G
        x = F.pad(x, (0, 0, 0, p, 0, p), value=fill)
        return self._windows(torch.roll(x, (-self.shift, -self.shift), (1, 2)) if self.shift else x)

    def forward(self, x):
        B, N, D = x.shape
        G, Gp, w = self.G, self.Gp, self.w
        win = self._partition(self.ln1(x).view(B, G, G, D))
        out = self.attn(win, win, self.mask.repeat(B, 1, 1, 1))
        out = out.view(B, Gp // w, Gp // w, w, w, D).transpose(2, 3).reshape(B, Gp, Gp, D)
        if self.shift:
            out = torch.roll(out, (self.shift, self.shift), (1, 2))
        x = x + self.ls1(out[:, :G, :G].reshape(B, N, D))
        return x + self.ls2(self.ffn(self.ln2(x)))


class SaliencySelect(nn.Module):
    """Keeps k of N tokens: the k most salient by a learned score, or, given a prior, the k the prior ranks first;
    each kept token is scaled by sigmoid(score), so the scorer learns through whatever reads the kept tokens.
    x [B, N, D], prior [B, N] or None -> kept [B, k, D], idx [B, k] (positions in the N tokens)"""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.k = k
        self.ln, self.score = nn.LayerNorm(dim), nn.Linear(dim, 1)

    def keep(self, x, s, idx):
        """The tokens idx [B, k] of x [B, N, D], each scaled by sigmoid of its score s [B, N] -> [B, k, D]."""
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1))) * torch.sigmoid(s.gather(1, idx)).unsqueeze(-1)

    def forward(self, x, prior=None):
        s = self.score(self.ln(x)).squeeze(-1)
        k = min(self.k, x.size(1))
        if prior is None:
            idx = s.topk(k, dim=1).indices
        elif torch.onnx.is_in_onnx_export():  # ONNX's TopK puts the lower index first among equal values
            idx = prior.topk(k, dim=1).indices
        else:  # the same order here: cells of a flat region (a blank image) tie exactly, and topk breaks ties freely
            idx = prior.sort(dim=1, descending=True, stable=True).indices[:, :k]
        return self.keep(x, s, idx), idx


class DelegateAttention(SaliencySelect):
    """Scores patches, keeps the top-k as delegates (scaled as SaliencySelect's), and lets every patch attend to them
    (residually). x [B, N, D] -> [B, N, D]"""

    def __init__(self, dim: int, heads: int, topk: int, scale: float = 0.0):
        super().__init__(dim, topk)
        self.attn, self.ls = Attention(dim, heads), layer_scale(dim, scale)

    def forward(self, x):
        h = self.ln(x)
        s = self.score(h).squeeze(-1)
        self.last_idx = s.topk(min(self.k, x.size(1)), dim=1).indices  # for explain.rollout
        return x + self.ls(self.attn(h, self.keep(h, s, self.last_idx)))


class PatchEmbed(nn.Module):
    """Image -> [B, D, S/p, S/p] patch grid through a convolutional stem: one 3x3 stride-2 conv + BatchNorm + GELU
    per factor 2 of p (a plain p'-stride conv for an odd rest p'), widths doubling towards the output; then a
    projection to D: with `mix`, a 3x3 stride-1 conv + BN + GELU (each patch also sees its neighbours), else a 1x1.
    Why: trained from scratch on a few hundred images, a linear or un-normalised patchify learns far too slowly.
    BatchNorm matters most: the pictures' colours vary freely, and per-channel batch statistics make the stem's
    responses comparable across pictures from the first steps. `mix` is used on the coarse grid only (cheap there)."""

    def __init__(self, dim: int, patch: int, mix: bool = False):
        super().__init__()
        n2 = (patch & -patch).bit_length() - 1  # stride-2 stages: the power of 2 in p
        rest = patch >> n2
        out = dim if mix else dim // 2
        widths = [max(16, out >> (n2 - i)) for i in range(1, n2 + 1)] + ([out] if rest > 1 else [])
        layers, cin = [], 3
        for i, w in enumerate(widths):
            k, s = (3, 2) if i < n2 else (rest, rest)
            # no conv bias before BatchNorm: its mean subtraction removes it
            layers += [nn.Conv2d(cin, w, k, s, k // 2 if s == 2 else 0, bias=False), nn.BatchNorm2d(w), nn.GELU()]
            cin = w
        layers += [nn.Conv2d(cin, dim, 3, 1, 1, bias=False), nn.BatchNorm2d(dim), nn.GELU()] if mix else \
            [nn.Conv2d(cin, dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ConvStem(nn.Module):
    """--vision_stem conv: two from-scratch patch stems (the ablation of the pretrained stem).
    pixels [B, 3, S, S] -> (coarse [B, D, S/pc, S/pc], fine [B, D, S/pf, S/pf])"""
    frozen = False

    def __init__(self, dim: int, coarse_patch: int, fine_patch: int):
        super().__init__()
        self.coarse, self.fine = PatchEmbed(dim, coarse_patch, mix=True), PatchEmbed(dim, fine_patch)
        self.channels = (dim, dim)

    def forward(self, pixels):
        return self.coarse(pixels), self.fine(pixels)


# EfficientNet-Lite0 feature maps by stride: (index of the last of the 16 blocks at that stride, its channels).
# Stride 32 is the network's final features, after its 1x1 head conv: the 1280 channels the plain MNER reads.
EFFNET_MAPS = {4: (2, 24), 8: (4, 40), 16: (10, 112), 32: (15, 1280)}


class EfficientNetStem(nn.Module):
    """--vision_stem efficientnet_lite0: the shipped ImageNet EfficientNet-Lite0 as the source of both views.
    pixels [B, 3, S, S] (mean = std = 0.5) -> (coarse [B, Cc, S/pc, S/pc], fine [B, Cf, S/pf, S/pf]): the maps
    at stride pc (--vision_patch_size) and pf (--vision_fine_patch_size), each one of 4, 8, 16, 32; stride 32 is
    the final 1280-channel features. At 288 px and 32/16: [B, 1280, 9, 9] and [B, 112, 18, 18]. Layers past the
    coarser map never run. Frozen (BatchNorm statistics included) unless --vision_trainable unfreezes its last
    --unfreeze_last_vision_blocks blocks (and the head conv with them); frozen, its maps are cached per image."""

    def __init__(self, coarse_stride: int, fine_stride: int, unfreeze: int = 0):
        super().__init__()
        net = load_efficientnet_lite0()
        self.conv, self.bn = net._conv_stem, net._bn0
        self.blocks = nn.ModuleList(list(net._blocks)[: EFFNET_MAPS[coarse_stride][0] + 1])
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6()) if coarse_stride == 32 else None
        self.fine_at = EFFNET_MAPS[fine_stride][0]
        self.channels = (EFFNET_MAPS[coarse_stride][1], EFFNET_MAPS[fine_stride][1])
        self.requires_grad_(False)
        for blk in list(self.blocks)[len(self.blocks) - unfreeze:] if unfreeze else []:
            blk.requires_grad_(True)
        if unfreeze and self.head is not None:
            self.head.requires_grad_(True)
        self.frozen = unfreeze == 0

    def train(self, mode: bool = True):
        return super().train(False)  # pretrained BatchNorm statistics are kept (see PretrainedVision.train)

    def forward(self, pixels):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = F.relu6(self.bn(self.conv(pixels.contiguous(memory_format=torch.channels_last))))  # faster on CPU
            for i, blk in enumerate(self.blocks):
                x = blk(x)
                if i == self.fine_at:
                    fine = x
            return (x if self.head is None else self.head(x)), fine


def activation_prior(c, f, parent_index):
    """Where the backbone sees something: each fine cell's distance from its map's mean feature times its parent
    coarse cell's, [B, Gf^2]. Off the cued object a learned score trained from tags alone drifts to background cells;
    this ranking keeps the fine view on what stands out in the pretrained maps.
    c [B, Cc, Gc, Gc], f [B, Cf, Gf, Gf], parent_index [Gf^2] -> [B, Gf^2]"""
    dev = lambda m: (m - m.mean((2, 3), keepdim=True)).norm(dim=1).flatten(1)  # noqa: E731  [B, G^2]
    return dev(f) * dev(c).index_select(1, parent_index)


DUAL_LAYER_SCALE = 0.1  # start of every residual branch's LayerScale inside the dual encoder


class DualGranularityEncoder(nn.Module):
    """Coarse (Swin + delegate attention) and fine (salient patches + transformer) views of one image.

    stem:   EfficientNetStem (default; frozen, cacheable) or ConvStem (--vision_stem conv), at --vision_img_size S;
            pc = --vision_patch_size > pf = --vision_fine_patch_size: every fine token covers a smaller area.
    coarse: the Gc x Gc map (Gc = S/pc) projected to D + position embedding, two Swin blocks (window
            --vision_swin_window, the second shifted), delegate attention (--vision_delegate_topk).
    fine:   the Gf x Gf map (Gf = S/pf) projected to D + position embedding + parent_cells; the k =
            min(--vision_max_patches, Gf^2) cells activation_prior ranks first (--vision_select learned: a learned
            score) are kept by SaliencySelect, then --vision_depth transformer layers.
    summary: an MLP over [mean coarse; mean fine].
    Every residual branch of the learned blocks starts at DUAL_LAYER_SCALE (LayerScale): they refine the pretrained
    features instead of replacing them in the first steps, on a few hundred pictures.
    forward(pixels [B, 3, S', S']) -> tokens [B, 1 + Gc^2 + k, D]; from_features(stem maps, flattened) -> the same.
    """

    def __init__(self, config):
        super().__init__()
        D, heads = config.vision_embed_dim, config.vision_heads
        self.size = config.vision_img_size
        pc, pf = config.vision_patch_size, config.vision_fine_patch_size
        self.Gc, self.Gf = self.size // pc, self.size // pf
        self.stem = ConvStem(D, pc, pf) if config.vision_stem == "conv" else \
            EfficientNetStem(pc, pf, config.unfreeze_last_vision_blocks if config.vision_trainable else 0)
        Cc, Cf = self.stem.channels
        # LayerNorm first: the pretrained maps' channels differ in scale by orders of magnitude
        self.coarse_proj = nn.Sequential(nn.LayerNorm(Cc), nn.Linear(Cc, D))
        self.fine_proj = nn.Sequential(nn.LayerNorm(Cf), nn.Linear(Cf, D))
        # the coarse cell holding each fine cell's centre, row-major [Gf*Gf] (any pc / pf ratio)
        side = torch.clamp((torch.arange(self.Gf) * pf + pf // 2) // pc, max=self.Gc - 1)
        self.register_buffer("parent_index", (side[:, None] * self.Gc + side[None, :]).flatten(), persistent=False)
        self.coarse_pos = nn.Parameter(torch.zeros(1, self.Gc * self.Gc, D))
        self.fine_pos = nn.Parameter(torch.zeros(1, self.Gf * self.Gf, D))
        # no dropout in here (--drop_prob is for the fusion stack and heads): this encoder underfits, not overfits
        ls = DUAL_LAYER_SCALE
        self.swin = nn.ModuleList(SwinBlock(D, heads, self.Gc, config.vision_swin_window, i == 1, ls) for i in range(2))
        self.delegate = DelegateAttention(D, heads, config.vision_delegate_topk, scale=ls)
        self.k = min(config.vision_max_patches, self.Gf * self.Gf)
        self.select = SaliencySelect(D, self.k)
        self.select_by = config.vision_select
        self.fine = nn.ModuleList(Block(D, heads, scale=ls) for _ in range(config.vision_depth))
        self.fuse = MLP(2 * D, 2 * D, out=D)
        self.norm = nn.LayerNorm(D)
        # label-free warm-up of a from-scratch stem: summary and coarse grid regress EfficientNet-Lite0's features
        self.distill = nn.Linear(D, TEACHER_DIM) if config.vision_distill_lambda > 0 else None
        nn.init.trunc_normal_(self.coarse_pos, std=0.02)
        nn.init.trunc_normal_(self.fine_pos, std=0.02)
        self.out_dim, self.n_tokens = D, 1 + self.Gc * self.Gc + self.k
        # a frozen stem's maps are computed once per image and cached (images.FeatureCache); the rest learns
        self.trainable, self.cacheable = True, self.stem.frozen
        self.map_shapes = ((Cc, self.Gc, self.Gc), (Cf, self.Gf, self.Gf))
        self.feat_shape = (sum(math.prod(s) for s in self.map_shapes),)
        self.backbone_id = f"efficientnet_lite0_maps:{pc}/{pf}"  # stride 32 is the final features
        self.weights_file = efficientnet_weights_file() if config.vision_stem != "conv" else None

    def stem_maps(self, pixels):
        if pixels.shape[-1] != self.size or pixels.shape[-2] != self.size:
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.stem(pixels)

    @torch.no_grad()
    def features(self, pixels):
        """What the feature cache keeps per image: both stem maps, flattened and concatenated, [B, F]."""
        c, f = self.stem_maps(pixels)
        return torch.cat([c.flatten(1), f.flatten(1)], 1)

    def from_features(self, feats):
        """features() output [B, F] -> tokens [B, 1 + Gc^2 + k, D]."""
        (Cc, Gc, _), (Cf, Gf, _) = self.map_shapes
        n = Cc * Gc * Gc
        return self.encode_maps(feats[:, :n].view(-1, Cc, Gc, Gc), feats[:, n:].view(-1, Cf, Gf, Gf))

    def forward(self, pixels):
        return self.encode_maps(*self.stem_maps(pixels))

    def encode_maps(self, c, f):
        """coarse [B, Cc, Gc, Gc], fine [B, Cf, Gf, Gf] -> tokens [B, 1 + Gc^2 + k, D]."""
        prior = activation_prior(c, f, self.parent_index) if self.select_by == "prior" else None
        c = self.coarse_proj(c.flatten(2).transpose(1, 2)) + self.coarse_pos
        f = self.fine_proj(f.flatten(2).transpose(1, 2)) + self.fine_pos + self.parent_cells(c)
        for blk in self.swin:
            c = blk(c)
        c = self.delegate(c)
        f, self.last_cells = self.select(f, prior)  # last_cells: for --explain
        for blk in self.fine:
            f = blk(f)
        summary = self.fuse(torch.cat([c.mean(1), f.mean(1)], -1)).unsqueeze(1)
        return self.norm(torch.cat([summary, c, f], 1))

    def parent_cells(self, c):
        """coarse tokens [B, Gc^2, D] -> [B, Gf^2, D]: each fine cell gets the coarse token of the cell its centre
        lies in, so the fine view starts from the backbone's semantic features."""
        return c.index_select(1, self.parent_index)

    def distill_loss(self, tokens, teacher):
        """Mean (1 - cos) between the encoder's summary and coarse grid (projected to the teacher's width) and the
        frozen EfficientNet-Lite0 features of the same images: the summary against the teacher's mean token, the
        grid (average-pooled to the teacher's grid side) cell by cell.
        tokens [B, 1 + Gc^2 + k, D]; teacher [B, R, 1280] with R a square (49 at 224 px) -> scalar."""
        B, R, _ = teacher.shape
        grid = tokens[:, 1:1 + self.Gc * self.Gc].transpose(1, 2).reshape(B, -1, self.Gc, self.Gc)
        grid = F.adaptive_avg_pool2d(grid, math.isqrt(R)).flatten(2).transpose(1, 2)  # [B, R, D]
        summary = 1 - F.cosine_similarity(self.distill(tokens[:, 0]), teacher.mean(1), dim=-1)
        cells = 1 - F.cosine_similarity(self.distill(grid), teacher, dim=-1)
        return (summary.mean() + cells.mean()) / 2


TEACHER_DIM = 1280  # EfficientNet-Lite0's feature width


def build_teacher(config) -> nn.Module | None:
    """The frozen EfficientNet-Lite0 whose features --vision_distill_lambda distils into the dual encoder (its
    pooled 7x7 map, cached like any frozen backbone's); None when distillation is off."""
    if not (config.use_image and config.use_dual_granularity and config.vision_distill_lambda > 0):
        return None
    c = copy.copy(config)
    c.image_encoder, c.vision_trainable = "efficientnet_lite0", False
    c.vision_img_size = 224  # its own input size, whatever the student's (its pictures come from images.EFFNET_PREP)
    return PretrainedVision(c)


# ============================================================================ fusion

class VisualResampler(nn.Module):
    """K learned queries read the image tokens (cross-attention + FFN): [B, R, Dv] -> [B, K, D].
    K = 0 turns the resampler off (ablation): the image tokens are only projected, [B, R, Dv] -> [B, R, D]."""

    def __init__(self, in_dim: int, dim: int, tokens: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim))
        self.queries = self.ln_q = self.attn = self.ln_f = self.ffn = None
        if tokens > 0:
            self.queries = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
            self.ln_q, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
            self.ln_f, self.ffn = nn.LayerNorm(dim), MLP(dim, 2 * dim, dropout)

    def forward(self, img):
        kv = self.proj(img)
        if self.queries is None:  # --resampler_tokens 0: the stack reads the projected image tokens directly
            return kv
        q = self.queries.expand(img.size(0), -1, -1)
        x = q + self.attn(self.ln_q(q), kv)
        return x + self.ffn(self.ln_f(x))


class MultimodalStack(nn.Module):
    """N pre-LN blocks over word states: self-attention (padding mask), cross-attention to image tokens, FFN.
    Runs at width fusion_dim (down/up projections around it) so seven layers stay cheap next to the encoder.
    text [B, W, H], mask [B, W] bool, img [B, K, Df] -> image context per word [B, W, H]"""

    def __init__(self, hidden: int, dim: int, layers: int, heads: int, dropout: float = 0.0,
                 checkpointing: bool = False):
        super().__init__()
        self.down, self.up = nn.Linear(hidden, dim), nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout, cross=True, ffn_mult=2) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.checkpointing = checkpointing  # recompute each block in backward: activations of one block, not N

    def forward(self, text, mask, img):
        x = self.down(text)
        m, ck = mask[:, None, None, :], self.checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = torch.utils.checkpoint.checkpoint(blk, x, m, img, use_reentrant=False) if ck else blk(x, m, img)
        return self.up(self.norm(x))


class GatedConcatFusion(nn.Module):
    """How much of the image context each word takes.
    rel  = f + (1 - f) sigmoid(w . [LN(text); LN(ctx)] / T)     per-word relevance in [f, 1] (floor f, temperature T)
    gate = sigmoid(W [text; rel * ctx])                         per-dimension gate
    out  = text + alpha * gate * rel * ctx                      (alpha learnable; residual on the text)
    text, ctx [B, W, H] -> out [B, W, H], rel [B, W]"""

    def __init__(self, hidden: int, temperature: float = 1.0, mode: str = "gated", floor: float = 0.0):
        super().__init__()
        self.mode = mode  # gated | rel (no per-dimension gate) | sum (out = text + ctx: the ablation baseline)
        self.ln_t = self.ln_c = self.rel = None
        if mode != "sum":
            self.ln_t, self.ln_c, self.rel = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.Linear(2 * hidden, 1)
        self.gate = nn.Linear(2 * hidden, hidden) if mode == "gated" else None
        self.alpha = nn.Parameter(torch.tensor(1.0)) if mode != "sum" else None
        self.temperature, self.floor = temperature, floor
        self.keep_weights, self.last_gate = False, None  # like Attention: the gate [B, W, H] kept for explanations

    def forward(self, text, ctx):
        if self.mode == "sum":
            if self.keep_weights:
                self.last_gate = torch.ones_like(ctx).detach()
            return text + ctx, text.new_ones(text.shape[:2])
        rel = torch.sigmoid(self.rel(torch.cat([self.ln_t(text), self.ln_c(ctx)], -1)) / self.temperature)
        rel = self.floor + (1 - self.floor) * rel
        ctx = rel * ctx
        g = torch.sigmoid(self.gate(torch.cat([text, ctx], -1))) if self.gate is not None else 1.0
        if self.keep_weights:
            self.last_gate = g.detach() if self.gate is not None else torch.ones_like(ctx)
        return text + self.alpha * g * ctx, rel.squeeze(-1)


class CoAttention(nn.Module):
    """roberta_clip_coattn's fusion: one co-attention block. Image tokens first read the text (image->text
    attention), then every word reads the updated image tokens (text->image attention); the caller adds the result
    to the word states. text [B, W, H], mask [B, W] bool, img [B, R, Dv] -> [B, W, H]"""

    def __init__(self, hidden: int, in_dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden))
        self.ln_i, self.i2t = nn.LayerNorm(hidden), Attention(hidden, heads)
        self.ln_t, self.t2i = nn.LayerNorm(hidden), Attention(hidden, heads)
        self.ln_f, self.ffn = nn.LayerNorm(hidden), MLP(hidden, 2 * hidden, dropout)

    def forward(self, text, mask, img):
        v = self.proj(img)
        t = self.ln_t(text)
        v = v + self.i2t(self.ln_i(v), t, mask[:, None, None, :])
        ctx = self.t2i(t, v)
        return ctx + self.ffn(self.ln_f(ctx))


# ============================================================================ heads

class SoftmaxHead(nn.Module):
    """Token cross-entropy on each word (label smoothing = the seed's soft labels)."""

    def __init__(self, num_labels: int, label_smoothing: float = 0.0):
        super().__init__()
        self.ls = label_smoothing

    def loss(self, em, labels, mask):
        return F.cross_entropy(em[..., 1:][mask].float(), labels[mask] - 1, label_smoothing=self.ls)  # no PAD target

    def losses(self, *triples):
        return [self.loss(*t) for t in triples]

    def decode(self, em, mask):
        ids = em[..., 1:].argmax(-1) + 1
        return [row[m].tolist() for row, m in zip(ids, mask)]


# ============================================================================ losses

def masked_mean(x, mask):
    """Mean of x [B, W, D] over the words where mask [B, W] is True -> [B, D]."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def residual_loss(text, fused, mask):
    """How far the image moved each word: (1 - cos) + 0.3 * MSE between its text and fused states, averaged uniformly
    over the words in mask: a penalty on the size of the image's contribution, not an alignment. The text side is
    detached (the penalty shrinks the image residual, never drags the text encoder); uniform weights keep the words
    where the image helps (entities) from being pushed back harder than the rest.
    text, fused [B, W, H]; mask [B, W] bool -> scalar (0 when mask is empty)."""
    t = text.detach()
    per = (1 - F.cosine_similarity(t, fused, dim=-1)) + 0.3 * (t - fused).pow(2).mean(-1)
    w = mask.float()
    return (per * w).sum() / w.sum().clamp_min(1e-6)


def info_nce(text_pool, image_pool, tau: float):
    """Symmetric InfoNCE between matched rows of text_pool and image_pool [N, D] (in-batch negatives)."""
    if text_pool.size(0) < 2:
        return text_pool.sum() * 0.0
    logits = F.normalize(text_pool, dim=-1) @ F.normalize(image_pool, dim=-1).t() / tau
    target = torch.arange(logits.size(0), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def image_type_loss(logits, labels):
    """Multi-label BCE: does the post hold an entity of type k? logits [B, K], labels [B, W] label ids, whose
    layout (LabelMap) is PAD, O, then B-/I- pairs per type, so type k owns ids 2 + 2k and 3 + 2k."""
    K = logits.size(1)
    inside = labels >= 2
    types = F.one_hot(((labels - 2).clamp_min(0) // 2).clamp_max(K - 1), K) * inside[..., None]
    return F.binary_cross_entropy_with_logits(logits, types.amax(1).to(logits.dtype))


def tag_distill_loss(log_student, teacher, mask):
    """KL(teacher || student) between tag marginals summed over each post's words, mean over posts (the CRF NLL's
    normalisation, so --distill_lambda 1 weighs them alike): log_student [B, W, L] (CRFHead.log_marginals), teacher
    [B, W, L] probabilities, mask [B, W] -> scalar."""
    kl = (teacher * (teacher.clamp_min(1e-8).log() - log_student)).sum(-1)                 # [B, W]
    return (kl * mask).sum(1).mean()


def warmup_weight(epoch: float, warmup_epochs: int) -> float:
    """w(epoch) = min(1, epoch / warmup); the training loop passes the current epoch (0-based)."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, epoch / warmup_epochs)


# ============================================================================ the model

class Tagger(nn.Module):
    """Text encoder + optional image path + optional BiLSTM + CRF/CE head (see the module docstring)."""

    def __init__(self, config, num_labels: int, fusion: str | None, bilstm: bool, head: str):
        super().__init__()
        self.config, self.num_labels, self.fusion_kind = config, num_labels, fusion
        p = config.drop_prob
        self.text = TextEncoder(config)
        H = self.text.hidden
        # an uncased encoder cannot see "apple" vs "Apple"; the word shape gives it back
        self.case = nn.Embedding(len(D.CASE_SHAPES), H, padding_idx=0) if config.case_features else None
        self.drop = nn.Dropout(p)
        self.vision = self.resampler = self.stack = self.gate = self.coattn = self.nce_proj = self.type_head = None
        if fusion:
            self.vision = DualGranularityEncoder(config) if config.use_dual_granularity else PretrainedVision(config)
            Dv, heads = self.vision.out_dim, config.cross_attn_heads
            if fusion == "stack":
                self.resampler = VisualResampler(Dv, config.fusion_dim, config.resampler_tokens, heads, p)
                self.stack = MultimodalStack(H, config.fusion_dim, config.fusion_layers, heads, p,
                                             config.grad_checkpointing)
                self.gate = GatedConcatFusion(H, config.rel_temperature, config.fusion_gate, config.rel_floor)
                self.nce_proj = nn.Linear(Dv, H)
                # which entity types occur in the post, from the pooled image alone: a direct image-level signal
                # for a vision encoder trained from scratch (the tagging loss reaches it only through the fusion)
                self.type_head = nn.Linear(Dv, (num_labels - 2) // 2) if config.image_type_lambda > 0 else None
            else:
                self.coattn = CoAttention(H, Dv, heads, p)
        self.lstm = nn.LSTM(H, config.hidden_dim, batch_first=True, bidirectional=True) if bilstm else None
        out = 2 * config.hidden_dim if bilstm else H
        bioes = head == "crf" and config.tag_scheme == "bioes"
        self.emit = nn.Linear(out, len(bioes_to_bio(num_labels)) if bioes else num_labels)  # before the head: seeds
        self.head = CRFHead(num_labels, config.bio_constraints, bioes) if head == "crf" else \
            SoftmaxHead(num_labels, config.label_smoothing)

    # -- parameter groups for the optimiser (train.py): text encoder / pretrained vision / tagging head / the rest
    HEAD_PREFIXES = ("case.", "lstm.", "emit.", "head.")

    def param_groups(self, crf_group=False) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """{text, vision, head, crf, rest: [(name, parameter)]} in named_parameters order; crf_group gives the CRF's
        scores their own group (--crf_lr), else they are the head's."""
        groups = {"text": [], "vision": [], "head": [], "crf": [], "rest": []}
        pretrained = ("vision.",) if isinstance(self.vision, PretrainedVision) else \
            ("vision.stem.",) if isinstance(getattr(self.vision, "stem", None), EfficientNetStem) else ()
        for n, prm in self.named_parameters():
            if not prm.requires_grad:
                continue
            g = "crf" if crf_group and n.startswith("head.crf.") else \
                "head" if n.startswith(self.HEAD_PREFIXES) else "text" if n.startswith("text.") else \
                "vision" if pretrained and n.startswith(pretrained) else "rest"
            groups[g].append((n, prm))
        return groups

    @property
    def iob2_targets(self) -> bool:
        """Train on IOB2 labels (dataloader.iob2): a CRF that decodes with the BIO bans, scored by conlleval (which
        reads a chunk opened by I- as the B- one; --eval_mode strict reads it as no entity, so its targets stay)."""
        return isinstance(self.head, CRFHead) and self.head.bio and self.config.eval_mode == "conlleval"

    @property
    def uses_image(self) -> bool:
        return self.fusion_kind is not None

    def image_tokens(self, batch, rows):
        """[n, R, Dv] for the posts `rows` [n] (those with a usable image), from cached features or pixels: only
        these rows enter the vision encoder, so placeholders never reach its BatchNorm statistics or its compute."""
        if "image_feats" in batch:
            return self.vision.from_features(batch["image_feats"][rows])
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision.trainable):
            return self.vision(batch["pixel_values"][rows])

    def _emissions(self, h, mask):
        if self.lstm is not None:
            lengths = mask.sum(1).clamp_min(1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
            h = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=h.size(1))[0]
        return self.emit(self.drop(h))

    def forward(self, batch, epoch: float = 0.0, image_on: bool = True):
        cfg, mask = self.config, batch["word_mask"]
        text = self.text(batch["input_ids"], batch["attention_mask"], batch["word_index"])  # [B, W, H]
        if self.case is not None:
            text = text + self.case(batch["case_ids"])
        text = self.drop(text)
        B, W, _ = text.shape
        zero = text.new_zeros(())
        parts = dict.fromkeys(["residual", "preserve", "nce", "sparsity", "image_types", "distill", "tag_distill"],
                              zero)
        rel = torch.zeros(B, W, device=text.device)
        fused, img = text, None
        if self.uses_image and image_on and cfg.use_image:
            has = batch["has_image"].to(text.device)
            if self.training and cfg.image_dropout_p > 0:
                has = has & (torch.rand(B, device=text.device) >= cfg.image_dropout_p)
            rows = has.nonzero().squeeze(1)
            if rows.numel():  # a batch with no usable image skips the vision encoder (text cost only)
                # the image path runs on the posts with an image only; the others keep the text path exactly
                img, t, m = self.image_tokens(batch, rows).to(text.dtype), text[rows], mask[rows]
                if self.stack is not None:
                    fused_rows, rel_rows = self.gate(t, self.stack(t, m, self.resampler(img)))
                    rel = rel.index_put((rows,), rel_rows.to(rel.dtype))
                else:
                    fused_rows = t + self.coattn(t, m, img)
                fused = text.index_put((rows,), fused_rows.to(text.dtype))
        em = self._emissions(fused, mask)
        out = {"emissions": em, "rel": rel}
        if "labels" not in batch:
            return out
        labels, tagged = batch["labels"], (em, batch["labels"], mask)
        if "labelled" in batch:  # distillation's unlabelled posts (never with an image) have no tag loss
            keep = batch["labelled"].nonzero().squeeze(1)
            tagged = (em[keep], labels[keep], mask[keep])
        if img is None or self.stack is None:
            loss = parts["tag"] = self.head.loss(*tagged) if len(tagged[0]) else zero
        else:  # the auxiliary losses of the posts with an image
            # the preserve loss (text-only emissions of the posts with an image) shares the tagging loss's CRF pass
            loss, parts["preserve"] = self.head.losses(tagged, (self._emissions(t, m), labels[rows], m))
            parts["tag"] = loss
            parts["residual"] = residual_loss(t, fused_rows, m)
            parts["nce"] = info_nce(masked_mean(t, m), self.nce_proj(img.mean(1)), cfg.nce_temperature)
            parts["sparsity"] = rel_rows[m].mean()
            if self.type_head is not None:
                parts["image_types"] = image_type_loss(self.type_head(img.mean(1)), labels[rows])
            if getattr(self.vision, "distill", None) is not None and "teacher_feats" in batch:
                parts["distill"] = self.vision.distill_loss(img, batch["teacher_feats"][rows].to(img.dtype))
            loss = sum([cfg.residual_lambda * warmup_weight(epoch, cfg.residual_warmup_epochs) * parts["residual"],
                        cfg.preserve_lambda * parts["preserve"], cfg.nce_lambda * parts["nce"],
                        cfg.sparsity_lambda * parts["sparsity"], cfg.image_type_lambda * parts["image_types"],
                        cfg.vision_distill_lambda * parts["distill"]], loss)
        if "teacher_marg" in batch and cfg.distill_lambda > 0:
            T = cfg.distill_temperature  # scaled by T^2 so its gradient keeps its size across temperatures
            parts["tag_distill"] = T * T * tag_distill_loss(self.head.log_marginals(em, mask, T),
                                                            batch["teacher_marg"].to(em.dtype), mask)
            loss = loss + cfg.distill_lambda * parts["tag_distill"]
        out["loss"] = loss
        out["parts"] = {k: v.detach() for k, v in parts.items()}
        return out

    @torch.no_grad()
    def decode(self, batch, image_on: bool = True) -> list[list[int]]:
        b = {k: v for k, v in batch.items() if k != "labels"}
        em = self.forward(b, image_on=image_on)["emissions"]
        return self.head.decode(em, batch["word_mask"])


# ============================================================================ registry

MODELS = {
    # name: (fusion, bilstm, head) -- None means "take it from the config"
    "MNER": ("stack", None, None),
    "roberta_clip_coattn": ("coattn", False, "crf"),
    "roberta_crf": (None, False, "crf"),
    "bert_bilstm_crf": (None, True, "crf"),
    "bert": (None, False, "softmax"),
}


def build_model(config, num_labels: int = 10) -> Tagger:
    """The model named by config.model (10 labels = PAD, O and B/I of PER, LOC, ORG, MISC)."""
    if config.model not in MODELS:
        raise ConfigError(f"--model {config.model!r} is unknown; choose one of {', '.join(MODELS)}")
    fusion, bilstm, head = MODELS[config.model]
    return Tagger(config, num_labels, fusion if config.use_image else None,
                  config.use_bilstm if bilstm is None else bilstm, config.head if head is None else head)


def unused_flags(config, given: set[str]) -> list[str]:
    """Flags written out (`given`: config.given_flags(argv)) that this model would ignore: a value the registry
    entry contradicts raises ConfigError (one line naming the flag and the fix); a flag whose part (its `applies`
    metadata, config.APPLIES) this model lacks comes back as a `--X does nothing with ...` line for a warning."""
    if config.model not in MODELS:
        return []  # build_model names the unknown model
    fusion, bilstm, head = MODELS[config.model]
    model = f"--model {config.model}"
    if "head" in given and head is not None and config.head != head:
        raise ConfigError(f"--head {config.head}: {model} always has a {head} head (only MNER takes --head); drop the "
                          f"flag, or use --model {'bert' if config.head == 'softmax' else 'roberta_crf'}")
    if "use_bilstm" in given and bilstm is False and config.use_bilstm:
        raise ConfigError(f"--use_bilstm: {model} has no BiLSTM (only MNER takes --use_bilstm); drop "
                          "the flag, or use --model bert_bilstm_crf")
    head = config.head if head is None else head
    if config.teacher_run and head != "crf":
        raise ConfigError(f"--teacher_run: the student learns CRF tag marginals; {model} has a {head} "
                          "head: use a CRF model")
    image = bool(fusion) and config.use_image
    dual = image and config.use_dual_granularity
    no_image = f"{model}{'' if config.use_image else ' --no-use_image'}"
    # each part a flag may apply to: None when this model has it, else what it has instead (the warning's words)
    why = {
        "bilstm": None if (config.use_bilstm if bilstm is None else bilstm) else
            f"{model} without a BiLSTM (it sizes the BiLSTM: --use_bilstm with MNER, or --model bert_bilstm_crf)",
        "softmax": None if head == "softmax" else f"the {head} head of {model} (it acts on the softmax head)",
        "crf": None if head == "crf" else f"the softmax head of {model} (it acts on the CRF)",
        "relevance": f"{no_image} (only MNER's image fusion has a per-word relevance)"
            if not (fusion == "stack" and config.use_image) else
            "--fusion_gate sum (that fusion has no per-word relevance)" if config.fusion_gate == "sum" else None,
        "teacher": None if config.teacher_run else "no --teacher_run (it shapes learning from a teacher's marginals)",
        "image": None if image else f"{no_image} (no image path)",
        "stack": None if fusion == "stack" and config.use_image else f"{no_image} (no image path)" if not image else
            f"the co-attention of {model} (it acts on MNER's fusion stack)",
        "trainable_vision": None if config.vision_trainable else
            "a frozen vision encoder (it counts the blocks --vision_trainable trains)",
        "sized_vision": f"{no_image} (no image path)" if not image else None
            if dual or config.image_encoder == "efficientnet_lite0" else "a CLIP encoder (it reads its own image size)",
        "dual": None if dual else "no dual-granularity encoder (add --use_dual_granularity to an image model)",
        "pretrained_vision": f"{no_image} (no image path)" if not image else
            "--vision_stem conv (that stem always trains)" if dual and config.vision_stem == "conv" else None,
    }
    return [f"--{k} does nothing with {why[part]}" for k, part in APPLIES.items() if k in given and why[part]]


def check_flags(config, given: set[str]) -> None:
    """unused_flags, its warnings printed once (`warning: --X does nothing with ...`)."""
    for w in unused_flags(config, given):
        print(f"warning: {w}")
