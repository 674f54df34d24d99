"""The dual-granularity encoder: pretrained stem, finer-than-coarse salient fine branch, distillation, real images
only, and the stem-map cache key."""
from __future__ import annotations

import pytest
import torch

import config as cfgmod
import dataloader as dl
import explain
import efficientnet as E
import model as M
from test_model import TINY_DUAL, build, make_config, text_batch, with_images

EFF = dict(TINY_DUAL, vision_stem="efficientnet_lite0")  # the shipped stem at 32 px: 2x2 coarse, 4x4 fine maps


def encoder(seed=0, **kw):
    torch.manual_seed(seed)
    return M.DualGranularityEncoder(make_config(vision="dual", **kw))


def patch_area(enc, which):
    """Image pixels covered by one token of the coarse or fine grid."""
    return (enc.size // (enc.Gc if which == "coarse" else enc.Gf)) ** 2


# ----------------------------------------------------------------------------- grids

@pytest.mark.parametrize("argv", [[], ["--vision_stem", "conv"]])
def test_fine_grid_is_finer_at_the_shipped_defaults(argv):
    c = cfgmod.get_config(["--use_dual_granularity", *argv])
    enc = M.DualGranularityEncoder(c)
    assert (enc.Gc, enc.Gf) == (9, 18)
    assert patch_area(enc, "fine") < patch_area(enc, "coarse")
    assert enc.n_tokens == 1 + 9 * 9 + c.vision_max_patches  # the fine branch keeps the cap, not a pooled grid


@pytest.mark.parametrize("argv", [
    ["--vision_fine_patch_size", "32"],                                        # equal: not finer
    ["--vision_fine_patch_size", "32", "--vision_patch_size", "16"],          # coarser
    ["--vision_stem", "conv", "--vision_patch_size", "8", "--vision_fine_patch_size", "8"],
    ["--vision_patch_size", "12", "--vision_fine_patch_size", "4", "--vision_img_size", "48"],  # no stride-12 map
])
def test_validate_refuses_a_fine_grid_that_is_not_finer(argv):
    with pytest.raises(cfgmod.ConfigError, match="--vision_"):
        cfgmod.get_config(["--use_dual_granularity", *argv])


@pytest.mark.parametrize("fine", [2, 4])
def test_fine_patch_size_changes_the_fine_tokens(fine):
    enc = encoder(vision_stem="conv", vision_fine_patch_size=fine, vision_max_patches=1000)
    assert enc.Gf == 32 // fine and enc.n_tokens == 1 + enc.Gc ** 2 + enc.Gf ** 2


def _signature(**kw):
    enc = encoder(**kw).eval()
    x = torch.rand(1, 3, enc.size, enc.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = enc(x)
    return {"shape": tuple(out.shape), "params": sum(p.numel() for p in enc.parameters()),
            "trainable": sum(p.numel() for p in enc.parameters() if p.requires_grad), "out": out}


# every --vision_* flag with the setting it is checked in and what it changes
VISION_FLAGS = [
    ("vision_stem", "conv", EFF, "params"),
    ("vision_img_size", 64, EFF, "shape"),
    ("vision_patch_size", 16, EFF, "shape"),               # the stride-16 map instead of the stride-8 one
    ("vision_fine_patch_size", 8, dict(EFF, vision_patch_size=16, vision_max_patches=1000), "shape"),
    ("vision_max_patches", 4, EFF, "shape"),
    ("vision_select", "learned", dict(EFF, vision_max_patches=4), "out"),  # other cells kept
    ("vision_embed_dim", 64, EFF, "shape"),
    ("vision_heads", 4, EFF, "out"),
    ("vision_swin_window", 1, EFF, "out"),
    ("vision_delegate_topk", 1, EFF, "out"),
    ("vision_depth", 2, EFF, "params"),
    ("vision_trainable", True, EFF, "trainable"),
    ("vision_distill_lambda", 1.0, EFF, "params"),          # the distillation head
]


def test_every_vision_flag_is_checked():
    flags = {a.dest for a in cfgmod.build_parser()._actions if a.dest.startswith("vision_")}
    assert flags == {f for f, *_ in VISION_FLAGS}


@pytest.mark.parametrize("flag,value,base,shows", VISION_FLAGS)
def test_every_vision_flag_changes_the_encoder(flag, value, base, shows):
    assert base.get(flag, getattr(cfgmod.get_config(), flag)) != value
    a, b = _signature(**base), _signature(**{**base, flag: value})
    if shows == "out":
        assert a["shape"] == b["shape"] and not torch.allclose(a["out"], b["out"])
    else:
        assert a[shows] != b[shows], (flag, a[shows])


def test_vision_flags_without_dual_granularity_are_warned():
    def warnings(argv):
        return M.unused_flags(cfgmod.get_config(argv), cfgmod.given_flags(argv))
    w = warnings(["--vision_depth", "3", "--vision_stem", "conv"])
    assert [x.split(" does nothing")[0] for x in w] == ["--vision_stem", "--vision_depth"]
    assert all("does nothing with no dual-granularity encoder" in x for x in w)
    assert warnings(["--use_dual_granularity", "--vision_depth", "3"]) == []
    assert warnings(["--model", "roberta_crf", "--use_dual_granularity", "--vision_depth", "3"])  # no image path
    assert warnings(["--use_dual_granularity", "--vision_stem", "conv", "--vision_trainable"]) == [
        "--vision_trainable does nothing with --vision_stem conv (that stem always trains)"]


# ----------------------------------------------------------------------------- the pretrained stem

def test_stem_maps_are_efficientnet_lite0s_own():
    """The coarse/fine maps are the shipped network's stride-16/stride-8 activations, frozen and unchanged."""
    enc = encoder(**dict(EFF, vision_img_size=64, vision_patch_size=16, vision_fine_patch_size=8)).eval()
    net = E.load_efficientnet_lite0()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        c, f = enc.stem_maps(x)
        h = torch.nn.functional.relu6(net._bn0(net._conv_stem(x)))
        maps = {}
        for i, blk in enumerate(net._blocks):
            h = blk(h)
            maps[i] = h
    assert c.shape == (2, 112, 4, 4) and f.shape == (2, 40, 8, 8)
    # float tolerance: the thread count (which an earlier test in the same process may have changed) reorders sums
    assert torch.allclose(c, maps[10], rtol=1e-4, atol=1e-4) and torch.allclose(f, maps[4], rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in enc.stem.parameters())
    enc.train()
    assert not enc.stem.training  # pretrained BatchNorm statistics stay fixed


def test_coarse_view_at_stride_32_is_what_the_plain_mner_reads():
    """At the defaults the coarse map is EfficientNet-Lite0's final 1280-channel features (PretrainedVision's
    tokens) and the fine map its stride-16 activations."""
    enc = encoder(**dict(EFF, vision_img_size=64, vision_patch_size=32, vision_fine_patch_size=16)).eval()
    plain = M.PretrainedVision(make_config()).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        c, f = enc.stem_maps(x)
        assert c.shape == (2, 1280, 2, 2) and f.shape == (2, 112, 4, 4)
        assert torch.allclose(c.flatten(2).transpose(1, 2), plain(x), rtol=1e-4, atol=1e-4)
    trained = encoder(**dict(EFF, vision_img_size=64, vision_patch_size=32, vision_fine_patch_size=16,
                             vision_trainable=True, unfreeze_last_vision_blocks=1))
    assert all(p.requires_grad for p in trained.stem.head.parameters())  # the head conv learns with the last block


def test_cached_stem_maps_give_the_pixel_path_result():
    enc = encoder(**EFF).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert enc.features(x).shape == (3, *enc.feat_shape)
        assert torch.allclose(enc.from_features(enc.features(x)), enc(x), atol=1e-5)


def test_trainable_stem_learns_at_the_pretrained_rate(tiny_bert_dir):
    model = build(tiny_bert_dir, "MNER", "dual", vision_stem="efficientnet_lite0", vision_trainable=True,
                  unfreeze_last_vision_blocks=1)
    groups = model.param_groups()
    assert groups["vision"] and all(n.startswith("vision.stem.blocks.") for n, _ in groups["vision"])
    assert not model.vision.cacheable  # a stem that learns is run on pixels every step
    assert build(tiny_bert_dir, "MNER", "dual", vision_stem="efficientnet_lite0").vision.cacheable


def test_stem_cache_key_changes_with_stem_weights_and_preprocessing(tmp_path):
    def key(weights=None, **kw):
        c = make_config(vision="dual", **{**EFF, **kw})
        enc = M.DualGranularityEncoder(c)
        return dl.FeatureCache(tmp_path, enc.backbone_id, weights or enc.weights_file, dl.image_prep_for(c)).key

    base = key()
    assert key() == base
    assert key(vision_patch_size=16) != base          # another stem map
    assert key(vision_patch_size=16, vision_fine_patch_size=8) != key(vision_patch_size=16)
    assert key(vision_img_size=64) != base            # preprocessing
    other = tmp_path / "other.pth"
    other.write_bytes(b"x")
    assert key(weights=other) != base                 # weights file


# ----------------------------------------------------------------------------- fine branch

def test_saliency_topk_passes_gradient_to_its_scorer():
    torch.manual_seed(0)
    sel = M.SaliencySelect(8, 3)
    x = torch.randn(2, 10, 8, requires_grad=True)
    kept, idx = sel(x)
    assert kept.shape == (2, 3, 8) and idx.shape == (2, 3)
    scores = sel.score(sel.ln(x)).squeeze(-1)
    assert torch.equal(idx, scores.topk(3, dim=1).indices)
    (kept * torch.randn_like(kept)).sum().backward()
    assert sel.score.weight.grad.abs().sum() > 0 and sel.score.bias.grad.abs() > 0


def test_prior_selection_keeps_the_cells_that_stand_out_and_still_trains_the_scorer():
    """--vision_select prior: the kept fine cells are those whose fine and parent-coarse features differ most from
    their map's mean (a bright object on a flat background), whatever the learned score says; the score still
    weights them, so it gets a gradient."""
    enc = encoder(**{**EFF, "vision_max_patches": 4}, vision_select="prior").train()
    (Cc, Gc, _), (Cf, Gf, _) = enc.map_shapes
    r = Gf // Gc
    c, f = torch.ones(1, Cc, Gc, Gc), torch.ones(1, Cf, Gf, Gf)
    c[..., -1, -1] += 5                       # the object: the bottom-right coarse cell ...
    f[..., -r:, -r:] += torch.rand(Cf, r, r) + 3  # ... and the fine cells inside it
    inside = [i * Gf + j for i in range(Gf - r, Gf) for j in range(Gf - r, Gf)]
    enc.encode_maps(c, f)
    assert set(enc.last_cells[0].tolist()) <= set(inside) and len(inside) >= enc.k
    assert set(M.activation_prior(c, f, enc.parent_index)[0].topk(enc.k).indices.tolist()) <= set(inside)
    out = enc.encode_maps(c, f)
    (out * torch.randn_like(out)).sum().backward()
    assert enc.select.score.weight.grad.abs().sum() > 0


def test_kept_fine_tokens_carry_their_position():
    """The same map content at other grid cells gives other fine tokens: position embeddings go with the kept."""
    enc = encoder(**EFF).eval()
    with torch.no_grad():
        enc.fine_pos.normal_()
        c = torch.randn(1, *enc.map_shapes[0])
        f = torch.randn(1, *enc.map_shapes[1])
        a = enc.encode_maps(c, f)
        b = enc.encode_maps(c, f.flip(-1))
    assert not torch.allclose(a[:, 1 + enc.Gc ** 2:].sort(1).values, b[:, 1 + enc.Gc ** 2:].sort(1).values)


def test_each_fine_cell_gets_its_parent_coarse_token():
    """The fine view starts from the backbone's semantics: fine cell (i, j) adds the coarse token of the cell its
    centre lies in, for any ratio of the patch sizes (48 px, 16 / 6: fine cell 5 spans pixels 30-36, coarse cell 2)."""
    for kw in (EFF, dict(TINY_DUAL, vision_img_size=48, vision_patch_size=16, vision_fine_patch_size=6)):
        enc = encoder(**kw)
        pc, pf = enc.size // enc.Gc, enc.size // enc.Gf
        c = torch.randn(2, enc.Gc ** 2, 8)
        par = enc.parent_cells(c)
        assert par.shape == (2, enc.Gf ** 2, 8)
        for i in range(enc.Gf):
            for j in range(enc.Gf):
                pi, pj = int((i + 0.5) * pf // pc), int((j + 0.5) * pf // pc)
                assert torch.equal(par[:, i * enc.Gf + j], c[:, pi * enc.Gc + pj])
        if pf == 6:
            assert enc.parent_index[5].item() == 2


def explained(enc, x):
    for m in [*(b.attn for b in enc.swin), enc.delegate.attn, *(b.attn for b in enc.fine)]:
        m.keep_weights = True
    with torch.no_grad():
        enc(x)
    return explain.rollout(enc)


@pytest.mark.parametrize("window", [2, 3])
def test_window_attention_map_stays_inside_each_window(window):
    """explain.window_map puts each window's weights back on the whole grid: rows sum to 1 and a cell draws
    only on cells of its own (shifted) window."""
    enc = encoder(**dict(TINY_DUAL, vision_img_size=40, vision_swin_window=window)).eval()  # 5 x 5 coarse grid
    explained(enc, torch.randn(2, 3, 40, 40))
    G = enc.Gc
    for blk in enc.swin:
        a = explain.window_map(blk)
        assert a.shape == (2, G * G, G * G) and torch.allclose(a.sum(-1), torch.ones(2, G * G), atol=1e-5)
        win = lambda r: ((r - blk.shift) % (-(-G // blk.w) * blk.w)) // blk.w  # noqa: E731 (window row/col)
        for i in range(G * G):
            for j in (a[0, i] > 0).nonzero().flatten().tolist():
                assert (win(i // G), win(i % G)) == (win(j // G), win(j % G)), (blk.shift, i, j)


def test_rollout_traces_mixed_tokens_back_to_their_cells():
    """Rows sum to 1 and the summary is no cell; with silent residual branches (LayerScale 0) every token is its
    own cell; when the blocks route everything to one cell, the coarse tokens point there."""
    enc = encoder(**dict(EFF, vision_swin_window=4)).eval()  # one window over the 4 x 4 coarse grid
    x = torch.randn(2, 3, enc.size, enc.size)
    r = explained(enc, x)
    Nc = enc.Gc ** 2
    assert r.shape == (2, enc.n_tokens, enc.n_tokens) and r[:, :, 0].abs().max() == 0
    assert torch.allclose(r.sum(-1), torch.ones(2, enc.n_tokens), atol=1e-5)
    assert r[:, 1:1 + Nc, 1 + Nc:].abs().max() == 0 and r[:, 1 + Nc:, 1:1 + Nc].abs().max() == 0  # views apart
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, M.LayerScale):
                m.gamma.zero_()
    r = explained(enc, x)
    assert torch.allclose(r[:, 1:, 1:], torch.eye(enc.n_tokens - 1).expand(2, -1, -1))
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, M.LayerScale):
                m.gamma.fill_(1e4)
    explained(enc, x)
    for blk in enc.swin:  # every window slot attends to the first cell only
        w = torch.zeros_like(blk.attn.last_weights)
        w[..., 0] = 1.0
        blk.attn.last_weights = w
    r = explain.rollout(enc)
    assert torch.allclose(r[:, 1:1 + Nc, 1], torch.ones(2, Nc), atol=1e-3)


@pytest.mark.parametrize("name", ["MNER", "roberta_clip_coattn"])
def test_word_attention_is_traced_to_the_cells_for_either_fusion(tiny_bert_dir, name):
    """Both fusions read the dual encoder's mixed tokens; the words' attention is rolled back to input cells (rows
    sum to 1, the summary slot, which is no cell, gets nothing)."""
    model = build(tiny_bert_dir, name, "dual").eval()
    explain.keep_weights(explain.explained_modules(model), True)
    with torch.no_grad():
        model(with_images(model, text_batch(model), has=[True, True, False, True]))
    att = explain.word_region_attention(model)
    assert att.shape[0] == 3 and att.shape[-1] == model.vision.n_tokens
    assert torch.allclose(att.sum(-1), torch.ones(att.shape[:2]), atol=1e-4) and att[..., 0].abs().max() == 0


def test_runs_before_the_parent_cells_are_refused_but_other_runs_load(tmp_path):
    import json

    import runner
    from config import ConfigError, config_from_dict
    run = tmp_path / "dual3"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"use_dual_granularity": True, "model": "MNER", "run_format": 3}))
    for f in ("label_map.json", "model.pt"):
        (run / f).write_text("{}")
    with pytest.raises(ConfigError, match=r"dual3/config.json: a run of an earlier dual-granularity encoder"):
        runner.load_run(tmp_path, "dual3")
    assert config_from_dict({"model": "MNER", "run_format": 3}, "c.json").model == "MNER"


def test_dual_runs_saved_before_the_prior_selection_keep_their_learned_one():
    from config import config_from_dict, get_config
    assert get_config([]).vision_select == "prior"
    assert get_config(["--use_dual_granularity", "--vision_stem", "conv"]).vision_select == "learned"  # auto
    assert config_from_dict({"model": "MNER", "use_dual_granularity": True, "run_format": 4}).vision_select == "learned"
    assert config_from_dict({"model": "MNER", "use_dual_granularity": True, "run_format": 5}).vision_select == "prior"


def test_runs_saved_before_the_padded_fit_keep_the_centre_crop():
    """Runs of format 5 and before centre-cropped every picture: they load (and so score, predict, export) with
    --image_fit crop; a new run pads unless told."""
    from config import config_from_dict, get_config
    assert get_config([]).image_fit == "pad"
    for old in ({"model": "MNER"}, {"model": "MNER", "run_format": 5}):
        assert config_from_dict(old).image_fit == "crop"
    assert config_from_dict({"model": "MNER", "run_format": 6}).image_fit == "pad"
    assert config_from_dict({"model": "MNER", "run_format": 6, "image_fit": "crop"}).image_fit == "crop"


def test_efficientnet_reads_the_image_size_it_is_given():
    """Plain EfficientNet-Lite0 reads --vision_img_size pixels (288, as the dual encoder), one token per 32 x 32
    cell; runs of format 6 and before read 224 px whatever the flag said; other sizes are refused by name."""
    import torch
    from config import ConfigError, config_from_dict, get_config
    from images import image_prep_for
    from model import PretrainedVision
    assert get_config([]).vision_img_size == image_prep_for(get_config([])).size == 288
    dual_default = get_config(["--use_dual_granularity"])
    assert dual_default.vision_img_size == 288 and dual_default.vision_swin_window == 288 // 32  # one window
    assert config_from_dict({"model": "MNER", "run_format": 7, "use_dual_granularity": True, "vision_img_size": 224,
                             "vision_swin_window": 7}).vision_img_size == 224  # a run keeps the size it trained at
    vision = PretrainedVision(get_config(["--vision_img_size", "64"])).eval()
    assert vision(torch.zeros(1, 3, 64, 64)).shape == (1, *vision.feat_shape) == (1, 4, 1280)
    assert config_from_dict({"model": "MNER", "run_format": 6, "vision_img_size": 64}).vision_img_size == 224
    dual = {"model": "MNER", "run_format": 6, "use_dual_granularity": True, "vision_img_size": 64}
    assert config_from_dict(dual).vision_img_size == 64
    assert config_from_dict(dual).rel_floor == 0.0 and get_config([]).rel_floor == 0.1  # the floor came with format 7
    with pytest.raises(ConfigError, match="--vision_img_size 100: .* multiple of 32"):
        get_config(["--vision_img_size", "100"])


# ----------------------------------------------------------------------------- only real images enter

@pytest.mark.parametrize("stem", ["conv", "efficientnet_lite0"])
def test_real_image_output_ignores_the_rest_of_its_batch(tiny_bert_dir, stem):
    """In train mode (BatchNorm on batch statistics for the conv stem) a real image's tokens and the post's
    emissions are the same whether placeholders share its batch or not: only rows with an image are encoded."""
    model = build(tiny_bert_dir, "MNER", "dual", vision_stem=stem, drop_prob=0.0, image_dropout_p=0.0)
    for m in model.modules():  # the tiny text encoder's own dropout would differ between the two batches
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    b = with_images(model, text_batch(model), has=[True, False, True, False])
    seen = []
    model.vision.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    full = model(b)["emissions"]
    assert seen == [2]
    sub = {k: v[[0, 2]] for k, v in b.items()}
    alone = model(sub)["emissions"]
    assert torch.allclose(full[[0, 2]], alone, atol=1e-5)
    b2 = dict(b, pixel_values=b["pixel_values"].clone())
    b2["pixel_values"][[1, 3]] = torch.randn_like(b2["pixel_values"][[1, 3]]) * 5  # other placeholder content
    assert torch.allclose(model(b2)["emissions"], full, atol=1e-5)


# ----------------------------------------------------------------------------- distillation

@pytest.mark.parametrize("argv,want", [([], 2.0), (["--use_dual_granularity"], 2.0), (["--no-use_image"], 0.0),
                                       (["--model", "roberta_crf"], 0.0), (["--image_type_lambda", "0.5"], 0.5)])
def test_image_type_weight_is_auto_on_for_mner_with_images(argv, want):
    assert cfgmod.get_config(argv).image_type_lambda == want


def test_distill_is_auto_on_for_the_conv_stem_only():
    assert cfgmod.get_config(["--use_dual_granularity", "--vision_stem", "conv"]).vision_distill_lambda == 1.0
    assert cfgmod.get_config(["--use_dual_granularity"]).vision_distill_lambda == 0.0
    assert cfgmod.get_config(["--use_dual_granularity", "--vision_stem", "conv",
                              "--vision_distill_lambda", "0"]).vision_distill_lambda == 0.0
    c = cfgmod.get_config(["--use_dual_granularity", "--vision_stem", "conv"])
    assert isinstance(M.build_teacher(c), M.PretrainedVision)
    assert M.build_teacher(cfgmod.get_config(["--use_dual_granularity"])) is None


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_the_teacher_frames_the_picture_as_the_student_does(monkeypatch, fit):
    """Distillation matches the student's grid to the teacher's cell by cell: the teacher reads the same --image_fit
    of the picture, at its own 224 px (7 x 7 tokens) whatever the student's size."""
    c = cfgmod.get_config(["--use_dual_granularity", "--vision_stem", "conv", "--vision_img_size", "112",
                           "--vision_patch_size", "16", "--vision_fine_patch_size", "8", "--image_fit", fit])
    teacher, preps = M.build_teacher(c), []
    assert teacher.feat_shape == (49, 1280)
    monkeypatch.setattr(dl, "cached_features", lambda cfg, v, paths, name, prep: (preps.append(prep) or {}, None))
    student = type("Cached", (), {"cacheable": True, "feat_shape": (4, 8)})()
    dl.make_dataset(c, "train", [], type("Tok", (), {"pad_token_id": 0})(), None, student, train=True, teacher=teacher)
    assert [(p.size, p.fit) for p in preps] == [(224, fit), (112, fit)]


def test_distillation_term_decreases_on_a_tiny_image_set():
    """The conv stem learns to reproduce the frozen EfficientNet-Lite0 features of a few images, no labels."""
    torch.manual_seed(0)
    enc = encoder(vision_stem="conv", vision_distill_lambda=1.0).train()
    teacher = E.load_efficientnet_lite0()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        target = teacher.forward_features(torch.nn.functional.interpolate(x, size=64)).flatten(2).transpose(1, 2)
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = enc.distill_loss(enc(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_distill_part_is_logged_and_reaches_the_stem(tiny_bert_dir):
    model = build(tiny_bert_dir, "MNER", "dual", vision_stem="conv", vision_distill_lambda=1.0).train()
    b = with_images(model, text_batch(model))
    B = b["input_ids"].size(0)
    b["teacher_feats"] = torch.randn(B, 4, 1280)
    out = model(b)
    assert out["parts"]["distill"] > 0
    out["loss"].backward()
    assert model.vision.stem.coarse.net[0].weight.grad.abs().sum() > 0
    assert model.vision.distill.weight.grad.abs().sum() > 0


def test_runs_of_the_earlier_encoder_are_refused_in_one_line(tmp_path):
    """A dual run saved before the current encoder (stride-32 map = the final 1280-channel features, LayerScale)
    cannot be rebuilt: loading it is one error line naming its config.json; other earlier runs still load, and
    results tables still read every run."""
    import json

    import runner
    from config import ConfigError, RUN_FORMAT, config_from_dict, save_config
    run = tmp_path / "old_dual"
    run.mkdir()
    old = {"use_dual_granularity": True, "vision_patch_size": 32, "vision_fine_patch_size": 16, "model": "MNER"}
    (run / "config.json").write_text(json.dumps(old))
    (run / "label_map.json").write_text("{}")
    (run / "model.pt").write_bytes(b"")
    with pytest.raises(ConfigError,
                       match=r"old_dual/config.json: a run of an earlier dual-granularity encoder.*retrain"):
        runner.load_run(tmp_path, "old_dual")
    assert config_from_dict(old).vision_patch_size == 32                 # read for tables, never built
    assert config_from_dict({"model": "MNER", "downs_en_lr": 2e-3}, "c.json").head_lr == 2e-3  # others migrate
    save_config(config_from_dict(old), run / "config.json")               # saved now: the current format
    assert json.loads((run / "config.json").read_text())["run_format"] == RUN_FORMAT
    with pytest.raises(ConfigError, match="run format 99"):
        config_from_dict({"run_format": 99}, "new/config.json")


def test_explain_hits_says_which_view_lands_on_the_object(monkeypatch):
    """attention_hits draws each view's tokens alone too: coarse weight on the object's quadrant and a denser fine
    token on the far corner make the overlay's peak miss, the coarse view alone hit and the fine view alone miss."""
    from types import SimpleNamespace

    import numpy as np
    enc = encoder(**dict(EFF, vision_max_patches=4))  # 32 px: 4x4 coarse, 8x8 fine grid, 4 fine tokens kept
    nc, last = enc.Gc ** 2, enc.Gf ** 2 - 1
    w = np.zeros(1 + nc + enc.k, np.float32)
    w[1] = 0.7                                       # coarse cell 0: the top-left corner, where the object is
    w[1 + nc] = 0.3                                  # the first kept fine token, at the bottom-right fine cell
    rows = [{"att": w[None], "cells": (last, 1, 2, 3)}]
    monkeypatch.setattr(explain, "attention_rows", lambda *a: rows)
    post = SimpleNamespace(imgid="1", tags=["B-PER"])
    ds = SimpleNamespace(posts=[post], prep=dl.ImagePrep(32))
    boxes = {"1": {"type": "PER", "box": [0, 0, 16, 16], "size": [32, 32]}}
    h = explain.attention_hits(SimpleNamespace(vision=enc), ds, None, None, None, None, boxes)
    assert (h["posts"], h["hits"]) == (1, 0)
    assert h["views"] == {"coarse": 1.0, "fine": 0.0}
