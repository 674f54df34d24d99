"""The text-path levers: retrieved context, mean sub-word pooling, layer-wise lr decay, frozen lower
layers, and the domain-adaptive MLM script (its leak check and that its output loads as --text_encoder), word and locked
dropout."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import config as C
import context
import dataloader as D
import model as M
import train
from conftest import ROOT, make_conll

TRAIN = [
    (["Obama", "visits", "Paris", "today"], ["B-PER", "O", "B-LOC", "O"], "1"),
    (["Obama", "visits", "Paris", "today"], ["B-PER", "O", "B-LOC", "O"], "2"),  # a duplicate of post 0
    (["Obama", "speaks", "in", "Paris"], ["B-PER", "O", "O", "B-LOC"], "3"),
    (["Apple", "releases", "a", "new", "phone"], ["B-ORG", "O", "O", "O", "O"], "4"),
    (["Google", "releases", "a", "new", "phone"], ["B-ORG", "O", "O", "O", "O"], "5"),
    (["rain", "in", "London", "again"], ["O", "O", "B-LOC", "O"], "6"),
]
DEV = [(["Obama", "visits", "Paris", "today"], ["B-PER", "O", "B-LOC", "O"], "7"),  # equal to train posts 0 and 1
       (["Zorblax", "quuxes", "Obama", "tonight"], ["B-PER", "O", "B-PER", "O"], "8")]
TEST = [(["Microsoft", "releases", "a", "tablet"], ["B-ORG", "O", "O", "O"], "9")]


@pytest.fixture(scope="module")
def ctx_env(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("ctx")
    for split, posts in (("train", TRAIN), ("valid", DEV), ("test", TEST)):
        make_conll(root / "data" / "ctx" / f"{split}.txt", posts)
    argv = ["--data_dir", str(root / "data"), "--dataset_name", "ctx", "--cache_dir", str(root / "cache"),
            "--text_encoder", tiny_bert_dir, "--model", "roberta_crf", "--context_k", "2"]
    c = C.get_config(argv)
    tok = M.load_tokenizer(c)
    posts = {s: D.load_split(c, s) for s in ("train", "valid", "test")}
    return {"argv": argv, "config": c, "tok": tok, "posts": posts, "labels": D.LabelMap.from_posts(posts["train"]),
            "root": root}


def _context_of(env, split):
    p = env["posts"]
    return context.context_words(env["config"], split, p[split], p["train"])


def test_context_never_the_post_itself_nor_dev_or_test(ctx_env):
    train_words = [p.tokens for p in ctx_env["posts"]["train"]]
    held_out = [p for s in ("valid", "test") for p in ctx_env["posts"][s]]
    for split in ("train", "valid", "test"):
        for post, ctx in zip(ctx_env["posts"][split], _context_of(ctx_env, split)):
            assert len(ctx) == 2
            for words in ctx:
                assert any(words is w for w in train_words)  # the pool is the training split's posts, always
                assert words != post.tokens  # never itself, nor a post with exactly its words
    # training posts 0 and 1 are equal: neither retrieves the other
    ctx0, ctx1 = _context_of(ctx_env, "train")[:2]
    assert TRAIN[0][0] not in ctx0 and TRAIN[0][0] not in ctx1
    # the dev post equal to training posts 0 and 1 retrieves neither of them
    assert TRAIN[0][0] not in _context_of(ctx_env, "valid")[0]
    # no dev or test post is ever a neighbour (train post 0 has the words of dev post 0, but it is a training post)
    for split in ("train", "valid", "test"):
        for ctx in _context_of(ctx_env, split):
            assert not any(words is p.tokens for words in ctx for p in held_out)


def test_context_words_carry_no_labels(ctx_env):
    c, tok, labels = ctx_env["config"], ctx_env["tok"], ctx_env["labels"]
    plain = D.make_dataset(C.get_config(ctx_env["argv"][:-2]), "valid", ctx_env["posts"]["valid"], tok, labels)
    ds = D.make_dataset(c, "valid", ctx_env["posts"]["valid"], tok, labels)
    assert "retrieved context: 2 neighbours" in ds.describe()
    for e, e0, p in zip(ds.enc, plain.enc, ds.posts):
        # the same words, the same positions and labels; context sub-words come after them and are not words
        assert e.word_index == e0.word_index and e.word_end == e0.word_end and len(e.word_index) == len(p.tokens)
        assert len(e.input_ids) > len(e0.input_ids) and e.input_ids[:len(e0.input_ids) - 1] == e0.input_ids[:-1]
        assert e.input_ids[len(e0.input_ids) - 1] == tok.sep_token_id
    batch = D.collate([ds[i] for i in range(len(ds))], ds.pad_id)
    assert int(batch["word_mask"].sum()) == sum(len(p.tokens) for p in ds.posts)
    torch.manual_seed(0)
    m = M.build_model(c, len(labels)).eval()
    # the loss reads labels on word_mask only: putting garbage labels past the words changes nothing
    b2 = dict(batch, labels=batch["labels"].clone())
    b2["labels"][~batch["word_mask"]] = 3
    loss = m(batch)["loss"]
    assert torch.equal(loss, m(b2)["loss"])
    # the scorer gets exactly one tag per post word
    assert [len(t) for t in m.decode(batch)] == [len(p.tokens) for p in ds.posts]
    # a context word's (the neighbours') gold tags are never read: relabelling the pool changes no label tensor
    relabelled = [D.Post(p.tokens, ["O"] * len(p.tokens), p.imgid) for p in ctx_env["posts"]["train"]]
    other = context.context_words(c, "valid", ctx_env["posts"]["valid"], relabelled)
    assert other == _context_of(ctx_env, "valid")


def test_neighbour_cache_is_keyed_by_content_and_encoder(ctx_env, monkeypatch, tmp_path):
    q, pool = ["a b", "c d"], ["a b c", "e f", "g h"]
    key = context.cache_key(q, pool, 2)
    assert key != context.cache_key(q, pool + ["x"], 2)       # pool (training split) content
    assert key != context.cache_key(["a b", "c e"], pool, 2)   # queried split content
    assert key != context.cache_key(q, pool, 1)                # k
    monkeypatch.setattr(context, "retriever_id", lambda: "another-encoder")
    assert key != context.cache_key(q, pool, 2)                # the retriever's weights
    monkeypatch.undo()
    first = context.cached_neighbours(tmp_path, q, pool, 2)
    assert len(list((tmp_path / "context").glob("*.json"))) == 1

    def no_recompute(*a, **k):
        raise AssertionError("neighbours recomputed despite a cache entry")
    monkeypatch.setattr(context, "neighbours", no_recompute)
    assert context.cached_neighbours(tmp_path, q, pool, 2) == first


def test_mean_pooling_averages_each_words_sub_words(tiny_bert_dir):
    c = C.get_config(["--text_encoder", tiny_bert_dir, "--model", "roberta_crf", "--word_pooling", "mean"])
    tok = M.load_tokenizer(c)
    e = D.encode_words(tok, ["hello", "unbelievablyxyz", "a"], 32)
    assert e.word_end[1] - e.word_index[1] > 1  # a word of several sub-words
    b = D.collate([{"input_ids": e.input_ids, "word_index": e.word_index, "word_end": e.word_end, "labels": [1] * 3,
                    "case_ids": [1] * 3, "has_image": False, "index": 0}])
    torch.manual_seed(0)
    enc = M.build_model(c, 10).text.eval()
    h = enc.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[0]
    w = enc(b["input_ids"], b["attention_mask"], b["word_index"], b["word_end"])[0]
    for i in range(3):
        torch.testing.assert_close(w[i], h[e.word_index[i]:e.word_end[i]].mean(0))


def test_case_input_reaches_every_sub_word_and_learns(tiny_bert_dir):
    """--case_input: each sub-word gets its word's shape (special tokens and padding none); the embedding starts at
    zero, so a fresh model encodes exactly as without it, and the tagging loss reaches it."""
    c = C.get_config(["--text_encoder", tiny_bert_dir, "--model", "roberta_crf", "--case_input"])
    tok = M.load_tokenizer(c)
    words = ["Hello", "UNBELIEVABLYXYZ", "a"]
    items = []
    for n in (3, 1):
        e = D.encode_words(tok, words[:n], 32)
        items.append({"input_ids": e.input_ids, "word_index": e.word_index, "word_end": e.word_end,
                      "labels": [2, 1, 1][:n],
                      "case_ids": [D.word_shape(w) for w in words[:n]], "has_image": False, "index": len(items)})
    b = D.collate(items)
    e = D.encode_words(tok, words, 32)
    assert e.word_end[1] - e.word_index[1] > 1  # a word of several sub-words
    sub = M.TextEncoder.subword_cases(b["input_ids"].size(1), b["word_index"], b["word_end"], b["case_ids"])
    want = [0] * b["input_ids"].size(1)
    for i, w in enumerate(words):
        want[e.word_index[i]:e.word_end[i]] = [D.word_shape(w)] * (e.word_end[i] - e.word_index[i])
    assert sub[0].tolist() == want and sub[1].tolist() == [0, D.word_shape("Hello")] + [0] * (len(want) - 2)
    assert len({D.word_shape(w) for w in words}) == 3
    m = M.build_model(c, 10)
    plain = M.build_model(C.get_config(["--text_encoder", tiny_bert_dir, "--model", "roberta_crf"]), 10)
    assert m.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["text.case_in.weight"]
    m.eval(), plain.eval()
    torch.testing.assert_close(m(b)["emissions"], plain(b)["emissions"])
    m.train()
    m(b)["loss"].backward()
    g = m.text.case_in.weight.grad
    assert g[0].abs().sum() == 0 and all(g[D.word_shape(w)].abs().sum() > 0 for w in words)


def test_layer_mix_weights_every_hidden_state_and_learns_at_the_head_rate(tiny_bert_dir):
    """--layer_mix: word states are the softmax-weighted sum of the embeddings and every layer's states (equal weights
    at start), the weights sit in the head's learning-rate group and the tagging loss reaches each of them."""
    c = C.get_config(["--text_encoder", tiny_bert_dir, "--model", "roberta_crf", "--layer_mix"])
    tok = M.load_tokenizer(c)
    e = D.encode_words(tok, ["Hello", "world", "a"], 32)
    b = D.collate([{"input_ids": e.input_ids, "word_index": e.word_index, "word_end": e.word_end, "labels": [2, 1, 1],
                    "case_ids": [1] * 3, "has_image": False, "index": 0}])
    torch.manual_seed(0)
    m = M.build_model(c, 10)
    enc = m.text.eval()
    hs = enc.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   output_hidden_states=True).hidden_states
    assert enc.layer_mix.shape == (len(hs),) == (enc.model.config.num_hidden_layers + 1,)
    with torch.no_grad():
        enc.layer_mix.copy_(torch.arange(len(hs), dtype=torch.float))
    w = torch.arange(len(hs), dtype=torch.float).softmax(0)
    want = sum(wl * h for wl, h in zip(w, hs))[0, b["word_index"][0]]
    torch.testing.assert_close(enc(b["input_ids"], b["attention_mask"], b["word_index"])[0], want)
    assert not torch.allclose(want, hs[-1][0, b["word_index"][0]])
    assert "text.layer_mix" in [n for n, _ in m.param_groups()["head"]]
    assert "text.layer_mix" not in [n for n, _ in m.param_groups()["text"]]
    m.train()
    m(b)["loss"].backward()
    assert (enc.layer_mix.grad.abs() > 0).all()


def test_word_masking_masks_whole_post_words_in_training_only(ctx_env):
    """--word_mask_prob: whole words (every sub-word) become the mask token, never special tokens or retrieved
    context; labels stay; the draw is fixed by (seed, epoch, post) and changes with the epoch; dev is never masked."""
    tok, lm, posts = ctx_env["tok"], ctx_env["labels"], ctx_env["posts"]["train"]
    argv = [*ctx_env["argv"], "--word_mask_prob", "0.5"]
    c = C.get_config(argv)
    ds = D.make_dataset(c, "train", posts, tok, lm, train=True)
    dev = D.make_dataset(c, "valid", D.load_split(c, "valid"), tok, lm)
    assert all(dev[i]["input_ids"] == dev.enc[i].input_ids for i in range(len(dev)))
    masked = words = 0
    draws = []
    for epoch in (0, 1):
        ds.epoch = epoch
        draws.append([ds[i]["input_ids"] for i in range(len(ds))])
        for i in range(len(ds)):
            e, ids = ds.enc[i], draws[-1][i]
            assert ds[i]["input_ids"] == ids and ds[i]["labels"] == ds.labels[i][: e.n_kept]
            post = set()
            for s, t in zip(e.word_index, e.word_end):
                post |= set(range(s, t))
                hit = [ids[j] == tok.mask_token_id for j in range(s, t)]
                assert all(hit) or not any(hit)
                masked, words = masked + all(hit), words + 1
            assert all(ids[j] == e.input_ids[j] for j in range(len(ids)) if j not in post)
    assert draws[0] != draws[1] and 0.25 < masked / words < 0.75
    assert C.get_config(argv[:-2]).word_mask_prob == 0 and D.make_dataset(C.get_config(argv[:-2]), "train", posts, tok,
                                                                          lm,
                                                                          train=True)[0]["input_ids"] == ds.enc[0].input_ids


def test_llrd_scales_each_layer(tiny_bert_dir):
    c = C.get_config(["--text_encoder", tiny_bert_dir, "--model", "roberta_crf", "--llrd", "0.5", "--warmup_prop", "0"])
    m = M.build_model(c, 10)
    opt, _ = train.make_optimizer(m, c, steps=10)
    L = m.text.model.config.num_hidden_layers
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for n, p in m.named_parameters():
        if not p.requires_grad:  # the frozen word-embedding matrix (default) is in no group
            assert n == "text.model.embeddings.word_embeddings.weight" and id(p) not in lr_of
            continue
        if n.startswith("text."):
            want = c.text_lr * 0.5 ** max(0, L - M.text_depth(n, L))
        else:
            want = c.head_lr
        assert lr_of[id(p)] == pytest.approx(want), n
    assert {g["base"] for g in opt.param_groups} == {"text", "head"}  # roberta_crf: nothing but the head above it


def test_crf_lr_gives_the_crf_scores_their_own_rate_and_crf_init_their_start(tiny_bert_dir):
    """--crf_lr: exactly the CRF's start, end and transition scores train at it, the rest of the head at --head_lr;
    -1 leaves them in the head's group. --crf_init zero / normal: the scores start at 0 / spread like N(0, 1)."""
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
    for init, check in (("zero", lambda x: (x == 0).all()), ("normal", lambda x: x.std() > 0.5),
                        ("uniform", lambda x: x.abs().max() <= 0.1)):
        m = M.build_model(C.get_config(argv + ["--crf_init", init]), 10)
        assert check(m.head.crf.transitions.detach()), init


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
            held |= {pretrain_mlm.words_key(p.tokens)
                     for p in D.load_split(C.get_config(["--dataset_name", name]), split)}
    assert not any(pretrain_mlm.words_key(s) in held for s in corpus)
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


# ----------------------------------------------------------------------------- word and locked dropout

def test_word_dropout_zeroes_whole_words_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(4, 50, 8) + 3.0  # no state is zero by chance
    y = M.word_dropout(x, 0.3, training=True)
    zero = (y == 0).all(-1)                                   # [B, W]: a word is zeroed whole or kept as it was
    kept = ~zero
    assert torch.equal(y[kept], x[kept]) and ((y == 0) == zero[..., None]).all()
    assert 0.15 < zero.float().mean() < 0.45
    assert torch.equal(M.word_dropout(x, 0.3, training=False), x) and torch.equal(M.word_dropout(x, 0.0, True), x)


def test_locked_dropout_shares_one_mask_over_a_posts_words():
    torch.manual_seed(0)
    x = torch.randn(3, 20, 64) + 3.0
    y = M.locked_dropout(x, 0.5, training=True)
    dropped = y == 0                                          # [B, W, H]
    assert (dropped == dropped[:, :1]).all()                  # the same dimensions at every word of a post
    assert not (dropped[0, 0] == dropped[1, 0]).all()         # but posts draw their own
    assert torch.allclose(y[~dropped], (x * 2)[~dropped])     # kept values rescaled by 1 / (1 - p)
    assert torch.equal(M.locked_dropout(x, 0.5, training=False), x)
