"""Issue #8: the bad-input corpus through the real entry points, faults while training and saving, the NaN guard.

Every case of tests/corpus/make_corpus.py's CASES runs through train.py / test.py / predict.py main() under
config.cli (what `python <entry>.py` runs; a sample also runs as real subprocesses) and its outcome is asserted:
an error exits 2 with exactly one `error:` line matching the case (it names the file:line, flag or run file and
the fix); a recovery or an accepted variant exits 0 with its line (and count) in stdout; no case may raise (an
uncaught exception fails the test with its traceback) or print a traceback.
Faults: SIGKILL during an epoch and during a checkpoint write leave loadable checkpoints and the resumed run
ends where an uninterrupted one ends; a full disk or a blocked path while saving is one line and the old
checkpoint stays; non-finite losses/gradients are skipped, counted, and stop the run after --max_bad_steps.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import dataloader
import predict
import runner
import test as test_py
import train
from config import ConfigError, cli, get_config
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "corpus"))
import make_corpus as MC  # noqa: E402

ENTRIES = {"train": train, "test": test_py, "predict": predict}
PROGRESS = re.compile(r"\d+%\||\[\d+:\d+[<,]|it/s\]|s/it\]")  # tqdm bars share stderr with the error line


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    data = MC.make_corpus(root / "corpus")
    return {"data": data, "files": root / "corpus" / "files", "save": root / "save"}


@pytest.fixture(scope="module")
def base(corpus, tiny_bert_dir, tiny_clip_dir):
    """train.py flags every case shares: the corpus, tiny BERT + tiny CLIP, a tiny MNER, one epoch."""
    return ["--data_dir", str(corpus["data"]), "--text_encoder", tiny_bert_dir, "--image_encoder", tiny_clip_dir,
            "--save_dir", str(corpus["save"]), "--cache_dir", str(corpus["save"] / "cache"), "--swanlab_mode",
            "disabled", "--device", "cpu", "--batch_size", "4", "--fusion_layers", "1", "--fusion_dim", "32",
            "--cross_attn_heads", "2", "--resampler_tokens", "4", "--epochs", "1", "--max_len", "48", "--seed", "7"]


@pytest.fixture(scope="module")
def runs(corpus, base):
    """Two trained runs on the clean set: `good` (MNER, what the run cases break) and `other` (roberta_crf)."""
    train.main([*base, "--dataset_name", "clean", "--save_name", "good"])
    train.main([*base, "--dataset_name", "clean", "--save_name", "other", "--model", "roberta_crf"])
    return corpus["save"] / "good", corpus["save"] / "other"


def fill(s: str, corpus, regex: bool = False) -> str:
    for k, v in (("{data}", corpus["data"]), ("{files}", corpus["files"]), ("{save}", corpus["save"]),
                 ("{run}", "good")):
        s = s.replace(k, re.escape(str(v)) if regex else str(v))
    return s


def case_argv(case, corpus, base) -> list[str]:
    args = [fill(a, corpus) for a in case.args]
    if case.entry != "train":
        return ["--save_dir", str(corpus["save"]), "--device", "cpu", *args]
    if "--continue_train_name" in args:  # a resumed run takes its flags from the run
        return ["--save_dir", str(corpus["save"]), "--swanlab_mode", "disabled", *args]
    return [*base, *args]


def run_entry(entry: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python <entry>.py argv`, run in this process under config.cli."""
    code = 0
    try:
        cli(lambda: ENTRIES[entry].main(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def message_lines(err: str) -> list[str]:
    return [l for l in re.split(r"[\r\n]", err) if l.strip() and not PROGRESS.search(l)]


def check_outcome(case, code, out, err, corpus):
    expect = fill(case.expect, corpus, regex=True)
    assert "Traceback" not in out + err, f"{case.name}: traceback\n{out[-2000:]}\n{err[-2000:]}"
    if case.outcome == "error":
        lines = message_lines(err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
            f"{case.name}: exit {code}, stderr lines {lines}\nstdout: {out[-1500:]}"
        assert re.search(expect, lines[0]), f"{case.name}:\n  got    {lines[0]}\n  wanted {expect}"
    else:
        assert code == 0, f"{case.name}: exit {code}\n{err[-2000:]}"
        assert re.search(expect, out, re.M), f"{case.name}: no line matching\n  {expect}\nin\n{out[-3000:]}"


# ----------------------------------------------------------------------------- the corpus

def test_corpus_covers_the_issue():
    names = {c.name for c in MC.CASES}
    assert len(MC.CASES) >= 40 and len(names) == len(MC.CASES)
    for need in ("conll_no_tab", "conll_three_columns", "conll_unknown_tag", "conll_i_after_o",
                 "conll_type_change_in_chunk", "conll_crlf", "conll_bom", "conll_nul_bytes", "conll_invalid_utf8",
                 "conll_empty", "conll_only_imgid", "conll_600_tokens", "conll_vanishing_tokens",
                 "conll_duplicate_imgids", "img_missing", "img_zero_bytes", "img_truncated_jpeg", "img_png_named_jpg",
                 "img_cmyk_jpeg", "img_16bit_png", "img_palette_transparency", "img_animated_gif", "img_1x1",
                 "img_bomb_20000", "img_directory", "run_unknown_save_name", "run_missing_label_map",
                 "run_foreign_checkpoint", "run_changed_architecture", "run_save_dir_read_only", "run_nan_loss"):
        assert need in names, need
    assert {c.outcome for c in MC.CASES} == {"error", "recovered", "accepted"}


def test_corpus_is_small_and_deterministic(tmp_path):
    a, b = MC.make_corpus(tmp_path / "a").parent, MC.make_corpus(tmp_path / "b").parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert sum((a / f).stat().st_size for f in files) < 2_000_000  # the 20000x20000 bomb is a 100-byte header
    assert (a / "data" / "img_bomb_20000" / "img_bomb_20000_images" / "p1.png").stat().st_size < 200


def test_case_table_note_is_current():
    note = (ROOT / "tests" / "corpus" / "CASES.md").read_text()
    assert MC.table() in note, "regenerate: python tests/corpus/make_corpus.py --table"


@pytest.mark.parametrize("case", MC.CASES, ids=lambda c: c.name)
def test_case(case, corpus, base, runs, capsys):
    if case.not_as_root and os.geteuid() == 0:
        pytest.skip("root ignores file permissions; run_save_dir_is_file covers an unwritable --save_dir")
    if case.setup:
        MC.prepare_run(case, corpus["save"], *runs)
    capsys.readouterr()
    code, out, err = run_entry(case.entry, case_argv(case, corpus, base), capsys)
    check_outcome(case, code, out, err, corpus)
    run = corpus["save"] / case.name
    if case.name == "run_pickle_with_code":
        assert not (run / "PWNED").exists(), "unpickling the checkpoint ran code"
    if case.name == "run_stale_checkpoint_tmp":
        assert not (run / "last.pt.tmp").exists() and torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    if case.name == "run_nan_loss":
        assert torch.load(corpus["save"] / "nan" / "last.pt", weights_only=True)["epoch"] >= 0  # still loadable
    if case.category == "conll" and case.outcome == "accepted":  # read exactly as the clean file, silently
        assert "warning" not in out and "note:" not in out
        posts = [(p.tokens, p.tags, p.imgid) for p in dataloader.read_conll(corpus["data"] / case.name / "train.txt")]
        assert posts == [(p.tokens, p.tags, p.imgid) for p in dataloader.read_conll(corpus["data"] / "clean" /
                                                                                     "train.txt")]


@pytest.mark.parametrize("name", ["conll_invalid_utf8", "run_foreign_checkpoint", "predict_image_truncated"])
def test_case_as_subprocess(name, corpus, base, runs):
    """The same outcome from a real `python <entry>.py` process (its stderr is what a user sees)."""
    case = next(c for c in MC.CASES if c.name == name)
    if case.setup and not (corpus["save"] / name).exists():
        MC.prepare_run(case, corpus["save"], *runs)
    p = subprocess.run([sys.executable, f"{case.entry}.py", *case_argv(case, corpus, base)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    check_outcome(case, p.returncode, p.stdout, p.stderr, corpus)


# ----------------------------------------------------------------------------- faults

def env():
    e = {k: v for k, v in os.environ.items() if k != "SWANLAB_API_KEY"}
    e.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return e


WRITER = """
import sys, torch, train
from pathlib import Path
path = Path(sys.argv[1])
obj = torch.load(path, weights_only=True)
obj["pad"] = torch.ones(16 * 2**20)  # 64 MB: long enough to be killed in the middle of writing it
while True:
    train.atomic_save(obj, path)
"""


def kill_during_save(path: Path) -> int:
    """SIGKILL a process in the middle of train.atomic_save(<path's checkpoint + a 64 MB tensor>, path), which it
    repeats; returns how many bytes of the temp file were written when it died."""
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp, t0, size = path.with_name(path.name + ".tmp"), time.time(), None
    while time.time() - t0 < 120 and p.poll() is None:
        n = tmp.stat().st_size if tmp.exists() else 0
        if 0 < n < 48 * 2**20:
            p.send_signal(signal.SIGKILL)
            size = n
            break
        time.sleep(0.0005)
    p.wait(timeout=60)
    assert size is not None, p.stderr.read().decode()[-2000:]
    return size


def kill_in_epoch(argv: list[str], epoch: int, epochs: int) -> int:
    """Start `python train.py argv` and SIGKILL it as soon as tqdm shows `epoch <epoch>/<epochs>` on stderr (the
    bar appears when that epoch starts); returns the exit status."""
    p = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    mark, seen = f"epoch {epoch}/{epochs}".encode(), []

    def watch():
        buf = b""
        while chunk := p.stderr.read1(4096):
            buf += chunk
            if mark in buf and not seen:
                seen.append(1)
                p.send_signal(signal.SIGKILL)
    t = threading.Thread(target=watch)
    t.start()
    p.wait(timeout=300)
    t.join()
    assert seen, "the run ended before the epoch started"
    return p.returncode


def test_sigkill_during_epoch_and_checkpoint_writes_then_resume_matches(tiny_data_dir, tiny_bert_dir,
                                                                        tiny_clip_dir, tmp_path):
    """A real training process is SIGKILLed inside epoch 2 of 3, then two processes are SIGKILLed while writing
    its last.pt and model.pt: both stay byte-for-byte the epoch-1 files, loadable, the torn .tmp files are
    ignored, and --continue_train_name ends with the metrics of an uninterrupted run (CPU, fixed seed)."""
    save = tmp_path / "save"
    args = ["--data_dir", str(tiny_data_dir), "--dataset_name", "tiny", "--text_encoder", tiny_bert_dir,
            "--image_encoder", tiny_clip_dir, "--save_dir", str(save), "--cache_dir", str(tmp_path / "cache"),
            "--swanlab_mode", "disabled", "--device", "cpu", "--batch_size", "2", "--fusion_layers", "1",
            "--fusion_dim", "32", "--cross_attn_heads", "2", "--resampler_tokens", "4", "--fusion_lr", "3e-3",
            "--epochs", "3", "--seed", "5", "--max_len", "48"]
    _, full = train.main([*args, "--save_name", "full"])

    assert kill_in_epoch([*args, "--save_name", "cut"], 2, 3) == -signal.SIGKILL
    cut = save / "cut"
    assert runner.load_checkpoint(cut / "last.pt")["epoch"] == 0  # killed inside epoch 2, before its save
    assert runner.load_checkpoint(cut / "model.pt")["epoch"] == 0 and not (cut / "test_report.json").exists()

    for f in ("last.pt", "model.pt"):
        before = {k: v for k, v in runner.load_checkpoint(cut / f).items() if k not in ("model", "optimizer", "rng")}
        assert kill_during_save(cut / f) > 0
        # the killed write is in the temp file only: the checkpoint is whole, the old one (or a finished rewrite
        # of it with the extra tensor, if an earlier write of the loop got through)
        after = runner.load_checkpoint(cut / f)
        assert {k: v for k, v in after.items() if k not in ("model", "optimizer", "rng", "pad")} == before
        assert (cut / f"{f}.tmp").is_file()  # the killed write, left unfinished beside the whole checkpoint
        with pytest.raises(Exception):
            torch.load(cut / f"{f}.tmp", weights_only=True)
    assert runner.load_checkpoint(cut / "last.pt")["epoch"] == 0

    r = subprocess.run([sys.executable, "train.py", "--continue_train_name", "cut", "--save_dir", str(save),
                        "--swanlab_mode", "disabled"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed cut after epoch 1" in r.stdout and not (cut / "last.pt.tmp").exists()
    resumed = json.loads((cut / "test_report.json").read_text())
    assert resumed["f1"] == full["f1"] and resumed["correct"] == full["correct"]
    assert resumed["per_type"] == full["per_type"]
    a = [json.loads(l) for l in (save / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["dev_f1"] == y["dev_f1"] and x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_full_disk_while_saving(tmp_path, monkeypatch):
    """ENOSPC while saving (raised by the file system, or as torch's zip writer reports it): one line naming the
    file, the old checkpoint intact, no temp file left."""
    path = tmp_path / "last.pt"
    train.atomic_save({"epoch": 1}, path)
    before = path.read_bytes()

    def full(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ConfigError) as e:
        train.atomic_save({"epoch": 2}, path)
    msg = one_line(e)
    assert f"could not write {path}: No space left on device" in msg and "left as it was" in msg
    assert "--continue_train_name" in msg
    assert path.read_bytes() == before and not (tmp_path / "last.pt.tmp").exists()

    def zip_writer_fails(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", zip_writer_fails)
    with pytest.raises(ConfigError) as e:
        train.atomic_save({"epoch": 2}, path)
    assert "could not write" in one_line(e) and "write failed" in str(e.value)
    assert path.read_bytes() == before and not (tmp_path / "last.pt.tmp").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_real_full_disk_through_the_cli(runs, corpus, capsys):
    """A real ENOSPC: the checkpoint temp files are links to /dev/full. The resumed run stops with one line at its
    first save and last.pt keeps epoch 1."""
    good, _ = runs
    run = corpus["save"] / "disk_full"
    shutil.copytree(good, run)
    before = (run / "last.pt").read_bytes()
    for f in ("model.pt.tmp", "last.pt.tmp"):
        os.symlink("/dev/full", run / f)
    capsys.readouterr()
    code, out, err = run_entry("train", ["--continue_train_name", "disk_full", "--save_dir", str(corpus["save"]),
                                         "--swanlab_mode", "disabled", "--epochs", "2"], capsys)
    lines = message_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, lines
    assert re.search(r"^error: could not write .*disk_full/(model|last)\.pt: No space left on device", lines[0])
    assert (run / "last.pt").read_bytes() == before
    assert runner.load_checkpoint(run / "last.pt")["epoch"] == 0


def test_blocked_path_while_saving(tmp_path):
    """The save target cannot be written (a directory in the way; read-only when not root): one line, old intact."""
    path = tmp_path / "model.pt"
    train.atomic_save({"epoch": 1}, path)
    before = path.read_bytes()
    (tmp_path / "model.pt.tmp").mkdir()
    with pytest.raises(ConfigError) as e:
        train.atomic_save({"epoch": 2}, path)
    assert "Is a directory" in one_line(e) and path.read_bytes() == before
    (tmp_path / "model.pt.tmp").rmdir()
    if os.geteuid() != 0:  # root writes through permissions
        tmp_path.chmod(0o555)
        try:
            with pytest.raises(ConfigError) as e:
                train.atomic_save({"epoch": 2}, path)
            assert "Permission denied" in one_line(e) and path.read_bytes() == before
        finally:
            tmp_path.chmod(0o755)


def test_oserror_anywhere_is_one_line(capsys):
    """An OSError no check caught (disk full writing a log, say) still ends as one line from config.cli."""
    def boom():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
    with pytest.raises(SystemExit) as e:
        cli(boom)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: /runs/x/metrics.jsonl: No space left on device; check free space "
                                         "and permissions there"]


# ----------------------------------------------------------------------------- the non-finite guard

class _Stub(torch.nn.Module):
    """A model whose loss is NaN on the batches listed in `bad` (or whose gradient is inf, with grad=True)."""

    def __init__(self, bad, grad=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.bad, self.grad, self.calls = set(bad), grad, 0

    def forward(self, batch, epoch=0, image_on=True):
        k, self.calls = self.calls, self.calls + 1
        loss = (self.w ** 2).sum()
        if k in self.bad:  # NaN loss, or a finite loss (0 at w = 1) whose gradient is infinite
            loss = torch.sqrt(self.w - 1).sum() if self.grad else loss * float("nan")
        return {"loss": loss, "parts": {"tag": loss.detach()}}


class _Tracker:
    def log(self, *a):
        pass

    def log_step(self, *a):
        pass


def _epoch(model, n, config, bad_run):
    opt = torch.optim.SGD([{"params": list(model.parameters()), "name": "rest"}], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batches = [{"x": torch.zeros(1)} for _ in range(n)]
    from contextlib import nullcontext
    return train.train_epoch(model, batches, opt, sched, config, torch.device("cpu"), 0, nullcontext, None,
                             _Tracker(), 0, bad_run)


def test_nan_guard_default_stops_after_10_in_a_row():
    config = get_config([])
    assert config.max_bad_steps == 10
    model, bad_run = _Stub(bad=range(100)), [0, 0]
    with pytest.raises(ConfigError) as e:
        _epoch(model, 30, config, bad_run)
    assert model.calls == 10 and bad_run == [10, 10]
    assert one_line(e).startswith("10 non-finite losses in a row at epoch 1 (10 skipped in all); lower the "
                                  "learning rates") and "--max_bad_steps 10" in str(e.value)
    assert torch.equal(model.w.detach(), torch.ones(2))  # no update from a bad step


def test_nan_guard_skips_and_counts_scattered_bad_steps():
    config = get_config(["--max_bad_steps", "3", "--clip_grad", "0"])
    bad = {1, 2, 4, 5, 7, 8, 10, 11}  # never 3 in a row
    model, bad_run = _Stub(bad=bad), [0, 0]
    losses, step = _epoch(model, 12, config, bad_run)
    assert step == 12 - len(bad) and bad_run == [2, len(bad)]  # 8 skipped, counted; the run goes on
    assert losses["loss"] == pytest.approx(losses["tag"]) and torch.isfinite(model.w).all()


def test_nan_guard_catches_infinite_gradients():
    config = get_config(["--max_bad_steps", "2"])
    model, bad_run = _Stub(bad=range(100), grad=True), [0, 0]
    with pytest.raises(ConfigError) as e:
        _epoch(model, 5, config, bad_run)
    assert one_line(e).startswith("2 non-finite gradients in a row") and bad_run == [2, 2]


def test_a_non_finite_loss_skips_its_whole_accumulation_group():
    """With --gradient_accumulation_steps 3, a NaN in the group's second batch takes no step: the first batch's
    gradient is not applied at a third of its size, the third batch is not read, and one skip is counted."""
    config = get_config(["--gradient_accumulation_steps", "3", "--clip_grad", "0"])
    model, bad_run = _Stub(bad={1}), [0, 0]
    losses, step = _epoch(model, 6, config, bad_run)
    assert model.calls == 5 and step == 1 and bad_run == [0, 1]  # group 1: batches 0-1 only; group 2: a step
    assert torch.equal(model.w.detach(), torch.full((2,), 0.8))  # one SGD step of lr 0.1 on w^2 from w = 1


# ----------------------------------------------------------------------------- nothing from a run dir is executed

def test_checkpoints_load_with_weights_only():
    """Every torch.load in the product passes weights_only=True; run files are JSON (config, label map)."""
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "data").glob("*.py")) + sorted((ROOT / "script").glob("*.py"))
    assert {"runner.py", "distill.py", "train.py"} <= {f.name for f in files}
    for f in files:
        src = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            assert "weights_only=True" in m.group(1), f"{f}: {m.group(0)}"
        assert "pickle.load" not in src and not re.search(r"(?<![\w.])eval\(", src), f  # literal_eval, .eval() fine
