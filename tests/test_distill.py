"""Distillation from a teacher run (--teacher_run): the CRF's differentiable marginals, the KL term, unlabelled
posts (no tag loss, dev/test posts refused, the builder), and the teacher cache keyed by run and posts."""
from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

import dataloader as D
import distill
import train
from config import UserError, get_config
from conftest import ROOT
from crf import CRFHead
from model import build_model, tag_distill_loss


def brute_marginals(head, em, n):
    """p(label at word) of one post by enumerating every path of its n words (score space, then BIO labels)."""
    start, end, trans = head.scores()
    x = head._pin(em)[0, :n]
    S = x.size(-1)
    paths = list(itertools.product(range(S), repeat=n))
    scores = torch.stack([start[p[0]] + end[p[-1]] + sum(x[t, p[t]] for t in range(n))
                          + sum(trans[p[t - 1], p[t]] for t in range(1, n)) for p in paths])
    w = scores.softmax(0)
    p = torch.zeros(n, S)
    for wi, path in zip(w, paths):
        p[torch.arange(n), torch.tensor(path)] += wi
    if not head.bioes:
        return p
    return p.new_zeros(n, int(head.to_bio.max()) + 1).index_add_(-1, head.to_bio, p)  # B+S -> B, I+E -> I


@pytest.mark.parametrize("bioes", [False, True])
def test_log_marginals_exact_and_differentiable(bioes):
    torch.manual_seed(0)
    head = CRFHead(4, bioes=bioes)  # PAD, O, B-X, I-X
    S = head.n_scores
    em = torch.randn(2, 4, S, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logm = head.log_marginals(em, mask)
    assert torch.allclose(logm[0, :3].exp(), brute_marginals(head, em[:1].detach(), 3), atol=1e-5)
    assert torch.allclose(logm.exp().sum(-1)[mask], torch.ones(7), atol=1e-5)
    assert (logm[~mask] == 0).all()
    logm[mask].sum().backward()
    assert em.grad is not None and em.grad[1].abs().sum() > 0
    # a higher temperature flattens every word's distribution
    hot = head.log_marginals(em.detach(), mask, temperature=4.0).exp()
    cold = head.log_marginals(em.detach(), mask).exp()
    ent = lambda p: -(p.clamp_min(1e-12).log() * p).sum(-1)[mask]  # noqa: E731
    assert ent(hot).mean() > ent(cold).mean() + 0.1


def test_tag_distill_loss_is_the_kl():
    p = torch.tensor([[[0.0, 0.7, 0.3], [0.0, 0.5, 0.5]]])
    mask = torch.tensor([[True, False]])
    assert tag_distill_loss(p.clamp_min(1e-8).log(), p, mask).abs() < 1e-6
    q = torch.tensor([[[0.0, 0.5, 0.5], [0.0, 0.9, 0.1]]])
    want = 0.7 * torch.log(torch.tensor(0.7 / 0.5)) + 0.3 * torch.log(torch.tensor(0.3 / 0.5))
    assert torch.isclose(tag_distill_loss(q.clamp_min(1e-8).log(), p, mask), want, atol=1e-5)


def _batch(cfg, tok, label_map, posts, targets):
    ds = D.make_dataset(cfg, "train", posts, tok, label_map, targets=targets)
    return D.collate([ds[i] for i in range(len(ds))], ds.pad_id)


def test_unlabelled_posts_have_no_tag_loss_and_targets_move_the_loss(tiny_bert_dir, tiny_data_dir):
    from model import load_tokenizer
    cfg = get_config(["--model", "roberta_crf", "--text_encoder", tiny_bert_dir, "--data_dir", str(tiny_data_dir),
                      "--dataset_name", "tiny", "--teacher_run", "x"])
    posts = D.load_split(cfg, "train")[:4]
    label_map = D.LabelMap.from_posts(posts)
    torch.manual_seed(0)
    model = build_model(cfg, len(label_map)).eval()
    tok = load_tokenizer(cfg)
    L = len(label_map)
    uniform = [torch.full((len(p.tokens), L), 1.0 / (L - 1)).index_fill(1, torch.tensor([0]), 0.0) for p in posts]
    unl = D.Post(posts[3].tokens, ["O"] * len(posts[3].tokens), None, "u:1", labelled=False)
    b = _batch(cfg, tok, label_map, posts[:3] + [unl], uniform)
    assert b["labelled"].tolist() == [True, True, True, False] and b["teacher_marg"].shape[-1] == L
    out = model(b)
    b2 = dict(b, labels=b["labels"].clone())
    b2["labels"][3, 0] = 2  # an unlabelled post's (placeholder) tags never reach the tag loss
    assert torch.equal(model(b2)["parts"]["tag"], out["parts"]["tag"])
    b3 = dict(b, labelled=torch.ones(4, dtype=torch.bool))
    assert not torch.equal(model(b3)["parts"]["tag"], out["parts"]["tag"])
    sharp = [torch.nn.functional.one_hot(torch.ones(len(p.tokens), dtype=torch.long), L).float() for p in posts]
    b4 = _batch(cfg, tok, label_map, posts[:3] + [unl], sharp)
    assert out["parts"]["tag_distill"] > 0 and model(b4)["parts"]["tag_distill"] != out["parts"]["tag_distill"]
    # only unlabelled posts in a batch: a zero tag loss, the distillation term alone
    only = model(_batch(cfg, tok, label_map, [unl], uniform[3:]))
    assert only["parts"]["tag"] == 0 and torch.isfinite(only["loss"]) and only["loss"] > 0


@pytest.fixture(scope="module")
def teacher(tiny_data_dir, tiny_bert_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    base = ["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny", "--model", "roberta_crf", "--text_encoder",
            tiny_bert_dir, "--save_dir", str(d / "save"), "--cache_dir", str(d / "cache"), "--swanlab_mode",
            "disabled", "--batch_size", "8", "--seed", "3", "--epochs", "1"]
    train.main([*base, "--save_name", "teacher"])
    return base, d


def test_student_learns_from_teacher_with_unlabelled_posts(teacher, tiny_data_dir, capsys):
    base, d = teacher
    unl = d / "unlabelled.txt"
    unl.write_text("Kevin Durant visits Paris today\n\nRT @nba : Golden State wins in Oakland\n", encoding="utf-8")
    train.main([*base, "--save_name", "student", "--teacher_run", "teacher", "--distill_unlabelled", str(unl)])
    out = capsys.readouterr().out
    assert "2 posts learned from the teacher only" in out and "from " in out
    assert "teacher marginals on every post (2 of them unlabelled)" in out
    cache = list((d / "cache" / "teacher").glob("*.pt"))
    assert len(cache) == 1
    entries = torch.load(cache[0], weights_only=True)
    assert len(entries) == 24 + 2  # the tiny training posts and the unlabelled ones, keyed by their words
    # a second student reads them back; a new post is added to the same file
    unl.write_text("Kevin Durant visits Paris today\nLeBron James in Cleveland\n", encoding="utf-8")
    train.main([*base, "--save_name", "student2", "--teacher_run", str(Path(base[base.index("--save_dir") + 1])
                                                                          / "teacher"),
                "--distill_unlabelled", str(unl), "--epochs", "1"])
    out = capsys.readouterr().out
    assert "marginals of 26 posts, 25 from" in out
    assert len(torch.load(cache[0], weights_only=True)) == 27
    # another temperature is another teacher output: its own file
    train.main([*base, "--save_name", "student3", "--teacher_run", "teacher", "--distill_temperature", "2"])
    assert len(list((d / "cache" / "teacher").glob("*.pt"))) == 2


def test_unlabelled_dev_or_test_post_is_refused(teacher, tiny_data_dir):
    base, d = teacher
    dev = D.read_conll(tiny_data_dir / "tiny" / "valid.txt")[2]
    unl = d / "leaky.txt"
    unl.write_text("a harmless post\n" + " ".join(w.upper() for w in dev.tokens) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"leaky.txt:2 repeats valid post .*valid.txt:\d+ \(1 such posts\)"):
        train.main([*base, "--save_name", "leak", "--teacher_run", "teacher", "--distill_unlabelled", str(unl)])


def test_teacher_refusals(teacher):
    base, _ = teacher
    with pytest.raises(UserError, match="--teacher_run ghost: no run with a model.pt"):
        train.main([*base, "--save_name", "x", "--teacher_run", "ghost"])
    assert not (Path(base[base.index("--save_dir") + 1]) / "x").exists()  # refused before the run directory
    with pytest.raises(UserError, match="--teacher_run: the student learns CRF tag marginals; --model bert"):
        train.main([*base, "--save_name", "x", "--teacher_run", "teacher", "--model", "bert"])
    # a teacher of another release with the same labels: it may have seen this run's dev or test posts
    save = Path(base[base.index("--save_dir") + 1])
    shutil.copytree(save / "teacher", save / "other_teacher")
    cfg = json.loads((save / "other_teacher" / "config.json").read_text())
    cfg["data_hash"]["train"] = "0" * 16
    (save / "other_teacher" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"--teacher_run other_teacher: it trained on another train split \(tiny"):
        train.main([*base, "--save_name", "y", "--teacher_run", "other_teacher"])


def test_make_unlabelled_removes_held_out_posts(tiny_data_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_unlabelled", ROOT / "data" / "make_unlabelled.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "u.txt"
    mod.main(["--source", "tiny", "--data_dir", str(tiny_data_dir), "--out", str(out)])
    lines = out.read_text(encoding="utf-8").splitlines()
    train_posts = D.read_conll(tiny_data_dir / "tiny" / "train.txt")
    held = {distill.post_key(p.tokens) for s in ("valid", "test") for p in D.read_conll(tiny_data_dir / "tiny" /
                                                                                          f"{s}.txt")}
    want = {distill.post_key(p.tokens) for p in train_posts} - held
    assert {distill.post_key(line.split()) for line in lines} == want
    assert f"{len(lines)} of {len(train_posts)} tiny training posts" in capsys.readouterr().out
    mod.main(["--source", "tiny,tiny", "--data_dir", str(tiny_data_dir), "--out", str(out)])  # a post in two sources
    assert sorted(out.read_text(encoding="utf-8").splitlines()) == sorted(lines)
    assert f"{len(lines)} of {2 * len(train_posts)} tiny + tiny training posts" in capsys.readouterr().out
