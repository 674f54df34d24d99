"""The dataset registry and its readers: MNRE (relation dicts -> word BIO), HacRED (DocRED JSON -> character BIO),
MORE / NewsMKG (CoNLL+IMGID, not shipped), per-dataset image folders, `--list`, and 1-epoch CLI runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import check_data
import dataloader as dl
from config import get_config
from conftest import ROOT, make_conll
from data.convert import read_hacred, read_mnre, spans_to_bio
from readers import DataError, ReadReport

MNRE_DIR = dl.DATA_DIR / "MNRE"


def mnre_line(tokens, h, t, rel="None", img="1.jpg") -> str:
    ent = lambda s, e: {"name": " ".join(tokens[s:e]), "pos": [s, e]}
    return repr({"token": tokens, "h": ent(*h), "t": ent(*t), "img_id": img, "relation": rel})


def write(path, lines) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return path


def real_lines(split: str, numbers) -> list[str]:
    lines = (MNRE_DIR / f"mnre_{split}.txt").read_text(encoding="utf-8").splitlines()
    return [lines[n - 1] for n in numbers]


def raises_at(fn, path, line) -> str:
    with pytest.raises(DataError) as e:
        fn(path)
    msg = str(e.value)
    assert f"{path}:{line}:" in msg and "\n" not in msg, msg
    return msg


def cfg(tmp_path, name, *extra):
    return get_config(["--data_dir", str(tmp_path), "--dataset_name", name, *extra], check=False)


# ----------------------------------------------------------------------------- registry

def test_registry_entries():
    assert set(dl.DATASETS) == {"twitter2015", "twitter2017", "demo", "heldout", "heldout2", "MNRE", "HacRED", "MORE",
                                "NewsMKG"}
    for spec in dl.DATASETS.values():
        assert spec.description and "\n" not in spec.description and spec.layout
        assert spec.reader() in (dl.read_conll, read_mnre, read_hacred)
    assert dl.DATASETS["MNRE"].reader() is read_mnre and dl.DATASETS["HacRED"].reader() is read_hacred
    assert [dl.DATASETS["MNRE"].file(s) for s in dl.SPLIT_FILES] == ["mnre_train.txt", "mnre_val.txt", "mnre_test.txt"]
    assert [dl.DATASETS["HacRED"].file(s) for s in dl.SPLIT_FILES] == ["train.json", "dev.json", "test.json"]
    assert dl.DATASETS["HacRED"].images is None


def test_shipped_mnre_is_the_shared_release():
    shared = ROOT.parent / "shared" / "datasets" / "MNRE"
    for f in ("mnre_train.txt", "mnre_val.txt", "mnre_test.txt"):
        assert (MNRE_DIR / f).is_file()
        if shared.is_dir():
            assert (MNRE_DIR / f).read_bytes() == (shared / f).read_bytes()


def test_list_cli(tmp_path):
    write(tmp_path / "MNRE" / "mnre_train.txt", real_lines("test", range(23, 29)) + real_lines("test", [38, 39]))
    make_conll(tmp_path / "mine" / "train.txt", [(["Bo"], ["B-PER"], "1")])
    p = subprocess.run([sys.executable, str(ROOT / "check_data.py"), "--list", "--data_dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for name in dl.DATASETS:
        assert f"\n{name}" in "\n" + p.stdout
    mnre = p.stdout[p.stdout.index("MNRE "):p.stdout.index("HacRED")]
    assert "train=2 valid=absent test=absent posts (from 8 lines)" in mnre
    assert "mnre_{train,val,test}.txt" in mnre and "img_org/<train|val|test>/" in mnre
    assert "HacRED/{train,dev,test}.json" in p.stdout and "NewsMKG/{train,valid,test}.txt" in p.stdout
    assert "\nmine        custom CoNLL+IMGID folder\n            train=1 valid=absent test=absent" in p.stdout


def test_list_real_data_dir():
    out = check_data.describe_datasets()
    assert "train=4000 valid=1000 test=3257" in out and "train=3373 valid=723 test=723" in out
    assert "train=7356 valid=931 test=914 posts (from 12247/1624/1614 lines)" in out


@pytest.mark.parametrize("name,files", [
    ("MORE", "train.txt, valid.txt, test.txt"), ("NewsMKG", "train.txt, valid.txt, test.txt"),
    ("HacRED", "train.json, dev.json, test.json"), ("MNRE", "mnre_train.txt, mnre_val.txt, mnre_test.txt")])
def test_missing_files_one_line_says_where_and_layout(tmp_path, name, files):
    with pytest.raises(DataError) as e:
        dl.load_split(cfg(tmp_path, name), "train")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / name) in msg and files in msg
    assert dl.DATASETS[name].layout in msg
    if name == "NewsMKG":
        assert "sub-path" in msg


# ----------------------------------------------------------------------------- overlap rule

def test_spans_to_bio_keeps_longer_and_counts():
    tags, dropped = spans_to_bio(6, {(0, 1): "PER", (0, 2): "PER", (3, 5): "LOC", (4, 6): "ORG", (1, 3): "MISC"})
    # (0,2) beats nested (0,1) and overlapping (1,3); (3,5) and (4,6) tie on length: the earlier start wins
    assert tags == ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"] and dropped == 3
    assert spans_to_bio(3, {}) == (["O"] * 3, 0)


# ----------------------------------------------------------------------------- MNRE

def test_mnre_real_lines_to_bio(tmp_path):
    """Real lines of the shipped test split: one post per (tokens, image), types from relation paths."""
    f = write(tmp_path / "mnre.txt",
              real_lines("test", [*range(23, 29), 38, 39, 40, 1061]) + real_lines("train", [1, 3]))
    r = ReadReport(str(f))
    posts = read_mnre(f, report=r)
    assert [p.source for p in posts] == [f"{f}:{n}" for n in (1, 7, 10, 11, 12)]
    padres, lolla, camila, arkham, cosby = posts
    assert padres.tokens[:10] == ["San", "Diego", "Padres", ":", "Reyes", ",", "Paddack", ",", "Radke", "Nominated"]
    assert padres.tags[:10] == ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER", "O", "B-PER", "O", "B-PER", "O"]
    assert set(padres.tags[10:]) == {"O"}
    assert set(lolla.tags) == {"O"}  # only 'None' relations and no other typed mention: left out
    assert camila.tags[5:8] == ["B-PER", "I-PER", "O"] and camila.tags.count("B-PER") == 1  # nested Camila dropped
    assert arkham.tokens[2:5] == ["Arkham", "Horror", "LCG"]
    assert arkham.tags == ["O", "O", "B-MISC", "I-MISC", "I-MISC", "O", "O", "O",
                           "B-MISC", "I-MISC", "O", "O", "O", "O"]
    assert cosby.tags[3:5] == ["B-PER", "I-PER"] and cosby.tags[8:12] == ["B-MISC", "I-MISC", "I-MISC", "I-MISC"]
    assert padres.imgid.endswith(".jpg")
    assert r.counts["lines"] == 12 and r.counts["left_out"] == 3 and r.counts["overlap_dropped"] == 1
    assert r.counts["entities"] == {"MISC": 3, "ORG": 1, "PER": 5}
    assert r.counts["name_mismatch"] == 0 and "left out untyped 3" in r.note


def test_mnre_surface_majority_and_left_out(tmp_path):
    a = ["Paris", "is", "nice"]
    f = write(tmp_path / "m.txt", [
        mnre_line(a, (0, 1), (2, 3), "/loc/misc/x", img="a.jpg"),
        mnre_line(["Paris", "Hilton", "and", "Paris"], (3, 4), (0, 2), "/per/per/peer", img="b.jpg"),
        mnre_line(["Paris", "rocks"], (0, 1), (1, 2), "/loc/loc/x", img="e.jpg"),
        mnre_line(["I", "saw", "Paris", "in", "Rome"], (2, 3), (4, 5), "None", img="c.jpg"),  # Paris: LOC 2, PER 1
        mnre_line(["Ann", "met", "Bo"], (0, 1), (2, 3), "/per/per/peer", img="d.jpg"),
        mnre_line(["Ann", "met", "Bo"], (0, 1), (2, 3), "/org/org/x", img="d.jpg"),  # same post: PER/ORG tie
    ])
    r = ReadReport(str(f))
    posts = read_mnre(f, report=r)
    assert [p.imgid for p in posts] == ["a.jpg", "b.jpg", "e.jpg", "c.jpg", "d.jpg"]
    assert posts[1].tags == ["B-PER", "I-PER", "O", "B-PER"]
    assert posts[3].tags == ["O", "O", "B-LOC", "O", "O"]  # Rome is typed nowhere: left out
    assert posts[4].tags == ["B-ORG", "O", "B-ORG"]  # a tie goes to the alphabetically first type
    assert r.counts["by_surface"] == 1 and r.counts["left_out"] == 1 and r.counts["type_conflicts"] == 2


@pytest.mark.parametrize("bad,why", [
    ("{'token': ['a'], 'h': {'name': 'a', 'pos': [0, 1]}", "not a Python dict literal"),
    ("__import__('os').system('touch PWNED')", "not a Python dict literal"),
    ("['a', 'b']", "expected a dict"),
    ("{'token': ['a', 'b'], 'h': {'name': 'a', 'pos': [0, 1]}, 'img_id': 'x.jpg', 'relation': 'None'}",
     "missing key(s) t"),
    (mnre_line(["a", "b"], (0, 1), (1, 3)), "within its 2 tokens"),
    (mnre_line(["a", "b"], (0, 1), (1, 2), "/per/animal/x"), "relation '/per/animal/x'"),
    (mnre_line(["a", "b"], (0, 1), (1, 2), "per/org"), "relation 'per/org'"),
])
def test_mnre_malformed_line_names_file_and_line(tmp_path, bad, why):
    good = mnre_line(["Bo", "x"], (0, 1), (1, 2), "/per/org/member_of")
    f = write(tmp_path / "m.txt", [good, "", bad, good])
    assert why in raises_at(read_mnre, f, 3)
    assert not (tmp_path / "PWNED").exists() and not (ROOT / "PWNED").exists()
    r = ReadReport(str(f))
    assert len(read_mnre(f, lenient=True, report=r)) == 1 and len(r.problems) == 1 and f"{f}:3" in r.problems[0]


def test_mnre_other_type_and_empty_file(tmp_path):
    f = write(tmp_path / "m.txt", [mnre_line(["Bo", "x"], (0, 1), (1, 2), "/PER/other/x")])
    assert read_mnre(f)[0].tags == ["B-PER", "B-MISC"]
    assert "no relation lines" in raises_at(read_mnre, write(tmp_path / "e.txt", ["", ""]), 1)


def test_mnre_shipped_splits(capsys):
    """load_split converts every shipped split and prints one summary line for it."""
    c = get_config(["--dataset_name", "MNRE"], check=False)
    sizes = {}
    for split in dl.SPLIT_FILES:
        r = ReadReport("x")
        posts = dl.load_split(c, split, report=r)
        sizes[split] = len(posts)
        for p in posts:
            assert len(p.tokens) == len(p.tags) and p.imgid.endswith(".jpg")
            for i, t in enumerate(p.tags):  # valid IOB2: every I- continues an entity of its type
                assert not t.startswith("I-") or (i and p.tags[i - 1][2:] == t[2:] and p.tags[i - 1] != "O")
        assert r.counts["name_mismatch"] == 0 and r.counts["type_conflicts"] == 0
    assert sizes == {"train": 7356, "valid": 931, "test": 914}
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and out[0].startswith("MNRE/train: ") and "left out untyped 6593" in out[0]


def test_mnre_image_roots(tmp_path):
    c = get_config(["--dataset_name", "MNRE"], check=False)
    assert dl.image_root(c, "valid") == MNRE_DIR / "img_org" / "val"
    flat = tmp_path / "flat"
    flat.mkdir()
    assert dl.image_root(get_config(["--dataset_name", "MNRE", "--image_root", str(flat)], check=False), "test") == flat
    (tmp_path / "split" / "test").mkdir(parents=True)
    assert dl.image_root(get_config(["--dataset_name", "MNRE", "--image_root", str(tmp_path / "split")], check=False),
                         "test") == tmp_path / "split" / "test"
    assert dl.image_root(get_config(["--dataset_name", "twitter2015"], check=False), "test") == \
        dl.DATA_DIR / "twitter2015" / "twitter2015_images"


# ----------------------------------------------------------------------------- images

def test_find_image_extension_and_sub_path(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "b" / "c.png")
    assert dl.find_image(tmp_path, "a/b/c") == tmp_path / "a" / "b" / "c.png"
    assert dl.find_image(tmp_path, "/a/b/c") == tmp_path / "a" / "b" / "c.png"  # stays below the image folder
    assert dl.find_image(tmp_path, "a/b/c.jpg") == tmp_path / "a" / "b" / "c.png"  # same stem, other extension
    assert dl.find_image(tmp_path, "a/b/zz") == tmp_path / "a" / "b" / "zz.jpg"
    assert dl.find_image(tmp_path, "x.jpg") == tmp_path / "x.jpg"  # MNRE img_id already has its extension


def test_newsmkg_sub_path_imgids(tmp_path):
    d = tmp_path / "NewsMKG"
    for split in dl.SPLIT_FILES:
        make_conll(d / dl.SPLIT_FILES[split], [(["Obama", "speaks"], ["B-PER", "O"], "2019/05/abc"),
                                               (["In", "Paris"], ["O", "B-LOC"], "2019/06/def")])
    (d / "NewsMKG_images" / "2019" / "05").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(d / "NewsMKG_images" / "2019" / "05" / "abc.jpg")
    c = cfg(tmp_path, "NewsMKG")
    posts = dl.load_split(c, "train")
    assert [p.imgid for p in posts] == ["2019/05/abc", "2019/06/def"]
    paths = [dl.find_image(dl.image_root(c, "train"), p.imgid) for p in posts]
    assert [p.is_file() for p in paths] == [True, False]


def test_more_reads_conll_and_custom_folders_still_work(tmp_path):
    make_conll(tmp_path / "MORE" / "valid.txt", [(["a", "Bo"], ["O", "B-PER"], "m1")])
    assert dl.load_split(cfg(tmp_path, "MORE"), "valid")[0].tags == ["O", "B-PER"]
    make_conll(tmp_path / "mine" / "train.txt", [(["Bo"], ["B-OTHER"], "1")])
    assert dl.load_split(cfg(tmp_path, "mine"), "train")[0].tags == ["B-OTHER"]  # its own types, as written
    assert dl.image_root(cfg(tmp_path, "mine")) == tmp_path / "mine" / "mine_images"
    with pytest.raises(DataError, match="not a known dataset"):
        dl.load_split(cfg(tmp_path, "nothing"), "train")


# ----------------------------------------------------------------------------- HacRED

HAC_DOCS = [
    {"sents_char": [list("马云创办了阿里巴巴。"), list("他住在杭州")],
     "vertex_char": [[{"name": "马云", "sent_id": 0, "type": "PER", "pos": [0, 2]},
                      {"name": "他", "sent_id": 1, "type": "PER", "pos": [0, 1]}],
                     [{"name": "阿里巴巴", "sent_id": 0, "type": "ORG", "pos": [5, 9]}],
                     [{"name": "阿里", "sent_id": 0, "type": "ORG", "pos": [5, 7]}],  # nested: dropped
                     [{"name": "杭州", "sent_id": 1, "type": "LOC", "pos": [3, 5]}]],
     "labels_char": [{"r": "创始人", "h": 1, "t": 0}],
     "sents_word": [["马云", "创办", "了", "阿里巴巴", "。"], ["他", "住在", "杭州"]], "vertex_word": [], "labels_word": []},
    {"sents_char": [list("北京"), []], "vertex_char": [[{"name": "北京", "sent_id": 0, "type": "LOC", "pos": [0, 2]}]]},
]
HAC_EXPECTED = [
    (list("马云创办了阿里巴巴。"), ["B-PER", "I-PER", "O", "O", "O", "B-ORG", "I-ORG", "I-ORG", "I-ORG", "O"], None),
    (list("他住在杭州"), ["B-PER", "O", "O", "B-LOC", "I-LOC"], None),
    (list("北京"), ["B-LOC", "I-LOC"], None),
]


def hacred_files(d, layout="lines", docs=HAC_DOCS):
    for name in ("train.json", "dev.json", "test.json"):
        text = "\n".join(json.dumps(x, ensure_ascii=False) for x in docs) + "\n" if layout == "lines" \
            else json.dumps(docs, ensure_ascii=False, indent=1)
        (d / "HacRED").mkdir(parents=True, exist_ok=True)
        (d / "HacRED" / name).write_text(text, encoding="utf-8")
    return d / "HacRED" / "train.json"


@pytest.mark.parametrize("layout", ["lines", "list"])
def test_hacred_sentences_to_character_bio(tmp_path, layout):
    f = hacred_files(tmp_path, layout)
    r = ReadReport(str(f))
    posts = read_hacred(f, report=r)
    assert [(p.tokens, p.tags, p.imgid) for p in posts] == HAC_EXPECTED
    assert r.counts["documents"] == 2 and r.counts["overlap_dropped"] == 1 and r.counts["empty_sentences"] == 1
    assert r.counts["entities"] == {"LOC": 2, "ORG": 1, "PER": 2}
    first_line = 1 if layout == "lines" else 2
    assert posts[1].source == f"{f}:{first_line} (sentence 1)"
    assert dl.image_root(cfg(tmp_path, "HacRED"), "train") is None


def test_hacred_malformed_json_lines(tmp_path):
    f = tmp_path / "h.json"
    good = json.dumps(HAC_DOCS[1], ensure_ascii=False)
    f.write_text(f"{good}\n{{\"sents_char\": [\n{good}\n", encoding="utf-8")
    assert "invalid JSON" in raises_at(read_hacred, f, 2)
    r = ReadReport(str(f))
    assert len(read_hacred(f, lenient=True, report=r)) == 2 and len(r.problems) == 1


def test_hacred_malformed_json_list_and_mentions(tmp_path):
    f = tmp_path / "h.json"
    f.write_text("[\n" + json.dumps(HAC_DOCS[1]) + ',\n{"sents_char": [["x"]], oops}\n]\n', encoding="utf-8")
    assert "invalid JSON" in raises_at(read_hacred, f, 3)
    bad = json.loads(json.dumps(HAC_DOCS[1]))
    bad["vertex_char"][0][0]["sent_id"] = 5
    f.write_text("[\n" + json.dumps(HAC_DOCS[1]) + ",\n\n" + json.dumps(bad) + "\n]", encoding="utf-8")
    assert "vertex_char[0][0]: sent_id 5" in raises_at(read_hacred, f, 4)
    r = ReadReport(str(f))
    posts = read_hacred(f, lenient=True, report=r)
    assert [p.tags for p in posts] == [["B-LOC", "I-LOC"], ["O", "O"]] and len(r.problems) == 1
    f.write_text(json.dumps({"sents_char": "北京", "vertex_char": []}) + "\n", encoding="utf-8")
    assert "sents_char" in raises_at(read_hacred, f, 1)


def test_hacred_alignment_with_tiny_bert(tmp_path, tiny_bert_dir):
    """CJK characters as words: each keeps exactly one first sub-word (single char or [UNK]); no images."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    posts = read_hacred(hacred_files(tmp_path))
    lm = dl.LabelMap.from_posts(posts)
    ds = dl.MNERDataset(posts + [dl.Post(list("𠀀\u200b鿿A"), ["O"] * 4, None)], tok, lm, 64, img_root=None,
                        image_mode="pixels", prep=dl.ImagePrep(32))
    for p, e in zip(ds.posts, (w.enc for w in ds.windows)):
        assert e.n_kept == len(p.tokens) and len(set(e.word_index)) == len(p.tokens)
    assert "images 0/4 usable" in ds.describe()
    assert ds[0]["has_image"] is False and tuple(ds[0]["pixel_values"].shape) == (3, 32, 32)


# ----------------------------------------------------------------------------- CLI, 1 epoch, tiny encoders

def run_train(args):
    env = {k: v for k, v in os.environ.items() if k != "SWANLAB_API_KEY"}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def tiny_flags(tmp_path, name, tiny_bert_dir, tiny_clip_dir):
    return ["--data_dir", str(tmp_path / "data"), "--dataset_name", name, "--text_encoder", tiny_bert_dir,
            "--image_encoder", tiny_clip_dir, "--save_dir", str(tmp_path / "save"), "--cache_dir",
            str(tmp_path / "cache"), "--swanlab_mode", "disabled", "--batch_size", "4", "--fusion_layers", "1",
            "--fusion_dim", "32", "--cross_attn_heads", "2", "--epochs", "1", "--save_name", "one", "--max_len", "48"]


def test_cli_one_epoch_mnre_and_hacred(tmp_path, tiny_bert_dir, tiny_clip_dir):
    d = tmp_path / "data"
    for split, lines in (("train", range(1, 25)), ("val", range(1, 9)), ("test", range(1, 9))):
        write(d / "MNRE" / f"mnre_{split}.txt", real_lines(split, lines))
    first = read_mnre(d / "MNRE" / "mnre_train.txt")
    (d / "MNRE" / "img_org" / "train").mkdir(parents=True)
    for p in first[:2]:
        Image.new("RGB", (40, 40), (200, 30, 30)).save(d / "MNRE" / "img_org" / "train" / p.imgid, "JPEG")
    out = run_train(tiny_flags(tmp_path, "MNRE", tiny_bert_dir, tiny_clip_dir))
    assert f"train: {len(first)} posts, images 2/{len(first)} usable" in out and "[Overall]" in out
    assert "MNRE/train: " in out and "left out untyped" in out
    run = tmp_path / "save" / "one"
    assert json.loads((run / "label_map.json").read_text())["labels"][2:] == \
        ["B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]

    hacred_files(d, "list", HAC_DOCS * 3)
    args = tiny_flags(tmp_path, "HacRED", tiny_bert_dir, tiny_clip_dir)
    args[args.index("one")] = "hac"
    out = run_train(args + ["--allow_split_overlap"])  # the same documents in every split
    assert "train: 9 posts, images 0/9 usable" in out and "[Overall]" in out
    pred = (tmp_path / "save" / "hac" / "test_predictions.conll").read_text(encoding="utf-8").split("\n\n")[0]
    assert [l.split("\t")[0] for l in pred.splitlines()[1:]] == list("马云创办了阿里巴巴。")


def test_check_reports_images_hashes_and_shared_posts(tiny_data_dir, tmp_path):
    import dataloader as D
    """check_data.py --check: per split posts, entities by type, images found / missing / unreadable and a content
    hash; a release whose test split repeats its dev split is named as such."""
    import config as C
    cfg = C.get_config(["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny"])
    out = check_data.check_dataset(cfg)
    hashes = D.split_hashes(cfg)
    for split in ("train", "valid", "test"):
        line = next(l for l in out.splitlines() if l.strip().startswith(f"{split}:"))
        posts = D.load_split(cfg, split)
        assert f"{len(posts)} posts" in line and f"sha256 {hashes[split]}" in line and "found /" in line
    assert "no post is shared" in out
    bad = tmp_path / "rel" / "rel"
    for split in ("train", "valid", "test"):
        (bad / f"{split}.txt").parent.mkdir(parents=True, exist_ok=True)
        (bad / f"{split}.txt").write_text((tiny_data_dir / "tiny" / ("valid.txt" if split == "test" else f"{split}.txt")).read_text())
    out = check_data.check_dataset(C.get_config(["--data_dir", str(bad.parent), "--dataset_name", "rel"]))
    assert "error: valid and test share" in out and "(the same posts)" in out
    with pytest.raises(SystemExit) as e:  # a script checking a release stops there
        check_data.main(["--check", "rel", "--data_dir", str(bad.parent)])
    assert e.value.code == 1
    (bad / "valid.txt").unlink()
    out = check_data.check_dataset(C.get_config(["--data_dir", str(bad.parent), "--dataset_name", "rel"]))
    assert "  valid: no valid.txt there; train.py needs train, valid and test" in out  # said, not skipped


@pytest.mark.parametrize("module", ["make_heldout", "make_heldout2"])
def test_heldout_generators_are_deterministic_and_boxes_lie_inside(tmp_path, module):
    """data/make_heldout.py and make_heldout2.py: the same seed gives byte-identical files; every post has a picture
    of its own size (found as images.find_image finds it) and one box of its cued object inside that picture; names
    never cross splits."""
    import importlib
    from images import find_image
    make = getattr(importlib.import_module(f"data.{module}"), module)
    a = make(tmp_path / "a" / "set", n_train=12, n_dev=4, n_test=4)
    b = make(tmp_path / "b" / "set", n_train=12, n_dev=4, n_test=4)
    for f in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    words = {}
    for split in ("train", "valid", "test"):
        posts = dl.read_conll(a / f"{split}.txt")
        boxes = [json.loads(l) for l in (a / f"{split}_boxes.jsonl").read_text().splitlines()]
        assert [p.imgid for p in posts] == [x["imgid"] for x in boxes]
        for x in boxes:
            with Image.open(find_image(a / f"{module[5:]}_images", x["imgid"])) as im:
                assert list(im.size) == x["size"]
            x0, y0, x1, y1 = x["box"]
            assert 0 <= x0 < x1 <= x["size"][0] and 0 <= y0 < y1 <= x["size"][1]
        words[split] = {w for p in posts for w, t in zip(p.tokens, p.tags) if t != "O"}
    assert not words["train"] & words["test"] and not words["train"] & words["valid"]


@pytest.mark.parametrize("module,kind", [("make_demo", "PER"), ("make_heldout", "ORG"), ("make_heldout", "PER")])
def test_the_box_covers_every_pixel_of_the_drawn_object(module, kind):
    """The cued object drawn alone on a flat canvas: every pixel it changed lies inside its box (a waving hand above
    the head, a factory's smoke above its roof)."""
    import importlib
    import random
    import numpy as np
    from PIL import ImageDraw
    m = importlib.import_module(f"data.{module}")
    for seed in range(40):
        rng, W, H = random.Random(seed), 320, 256
        img = Image.new("RGB", (W, H), (1, 2, 3))
        if module == "make_demo":
            x0, y0, x1, y1 = m.draw_person(img, ImageDraw.Draw(img), rng, W)
        else:
            s = rng.uniform(0.22, 0.6) * H
            x, y = rng.uniform(0.5 * s, W - 0.5 * s), rng.uniform(0.5 * s, H - 0.5 * s)
            x0, y0, x1, y1 = m.object_box(kind, rng, x, y, s, W, H)
            m.DRAW[kind](ImageDraw.Draw(img), rng, x, y, s)
        diff = np.any(np.asarray(img) != (1, 2, 3), axis=-1)
        ys, xs = np.nonzero(diff)
        assert xs.min() >= x0 - 1 and ys.min() >= y0 - 1 and xs.max() <= x1 + 1 and ys.max() <= y1 + 1, seed


@pytest.mark.parametrize("module", ["make_heldout", "make_heldout2", "make_demo"])
def test_generators_started_together_publish_one_complete_set(tmp_path, module):
    """Runs started at once each generate the set (as reproduce.sh's parallel jobs do on a fresh clone): every
    caller gets the complete folder and no scratch folder is left behind."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor
    make = getattr(importlib.import_module(f"data.{module}"), module)
    out = tmp_path / "set"
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda _: make(out, n_train=8, n_dev=4, n_test=4), range(3)))
    assert got == [out] * 3 and sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert len(dl.read_conll(out / "test.txt")) == 4 and (out / "README.md").is_file()
