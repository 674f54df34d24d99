"""Tag new posts with a trained run, and draw what its image path looks at.

    python predict.py --save_name NAME --text "Kevin Durant enters Oracle Arena" [--image p.jpg] [--explain]
    python predict.py --save_name NAME --input posts.jsonl [--format json|conll] [--out_dir DIR] [--explain]

--text prints the post's entities: type, words, word span and character span ([start, end), end exclusive)
and score. --input reads JSON lines (or one JSON list), one post each: {"text": "..."} or {"tokens": [...]},
optionally "image": a path (relative to the current directory) or null, and any other keys, which are passed
through. It writes <out_dir>/predictions.jsonl (each input line plus "text", "tokens", "tags", "entities",
"image_used"; it can be read back as input) or, with --format conll, predictions.conll (an IMGID line with the
image, then `word<TAB>tag`). --out_dir defaults to the run directory. A post without an image, or whose image
is missing or unreadable (one warning line), is tagged text-only, exactly as in training.

Words: raw text is split by TOKEN_RE: URLs, @mentions and #hashtags stay whole, a word keeps inner ' and -
("don't", "Jean-Luc") and its combining marks, every other character (an emoji with its modifiers, a punctuation
mark) is a word of its own, whitespace separates words.
"tokens" are taken as given: without "text" the text is the words joined by single spaces; with both, the
words are found left to right in the text. From there the training code runs unchanged: the run's config.json
and label_map.json (runner.load_run), dataloader.make_dataset (encode_windows: sub-words, and posts longer
than --max_len in overlapping windows; the run's image preprocessing and frozen-feature cache), then the runtime
test.py and serve.py tag with (runtime.CheckpointRuntime: batches of --batch_size sorted by length, posts with and
without an image apart, the head's decoding in numpy).

Score of an entity: the mean over its words of the marginal probability of the predicted tag. CRF head: exact
marginals (forward-backward, crf.py); softmax head: the softmax of the emissions.

--explain writes per post with an image <out_dir>/explain/post<k>_attention.png (the part of the image the
model sees, with the text->image attention of --explain_word or of each predicted entity as a heat overlay;
see word_region_attention for what it approximates) and post<k>_relevance.png (per-word rel and gate under the
sentence; MNER only). A model whose image path is off is refused with one line instead of a blank picture.

New images are decoded and preprocessed in a pool of --image_workers threads while the frozen backbone runs on
batches of 32 (bundle.features_from_paths); their features are rounded to fp16 like the cache's but not cached.
--bundle DIR (instead of --save_name) tags the same way from an export.py bundle with onnxruntime: bundle.py,
with CRF decoding in numpy; model.py, train.py and test.py are not imported on that path (no --explain);
--out_dir defaults to the bundle directory.
"""
from __future__ import annotations

import dataclasses
import json
import regex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import dataloader as D
from config import ConfigError, cli, get_config, given_flags
from explain import ExplainRefused, attention_rows, image_path_off, region_grids, region_heat
from metrics import get_entities

# model.py, test.py, plots and cv2 are imported where used: --bundle runs without the training code

# a URL | an @mention or #hashtag | a word (letters with their combining marks: Devanagari, Thai, a decomposed
# accent; digits, superscripts and fractions: km², H₂O) with inner ' ’ or - | any other character on its own, with
# what combines with it (an emoji's variation selector and skin tone, a flag's two letters, a ZWJ sequence: one
# grapheme). Separators: whitespace and the information separators U+001C-U+001F, as str.split has them.
TOKEN_RE = regex.compile(r"https?://\S+|www\.\S+|[@#][\w\p{M}\p{No}]+|[\w\p{M}\p{No}]+(?:['’-][\w\p{M}\p{No}]+)*"
                         r"|(?![\w\p{No}\s\x1c-\x1f])\X")
VIEW = 320        # side in pixels of the image as drawn
MAX_PANELS = 6    # overlays in one attention picture (a post with more entities shows its first six)


@dataclasses.dataclass
class NewPost:
    """A post to tag: its words and where each sits in `text` ([start, end) characters)."""
    text: str
    words: list[str]
    spans: list[tuple[int, int]]
    image: str | None  # as given; None: no image
    record: dict       # the input line, passed through to predictions.jsonl
    source: str        # "file:line" or "--text", for messages


def warn(msg: str):
    print(f"warning: {msg}")


# ----------------------------------------------------------------------------- input

def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Raw text -> words (TOKEN_RE) and their [start, end) character spans in text."""
    ms = list(TOKEN_RE.finditer(text))
    return [m.group() for m in ms], [m.span() for m in ms]


def locate_words(text: str, words: list[str]) -> list[tuple[int, int]]:
    """Character spans of given words found left to right in text; ValueError when one is not there."""
    spans, at = [], 0
    for w in words:
        k = text.find(w, at)
        if k < 0:
            raise ValueError(f"token {w!r} is not in \"text\" after character {at}")
        spans.append((k, k + len(w)))
        at = k + len(w)
    return spans


def post_from_record(rec, source: str) -> NewPost:
    """One input object -> NewPost; ValueError(why) for a malformed one."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, found {type(rec).__name__}")
    text, tokens, image = rec.get("text"), rec.get("tokens"), rec.get("image")
    if text is not None and not isinstance(text, str):
        raise ValueError('"text" must be a string')
    if image is not None and not isinstance(image, str):
        raise ValueError('"image" must be a file path or null')
    if tokens is not None:
        if not (isinstance(tokens, list) and tokens and all(isinstance(w, str) and w for w in tokens)):
            raise ValueError('"tokens" must be a non-empty list of non-empty strings')
        if any(c in w for w in tokens for c in "\t\n\r"):  # a CoNLL line is `word<TAB>tag`
            raise ValueError('"tokens" must not hold tabs or line breaks; split such a token in two')
        text = " ".join(tokens) if text is None else text
        words, spans = list(tokens), locate_words(text, tokens)
    elif text is not None:
        words, spans = split_words(text)
        if not words:
            raise ValueError('"text" has no words')
    else:
        raise ValueError('needs "text" (a string) or "tokens" (a list of strings)')
    return NewPost(text, words, spans, image or None, rec, source)


def read_posts(path, lenient: bool = False) -> list[NewPost]:
    """The posts of a JSON-lines file (or one JSON list); a bad line stops with file:line (skipped under lenient)."""
    path = Path(path)
    if not path.is_file():
        raise D.DataError(f"--input {path}: file not found")
    report = D.ReadReport(str(path))
    problem = D._problem_fn(path, lenient, report)
    posts = []
    for lineno, rec in D._json_records(path, problem):
        try:
            posts.append(post_from_record(rec, f"{path}:{lineno}"))
        except ValueError as e:
            problem(lineno, str(e), 'write one {"text": "...", "image": "..."} or {"tokens": [...]} object per line')
    if report.problems:
        warn(f"{len(report.problems)} input line(s) skipped under --lenient_data (first: {report.problems[0]})")
    if not posts:
        raise D.DataError(f"{path}:1: no posts found; write one JSON object per line")
    return posts


def dataset_posts(posts: list[NewPost], use_images: bool) -> list[D.Post]:
    """dataloader Posts (tags all O) whose IMGID is the image's absolute path (None: text-only).

    A named image that is not there gets one warning line and the text-only path.
    """
    out = []
    for p in posts:
        img = None
        if p.image and use_images:
            f = Path(p.image).expanduser().resolve()
            if not f.exists():
                warn(f"{p.source}: image {p.image} is missing; this post is tagged text-only")
            else:  # whatever its name: the decoder decides (a file it cannot read is warned about when read)
                img = str(f)
        out.append(D.Post(p.words, ["O"] * len(p.words), img, p.source))
    return out


# ----------------------------------------------------------------------------- output

def entities(post: NewPost, tags: list[str], probs: list[float], mode: str) -> list[dict]:
    """The predicted entities of a post with word and character spans ([start, end)) and their score."""
    out = []
    for typ, s, e in get_entities(tags, mode):
        cs, ce = post.spans[s][0], post.spans[e - 1][1]
        ps = probs[s:e]
        out.append({"type": typ, "text": post.text[cs:ce], "words": post.words[s:e], "word_start": s, "word_end": e,
                    "char_start": cs, "char_end": ce, "score": round(sum(ps) / len(ps), 4)})
    return out


def format_entities(post: NewPost, ents: list[dict], image_used: bool) -> str:
    """The --text printout: the post, then one line per entity."""
    img = f"  [image {post.image}: {'used' if image_used else 'not used'}]" if post.image else "  [no image]"
    lines = [post.text + img]
    if not ents:
        return "\n".join(lines + ["  no entities"])
    w = max(12, *(len(e["text"]) for e in ents))
    lines.append(f"  {'type':6s}{'words':{w + 2}s}{'word span':11s}{'char span':11s}score")
    for e in ents:
        words, chars = f"{e['word_start']}:{e['word_end']}", f"{e['char_start']}:{e['char_end']}"
        lines.append(f"  {e['type']:6s}{e['text']:{w + 2}s}{words:11s}{chars:11s}{e['score']:.3f}")
    return "\n".join(lines)


def prediction_record(p: NewPost, r: dict) -> dict:
    """One predictions.jsonl object (also serve.py's answer): input keys + text, tokens, tags, entities, image_used."""
    return {**p.record, "text": p.text, "tokens": p.words, "tags": r["tags"], "entities": r["entities"],
            "image_used": r["image_used"]}


def write_predictions(path: Path, posts: list[NewPost], results: list[dict], fmt: str) -> Path:
    """predictions.jsonl (prediction_record per line) or predictions.conll."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p, r in zip(posts, results):
            if fmt == "conll":
                f.write(f"IMGID:{p.image or ''}\n" + "".join(f"{w}\t{t}\n" for w, t in zip(p.words, r["tags"])) + "\n")
            else:
                f.write(json.dumps(prediction_record(p, r), ensure_ascii=False) + "\n")
    return path


def explain_targets(post: NewPost, tags: list[str], ex: dict, word: str, mode: str) -> list[tuple[str, list[int]]]:
    """(caption, word indices) of each overlay: --explain_word, else each predicted entity, else the word
    with the highest rel. Only scored words (within --max_len) have attention."""
    n = len(ex["att"])
    if word:
        hits = [j for j, w in enumerate(post.words[:n]) if w.lower() == word.lower()]
        return [(f"'{post.words[j]}' (word {j})", [j]) for j in hits[:MAX_PANELS]]
    ents = get_entities(tags[:n], mode)
    if ents:
        return [(f"{t}: {' '.join(post.words[s:e])}", list(range(s, e))) for t, s, e in ents[:MAX_PANELS]]
    j = int(np.argmax(ex["rel"]))
    return [(f"'{post.words[j]}' (no entity; highest rel)", [j])]


def explain_post(k: int, post: NewPost, r: dict, model, config, out_dir: Path, word: str) -> list[Path]:
    """post<k>_attention.png and (MNER) post<k>_relevance.png for a post whose image reached the model."""
    import plots
    ex, written = r["explain"], []
    targets = explain_targets(post, r["tags"], ex, word, config.eval_mode)
    if not targets:
        warn(f"{post.source}: --explain_word {word!r} is not among its scored words; no attention overlay for it")
    else:
        view = model_view(post.image, D.image_prep_for(config))
        grids = region_grids(model.vision)
        panels = []
        for caption, idx in targets:
            panels.append((caption, region_heat(ex["att"][idx].mean(0), grids, VIEW, ex["cells"])))
        written.append(plots.attention_overlay(view, panels, out_dir / f"post{k}_attention.png",
                                               f"post {k}: text -> image attention over the model's view"))
    if ex["gate"] is not None:
        n = len(ex["rel"])
        written.append(plots.relevance_strip(post.words[:n], r["tags"][:n], ex["rel"], ex["gate"],
                                             out_dir / f"post{k}_relevance.png",
                                             f"post {k}: image relevance (rel) and mean gate per word"))
    return written


def model_view(path, prep: D.ImagePrep, size: int = VIEW) -> np.ndarray:
    """The part of the image the model sees, [size, size, 3] uint8 RGB: the run's ImagePrep (resize, centre crop or pad)
    at display size, without normalisation."""
    im, _ = D.load_image(Path(path).expanduser().resolve())
    x = dataclasses.replace(prep, size=size, short=round(prep.short * size / prep.size), mean=(0.0, 0.0, 0.0),
                            std=(1.0, 1.0, 1.0))(im)
    return (x.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- main

def check_args(a) -> None:
    if a.bundle and a.explain:
        raise ExplainRefused("--explain needs the run's torch model (attention weights); "
                             "give --save_name, not --bundle")
    if not a.save_name and not a.bundle:
        raise ConfigError("--save_name is required: the run directory under --save_dir whose model.pt tags the posts "
                          "(or --bundle DIR: an export.py bundle)")
    if bool(a.text) == bool(a.input):
        raise ConfigError('give either --text "..." (one post) or --input posts.jsonl')
    if a.image and not a.text:
        raise ConfigError("--image goes with --text; in an --input file each post names its own \"image\"")
    if a.explain_word and not a.explain:
        raise ConfigError("--explain_word needs --explain")


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = get_config(argv, check=False, tool="predict")
    check_args(args)
    if args.text:
        rec = {"text": args.text, "image": args.image or None}
        try:
            posts = [post_from_record(rec, "--text")]
        except ValueError as e:
            raise ConfigError(f"--text: {e}") from None
    else:
        posts = read_posts(args.input, args.lenient_data)
    if args.bundle:
        return main_bundle(args, posts)
    from model import load_tokenizer
    from runner import RUNTIME_FLAGS, amp_context, load_run, pick_device
    from runtime import CheckpointRuntime
    given = given_flags(argv)
    config, label_map, model, _ = load_run(args.save_dir, args.save_name,
                                           {k: getattr(args, k) for k in given & RUNTIME_FLAGS})
    if "use_image" in given:  # after the model is built: --no-use_image runs a multimodal model text-only
        config.use_image = args.use_image
    config.image_control = "none"  # new posts are shown their own pictures, whatever control the run trained under
    off = image_path_off(model, config)
    if args.explain and off:
        raise ExplainRefused(f"--explain: {off}, so there is no text->image attention "
                             "to draw; predict without --explain")
    if off and any(p.image for p in posts):
        print(f"note: {off}; the images are not used")
    device = pick_device(config.device)
    model.to(device)
    out_dir = Path(args.out_dir or Path(args.save_dir) / args.save_name)

    t0 = time.time()
    dposts = dataset_posts(posts, not off)
    vision = None if off else model.vision
    if vision is not None and vision.cacheable:  # new images: pool decoding + batched backbone (no cache)
        ds = dataset_with_features(config, dposts, load_tokenizer(config), label_map, vision, args.image_workers)
    else:
        ds = D.make_dataset(config, "predict", dposts, load_tokenizer(config), label_map, vision, image_dir="/")
    for p, dp, ok in zip(posts, dposts, ds.has_image):
        if dp.imgid and not ok:
            why = D.load_image(dp.imgid)[1]
            why = {"zero bytes": "empty (0 bytes)", "decompression bomb": "a decompression bomb"}.get(why, why)
            warn(f"{p.source}: image {p.image} is {why}; this post is tagged text-only")
    amp = amp_context(config, device)[0]
    rt = CheckpointRuntime(args.save_dir, args.save_name, loaded=(config, label_map, model), strict=False,
                           device=device, amp=amp)
    results = rt.tag_dataset(ds, rt.dataset_features(ds), config.batch_size)
    if args.explain:  # the attention maps behind the overlays, from the model's own modules
        for r, ex in zip(results, attention_rows(model, ds, config, device, amp)):
            if ex:
                r["explain"] = ex
    for p, r in zip(posts, results):
        r["entities"] = entities(p, r["tags"], r["probs"], config.eval_mode)
    dt = time.time() - t0

    if args.text:
        print(format_entities(posts[0], results[0]["entities"], results[0]["image_used"]))
    else:
        f = write_predictions(out_dir / f"predictions.{'conll' if args.format == 'conll' else 'jsonl'}", posts,
                              results, args.format)
        print(f"wrote {f}: {len(posts)} posts, {sum(len(r['entities']) for r in results)} entities")
    if args.explain:
        for k, (p, r) in enumerate(zip(posts, results), 1):
            if "explain" not in r:
                warn(f"{p.source}: no image reached the model, so no attention overlay or rel/gate strip for post {k} "
                     "(its predictions are kept)")
                continue
            for f in explain_post(k, p, r, model, config, out_dir / "explain", args.explain_word):
                print(f"wrote {f}")
    print(f"{len(posts)} posts in {dt:.2f} s: {len(posts) / dt:.1f} posts/s on {device} "
          f"(batch size {config.batch_size}, {torch.get_num_threads()} threads)")
    return results


def dataset_with_features(config, dposts: list[D.Post], tokenizer, label_map, vision, workers: int) -> D.MNERDataset:
    """make_dataset for new images of a frozen backbone: decoded and preprocessed in a pool of `workers`
    threads while the backbone runs on batches of 32 (bundle.features_from_paths). The features are rounded to
    fp16 as the training cache stores them, but not written to the cache: new images are seen once."""
    from concurrent.futures import ThreadPoolExecutor

    import bundle
    prep = D.image_prep_for(config)
    paths = [D.find_image("/", p.imgid) for p in dposts]
    param = next(vision.parameters())

    @torch.no_grad()
    def encode(x: np.ndarray) -> np.ndarray:
        return vision.features(torch.from_numpy(x).to(param.device, param.dtype)).float().cpu().numpy()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        feats, _ = bundle.features_from_paths(paths, prep, encode, pool)
    table = {str(p): torch.from_numpy(bundle.fp16_round(f)) for p, f in zip(paths, feats) if f is not None}
    return D.MNERDataset(dposts, tokenizer, label_map, config.max_len, "/", "features", prep, table,
                         feat_shape=vision.feat_shape, name="predict")


def main_bundle(args, posts: list[NewPost]) -> list[dict]:
    """predict.py --bundle DIR: the same posts, warnings and outputs from an export.py bundle (onnxruntime),
    with images decoded in a pool of --image_workers threads and the backbone run in batches."""
    from concurrent.futures import ThreadPoolExecutor

    import bundle
    rt = bundle.Bundle(args.bundle)
    use = rt.uses_image and args.use_image
    if not use and any(p.image for p in posts):
        print(f"note: the model of bundle {args.bundle} has no image path; the images are not used")
    t0 = time.time()
    dposts = dataset_posts(posts, use)
    feats = None
    if use:
        with ThreadPoolExecutor(max(1, args.image_workers)) as pool:
            feats, why = bundle.features_from_paths([p.imgid for p in dposts], rt.prep, rt.vision_features, pool)
        for p, dp, f, w in zip(posts, dposts, feats, why):
            if dp.imgid and f is None:
                w = {"zero bytes": "empty (0 bytes)", "decompression bomb": "a decompression bomb"}.get(w, w)
                warn(f"{p.source}: image {p.image} is {w}; this post is tagged text-only")
    results = rt.tag([p.words for p in posts], feats, args.batch_size)
    for p, r in zip(posts, results):
        r["entities"] = entities(p, r["tags"], r["probs"], rt.meta["eval_mode"])
    dt = time.time() - t0
    if args.text:
        print(format_entities(posts[0], results[0]["entities"], results[0]["image_used"]))
    else:
        out_dir = Path(args.out_dir or args.bundle)
        f = write_predictions(out_dir / f"predictions.{'conll' if args.format == 'conll' else 'jsonl'}", posts,
                              results, args.format)
        print(f"wrote {f}: {len(posts)} posts, {sum(len(r['entities']) for r in results)} entities")
    print(f"{len(posts)} posts in {dt:.2f} s: {len(posts) / dt:.1f} posts/s with bundle {args.bundle} "
          f"({rt.meta['format']}{', int8' if rt.meta['int8'] else ''}, batch size {args.batch_size}, {rt.threads} "
          "threads)")
    return results


if __name__ == "__main__":
    cli(main)
