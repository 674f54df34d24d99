"""The text-path levers: the CRF's own rate, the auto settings (head rate, tag scheme, weight average, an image model
without training images), frozen lower layers, and the domain-adaptive MLM script (its leak check and that its output
loads as --text_encoder)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import config as C
import dataloader as D
import model as M
import train
from conftest import ROOT

def test_crf_lr_gives_the_crf_scores_their_own_rate(tiny_bert_dir):
    """--crf_lr: exactly the CRF's start, end and transition scores train at it, the rest of the head at --head_lr;
    -1 leaves them in the head's group."""
    argv = ["--text_encoder", tiny_bert_dir, "--model", "roberta_crf", "--warmup_prop", "0"]
    for extra, crf_rate in (([], None), (["--crf_lr", "0.02"], 0.02)):
        c = C.get_config(argv + extra)
        m = M.build_model(c, 10)
        opt, _ = train.make_optimizer(m, c, steps=10)
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        crf = {id(p) for p in m.head.crf.parameters()}
        assert len(crf) == 3
        for n, p in m.named_parameters():
            if p.requires_grad and not n.startswith("text."):
                assert lr_of[id(p)] == pytest.approx(crf_rate if crf_rate and id(p) in crf else c.head_lr), n


def test_head_lr_auto_is_higher_only_without_image_fusion():
    """-1 resolves to 3e-3 for a text-only model and to --fusion_lr for the image models;
    config.IMAGE_MODELS names exactly the registry entries that fuse the image."""
    assert set(C.IMAGE_MODELS) == {name for name, (fusion, _, _) in M.MODELS.items() if fusion}
    for model in M.MODELS:
        c = C.get_config(["--model", model, "--fusion_lr", "2e-3"], check=False)
        assert c.head_lr == (2e-3 if model in C.IMAGE_MODELS else 3e-3), model
    # MNER without its image (the text_only control) keeps MNER's head rate: only the image changes
    assert C.get_config(["--no-use_image", "--fusion_lr", "2e-3"], check=False).head_lr == 2e-3
    assert C.get_config(["--model", "roberta_crf", "--head_lr", "1e-4"], check=False).head_lr == 1e-4
    # a run saved before --head_lr existed trained its head at --fusion_lr, and resumes so
    assert C.config_from_dict({"model": "roberta_crf", "downs_en_lr": 2e-3}).head_lr == 2e-3


def test_tag_scheme_auto_is_bioes_only_for_the_text_only_models():
    for model in M.MODELS:
        c = C.get_config(["--model", model], check=False)
        assert c.tag_scheme == ("bio" if model in C.IMAGE_MODELS else "bioes"), model
    assert C.get_config(["--model", "roberta_crf", "--tag_scheme", "bio"], check=False).tag_scheme == "bio"
    assert C.config_from_dict({"model": "roberta_crf"}).tag_scheme == "bio"  # a run saved before the flag


def test_ema_auto_is_on_only_for_the_text_only_models():
    import model as M
    for model in M.MODELS:
        c = C.get_config(["--model", model], check=False)
        assert c.ema_decay == (0.0 if model in C.IMAGE_MODELS else 0.99), model
    assert C.get_config(["--model", "roberta_crf", "--ema_decay", "0"], check=False).ema_decay == 0
    assert C.get_config(["--model", "MNER", "--ema_decay", "0.9"], check=False).ema_decay == 0.9
    # a run saved before --ema_decay existed kept no average, and resumes without one
    assert C.config_from_dict({"model": "roberta_crf"}).ema_decay == 0.0


def test_image_models_without_any_training_image_take_the_text_paths_settings(tiny_data_dir):
    """With no usable image among the training posts only MNER's text path trains, so its auto flags become the text
    path's; one image keeps MNER's own; a flag the user gives is kept; text-only models are untouched."""
    argv = ["--model", "MNER", "--data_dir", str(tiny_data_dir), "--dataset_name", "tiny"]
    c = C.get_config(argv, tool="train")
    posts = D.load_split(c, "train")
    imageless = [D.Post(p.tokens, p.tags, "no_such_image") for p in posts]
    said = []
    train.text_path_settings(c, argv, posts, said.append)
    assert (c.tag_scheme, c.head_lr, c.ema_decay, said) == ("bio", c.fusion_lr, 0.0, [])
    train.text_path_settings(c, argv, imageless, said.append)
    assert (c.tag_scheme, c.head_lr, c.ema_decay) == ("bioes", 3e-3, 0.99) and "--tag_scheme bioes" in said[0]
    given = argv + ["--tag_scheme", "bio"]
    c = C.get_config(given, tool="train")
    train.text_path_settings(c, given, imageless, said.append)
    assert (c.tag_scheme, c.head_lr) == ("bio", 3e-3)
    off = argv + ["--no-use_image"]  # the text_only control keeps MNER's settings, as it was measured
    c = C.get_config(off, tool="train")
    train.text_path_settings(c, off, imageless, said.append)
    assert (c.tag_scheme, c.head_lr) == ("bio", c.fusion_lr)


def test_frozen_lower_layers_get_no_gradient(tiny_bert_dir):
    c = C.get_config(["--text_encoder", tiny_bert_dir, "--model", "roberta_crf", "--freeze_text_layers", "1"])
    torch.manual_seed(0)
    m = M.build_model(c, 10)
    L = m.text.model.config.num_hidden_layers
    frozen = {n for n, p in m.text.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in m.text.model.named_parameters() if M.text_depth(n, L) <= 1}
    batch = {"input_ids": torch.randint(5, 500, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long),
             "word_index": torch.arange(1, 6).repeat(2, 1), "word_mask": torch.ones(2, 5, dtype=torch.bool),
             "labels": torch.randint(1, 10, (2, 5)), "case_ids": torch.ones(2, 5, dtype=torch.long),
             "has_image": torch.zeros(2, dtype=torch.bool), "index": torch.arange(2)}
    m(batch)["loss"].backward()
    for n, p in m.text.model.named_parameters():
        assert (p.grad is None) == (n in frozen), n
    assert not any(n.startswith("text.model.embeddings") for n, _ in m.param_groups()["text"])


def test_mlm_corpus_leak_check_on_the_shipped_data():
    import pretrain_mlm
    corpus, report = pretrain_mlm.build_corpus(str(ROOT / "data"), ["twitter2015", "twitter2017", "MNRE"])
    held = set()
    for name in pretrain_mlm.TWITTER:
        for split in ("valid", "test"):
            held |= {pretrain_mlm.post_key(p.tokens)
                     for p in D.load_split(C.get_config(["--dataset_name", name]), split)}
    assert not any(pretrain_mlm.post_key(s) in held for s in corpus)
    assert report["dropped_leak"] == sum(s["dropped_leak"] for s in report["sources"].values()) > 0
    assert report["sentences"] == len(corpus)


def test_mlm_script_writes_a_loadable_encoder(tmp_path, tiny_bert_dir):
    out = tmp_path / "enc"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "pretrain_mlm.py", "--text_encoder", tiny_bert_dir, "--out", str(out),
                        "--max_sentences", "40", "--epochs", "1", "--batch_size", "8", "--head_warmup_steps", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((out / "mlm_report.json").read_text())
    assert rep["epoch_loss"] and rep["dropped_leak"] > 0 and "leak check" in p.stdout
    c = C.get_config(["--text_encoder", str(out), "--model", "roberta_crf"])
    before = M.build_model(C.get_config(["--text_encoder", tiny_bert_dir, "--model", "roberta_crf"]), 10)
    after = M.build_model(c, 10)
    # the adapted encoder loads as --text_encoder and its weights moved
    w0 = dict(before.text.model.named_parameters())
    assert any(not torch.equal(w0[n], q) for n, q in after.text.model.named_parameters())


