"""model.py: registry, shapes, padding invariance, text-only equivalence, gradient flow, CRF, losses, pretrained
weights, the EfficientNet-Lite0 checksum, the dual-granularity encoder and image dropout.

Everything runs on tiny random encoders (conftest fixtures), batches of <= 4 short posts and tiny images.
"""
from __future__ import annotations

import functools
import itertools
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import config as cfgmod
import dataloader as dl
import efficientnet as E
import model as M
from dataloader import LabelMap, Post
from crf import CRFHead, bio_to_bioes

LABELS = LabelMap(["<PAD>", "O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"])
NL = len(LABELS)
POSTS = [
    Post(["Obama", "visits", "Paris", "today"], ["B-PER", "O", "B-LOC", "O"], "1"),
    Post(["New", "York", "Knicks", "win", "again", "!"], ["B-ORG", "I-ORG", "I-ORG", "O", "O", "O"], "2"),
    Post(["lol"], ["O"], "3"),
    Post(["Barack", "Obama", "in", "Berlin", "#EU"], ["B-PER", "I-PER", "O", "B-LOC", "B-MISC"], "4"),
]
PART_KEYS = {"tag", "residual", "preserve", "nce", "sparsity", "image_types", "distill", "tag_distill"}
IMAGE_MODELS = [n for n, (fusion, *_) in M.MODELS.items() if fusion]
TEXT_MODELS = [n for n in M.MODELS if n not in IMAGE_MODELS]

TINY_FUSION = dict(fusion_layers=2, fusion_dim=16, cross_attn_heads=2, resampler_tokens=4, hidden_dim=8)
TINY_DUAL = dict(use_dual_granularity=True, vision_stem="conv", vision_img_size=32, vision_patch_size=8,
                 vision_fine_patch_size=4,
                 vision_embed_dim=32, vision_heads=2, vision_depth=1, vision_swin_window=2,
                 vision_delegate_topk=4, vision_max_patches=16)
EFFNET_PX = 64  # the CNN pads "same", so small images keep it cheap (2x2 region tokens)


# ----------------------------------------------------------------------------- helpers

def make_config(text_dir="minilm", vision=None, **kw):
    """Defaults + tiny fusion sizes. vision: None/"effnet" (shipped EfficientNet-Lite0), "dual", or a CLIP dir."""
    c = cfgmod.get_config()
    c.text_encoder = text_dir
    if vision == "dual":
        kw = {**TINY_DUAL, **kw}
    elif vision not in (None, "effnet"):
        c.image_encoder = vision
    for k, v in {**TINY_FUSION, **kw}.items():
        assert hasattr(c, k), k
        setattr(c, k, v)
    cfgmod.validate(c)
    return c


def build(text_dir, name="MNER", vision=None, seed=0, **kw) -> M.Tagger:
    torch.manual_seed(seed)
    return M.build_model(make_config(text_dir, vision, model=name, **kw), NL)


@functools.lru_cache(maxsize=None)
def _tokenizer(text_dir):
    c = cfgmod.get_config()
    c.text_encoder = text_dir
    return M.load_tokenizer(c)


def text_batch(model, posts=POSTS) -> dict:
    tok = _tokenizer(model.config.text_encoder)
    ds = dl.MNERDataset(posts, tok, LABELS, 64)
    return dl.collate([ds[i] for i in range(len(ds))], ds.pad_id)


def with_images(model, batch, has=None, seed=1) -> dict:
    """A copy of batch with random pixels [B, 3, S, S] and has_image (all True unless given)."""
    B = batch["input_ids"].size(0)
    S = EFFNET_PX if model.config.image_encoder == "efficientnet_lite0" and not model.config.use_dual_granularity \
        else dl.image_prep_for(model.config).size
    g = torch.Generator().manual_seed(seed)
    b = dict(batch)
    b["pixel_values"] = torch.rand(B, 3, S, S, generator=g) * 2 - 1
    b["has_image"] = torch.ones(B, dtype=torch.bool) if has is None else torch.tensor(has)
    return b


def pad_more(batch, pad_id, extra_t=3, extra_w=2) -> dict:
    """The same posts with extra pad sub-tokens and extra padded words appended."""
    B = batch["input_ids"].size(0)
    cat = lambda k, fill, n, dt: torch.cat([batch[k], torch.full((B, n), fill, dtype=dt)], 1)
    b = dict(batch)
    b["input_ids"] = cat("input_ids", pad_id, extra_t, torch.long)
    b["attention_mask"] = cat("attention_mask", 0, extra_t, torch.long)
    b["word_index"] = cat("word_index", 0, extra_w, torch.long)
    b["word_mask"] = cat("word_mask", False, extra_w, torch.bool)
    b["labels"] = cat("labels", 0, extra_w, torch.long)
    b["case_ids"] = cat("case_ids", 0, extra_w, torch.long)
    return b


def rows(batch, idx) -> dict:
    """Sub-batch of the given rows, trimmed to its own longest post (no extra padding)."""
    b = {k: v[idx] for k, v in batch.items()}
    T, W = int(b["attention_mask"].sum(1).max()), int(b["word_mask"].sum(1).max())
    for k in ("input_ids", "attention_mask"):
        b[k] = b[k][:, :T]
    for k in ("word_index", "word_mask", "labels", "case_ids"):
        b[k] = b[k][:, :W]
    return b


def autograd_leaves(t) -> set[int]:
    """ids of the leaf tensors that t's autograd graph accumulates into."""
    seen, out, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            out.add(id(fn.variable))
        stack += [f for f, _ in fn.next_functions]
    return out


@pytest.fixture(params=["bert", "roberta"])
def text_dir(request):
    return request.getfixturevalue(f"tiny_{request.param}_dir")


# Attention key biases add the same q.b_k to every score of a query, which softmax cancels: their gradient is
# exactly zero in exact arithmetic (rounding leaves ~1e-10). That holds for BERT's own key.bias too.
KEY_BIAS = re.compile(r"(\.k|\.key|\.k_proj)\.bias$")


def assert_learns(named_params):
    """Every trainable parameter gets a finite gradient that is non-zero (key biases: zero up to rounding)."""
    for n, p in named_params:
        if not p.requires_grad:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if KEY_BIAS.search(n):
            assert p.grad.abs().max() < 1e-6, n
        else:
            assert p.grad.abs().sum() > 0, n


def vision_of(request, kind):
    return request.getfixturevalue("tiny_clip_dir") if kind == "clip" else kind


# ----------------------------------------------------------------------------- registry and shapes

# every model with tiny BERT and tiny RoBERTa (image models on tiny CLIP); image models also on the shipped
# EfficientNet-Lite0 and on the dual-granularity encoder (with tiny BERT: the text side is independent of them)
REGISTRY_CASES = ([(t, n, "clip") for t in ("bert", "roberta") for n in M.MODELS]
                  + [("bert", n, v) for n in IMAGE_MODELS for v in ("effnet", "dual")])


@pytest.mark.parametrize("enc,name,vision", REGISTRY_CASES, ids=["-".join(c) for c in REGISTRY_CASES])
def test_build_and_forward_contract(request, enc, name, vision):
    model = build(request.getfixturevalue(f"tiny_{enc}_dir"), name, vision_of(request, vision))
    fusion, bilstm, head = M.MODELS[name]
    assert model.uses_image == bool(fusion) and (model.vision is None) == (not fusion)
    assert (model.lstm is not None) == bool(bilstm)
    assert isinstance(model.head, M.SoftmaxHead if head == "softmax" else CRFHead)
    if fusion:
        want = M.DualGranularityEncoder if vision == "dual" else M.PretrainedVision
        assert isinstance(model.vision, want)
    batch = text_batch(model)
    if fusion:
        batch = with_images(model, batch, has=[True, False, True, True])
    B, W = batch["word_mask"].shape
    model.train()
    out = model(batch, epoch=5)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert set(out["parts"]) == PART_KEYS
    assert all(v.dim() == 0 and not v.requires_grad for v in out["parts"].values())
    out["loss"].backward()
    model.eval()
    with torch.no_grad():
        out = model({k: v for k, v in batch.items() if k != "labels"})
    assert set(out) == {"emissions", "rel"}
    assert out["emissions"].shape == (B, W, NL) and out["rel"].shape == (B, W)
    if not fusion:
        assert torch.equal(out["rel"], torch.zeros(B, W))
    pred = model.decode(batch)
    assert [len(p) for p in pred] == batch["word_mask"].sum(1).tolist()
    assert all(1 <= y < NL for p in pred for y in p)
    if fusion:  # what the feature cache keeps (tokens; the dual encoder's stem maps) gives the same result
        feats = model.vision.features(batch["pixel_values"])
        R = model.vision.n_tokens if vision != "effnet" else (EFFNET_PX // 32) ** 2
        assert feats.shape == ((B, *model.vision.feat_shape) if vision == "dual" else (B, R, model.vision.out_dim))
        fb = {k: v for k, v in batch.items() if k not in ("pixel_values", "labels")}
        fb["image_feats"] = feats
        with torch.no_grad():
            torch.testing.assert_close(model(fb)["emissions"], out["emissions"])


def test_mner_config_head_and_bilstm(tiny_bert_dir):
    model = build(tiny_bert_dir, "MNER", "dual", head="softmax", use_bilstm=True)
    assert isinstance(model.head, M.SoftmaxHead) and model.lstm is not None
    b = with_images(model, text_batch(model))
    assert model(b)["emissions"].shape == (*b["word_mask"].shape, NL)
    assert [len(p) for p in model.eval().decode(b)] == b["word_mask"].sum(1).tolist()


def test_use_image_off_builds_text_only(tiny_bert_dir, tiny_clip_dir):
    model = build(tiny_bert_dir, "MNER", tiny_clip_dir, use_image=False)
    assert model.vision is None and not model.uses_image


def test_cpu_bf16_text_attention_takes_the_plain_product(tiny_bert_dir, monkeypatch):
    """Under CPU bf16 autocast the text encoder attends without torch's fused kernel (slow backward there), with the
    same states to bf16 precision; outside autocast it is back on the implementation it loaded with."""
    model = build(tiny_bert_dir, "roberta_crf").eval()
    b = text_batch(model)
    args = (b["input_ids"], b["attention_mask"], b["word_index"])
    fused = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    loaded = model.text.model.config._attn_implementation
    assert loaded == "sdpa"
    with torch.no_grad():
        ref = model.text(*args)
        n_fp32 = len(calls)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.text(*args)
        assert len(calls) == n_fp32
        torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)
        again = model.text(*args)
    assert model.text.model.config._attn_implementation == loaded
    torch.testing.assert_close(again, ref)
    assert n_fp32 > 0 and len(calls) > n_fp32


def test_unknown_model_name(tiny_bert_dir):
    c = make_config(tiny_bert_dir, model="bert_gpt_crf")
    with pytest.raises(ValueError) as e:
        M.build_model(c, NL)
    assert "bert_gpt_crf" in str(e.value)
    assert all(n in str(e.value) for n in M.MODELS)


def test_readme_snippet(tiny_bert_dir):
    config = cfgmod.get_config(["--use_dual_granularity", "--vision_depth", "8"])  # auto values resolve from flags
    config.text_encoder = tiny_bert_dir
    config.residual_lambda = 0.3
    torch.manual_seed(0)
    model = M.build_model(config)
    assert isinstance(model.vision, M.DualGranularityEncoder) and len(model.vision.fine) == 8
    twitter = LabelMap.from_posts(dl.read_conll(dl.DATA_DIR / "twitter2017" / "train.txt"))
    assert model.num_labels == len(twitter)  # the default fits PAD, O and B/I of the four types
    b = with_images(model, text_batch(model, POSTS[:1]))
    assert dl.image_prep_for(config).size == 288 and b["pixel_values"].shape[-1] == 288
    out = model(b)
    assert out["emissions"].shape == (1, 4, model.num_labels) and torch.isfinite(out["loss"])


# ----------------------------------------------------------------------------- invariances

@pytest.mark.parametrize("name", list(M.MODELS))
def test_padding_invariance(request, text_dir, name):
    model = build(text_dir, name, vision_of(request, "clip")).eval()
    batch = text_batch(model)
    if model.uses_image:
        batch = with_images(model, batch, has=[True, True, False, True])
    pad_id = _tokenizer(text_dir).pad_token_id
    padded = pad_more(batch, pad_id)
    with torch.no_grad():
        a, b = model(batch), model(padded)
    W, m = batch["word_mask"].size(1), batch["word_mask"]
    torch.testing.assert_close(b["emissions"][:, :W][m], a["emissions"][m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["rel"][:, :W][m], a["rel"][m], atol=1e-5, rtol=1e-5)
    pred = model.decode(batch)
    assert model.decode(padded) == pred
    # a post alone (no padding at all) is predicted as inside the padded batch
    for i in range(len(POSTS)):
        assert model.decode(rows(batch, [i])) == [pred[i]]


@pytest.mark.parametrize("name,vision", [("MNER", "clip"), ("MNER", "dual"), ("roberta_clip_coattn", "clip"),
                                         ("roberta_clip_coattn", "effnet")])
def test_no_image_is_text_only_path(request, tiny_bert_dir, name, vision):
    model = build(tiny_bert_dir, name, vision_of(request, vision)).eval()
    tb = text_batch(model)
    em = lambda b, **kw: model(b, **kw)["emissions"]
    with torch.no_grad():
        text = em(tb)
        full = with_images(model, tb)
        assert torch.equal(em(full, image_on=False), text)
        assert torch.equal(em(with_images(model, tb, has=[False] * 4)), text)
        mixed = with_images(model, tb, has=[True, False, True, False])
        out = model(mixed)
        assert torch.equal(out["emissions"][[1, 3]], text[[1, 3]])
        assert torch.equal(out["rel"][[1, 3]], torch.zeros(2, out["rel"].size(1)))
        assert not torch.allclose(out["emissions"][[0, 2]], text[[0, 2]])  # the image path is live
    assert model.decode(full, image_on=False) == model.decode(tb)


# ----------------------------------------------------------------------------- gradient flow

LOSS_ON = dict(residual_lambda=0.3, residual_warmup_epochs=2, preserve_lambda=0.2, nce_lambda=0.2, sparsity_lambda=0.1,
               image_type_lambda=0.5, image_dropout_p=0.0, drop_prob=0.0)
GRAD_CASES = [("clip", 0), ("clip", 1), ("dual", 0), ("effnet", 0), ("effnet", 1)]


@pytest.mark.parametrize("vision,unfreeze", GRAD_CASES, ids=[f"{v}-unfreeze{n}" for v, n in GRAD_CASES])
def test_every_trainable_parameter_gets_a_gradient(request, tiny_bert_dir, vision, unfreeze):
    dual = vision == "dual"  # with the distillation head of its from-scratch stem
    model = build(tiny_bert_dir, "MNER", vision_of(request, vision), vision_trainable=unfreeze > 0,
                  unfreeze_last_vision_blocks=unfreeze, vision_distill_lambda=float(dual), **LOSS_ON).train()
    batch = with_images(model, text_batch(model))
    if dual:
        batch["teacher_feats"] = torch.randn(batch["input_ids"].size(0), 4, 1280)
    out = model(batch, epoch=2)
    off = {"tag_distill"} | (set() if dual else {"distill"})  # no teacher marginals in this batch
    assert all(out["parts"][k] > 0 for k in PART_KEYS - off), out["parts"]
    out["loss"].backward()
    pretrained = isinstance(model.vision, M.PretrainedVision)
    assert_learns(model.named_parameters())
    for n, p in model.named_parameters():
        if not p.requires_grad:  # frozen on purpose: the pretrained backbone, the word-embedding matrix (default)
            assert (pretrained and n.startswith("vision.net.") or n == "text.model.embeddings.word_embeddings.weight") \
                and p.grad is None, n
    if pretrained:
        trainable = {n for n, p in model.vision.named_parameters() if p.requires_grad}
        assert bool(trainable) == (unfreeze > 0)


@pytest.mark.parametrize("vision,n", [("effnet", 2), ("effnet", 0), ("clip", 1), ("clip", 2)])
def test_unfreeze_last_blocks_and_param_groups(request, tiny_bert_dir, vision, n):
    model = build(tiny_bert_dir, "MNER", vision_of(request, vision), vision_trainable=True,
                  unfreeze_last_vision_blocks=n)
    total = {"effnet": 16, "clip": 2}[vision]  # EfficientNet _blocks; CLIP encoder layers (tiny CLIP has 2)
    prefix = next(k for k, m in model.vision.named_modules() if m is model.vision.blocks) + "."
    assert len(model.vision.blocks) == total and prefix.endswith(("net._blocks.", "encoder.layers."))
    want = {f"{prefix}{i}." for i in range(total - n, total)}
    trainable = {k for k, p in model.vision.named_parameters() if p.requires_grad}
    assert all(any(k.startswith(w) for w in want) for k in trainable)
    blocks = {f"{prefix}{k[len(prefix):].split('.')[0]}." for k in trainable}
    assert blocks == want
    whole_blocks = {k for k, _ in model.vision.named_parameters() if any(k.startswith(w) for w in want)}
    assert trainable == whole_blocks
    assert model.vision.trainable == (n > 0)
    groups = model.param_groups()
    assert {k for k, _ in groups["vision"]} == {f"vision.{k}" for k in trainable}
    assert groups["text"] and all(k.startswith("text.") for k, _ in groups["text"])
    assert all(not k.startswith(("text.", "vision.")) for k, _ in groups["rest"])
    named = [k for g in groups.values() for k, _ in g]
    assert sorted(named) == sorted(k for k, p in model.named_parameters() if p.requires_grad)


def test_param_groups_dual_granularity_is_rest(tiny_bert_dir):
    model = build(tiny_bert_dir, "MNER", "dual")
    groups = model.param_groups()
    assert groups["vision"] == []
    rest = {k for k, _ in groups["rest"]}
    assert {f"vision.{k}" for k, _ in model.vision.named_parameters()} <= rest
    assert {"vision.coarse_pos", "vision.fine_pos"} <= rest


# ----------------------------------------------------------------------------- CRF

def crf_score(crf, em, y):
    s = crf.start_transitions[y[0]] + em[0, y[0]] + crf.end_transitions[y[-1]]
    for i in range(1, len(y)):
        s = s + crf.transitions[y[i - 1], y[i]] + em[i, y[i]]
    return s


@pytest.mark.parametrize("seed", range(3))
def test_crf_decode_and_loss_brute_force(seed):
    torch.manual_seed(seed)
    head = CRFHead(4)
    with torch.no_grad():
        for p in head.crf.parameters():
            p.normal_(0, 1.0)
    lengths = [4, 3, 1, 2]
    W = max(lengths)
    em = torch.randn(len(lengths), W, 4) * 2
    em[1, :, 0] = 50.0  # a huge PAD emission still never decodes to PAD
    mask = torch.arange(W)[None] < torch.tensor(lengths)[:, None]
    labels = torch.randint(1, 4, (len(lengths), W)) * mask
    got = head.decode(em, mask)
    nll = []
    with torch.no_grad():
        for b, n in enumerate(lengths):
            seqs = list(itertools.product(range(1, 4), repeat=n))  # PAD (0) excluded
            scores = torch.stack([crf_score(head.crf, em[b], y) for y in seqs])
            assert got[b] == list(seqs[int(scores.argmax())])
            nll.append(scores.logsumexp(0) - crf_score(head.crf, em[b], labels[b, :n].tolist()))
        torch.testing.assert_close(head.loss(em, labels, mask), torch.stack(nll).mean(), atol=1e-4, rtol=1e-5)
    assert all(0 not in p for p in got)


def valid_bio(y) -> bool:
    """Label ids in LabelMap's layout (1 = O, then B/I pairs: 2 B-X, 3 I-X, 4 B-Y, 5 I-Y): no I- after O or another type."""
    return all(t % 2 == 0 or t == 1 or (i and y[i - 1] in (t - 1, t)) for i, t in enumerate(y))


@pytest.mark.parametrize("seed", range(3))
def test_bio_constrained_decode_is_the_best_valid_path(seed):
    """bio=True: Viterbi returns the best-scoring path among valid BIO paths (brute force over them); the CRF's own
    parameters and loss are those of the unconstrained head; without bio the decode is pytorch-crf's, label for label."""
    torch.manual_seed(seed)
    L = 6  # PAD, O, B-X, I-X, B-Y, I-Y
    head, plain = CRFHead(L, bio=True), CRFHead(L)
    with torch.no_grad():
        for p in head.crf.parameters():
            p.normal_(0, 1.0)
    plain.load_state_dict(head.state_dict())
    lengths = [4, 3, 1, 2, 4]
    W = max(lengths)
    em = torch.randn(len(lengths), W, L) * 2
    em[0, 0, 3] = em[0, 2, 5] = 20.0  # I-X first and I-Y after O: the unconstrained path takes them
    mask = torch.arange(W)[None] < torch.tensor(lengths)[:, None]
    got, free = head.decode(em, mask), plain.decode(em, mask)
    assert free == plain.crf.decode(CRFHead._pin(em), mask=mask)
    assert not valid_bio(free[0]) and all(valid_bio(p) for p in got)
    with torch.no_grad():
        for b, n in enumerate(lengths):
            seqs = [y for y in itertools.product(range(1, L), repeat=n) if valid_bio(y)]
            scores = torch.stack([crf_score(head.crf, em[b], y) for y in seqs])
            assert got[b] == list(seqs[int(scores.argmax())])
    labels = torch.randint(1, L, (len(lengths), W)) * mask
    torch.testing.assert_close(head.loss(em, labels, mask), plain.loss(em, labels, mask))
    assert [n for n, _ in head.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert set(head.state_dict()) == set(plain.state_dict())  # the bans are not saved: old checkpoints load


@pytest.mark.parametrize("seed", range(3))
def test_bioes_crf_scores_chunk_ends_and_decodes_valid_bio(seed):
    """bioes=True: the CRF scores BIOES tags (4 per type); its loss is the NLL of the gold BIO labels' BIOES path
    over every path (brute force), and with bio=True Viterbi is the best valid BIOES path, returned as BIO ids."""
    torch.manual_seed(seed)
    L = 6                                                   # PAD, O, B-X, I-X, B-Y, I-Y -> S = 10 BIOES scores
    head = CRFHead(L, bio=True, bioes=True)
    assert head.n_scores == 10 and head.to_bio.tolist() == [0, 1, 2, 3, 3, 2, 4, 5, 5, 4]
    with torch.no_grad():
        for p in head.crf.parameters():
            p.normal_(0, 1.0)
    lengths = [4, 3, 1]
    W = max(lengths)
    em = torch.randn(len(lengths), W, 10) * 2
    mask = torch.arange(W)[None] < torch.tensor(lengths)[:, None]
    gold = torch.tensor([[2, 3, 1, 4], [4, 5, 5, 0], [2, 0, 0, 0]])
    assert bio_to_bioes(gold, mask).tolist() == [[2, 4, 1, 9], [6, 7, 8, 0], [5, 0, 0, 0]]
    got = head.decode(em, mask)
    pinned = CRFHead._pin(em)
    with torch.no_grad():
        for b, n in enumerate(lengths):
            bio = [y for y in itertools.product(range(1, L), repeat=n) if valid_bio(y)]
            paths = bio_to_bioes(torch.tensor([list(y) for y in bio]), torch.ones(len(bio), n, dtype=torch.bool))
            scores = torch.stack([crf_score(head.crf, em[b], y.tolist()) for y in paths])
            assert got[b] == list(bio[int(scores.argmax())])
            every = torch.stack([crf_score(head.crf, pinned[b], list(y))
                                 for y in itertools.product(range(1, 10), repeat=n)])
            gold_path = paths[bio.index(tuple(gold[b, :n].tolist()))].tolist()
            nll = every.logsumexp(0) - crf_score(head.crf, pinned[b], gold_path)
            torch.testing.assert_close(head.nll(em, gold, mask)[b], nll, atol=1e-3, rtol=1e-5)


def test_softmax_head_never_decodes_pad():
    head = M.SoftmaxHead(4)
    em = torch.zeros(1, 3, 4)
    em[..., 0] = 10.0
    em[0, :, 2] = 1.0
    assert head.decode(em, torch.tensor([[True, True, False]])) == [[2, 2]]


# ----------------------------------------------------------------------------- losses

def test_residual_loss_on_a_hand_made_case():
    """The penalty measures how far fusion moved each word, weighted the same on every scored word."""
    text = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    fused = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])  # word 0 unmoved, word 1 turned 90 degrees
    mask = torch.tensor([[True, True, False]])                       # word 2 is padding
    # word 0: 0; word 1: (1 - cos 90deg) + 0.3 * mean((0-2)^2, (2-0)^2) = 1 + 1.2
    torch.testing.assert_close(M.residual_loss(text, fused, mask), torch.tensor((0.0 + 2.2) / 2))
    assert M.residual_loss(text, fused, torch.zeros_like(mask)) == 0  # nothing scored
    t = text.clone().requires_grad_(True)
    M.residual_loss(t, fused.requires_grad_(True), mask).backward()
    assert t.grad is None or not t.grad.any()  # the text side is the anchor


def test_info_nce_units():
    torch.manual_seed(0)
    for n in (0, 1):
        v = M.info_nce(torch.randn(n, 8), torch.randn(n, 8), 0.15)
        assert v.dim() == 0 and v.item() == 0
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    assert M.info_nce(a, b, 0.15) > 0 and torch.isclose(M.info_nce(a, b, 0.15), M.info_nce(b, a, 0.15))
    assert M.info_nce(a, a * 2, 0.15) < M.info_nce(a, b, 0.15)  # matched rows score better than random ones
    assert M.info_nce(a, a * 2, 0.05) < M.info_nce(a, a * 2, 0.5)  # --nce_temperature sharpens the match


@pytest.mark.parametrize("epoch,warmup,w", [(0, 2, 0.0), (1, 2, 0.5), (2, 2, 1.0), (7, 2, 1.0), (0.5, 4, 0.125),
                                            (0, 0, 1.0), (3, 0, 1.0)])
def test_warmup_weight(epoch, warmup, w):
    assert M.warmup_weight(epoch, warmup) == pytest.approx(w)


@pytest.fixture(scope="module")
def mner_clip(tiny_bert_dir, tiny_clip_dir):
    return build(tiny_bert_dir, "MNER", tiny_clip_dir, **LOSS_ON)


def test_loss_parts_nonnegative_and_finite(mner_clip):
    model = mner_clip.train()
    b = with_images(model, text_batch(model))
    all_o = dict(b, labels=torch.where(b["word_mask"], 1, 0))
    for batch in (b, all_o):
        out = model(batch, epoch=3)
        assert all(torch.isfinite(v) and v >= 0 for v in out["parts"].values()), out["parts"]
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
    model.zero_grad(set_to_none=True)


def test_sparsity_is_mean_relevance_of_scored_image_words(mner_clip):
    model = mner_clip.eval()
    b = with_images(model, text_batch(model), has=[True, False, False, True])
    with torch.no_grad():
        out = model(b, epoch=3)
    on = b["word_mask"] & b["has_image"][:, None]
    assert (out["rel"][~b["has_image"]] == 0).all() and (out["rel"][on] > 0).all()
    torch.testing.assert_close(out["parts"]["sparsity"], out["rel"][on].mean())


def test_parts_zero_without_images(mner_clip):
    model = mner_clip.eval()
    tb = text_batch(model)
    for b in (tb, with_images(model, tb, has=[False] * 4)):
        out = model(b, epoch=3)
        assert all(out["parts"][k] == 0 for k in PART_KEYS - {"tag"})
        assert out["parts"]["tag"] > 0 and torch.equal(out["loss"], model(tb)["parts"]["tag"])


def test_total_loss_uses_warmed_residual(mner_clip):
    model = mner_clip.eval()
    b = with_images(model, text_batch(model))
    cfg = model.config
    assert cfg.residual_warmup_epochs == 2

    def loss(lam, epoch):
        old, cfg.residual_lambda = cfg.residual_lambda, lam
        try:
            with torch.no_grad():
                out = model(b, epoch=epoch)
        finally:
            cfg.residual_lambda = old
        return out["loss"], out["parts"]

    base0, parts = loss(0.0, 0)
    assert parts["residual"] > 0
    assert torch.equal(loss(0.7, 0)[0], base0)  # epoch 0: the residual term is fully warmed down
    for epoch, w in ((1, 0.5), (2, 1.0), (9, 1.0)):
        base, parts = loss(0.0, epoch)
        torch.testing.assert_close(loss(0.7, epoch)[0] - base, 0.7 * w * parts["residual"], atol=1e-5, rtol=1e-4)
    # the other terms are weighted by their lambdas
    p = parts
    want = (p["tag"] + cfg.preserve_lambda * p["preserve"] + cfg.nce_lambda * p["nce"]
            + cfg.sparsity_lambda * p["sparsity"] + cfg.image_type_lambda * p["image_types"])
    torch.testing.assert_close(base0, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- pretrained weights

def _file_tensors(path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("enc", ["bert", "roberta"])
def test_text_encoder_weights_equal_files(request, tiny_clip_dir, enc):
    from pathlib import Path

    from transformers import AutoModel
    d = request.getfixturevalue(f"tiny_{enc}_dir")
    model = build(d, "MNER", tiny_clip_dir)
    ours = model.text.model.state_dict()
    ref = AutoModel.from_pretrained(d).state_dict()
    files = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        files.update(_file_tensors(f))
    assert files and set(ours) <= set(ref)
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k
        if k in files:
            assert torch.equal(v, files[k]), k
    assert sum(k in files for k in ours) >= len(ours) - 1  # at most a derived buffer (position ids) is not stored


def test_clip_weights_equal_files(tiny_bert_dir, tiny_clip_dir):
    model = build(tiny_bert_dir, "roberta_clip_coattn", tiny_clip_dir)
    files = _file_tensors(model.vision.weights_file)
    ours = model.vision.net.state_dict()
    stored = [k for k in ours if k in files]
    assert len(stored) >= len(ours) - 1
    assert all(torch.equal(ours[k], files[k]) for k in stored)


@pytest.fixture(scope="module")
def effnet_file_state():
    return torch.load(E.efficientnet_weights_file(), map_location="cpu", weights_only=True)


def test_efficientnet_weights_equal_file_and_bn_stats_kept(tiny_bert_dir, effnet_file_state):
    model = build(tiny_bert_dir, "MNER", "effnet", vision_trainable=True, unfreeze_last_vision_blocks=2, **LOSS_ON)
    assert model.vision.weights_file == E.efficientnet_weights_file()
    ours = model.vision.net.state_dict()
    assert set(ours) == set(effnet_file_state)
    assert all(torch.equal(ours[k], effnet_file_state[k]) for k in ours)
    n = sum(p.numel() for p in model.vision.net.parameters())
    assert 4.6e6 < n < 4.7e6
    model.train()
    model(with_images(model, text_batch(model)), epoch=2)["loss"].backward()
    ours = model.vision.net.state_dict()  # training forwards keep the pretrained BatchNorm statistics
    assert all(torch.equal(ours[k], effnet_file_state[k]) for k in ours if "running" in k or "num_batches" in k)


def _drawn_image():
    img = Image.new("RGB", (224, 224), (135, 206, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 150, 223, 223], fill=(34, 139, 34))
    d.rectangle([60, 90, 160, 170], fill=(178, 34, 34))
    d.rectangle([95, 130, 125, 170], fill=(101, 67, 33))
    d.rectangle([170, 20, 200, 50], fill=(255, 215, 0))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255).mul(2).sub(1).unsqueeze(0)


def test_efficientnet_lite0_checksum():
    net = E.load_efficientnet_lite0()  # strict load inside
    assert not net.training
    net.load_state_dict(torch.load(E.efficientnet_weights_file(), map_location="cpu", weights_only=True), strict=True)
    x = _drawn_image()
    with torch.no_grad():
        logits, feats = net(x), net.forward_features(x)
    assert logits.shape == (1, 1000) and feats.shape == (1, 1280, 7, 7)
    assert logits.sum().item() == pytest.approx(-61.2833, abs=1e-2)
    assert logits.argmax().item() == 549
    assert logits[0].topk(5).indices.tolist() == [549, 419, 446, 892, 916]
    assert feats.sum().item() == pytest.approx(7278.20, rel=1e-4)


def test_efficientnet_bn_means_follow_skip_chains(effnet_file_state):
    """Weights only: a skip block's input is the sum of its stage's earlier branch outputs, whose means are
    their _bn2 biases, so the expand BN's running mean must be W_expand @ that sum (checks block order/naming)."""
    net = E.EfficientNetLite0()
    net.load_state_dict(effnet_file_state)
    i, checked = 0, 0
    for repeats, *_ in E.STAGES:
        chain = []
        for _ in range(repeats):
            blk = net._blocks[i]
            if blk.has_skip and hasattr(blk, "_expand_conv"):
                pred = blk._expand_conv.weight[:, :, 0, 0] @ sum(c._bn2.bias for c in chain)
                rm = blk._bn0.running_mean
                assert (pred - rm).norm() < 0.01 * rm.norm(), i
                checked += 1
            chain.append(blk)
            i += 1
    assert checked == 9


# ----------------------------------------------------------------------------- dual-granularity encoder

def dual_encoder(seed=0, **kw):
    torch.manual_seed(seed)
    return M.DualGranularityEncoder(make_config(vision="dual", **kw))


def test_dual_encoder_parameters_registered_and_learn():
    enc = dual_encoder().train()
    x = torch.rand(2, 3, 32, 32)
    out = enc(x)
    assert out.shape == (2, enc.n_tokens, 32) and enc.n_tokens == 1 + 16 + 16
    params = dict(enc.named_parameters())
    assert {"coarse_pos", "fine_pos"} <= set(enc.state_dict()) and set(params) <= set(enc.state_dict())
    assert autograd_leaves(out) == {id(p) for p in params.values()}  # nothing unregistered, nothing unused
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is not None for p in params.values())
    assert_learns(params.items())
    assert enc(torch.rand(1, 3, 40, 40)).shape == (1, enc.n_tokens, 32)  # other sizes are resized


def test_swin_masks():
    shifted, plain = M.SwinBlock(8, 2, grid=4, window=2, shift=True), M.SwinBlock(8, 2, grid=4, window=4, shift=False)
    assert shifted.shift == 1 and not shifted.mask.all()
    assert (shifted.mask[:, 0] & ~torch.eye(4, dtype=torch.bool)).any()  # not every token alone in its region
    assert plain.shift == 0 and plain.mask.all()
    assert M.SwinBlock(8, 2, grid=4, window=2, shift=False).mask.all()
    padded = M.SwinBlock(8, 2, grid=3, window=2, shift=False)  # 3x3 grid padded to 4x4: pad cells are never keys
    ids = M._window_ids(3, 2, 0)
    keys_pad = padded._windows(ids[None, :, :, None].float())[..., 0] < 0  # [nW, w*w]
    m = padded.mask[:, 0]
    assert not (m & keys_pad[:, None, :] & ~torch.eye(4, dtype=torch.bool)).any()


@pytest.mark.parametrize("grid,window,shift,groups", [
    (4, 2, False, [[0, 1], [2, 3]]), (4, 2, True, [[0], [1, 2], [3]]), (4, 4, False, [[0, 1, 2, 3]]),
    (5, 2, False, [[0, 1], [2, 3], [4]]), (5, 2, True, [[0], [1, 2], [3, 4]]), (6, 3, True, [[0], [1, 2, 3], [4, 5]])])
def test_swin_block_attends_within_regions_only(grid, window, shift, groups):
    """Perturb one cell; exactly the cells of its (shifted) window region change: no wrap-around attention,
    and a shifted window mixes the cells it joins across the unshifted windows' borders."""
    torch.manual_seed(0)
    blk = M.SwinBlock(8, 2, grid=grid, window=window, shift=shift).double().eval()
    gid = {c: g for g, cells in enumerate(groups) for c in cells}
    N = grid * grid
    x = torch.randn(1, N, 8, dtype=torch.double)
    with torch.no_grad():
        y = blk(x)
        for j in range(N):
            x2 = x.clone()
            x2[0, j] += torch.randn(8, dtype=torch.double)
            changed = (blk(x2) - y).abs().amax(-1)[0] > 1e-9
            for i in range(N):
                same = gid[i // grid] == gid[j // grid] and gid[i % grid] == gid[j % grid]
                assert bool(changed[i]) == same, (i, j)


# ----------------------------------------------------------------------------- image dropout

def test_image_dropout(tiny_bert_dir):
    model = build(tiny_bert_dir, "MNER", "dual", drop_prob=0.0, image_dropout_p=1.0)
    b = with_images(model, text_batch(model))

    def run(**kw):
        torch.manual_seed(123)  # the text encoder's own dropout draws the same masks in both runs
        return model(b, epoch=3, **kw)

    model.train()
    out, text = run(), run(image_on=False)
    assert torch.equal(out["emissions"], text["emissions"]) and torch.equal(out["loss"], text["loss"])
    assert all(out["parts"][k] == 0 for k in PART_KEYS - {"tag"})
    model.eval()
    with torch.no_grad():
        dropped = run()["emissions"]
        model.config.image_dropout_p = 0.0
        kept = run()["emissions"]
        text = run(image_on=False)["emissions"]
    assert torch.equal(dropped, kept) and not torch.allclose(kept, text)


# ----------------------------------------------------------------------------- speed/quality options

@pytest.mark.parametrize("word,shape", [("apple", "lower"), ("Apple", "title"), ("A", "title"), ("NBA", "upper"),
                                        ("iPhone", "mixed"), ("2017", "no_letter"), ("!!", "no_letter"),
                                        ("@nytimes", "mention_or_hashtag"), ("#EU", "mention_or_hashtag"),
                                        ("#", "no_letter"), ("McDonald's", "mixed"), ("Ça", "title")])
def test_word_shape(word, shape):
    assert dl.CASE_SHAPES[dl.word_shape(word)] == shape


def test_case_features_let_an_uncased_encoder_see_case(tiny_bert_dir):
    lower = [Post(["apple", "store"], ["O", "O"], "a")]
    title = [Post(["Apple", "Store"], ["O", "O"], "b")]
    for on in (True, False):
        model = build(tiny_bert_dir, "roberta_crf", case_features=on, drop_prob=0.0).eval()
        a, b = text_batch(model, lower), text_batch(model, title)
        assert torch.equal(a["input_ids"], b["input_ids"])  # the uncased tokenizer cannot tell them apart
        ea, eb = model(a)["emissions"], model(b)["emissions"]
        assert torch.allclose(ea, eb) != on
    model = build(tiny_bert_dir, "roberta_crf", case_features=True).train()
    model(text_batch(model))["loss"].backward()
    g = model.case.weight.grad
    assert g[0].abs().sum() == 0 and g[1:].abs().sum() > 0  # the padding shape never learns


@pytest.mark.parametrize("kw", [dict(fusion_gate="sum"), dict(fusion_gate="rel"), dict(resampler_tokens=0),
                                dict(fusion_layers=1)], ids=["sum", "rel", "no_resampler", "one_layer"])
def test_fusion_ablations_build_and_learn(request, tiny_bert_dir, kw):
    model = build(tiny_bert_dir, "MNER", vision_of(request, "clip"), **{**LOSS_ON, **kw}).train()
    batch = with_images(model, text_batch(model))
    out = model(batch, epoch=2)
    assert out["emissions"].shape[:2] == batch["word_mask"].shape
    out["loss"].backward()
    assert_learns((n, p) for n, p in model.named_parameters() if not n.startswith("vision."))
    if kw.get("fusion_gate") == "sum":
        assert model.gate.gate is None and model.gate.rel is None and torch.all(out["rel"] == 1)
    if kw.get("resampler_tokens") == 0:
        assert model.resampler.queries is None


def test_grad_checkpointing_same_loss_and_gradients(request, tiny_bert_dir):
    grads = []
    for ck in (False, True):
        model = build(tiny_bert_dir, "MNER", vision_of(request, "clip"), grad_checkpointing=ck, **LOSS_ON).train()
        out = model(with_images(model, text_batch(model)), epoch=2)
        out["loss"].backward()
        grads.append((out["loss"].item(),
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert abs(l0 - l1) < 1e-5 and g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5), n


def test_frozen_word_embeddings_and_no_attention_dropout(tiny_bert_dir):
    model = build(tiny_bert_dir, "roberta_crf", freeze_word_embeddings=True)
    emb = model.text.model.get_input_embeddings().weight
    assert not emb.requires_grad
    assert all(p is not emb for _, p in model.param_groups()["text"])
    model = build(tiny_bert_dir, "roberta_crf", freeze_word_embeddings=False)
    assert model.text.model.config.attention_probs_dropout_prob == 0.0
    assert model.text.model.get_input_embeddings().weight.requires_grad


def test_image_type_loss_targets():
    # labels: PAD 0, O 1, B-LOC 2, I-LOC 3, B-MISC 4, I-MISC 5, B-ORG 6, I-ORG 7, B-PER 8, I-PER 9
    labels = torch.tensor([[8, 9, 1, 2], [1, 1, 0, 0], [7, 1, 1, 0]])
    want = torch.tensor([[1., 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]])  # LOC MISC ORG PER
    logits = torch.randn(3, 4)
    torch.testing.assert_close(M.image_type_loss(logits, labels),
                               torch.nn.functional.binary_cross_entropy_with_logits(logits, want))
    assert M.image_type_loss(want * 40 - 20, labels) < 1e-6


def test_image_type_head_only_when_weighted(tiny_bert_dir):
    assert build(tiny_bert_dir, "MNER", image_type_lambda=0.0).type_head is None
    m = build(tiny_bert_dir, "MNER", image_type_lambda=0.5)
    assert m.type_head.out_features == (NL - 2) // 2 == 4


def test_efficientnet_lite0_matches_an_independent_implementation():
    """efficientnet.EfficientNetLite0 and efficientnet_lite_pytorch (ml-illustrated's port of the TF Lite reference, with
    its own static-SAME-padding convolutions and MBConv blocks) give the same logits on the same shipped weights
    for preprocessed pictures of several aspect ratios."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch==0.1.0 "
                                  "(requirements-dev.txt) for the reference implementation")
    import config as cfgmod
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(E.efficientnet_weights_file(), map_location="cpu", weights_only=True), strict=True)
    ours = E.load_efficientnet_lite0()
    prep = dl.image_prep_for(cfgmod.get_config([]))
    rng = np.random.default_rng(0)
    pics = []
    for w, h in ((320, 240), (200, 300), (256, 256)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        d = ImageDraw.Draw(im)
        d.ellipse((w // 5, h // 5, w // 2, h // 2), fill=(240, 200, 20))
        d.rectangle((w // 2, h // 3, w - 10, h - 10), fill=(20, 60, 200))
        pics.append(prep(im))
    x = torch.stack(pics)
    with torch.no_grad():
        a, b = ours.eval()(x), ref.eval()(x)
    assert a.shape == b.shape == (3, 1000)
    assert (a - b).abs().max() < 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))
