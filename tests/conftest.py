"""Shared fixtures: tiny random models (built on the fly, no hub) and a tiny data/ folder.

Expensive ones are session-scoped. Everything is seeded so runs repeat.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import config  # noqa: E402
import dataloader  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The CI box has 2 shared cores: one intra-op thread avoids oversubscription stalls (10-100x slower)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def real_split(name: str, split: str) -> Path:
    """A shipped Twitter split file (data/<name>/<split>.txt)."""
    return dataloader.DATA_DIR / name / dataloader.SPLIT_FILES[split]


def make_conll(path, posts) -> Path:
    """Write posts (dataloader.Post or (tokens, tags, imgid) tuples) as a CoNLL+IMGID file."""
    lines = []
    for p in posts:
        tokens, tags, imgid = (p.tokens, p.tags, p.imgid) if isinstance(p, dataloader.Post) else p
        if imgid is not None:
            lines.append(f"IMGID:{imgid}")
        lines += [f"{w}\t{t}" for w, t in zip(tokens, tags)]
        lines.append("")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return config.resolve_text_encoder("minilm")


@pytest.fixture(scope="session")
def minilm_tok(minilm_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir, minilm_tok) -> str:
    import torch
    from transformers import BertConfig, BertModel
    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=len(minilm_tok), max_position_embeddings=512)
    BertModel(cfg).save_pretrained(d)
    minilm_tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory) -> str:
    """Tiny random RoBERTa + a byte-level BPE tokenizer (vocab 2000) trained on twitter2017 train."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer
    d = tmp_path_factory.mktemp("tiny_roberta")
    posts = dataloader.read_conll(real_split("twitter2017", "train"))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator((" ".join(p.tokens) for p in posts), vocab_size=2000, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(str(d))
    tok = RobertaTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"), add_prefix_space=True)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, max_position_embeddings=514, type_vocab_size=1)
    RobertaModel(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_roberta_tok(tiny_roberta_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_roberta_dir)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    d = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16)
    CLIPVisionModel(cfg).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 64, "width": 64}, "size": {"shortest_edge": 64}, "do_normalize": True,
         "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "CLIPImageProcessor"}, indent=1))
    return str(d)


TINY_COUNTS = {"train": 24, "valid": 8, "test": 8}


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """<tmp>/tiny/{train,valid,test}.txt (first posts of twitter2017's splits) and tiny/tiny_images/ with a
    small drawing for every other post (the rest are missing on purpose). Returns <tmp> (a --data_dir)."""
    from PIL import Image, ImageDraw
    root = tmp_path_factory.mktemp("data")
    d = root / "tiny"
    img_dir = d / "tiny_images"
    img_dir.mkdir(parents=True)
    for split, n in TINY_COUNTS.items():
        posts = dataloader.read_conll(real_split("twitter2017", split))[:n]
        make_conll(d / dataloader.SPLIT_FILES[split], posts)
        for i, p in enumerate(posts):
            if i % 2 == 0:
                im = Image.new("RGB", (48 + 8 * (i % 3), 40), (20 * (i % 12), 90, 160))
                ImageDraw.Draw(im).ellipse((4, 4, 30, 30), fill=(250, 200, 10 * (i % 25)))
                im.save(img_dir / f"{p.imgid}.png")
    return root
