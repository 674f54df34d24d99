"""Every flag of config.build_parser() does something, or says that it does not.

FLAGS below is the table: each flag -> the checks that show its effect. A flag added to config.py without a row
here fails test_every_flag_is_in_the_table. The kinds of check (all of a row's checks must hold):

    model(base, alt)      the built model differs: parameter names/shapes/count/trainability, module repr or the
                          plain settings modules keep (temperatures, checkpointing)
    forward(base, alt)    same seed, same batch: the training loss differs
    data(base, alt)       the posts, encodings or batches of the tiny data set differ
    train(base, alt)      the resolved optimiser (groups, lrs, weight decay) or lr schedule differs
    fn(callable)          a documented function behaves differently (callable returns True)
    refused(argv, text)   ConfigError naming the flag;  warned(argv): a `warning: --flag does nothing` line
    used_by(file)         an entry point's own flag: its source reads config.<flag> / args.<flag>

`base` and `alt` are argv lists on top of the tiny encoders (BASE); alt alone must differ from base.
"""
from __future__ import annotations

import re
import contextlib
import io

import pytest
import torch

import config as C
import dataloader as D
import model as M
import runner
import train
from conftest import ROOT, make_conll
from metrics import evaluate

# ------------------------------------------------------------------ kinds of check


def _compare(kind):
    """A check of `kind` that compares a signature (SIGS below) of argv `base` with that of base + `alt`."""
    return lambda base=(), alt=(): (kind, list(base), list(alt))


model, forward, data, train_ = (_compare(k) for k in ("model", "forward", "data", "train"))


def fn(f):
    return ("fn", f)


def refused(argv, text=""):
    return ("refused", list(argv), text)


def warned(argv):
    return ("warned", list(argv))


def used_by(entry):
    return ("used_by", entry)


# ------------------------------------------------------------------ behaviours checked through functions

def _allow_download(env):
    missing = ["--text_encoder", str(env["tmp"] / "no_such_encoder")]
    with pytest.raises(C.ConfigError):
        C.get_config(missing)
    C.get_config(missing + ["--allow_download"])  # accepted: transformers may fetch it
    return True


def _words(data_dir, name):
    return [p.tokens for p in D.load_split(C.get_config(["--data_dir", str(data_dir), "--dataset_name", name]),
                                           "train")]


def _datasets(env):
    """<tmp>/d1/{one,two}/train.txt and <tmp>/d2/one/train.txt, each with other words."""
    for root, name, word in (("d1", "one", "x"), ("d1", "two", "y"), ("d2", "one", "z")):
        make_conll(env["tmp"] / root / name / "train.txt", [([word], ["O"], "1")])
    return env["tmp"] / "d1", env["tmp"] / "d2"


def _dataset_name(env):
    d1, _ = _datasets(env)
    return _words(d1, "one") != _words(d1, "two")


def _data_dir(env):
    d1, d2 = _datasets(env)
    return _words(d1, "one") != _words(d2, "one")


def _image_root(env):
    cfg = lambda *a: C.get_config(env["data"] + list(a))  # noqa: E731
    return D.image_root(cfg(), "train") != D.image_root(cfg("--image_root", str(env["tmp"])), "train")


def _lenient(env):
    d = env["tmp"] / "bad" / "bad"
    make_conll(d / "train.txt", [(["a", "b"], ["O", "O"], "1")])
    (d / "train.txt").write_text((d / "train.txt").read_text() + "IMGID:2\nno_tab_here\n\n")
    argv = ["--data_dir", str(d.parent), "--dataset_name", "bad"]
    with pytest.raises(D.DataError):
        D.load_split(C.get_config(argv), "train")
    return len(D.load_split(C.get_config(argv + ["--lenient_data"]), "train")) == 2


def _allow_split_overlap(env):
    """A release whose test split repeats its dev split is refused in training, unless the flag says so."""
    d = env["tmp"] / "overlap" / "overlap"
    for split in ("train", "valid", "test"):
        make_conll(d / f"{split}.txt", [(["a", split if split == "train" else "b"], ["B-PER", "O"], "1")])
    argv = ["--data_dir", str(d.parent), "--dataset_name", "overlap"] + env["enc"][:2]
    with pytest.raises(D.DataError, match="valid and test share 1 of 1 / 1 distinct posts"):
        train.load_data(C.get_config(argv), None)
    cfg = C.get_config(argv + ["--allow_split_overlap"])
    posts, _, _ = train.load_data(cfg, None)
    return len(posts["test"]) == 1 and set(cfg.data_hash) == {"train", "valid", "test"}


def _keep_raw_types(env):
    """Twitter-2015's OTHER is read as MISC unless the flag keeps it; any other folder keeps its own types."""
    for name in ("twitter2015", "raw"):
        make_conll(env["tmp"] / "raw" / name / "train.txt", [(["a", "b"], ["B-OTHER", "O"], "1")])
    tags = lambda name, *a: D.load_split(C.get_config(  # noqa: E731
        ["--data_dir", str(env["tmp"] / "raw"), "--dataset_name", name, *a]), "train")[0].tags
    old_run = C.config_from_dict({"dataset_name": "raw", "data_dir": str(env["tmp"] / "raw"), "keep_raw_types": False})
    return tags("twitter2015") == ["B-MISC", "O"] and tags("twitter2015", "--keep_raw_types") == ["B-OTHER", "O"] \
        and tags("raw") == ["B-OTHER", "O"] and tags("raw", "--no-keep_raw_types") == ["B-MISC", "O"] \
        and D.load_split(old_run, "train")[0].tags == ["B-MISC", "O"]  # a run of an earlier version reads as it did


def _pixels_differ(env, flags: list[str], base: tuple = ()) -> bool:
    """Whether the flags change the pixels a training post's image becomes (both with the `base` flags)."""
    config = C.get_config(env["data"])
    posts = D.load_split(config, "train")
    i = next(k for k, p in enumerate(posts) if D.find_image(D.image_root(config, "train"), p.imgid))
    vision = type("Trainable", (), {"trainable": True, "cacheable": False})()  # make_dataset reads pixels for it
    px = []
    for argv in ([], flags):
        c = C.get_config(env["data"] + [*base, *argv])
        ds = D.make_dataset(c, "train", posts, env["tok"], env["labels"], vision, train=True)
        ds.epoch = 1
        px.append(ds[i]["pixel_values"])
    return not torch.equal(*px)


def _cache_dir(env):
    c = C.get_config(env["enc"] + env["data"] + ["--cache_dir", str(env["tmp"] / "feats")])
    torch.manual_seed(0)
    vision = M.build_model(c, 10).vision
    posts = D.load_split(c, "valid")
    D.make_dataset(c, "valid", posts, env["tok"], env["labels"], vision)
    return any((env["tmp"] / "feats").rglob("*.pt"))


def _num_workers(env):
    ds = env["dataset"]()
    return D.make_loader(ds, C.get_config(["--num_workers", "2"]), train=True).num_workers == 2


def _eval_mode(env):
    gold = pred = [["I-PER", "O"]]  # an I- that begins a chunk: an entity for conlleval, none for strict
    f1 = lambda *a: evaluate(gold, pred, C.get_config(list(a)).eval_mode)["f1"]  # noqa: E731
    return f1() != f1("--eval_mode", "strict")


def _epochs_and_accumulation(flag, value):
    def check(env):
        return train.optimizer_steps(C.get_config([]), 10) != train.optimizer_steps(C.get_config([flag, value]), 10)
    return check


def _clip_grad(env):
    """The clipped gradient AdamW sees (its first moment) shrinks with --clip_grad."""
    moments = []
    for argv in (["--clip_grad", "1e-4"], ["--clip_grad", "0"]):
        c, m, batch = env["mner"](argv)
        opt, sched = train.make_optimizer(m, c, steps=10)
        r = train.train_step(m, [batch], opt, sched, c, torch.device("cpu"), 5, contextlib.nullcontext, None, [0, 0])
        assert r["norm"] is not None
        moments.append(sum(float(s["exp_avg"].norm()) for s in opt.state.values()))
    return moments[0] < moments[1]


def _distill(argv):
    """The distillation term of a roberta_crf student changes with argv (a batch with teacher marginals, one post
    unlabelled)."""
    def loss(env, a):
        c, m, batch = env["mner"](["--model", "roberta_crf", "--teacher_run", "t", *a])
        marg = torch.softmax(torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(2)), -1)
        batch = dict(batch, teacher_marg=marg.index_fill(-1, torch.tensor([0]), 0.0),
                     labelled=torch.tensor([True, False]))
        m.train()
        torch.manual_seed(1)
        return float(m(batch)["loss"].detach())
    return lambda env: loss(env, []) != loss(env, argv)


def _ema_decay(env):
    """With --ema_decay 0.9 the weights dev and model.pt see after two steps (w1, w2) are the bias-corrected average
    (0.09 w1 + 0.1 w2) / 0.19: the initial weights carry none; leaving averaged() restores the live w2."""
    c, m, batch = env["mner"](["--ema_decay", "0.9"])
    ema = train.WeightEMA(m, c.ema_decay)
    opt, sched = train.make_optimizer(m, c, steps=10)
    ws = []
    for _ in range(2):
        train.train_step(m, [batch], opt, sched, c, torch.device("cpu"), 5, contextlib.nullcontext, None, [0, 0])
        ema.update()
        ws.append([p.detach().clone() for p in ema.params])
    want = [(0.09 * w1 + 0.1 * w2) / 0.19 for w1, w2 in zip(*ws)]
    with ema.averaged():
        averaged = all(torch.allclose(p, w, atol=1e-6) for p, w in zip(ema.params, want))
        moved = any(not torch.equal(p, w) for p, w in zip(ema.params, ws[1]))
    back = all(torch.equal(p, w) for p, w in zip(ema.params, ws[1]))
    return averaged and moved and back


def _bio_constraints(env):
    """The head decodes with the BIO bans (an I-X first becomes something else) only with --bio_constraints; a
    saved run's config.json without the flag decodes as before it existed."""
    em = torch.zeros(1, 2, 10)
    em[0, 0, 3] = em[0, 1, 3] = 5.0  # I-LOC I-LOC: the free Viterbi's choice
    mask = torch.ones(1, 2, dtype=torch.bool)
    on, off = (env["mner"](argv)[1].head for argv in ([], ["--no-bio_constraints"]))
    return off.decode(em, mask) == [[3, 3]] and on.decode(em, mask)[0][0] != 3 and \
        C.config_from_dict({"model": "roberta_crf"}).bio_constraints is False


def _max_bad_steps(env):
    c = C.get_config(["--max_bad_steps", "1"])
    with pytest.raises(C.ConfigError, match="--max_bad_steps 1"):
        train.skip_bad_step([0, 0], c, 0, "losses")
    train.skip_bad_step([0, 0], C.get_config([]), 0, "losses")  # the default allows 10 in a row
    return True


def _min_gain(env):
    strict = C.get_config(["--min_gain", "0.01"])
    return train.improves(C.get_config([]), 0.501, 0.5) and not train.improves(strict, 0.501, 0.5)


def _patience_epochs(env):
    impatient = C.get_config(["--patience_epochs", "1"])
    return train.stops_early(impatient, 1, 5) and not train.stops_early(C.get_config([]), 1, 5)


def _min_epoch_num(env):
    late = C.get_config(["--min_epoch_num", "9"])
    return train.stops_early(C.get_config([]), 3, 4) and not train.stops_early(late, 3, 4)


def _seed(env):
    def order(*a):
        return list(D.make_loader(env["dataset"](), C.get_config(list(a)), train=True).batch_sampler)
    shuffled = ["--no-length_bucketing", "--batch_size", "4"]
    return order(*shuffled) != order(*shuffled, "--seed", "7")


def _device(env):
    return runner.pick_device(C.get_config([]).device) != runner.pick_device(C.get_config(["--device", "meta"]).device)


def _amp(env):
    cpu = torch.device("cpu")
    return runner.amp_context(C.get_config([]), cpu)[0] is contextlib.nullcontext and \
        runner.amp_context(C.get_config(["--amp"]), cpu)[0] is not contextlib.nullcontext


def _run_dir(flag, value):
    def check(env):
        base = ["--save_dir", str(env["tmp"] / "runs"), "--save_name", "a"] if flag != "ex_name" else \
            ["--save_dir", str(env["tmp"] / "runs"), "--ex_name", "a"]
        alt = {"save_dir": ["--save_dir", str(env["tmp"] / "runs2")], "save_name": ["--save_name", "b"],
               "ex_name": ["--ex_name", "b"]}[flag]
        a, b = (train.new_run_dir(C.get_config(base + x)) for x in ([], alt))
        return a != b
    return check


def _predict_args(argv, text):
    def check(env):
        with pytest.raises(C.ConfigError, match=text):
            import predict
            predict.check_args(C.get_config(["--save_name", "r"] + argv, check=False))
        return True
    return check


def _serve_limit(flag):
    """A serve.py limit: its 4xx message names the flag, and tests/test_serve.py sends a request over it."""
    def check(env):
        return f"over --{flag} " in (ROOT / "serve.py").read_text() and \
            f'"--{flag}"' in (ROOT / "tests" / "test_serve.py").read_text()
    check.__name__ = f"_serve_limit_{flag}"
    return check


def _image_control(env):
    """--image_control reaches the dataset: another post's picture (shuffle) for the posts with one."""
    def sources(argv):
        c = C.get_config(env["enc"] + env["data"] + argv)
        torch.manual_seed(0)
        ds = D.make_dataset(c, "train", D.load_split(c, "train"), env["tok"], env["labels"],
                            M.build_model(c, 10).vision)
        return ds.source
    return sources([]) != sources(["--image_control", "shuffle"])


def _rel_floor(env):
    """Relevance never falls below the floor, however hard its logits push it down."""
    gate = M.GatedConcatFusion(8, floor=0.25)
    torch.nn.init.constant_(gate.rel.bias, -50.0)
    _, rel = gate(torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    return torch.allclose(rel, torch.full_like(rel, 0.25))


def _freeze_text_layers_too_many(env):
    with pytest.raises(C.ConfigError, match="--freeze_text_layers 99"):
        env["mner"](["--freeze_text_layers", "99"])
    return True


# ------------------------------------------------------------------ THE TABLE: every flag -> how it is checked
# Add a row for every new flag. DUAL: the dual-granularity encoder at a tiny size (the --vision_* flags act there).
DUAL = ["--use_dual_granularity", "--vision_stem", "conv", "--vision_img_size", "32", "--vision_patch_size", "8",
        "--vision_fine_patch_size", "4",
        "--vision_embed_dim", "16", "--vision_heads", "2", "--vision_depth", "1", "--vision_swin_window", "2",
        "--vision_delegate_topk", "4", "--vision_max_patches", "16"]

FLAGS = {
    # data
    "dataset_name": [fn(_dataset_name)],
    "data_dir": [fn(_data_dir)],
    "image_root": [fn(_image_root)],
    "lenient_data": [fn(_lenient)],
    "allow_split_overlap": [fn(_allow_split_overlap)],
    "keep_raw_types": [fn(_keep_raw_types)],
    "max_len": [data(alt=["--max_len", "10"])],
    "length_bucketing": [data(alt=["--no-length_bucketing"])],
    # random crop + flip; a padded picture is only flipped (so it may draw no change)
    "image_aug": [fn(lambda env: _pixels_differ(env, ["--image_aug"], base=("--image_fit", "crop")))],
    "image_fit": [fn(lambda env: _pixels_differ(env, ["--image_fit", "crop"]))],
    "cache_dir": [fn(_cache_dir)],
    "num_workers": [fn(_num_workers)],
    "eval_mode": [fn(_eval_mode)],
    # model
    "model": [model(alt=["--model", "roberta_crf"])],
    "text_encoder": [model(alt=["--text_encoder", "minilm"])],
    "image_encoder": [model(alt=["--image_encoder", "efficientnet_lite0"])],
    "freeze_word_embeddings": [model(alt=["--no-freeze_word_embeddings"])],
    "freeze_text_layers": [model(alt=["--freeze_text_layers", "1"]), fn(_freeze_text_layers_too_many)],
    "case_features": [model(alt=["--no-case_features"])],
    "allow_download": [fn(_allow_download)],
    "use_image": [model(alt=["--no-use_image"])],
    "bio_constraints": [fn(_bio_constraints), warned(["--head", "softmax", "--bio_constraints"])],
    "head": [model(alt=["--head", "softmax"]), refused(["--model", "roberta_crf", "--head", "softmax"], "--head")],
    "label_smoothing": [forward(["--head", "softmax"], ["--label_smoothing", "0.3"]),
                        warned(["--label_smoothing", "0.1"])],
    "use_bilstm": [model(alt=["--use_bilstm"]), refused(["--model", "bert", "--use_bilstm"], "--use_bilstm")],
    "hidden_dim": [model(["--use_bilstm"], ["--hidden_dim", "8"]), warned(["--hidden_dim", "8"])],
    "drop_prob": [model(alt=["--drop_prob", "0.3"])],
    "tag_scheme": [model(alt=["--tag_scheme", "bioes"]), forward(["--model", "roberta_crf"], ["--tag_scheme", "bio"]),
                   warned(["--model", "bert", "--tag_scheme", "bioes"])],
    "vision_trainable": [model(alt=["--vision_trainable"]), warned(DUAL + ["--vision_trainable"])],
    "unfreeze_last_vision_blocks": [model(["--vision_trainable"], ["--unfreeze_last_vision_blocks", "1"]),
                                    warned(["--unfreeze_last_vision_blocks", "1"])],
    "use_dual_granularity": [model(alt=DUAL), warned(["--model", "roberta_crf", "--use_dual_granularity"])],
    "vision_img_size": [forward(DUAL, ["--vision_img_size", "64"]), warned(["--vision_img_size", "64"]),  # CLIP
                        forward(["--image_encoder", "efficientnet_lite0"], ["--vision_img_size", "64"])],
    "vision_patch_size": [forward(DUAL, ["--vision_patch_size", "16"])],
    "vision_embed_dim": [model(DUAL, ["--vision_embed_dim", "32"])],
    "vision_heads": [forward(DUAL, ["--vision_heads", "4"])],
    "vision_swin_window": [forward(DUAL, ["--vision_swin_window", "4"])],
    "vision_delegate_topk": [forward(DUAL, ["--vision_delegate_topk", "2"])],
    "vision_max_patches": [forward(DUAL, ["--vision_max_patches", "4"])],
    "vision_select": [forward(DUAL, ["--vision_select", "prior"]), warned(["--vision_select", "prior"])],  # auto: learned here
    "vision_fine_patch_size": [forward(DUAL, ["--vision_fine_patch_size", "2"]),
                               refused(DUAL + ["--vision_fine_patch_size", "8"], "--vision_fine_patch_size")],
    "vision_depth": [model(DUAL, ["--vision_depth", "2"]), warned(["--vision_depth", "3"])],
    "vision_stem": [model(DUAL, ["--vision_stem", "efficientnet_lite0"]), warned(["--vision_stem", "conv"])],
    "vision_distill_lambda": [model(DUAL, ["--vision_distill_lambda", "0"]),  # auto 1 with the conv stem: its head
                              warned(["--vision_distill_lambda", "1"])],
    "resampler_tokens": [model(alt=["--resampler_tokens", "2"]), warned(["--model", "roberta_clip_coattn", "--resampler_tokens", "2"])],
    "cross_attn_heads": [forward(alt=["--cross_attn_heads", "4"]), warned(["--model", "roberta_crf", "--cross_attn_heads", "4"])],
    "fusion_layers": [model(alt=["--fusion_layers", "2"]), warned(["--no-use_image", "--fusion_layers", "2"])],
    "fusion_dim": [model(alt=["--fusion_dim", "8"]), warned(["--model", "roberta_crf", "--fusion_dim", "8"])],
    "fusion_gate": [model(alt=["--fusion_gate", "sum"])],
    "rel_temperature": [forward(alt=["--rel_temperature", "0.2"]),
                        warned(["--fusion_gate", "sum", "--rel_temperature", "2"]),
                        warned(["--model", "roberta_crf", "--rel_temperature", "2"])],
    "rel_floor": [forward(alt=["--rel_floor", "0.5"]), fn(_rel_floor), refused(["--rel_floor", "1"], "--rel_floor"),
                  warned(["--fusion_gate", "sum", "--rel_floor", "0.1"])],
    "image_dropout_p": [forward(alt=["--image_dropout_p", "1"]), warned(["--model", "bert", "--image_dropout_p", "1"])],
    "image_control": [fn(_image_control), warned(["--model", "roberta_crf", "--image_control", "shuffle"])],
    # losses
    # full weight at epoch 0
    "residual_lambda": [forward(["--residual_warmup_epochs", "0"], ["--residual_lambda", "5"])],
    "residual_warmup_epochs": [forward(alt=["--residual_warmup_epochs", "0"])],
    "preserve_lambda": [forward(alt=["--preserve_lambda", "5"])],
    "nce_lambda": [forward(alt=["--nce_lambda", "5"]), warned(["--model", "roberta_crf", "--nce_lambda", "5"])],
    "nce_temperature": [forward(alt=["--nce_temperature", "0.02"])],
    "image_type_lambda": [model(alt=["--image_type_lambda", "0"]), forward(alt=["--image_type_lambda", "5"])],
    "sparsity_lambda": [forward(alt=["--sparsity_lambda", "5"])],
    # training
    "epochs": [fn(_epochs_and_accumulation("--epochs", "3"))],
    "batch_size": [data(alt=["--batch_size", "3"])],
    "text_lr": [train_(alt=["--text_lr", "1e-3"])],
    "backbone_lr": [train_(["--vision_trainable"], ["--backbone_lr", "1e-3"])],
    "fusion_lr": [train_(alt=["--fusion_lr", "1e-2"])],
    "head_lr": [train_(alt=["--head_lr", "1e-2"])],
    "crf_lr": [train_(alt=["--crf_lr", "1e-2"]), refused(["--crf_lr", "-2"], "--crf_lr"),
               warned(["--model", "bert", "--crf_lr", "1e-2"])],
    "weight_decay_rate": [train_(alt=["--weight_decay_rate", "0.5"])],
    "clip_grad": [fn(_clip_grad)],
    "warmup_prop": [train_(alt=["--warmup_prop", "0.5"])],
    "ema_decay": [fn(_ema_decay), refused(["--ema_decay", "1"], "--ema_decay")],
    "gradient_accumulation_steps": [fn(_epochs_and_accumulation("--gradient_accumulation_steps", "4"))],
    "min_epoch_num": [fn(_min_epoch_num)],
    "min_gain": [fn(_min_gain)],
    "patience_epochs": [fn(_patience_epochs)],
    # distillation (behaviour end to end: tests/test_distill.py)
    "teacher_run": [used_by("train.py"), refused(["--teacher_run", "t", "--model", "bert"], "--teacher_run")],
    "distill_lambda": [fn(_distill(["--distill_lambda", "0.3"])), warned(["--distill_lambda", "0.3"]),
                       refused(["--distill_lambda", "-1"], "--distill_lambda")],
    "distill_temperature": [fn(_distill(["--distill_temperature", "2"])), warned(["--distill_temperature", "2"]),
                            refused(["--distill_temperature", "0"], "--distill_temperature")],
    "distill_unlabelled": [used_by("distill.py"), warned(["--distill_unlabelled", "u.txt"])],
    "seed": [fn(_seed)],
    "device": [fn(_device)],
    "max_bad_steps": [fn(_max_bad_steps)],
    "grad_checkpointing": [model(alt=["--grad_checkpointing"])],
    "amp": [fn(_amp)],
    # runs
    "save_dir": [fn(_run_dir("save_dir", None))],
    "save_name": [fn(_run_dir("save_name", None))],
    "ex_name": [fn(_run_dir("ex_name", None))],
    "continue_train_name": [refused(["--continue_train_name", "no_such_run"], "--continue_train_name")],
    "ex_project": [used_by("train.py")],      # SwanLab's project name (Tracker)
    "swanlab_mode": [used_by("train.py")],    # SwanLab on/off/local (Tracker)
    "split": [used_by("test.py")],
    "record_file": [used_by("test.py")],
    "plots": [used_by("test.py")],
    "explain_hits": [used_by("test.py")],     # behaviour: tests/test_predict.py
    # predict
    "text": [fn(_predict_args([], "either --text"))],
    "input": [fn(_predict_args(["--text", "a", "--input", "b.jsonl"], "either --text"))],
    "image": [fn(_predict_args(["--input", "b.jsonl", "--image", "x.jpg"], "--image goes with --text"))],
    "format": [used_by("predict.py")],
    "out_dir": [used_by("predict.py"), used_by("test.py")],
    "explain": [used_by("predict.py")],
    "explain_word": [fn(_predict_args(["--text", "a", "--explain_word", "x"], "--explain_word needs --explain"))],
    # export / serve (behaviour: tests/test_export.py, tests/test_serve.py)
    "bundle": [used_by("predict.py"), used_by("serve.py"), used_by("export.py"), used_by("test.py")],
    "int8": [used_by("export.py")],
    "export_format": [used_by("export.py")],
    "opset": [used_by("export.py")],
    "image_workers": [used_by("predict.py"), used_by("serve.py")],
    "host": [used_by("serve.py")],
    "port": [used_by("serve.py")],
    "quiet": [used_by("serve.py")],
    "batch_window_ms": [used_by("serve.py")],
    "max_batch_posts": [used_by("serve.py")],
    "max_body_bytes": [used_by("serve.py"), fn(_serve_limit("max_body_bytes"))],
    "max_image_bytes": [used_by("serve.py"), fn(_serve_limit("max_image_bytes"))],
    "max_image_pixels": [fn(_serve_limit("max_image_pixels"))],
    "max_posts": [fn(_serve_limit("max_posts"))],
    "max_words": [fn(_serve_limit("max_words"))],
}
# ------------------------------------------------------------------ end of the table


def test_every_flag_is_in_the_table():
    dests = {a.dest for a in C.build_parser()._actions if a.option_strings and a.dest != "help"}
    assert not dests - set(FLAGS), f"flags without a row in tests/test_flags.py FLAGS: {sorted(dests - set(FLAGS))}"
    assert not set(FLAGS) - dests, f"rows for flags that no longer exist: {sorted(set(FLAGS) - dests)}"


@pytest.fixture(scope="module")
def env(tiny_bert_dir, tiny_clip_dir, tiny_data_dir, tmp_path_factory):
    from transformers import AutoTokenizer
    tmp = tmp_path_factory.mktemp("flags")
    enc = ["--text_encoder", tiny_bert_dir, "--image_encoder", tiny_clip_dir, "--cross_attn_heads", "2",
           "--fusion_layers", "1", "--fusion_dim", "16", "--resampler_tokens", "4", "--hidden_dim", "4"]
    data_argv = ["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny", "--cache_dir", str(tmp / "cache")]
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    posts = D.load_split(C.get_config(data_argv), "train")
    labels = D.LabelMap.from_posts(posts)
    e = {"tmp": tmp, "enc": enc, "data": data_argv, "tok": tok, "labels": labels, "memo": {}}

    def dataset(argv=()):
        c = C.get_config(enc + data_argv + list(argv))
        return D.make_dataset(c, "train", D.load_split(c, "train"), tok, labels)

    def mner(argv=()):
        """(config, tiny model built with seed 0, a batch with images) for argv over the tiny encoders."""
        c = C.get_config(enc + list(argv))
        torch.manual_seed(0)
        m = M.build_model(c, 10)
        g = torch.Generator().manual_seed(0)
        S = D.image_prep_for(c).size
        batch = {"input_ids": torch.randint(5, 500, (2, 9), generator=g),
                 "attention_mask": torch.ones(2, 9, dtype=torch.long),
                 "word_index": torch.arange(1, 7).repeat(2, 1),
                 "word_mask": torch.ones(2, 6, dtype=torch.bool),
                 "labels": torch.randint(1, 10, (2, 6), generator=g),
                 "case_ids": torch.randint(1, 4, (2, 6), generator=g),
                 "has_image": torch.ones(2, dtype=torch.bool), "index": torch.arange(2),
                 "pixel_values": torch.randn(2, 3, S, S, generator=g)}
        return c, m, batch
    e["dataset"], e["mner"] = dataset, mner
    return e


def _simple_attrs(m: torch.nn.Module) -> list:
    """The plain settings each module keeps (temperatures, smoothing, checkpointing, dropout probabilities, HF configs)."""
    out = []
    for name, mod in m.named_modules():
        for k, v in sorted(vars(mod).items()):
            if k != "training" and isinstance(v, (bool, int, float, str)):
                out.append((name, k, v))
        cfg = getattr(mod, "config", None)
        if hasattr(cfg, "to_json_string") and not isinstance(cfg, type):
            out.append((name, "config", cfg.to_json_string()))
    return out


def _model_sig(env, argv):
    c, m, _ = env["mner"](argv)
    params = [(n, tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()]
    return params, repr(m), _simple_attrs(m), m.text.model.is_activation_checkpointing if hasattr(m.text.model, "is_activation_checkpointing") \
        else m.text.model.is_gradient_checkpointing


def _loss(env, argv):
    c, m, batch = env["mner"](argv)
    m.train()
    torch.manual_seed(1)
    return float(m(batch, epoch=0)["loss"].detach())


def _data_sig(env, argv):
    ds = env["dataset"](argv)
    batches = list(D.make_loader(ds, ds_config(env, argv), train=True))
    return [p.tokens for p in ds.posts], [w.enc.input_ids for w in ds.windows], [b["index"].tolist() for b in batches]


def ds_config(env, argv):
    return C.get_config(env["enc"] + env["data"] + list(argv))


def _train_sig(env, argv):
    c, m, _ = env["mner"](argv)
    opt, sched = train.make_optimizer(m, c, steps=20)
    groups = [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    return groups, [sched.lr_lambdas[0](t) for t in range(21)]


SIGS = {"model": _model_sig, "forward": _loss, "data": _data_sig, "train": _train_sig}


def _check(env, flag, check) -> bool:
    kind = check[0]
    if kind in SIGS:
        _, base, alt = check
        sig = SIGS[kind]
        key = (kind, tuple(base))
        if key not in env["memo"]:
            env["memo"][key] = sig(env, base)
        return env["memo"][key] != sig(env, base + alt)
    if kind == "fn":
        return check[1](env) is True
    if kind == "refused":
        _, argv, text = check
        with pytest.raises(C.ConfigError) as e:
            c = C.get_config(env["enc"] + argv)
            M.unused_flags(c, C.given_flags(argv))
            train.resolve_resume(env["enc"] + argv)
        return text in str(e.value)
    if kind == "warned":
        argv = check[1]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            M.check_flags(C.get_config(env["enc"] + argv), C.given_flags(argv))
        lines = [l for l in out.getvalue().splitlines() if l.startswith(f"warning: --{flag} does nothing with ")]
        return len(lines) == 1
    if kind == "used_by":
        src = (ROOT / check[1]).read_text()
        return any(f"{v}.{flag}" in src for v in ("config", "args", "cli"))
    raise AssertionError(f"unknown check kind {kind}")


def test_every_flag_has_an_effect(env):
    failed = [f"--{flag}: {check[0]} {check[1:] if check[0] != 'fn' else check[1].__name__}"
              for flag, checks in FLAGS.items() for check in checks if not _check(env, flag, check)]
    assert not failed, "flags without the effect their row claims:\n" + "\n".join(failed)


def test_no_warning_for_flags_that_act(env):
    """The MNER defaults with the flags given explicitly where they act: no warning, no refusal."""
    argv = ["--head", "softmax", "--label_smoothing", "0.1", "--use_bilstm", "--hidden_dim", "8", "--rel_temperature",
            "2", "--vision_trainable", "--unfreeze_last_vision_blocks", "1"]
    assert M.unused_flags(C.get_config(env["enc"] + argv), C.given_flags(argv)) == []
    # a value the registry entry already has is no contradiction
    argv = ["--model", "bert_bilstm_crf", "--use_bilstm", "--head", "crf"]
    assert M.unused_flags(C.get_config(argv), C.given_flags(argv)) == []


def test_renamed_flags_keep_their_old_spelling_with_one_warning_line(capsys):
    """Each old spelling sets the renamed flag, prints one deprecation line naming the new one, is hidden from
    --help; old runs' config.json keys are read under the new names (config.migrate)."""
    for old, new in C.RENAMED.items():
        value = "7" if new == "patience_epochs" else "0.25"
        c = C.get_config([f"--{old}", value])
        assert str(getattr(c, new)) in (value, str(float(value))) and C.given_flags([f"--{old}", value]) == {new}
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"warning: --{old} is deprecated; use --{new}"]
        assert not re.search(f"--{old}\\b(?!_)", C.build_parser().format_help())
    old_run = C.config_from_dict({"model": "MNER", "fin_tuning_lr": 2e-5, "downs_en_lr": 2e-3, "patience_num": 7})
    assert (old_run.text_lr, old_run.fusion_lr, old_run.head_lr, old_run.patience_epochs) == (2e-5, 2e-3, 2e-3, 7)
    fmt2 = C.config_from_dict({"run_format": 2, "model": "MNER", "clip_lr": 3e-6, "patience": 0.5})
    assert (fmt2.backbone_lr, fmt2.min_gain) == (3e-6, 0.5)


def test_old_registry_name_is_an_alias_with_one_warning_line(capsys):
    """--model bert_crf (the same model as roberta_crf) builds roberta_crf and says so in one line; a run saved
    under the old name loads as roberta_crf; the registry and --help name it once."""
    assert C.get_config(["--model", "bert_crf"]).model == "roberta_crf"
    assert capsys.readouterr().err.strip().splitlines() == ["warning: --model bert_crf is deprecated; use --model "
                                                            "roberta_crf"]
    assert C.config_from_dict({"model": "bert_crf", "run_format": 5}).model == "roberta_crf"
    assert "bert_crf" not in M.MODELS and "bert_crf," not in C.build_parser().format_help()


def test_runs_of_removed_levers_load_only_when_the_lever_left_the_weights_alone():
    """A lever taken out of MANGO: a run that used one that defines the model is refused in one line naming it;
    one that only shaped training (--llrd) loads for test and predict; the flag is gone from the parser."""
    with pytest.raises(C.ConfigError, match=r"^run/config.json: trained with --context_k 2, .*retrain") as e:
        C.config_from_dict({"model": "roberta_crf", "context_k": 2}, "run/config.json")
    assert "\n" not in str(e.value)
    with pytest.raises(C.ConfigError, match=r"trained with --word_pooling mean, "):
        C.config_from_dict({"model": "roberta_crf", "word_pooling": "mean"}, "run/config.json")
    c = C.config_from_dict({"model": "roberta_crf", "llrd": 0.9, "case_input": False, "word_pooling": "first",
                            "crf_init": "zero", "word_dropout": 0.05}, "run/config.json")
    assert c.model == "roberta_crf" and not {"llrd", "case_input", "word_pooling", "crf_init", "word_dropout"} & set(vars(c))
    with pytest.raises(C.ConfigError, match="--llrd"):
        C.get_config(["--llrd", "0.9"])


def test_a_run_of_a_removed_training_lever_does_not_resume(tmp_path):
    """It loads for test and predict, but training on would not go as it began: refused in one line."""
    import json
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "roberta_crf", "run_format": 4, "llrd": 0.9}))
    for f in ("label_map.json", "last.pt"):
        (run / f).write_text("{}")
    with pytest.raises(C.ConfigError, match=r"^--continue_train_name old: the run trained with --llrd 0.9, .*new run"):
        train.main(["--continue_train_name", "old", "--save_dir", str(tmp_path), "--swanlab_mode", "disabled"])


def test_flag_policy_comes_from_the_declarations():
    """Resume and tool policy are keywords of each flag's declaration; the sets are derived from them."""
    dests = {a.dest for a in C.build_parser()._actions}
    assert C.RESUME_MAY_CHANGE <= dests and set(C.RESUME_REFUSED) <= dests
    assert "epochs" in C.RESUME_MAY_CHANGE and not {"model", "teacher_run"} & C.RESUME_MAY_CHANGE
    assert "chunking rule" in C.RESUME_REFUSED["eval_mode"] and not C.RESUME_MAY_CHANGE & set(C.RESUME_REFUSED)
    for tool, flags in C.TOOL_FLAGS.items():
        own = {a.dest for a in C.build_parser(tool)._actions if a.option_strings and a.dest != "help"}
        assert own - set(C.RENAMED.values()) == flags - {"help"}, tool
    assert "port" in C.TOOL_FLAGS["serve"] and "port" not in C.TOOL_FLAGS["test"]


@pytest.mark.parametrize("fast", [True, False])
def test_amp_warns_once_on_a_cpu_without_fast_bf16(monkeypatch, capsys, request, fast):
    """--amp on a CPU whose bf16 is emulated (an AVX2-only x86: many times the fp32 step) says so in one line, once;
    a CPU with fast bf16, or a run without --amp, hears nothing."""
    monkeypatch.setattr(runner, "bf16_vector_units", lambda: fast)
    runner.cpu_bf16_ok.cache_clear()
    request.addfinalizer(runner.cpu_bf16_ok.cache_clear)  # the next caller asks this machine again
    cpu = torch.device("cpu")
    runner.amp_context(C.get_config([]), cpu)
    runner.amp_context(C.get_config(["--no-amp"]), cpu)
    assert capsys.readouterr().err == ""
    for _ in range(2):
        runner.amp_context(C.get_config(["--amp"]), cpu)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ([] if fast else [err[0]]) and (fast or "--no-amp" in err[0] and err[0].startswith("warning: --amp"))
