"""serve.py as a real process on a free loopback port, called over HTTP with httpx: text only, an image, a
batch, multipart, every limit's 4xx, bad requests mixed into good concurrent ones, /info, and a clean stop."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import bundle as BU
import test_export as TE

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Kevin Durant enters Oracle Arena tonight with LeBron James"
LIMITS = {"max_body_bytes": 300_000, "max_posts": 4, "max_words": 30, "max_image_bytes": 100_000,
          "max_image_pixels": 250_000}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data_dir, tiny_bert_dir, tiny_clip_dir):
    return TE.make_tiny_run(tmp_path_factory, tiny_data_dir, tiny_bert_dir, tiny_clip_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """serve.py --bundle on 127.0.0.1:<free port>, small limits; stopped (SIGTERM) and checked at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    flags = [f for k, v in LIMITS.items() for f in (f"--{k}", str(v))]
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--bundle", str(tiny_run["bundle"]),
                                 "--port", str(port), "--batch_window_ms", "30", "--max_batch_posts", "16", *flags],
                                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # a loaded CI box can take minutes to import torch
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, f"serve.py exited: {log.read_text()[-2000:]}"
            assert time.time() < deadline, f"serve.py did not come up: {log.read_text()[-2000:]}"
            time.sleep(0.3)
        yield {"url": url, "proc": proc, "log": log, "rt": BU.Bundle(tiny_run["bundle"])}
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("serve.py did not stop within 120 s of SIGTERM")
    # uvicorn shuts down gracefully on SIGTERM (lifespan end: the "stopped" line), then re-raises the signal
    assert code in (0, -15) and "stopped: " in log.read_text(), f"exit status {code}: {log.read_text()[-2000:]}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def png_bytes(size=(80, 60), colour=(20, 160, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(server, payload=None, **kw) -> httpx.Response:
    return httpx.post(server["url"] + "/predict", json=payload, timeout=300, **kw) if payload is not None \
        else httpx.post(server["url"] + "/predict", timeout=300, **kw)


def expected(server, words, image: bytes | None = None) -> list[str]:
    """The bundle's own tags for a post, in this process (the server must give the same)."""
    rt = server["rt"]
    feats = None
    if image is not None:
        from serve import image_pixels
        x = image_pixels(image, rt.prep, type("L", (), LIMITS), "t")
        feats = [rt.vision_features(x[None])[0]]
    return rt.tag([words], feats)[0]["tags"]


def check_record(rec: dict):
    for e in rec["entities"]:
        assert rec["text"][e["char_start"]:e["char_end"]] == e["text"]
        assert e["words"] == rec["tokens"][e["word_start"]:e["word_end"]] and 0 <= e["score"] <= 1


# ----------------------------------------------------------------------------- good requests

def test_health_and_info(server):
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    info = httpx.get(server["url"] + "/info").json()
    assert info["model"] == "MNER" and info["source"].startswith("bundle ") and info["int8"] is False
    assert set(info["types"]) <= {"PER", "LOC", "ORG", "MISC"} and info["uses_image"]
    assert info["limits"]["max_words"] == 30 and info["batching"]["max_batch_posts"] == 16


def test_text_only(server):
    r = post(server, {"text": TEXT, "id": 7})
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["id"] == 7 and rec["tokens"] == TEXT.split() and not rec["image_used"]
    assert rec["tags"] == expected(server, TEXT.split())
    check_record(rec)
    r = post(server, {"tokens": ["New", "York", "!"]})
    assert r.status_code == 200 and r.json()["text"] == "New York !"


def test_with_image_and_multipart(server):
    img = png_bytes()
    r = post(server, {"text": TEXT, "image_b64": b64(img)})
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["image_used"] and "image_b64" not in rec
    assert rec["tags"] == expected(server, TEXT.split(), img)
    m = post(server, data={"text": TEXT}, files={"image": ("p.png", img, "image/png")})
    assert m.status_code == 200, m.text
    assert m.json()["tags"] == rec["tags"] and m.json()["image_used"]
    d = post(server, {"text": TEXT, "image_b64": "data:image/png;base64," + b64(img)})  # a data URI, as pages send
    assert d.status_code == 200 and d.json()["tags"] == rec["tags"] and d.json()["image_used"]
    m = post(server, data={"tokens": json.dumps(TEXT.split())})
    assert m.status_code == 200 and not m.json()["image_used"]


def test_explain_gives_each_entity_its_attention_over_the_image(server):
    """"explain": true adds, per entity, its words' attention over the image cells in multiples of uniform (the
    bundle's explain graph: the same numbers in process); a post without an image says why there is none; the
    answer without "explain" has no attention; multipart takes explain=true."""
    img = png_bytes()
    rec = post(server, {"text": TEXT, "image_b64": b64(img), "explain": True}).json()
    att, rt = rec["attention"], server["rt"]
    assert rec["entities"], "the tiny model tags no entity in this post"
    side = att["side"]
    assert side == rt.meta["explain_side"] and len(att["entities"]) == len(rec["entities"])
    from serve import image_pixels
    x = image_pixels(img, rt.prep, type("L", (), LIMITS), "t")
    mine = rt.explain(TEXT.split(), rt.vision_features(x[None])[0])
    for e, m in zip(rec["entities"], att["entities"]):
        assert len(m) == side * side and abs(np.mean(m) - 1) < 0.01
        np.testing.assert_allclose(m, mine[e["word_start"]:e["word_end"]].mean(0) * side * side, atol=2e-3)
    assert "no image" in post(server, {"text": TEXT, "explain": True}).json()["attention"]["why"]
    assert "attention" not in post(server, {"text": TEXT, "image_b64": b64(img)}).json()
    m = post(server, data={"text": TEXT, "explain": "true"}, files={"image": ("p.png", img, "image/png")}).json()
    assert m["attention"] == att


def test_batch_of_posts(server):
    img = png_bytes(colour=(200, 30, 30))
    r = post(server, [{"text": TEXT}, {"text": "Paris is lovely", "image_b64": b64(img)}, {"tokens": ["Obama"]}])
    assert r.status_code == 200, r.text
    recs = r.json()
    assert [x["image_used"] for x in recs] == [False, True, False]
    assert recs[1]["tags"] == expected(server, ["Paris", "is", "lovely"], img)
    assert recs[0]["tags"] == expected(server, TEXT.split())


# ----------------------------------------------------------------------------- limits and bad input

BAD = {
    "body": (413, "--max_body_bytes", lambda: {"content": json.dumps({"text": "x " * 200_000}),
                                               "headers": {"content-type": "application/json"}}),
    "words": (413, "--max_words", lambda: {"json": {"text": " ".join(["w"] * 31)}}),
    "posts": (413, "--max_posts", lambda: {"json": [{"text": "a"}] * 5}),
    "image_bytes": (413, "--max_image_bytes",
                    lambda: {"json": {"text": "a", "image_b64": b64(b"\x89PNG" + bytes(120_000))}}),
    "image_pixels": (413, "--max_image_pixels",
                     lambda: {"json": {"text": "a", "image_b64": b64(png_bytes((600, 500)))}}),
    "multipart_image_bytes": (413, "--max_image_bytes",
                              lambda: {"data": {"text": "a"}, "files": {"image": ("x.png", bytes(150_000))}}),
    "bad_json": (400, "not valid JSON", lambda: {"content": b"{oops", "headers": {"content-type": "application/json"}}),
    "content_type": (415, "content type", lambda: {"content": b"hi", "headers": {"content-type": "text/plain"}}),
    "no_text": (422, 'needs "text"', lambda: {"json": {"id": 3}}),
    "unknown_key": (422, "unknown key 'imageb64'", lambda: {"json": {"text": "a", "imageb64": b64(png_bytes())}}),
    "unknown_keys": (422, "unknown keys 'picture', 'txt'", lambda: {"json": [{"text": "a", "picture": 1, "txt": 2}]}),
    "unknown_field": (422, "unknown form field 'picture'",
                      lambda: {"data": {"text": "a"}, "files": {"picture": ("p.png", png_bytes(), "image/png")}}),
    "bad_data_uri": (422, "data URI",
                     lambda: {"json": {"text": "a", "image_b64": "data:image/png," + b64(png_bytes())}}),
    "empty_list": (422, "empty list", lambda: {"json": []}),
    "explain_not_bool": (422, '"explain" must be true or false', lambda: {"json": {"text": "a", "explain": "yes"}}),
    "explain_field": (422, 'field "explain" must be true or false', lambda: {"data": {"text": "a", "explain": "1"}}),
    "explain_file": (422, 'field "explain" must be true or false, not a file',
                     lambda: {"data": {"text": "a"}, "files": {"explain": ("e.txt", b"true", "text/plain")}}),
    "not_object": (422, "expected a JSON object", lambda: {"json": [3]}),
    "bad_tokens": (422, '"tokens" must be', lambda: {"json": {"tokens": "abc"}}),
    "server_path": (422, '"image" (a server path)', lambda: {"json": {"text": "a", "image": "/etc/passwd"}}),
    "form_server_path": (422, 'field "image" must be an uploaded file', lambda: {"data": {"text": "a",
                                                                                         "image": "/etc/passwd"}}),
    "bad_base64": (422, "not valid base64", lambda: {"json": {"text": "a", "image_b64": "@@@"}}),
    "not_image": (422, "not a readable image", lambda: {"json": {"text": "a", "image_b64": b64(b"hello")}}),
    "truncated": (422, "image is", lambda: {"json": {"text": "a", "image_b64": b64(png_bytes()[:60])}}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_limits_and_bad_input_are_4xx(server, case):
    status, words, kw = BAD[case]
    r = httpx.post(server["url"] + "/predict", timeout=300, **kw())
    assert r.status_code == status, (case, r.status_code, r.text)
    assert words in r.json()["error"], r.json()


def test_unknown_route_and_method(server):
    assert httpx.get(server["url"] + "/nope").status_code == 404
    r = httpx.get(server["url"] + "/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_bad_requests_do_not_disturb_good_ones(server):
    """Good and bad requests sent together (so they share batching windows): every good one gets its own
    right answer, every bad one its 4xx, and the server keeps serving."""
    img = png_bytes(colour=(10, 10, 240))
    goods = [({"text": f"{TEXT} {k}"}, None) if k % 2 else ({"text": f"{TEXT} {k}", "image_b64": b64(img)}, img)
             for k in range(8)]
    bads = [BAD[c][2]() for c in ("words", "bad_base64", "truncated", "no_text")]

    async def go():
        async with httpx.AsyncClient(base_url=server["url"], timeout=300) as c:
            reqs = [c.post("/predict", json=g) for g, _ in goods] + [c.post("/predict", **b) for b in bads]
            order = list(range(len(reqs)))
            order = order[::2] + order[1::2]  # interleave good and bad
            res = await asyncio.gather(*[reqs[i] for i in order])
            return {i: r for i, r in zip(order, res)}
    before = httpx.get(server["url"] + "/info").json()["batching"]["batches"]
    res = asyncio.run(go())
    for k, (g, img_k) in enumerate(goods):
        r = res[k]
        assert r.status_code == 200, r.text
        assert r.json()["tags"] == expected(server, g["text"].split(),
                                            img_k) and r.json()["image_used"] == (img_k is not None)
    for j in range(len(bads)):
        assert 400 <= res[len(goods) + j].status_code < 500
    batches = httpx.get(server["url"] + "/info").json()["batching"]["batches"] - before
    assert 1 <= batches < len(goods), f"{len(goods)} concurrent posts took {batches} batches: no batching"
    assert httpx.get(server["url"] + "/health").status_code == 200


def test_checkpoint_mode_same_answers(tiny_run, server):
    """serve.py --save_name (the torch checkpoint) answers like the bundle (in-process app, same code)."""
    from fastapi.testclient import TestClient

    import serve
    from config import get_config
    args = get_config(["--save_dir", str(tiny_run["save"]), "--save_name", "e"], check=False)
    app = serve.make_app(serve.load_runtime(args), args)
    with TestClient(app) as c:
        info = c.get("/info").json()
        assert info["source"].startswith("checkpoint ") and info["format"] == "torch"
        img = png_bytes()
        r = c.post("/predict", json=[{"text": TEXT}, {"text": TEXT, "image_b64": b64(img)}])
        assert r.status_code == 200, r.text
    mine = post(server, [{"text": TEXT}, {"text": TEXT, "image_b64": b64(img)}]).json()
    assert [x["tags"] for x in r.json()] == [x["tags"] for x in mine]


def test_one_line_startup_errors(tmp_path):
    for argv, msg in [([], "give either --bundle"), (["--bundle", str(tmp_path)], "no meta.json"),
                      (["--bundle", str(tmp_path), "--max_words", "0"], "--max_words must be > 0")]:
        r = subprocess.run([sys.executable, str(ROOT / "serve.py"), *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        err = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(err) == 1 and msg in err[0], r.stderr


def test_access_log_and_quiet(server):
    """One line per request (method, path, status, posts, ms) in the server's output; --quiet turns it off."""
    post(server, [{"text": "a"}, {"text": "b"}])
    time.sleep(0.5)
    assert any(l.startswith("POST /predict 200 2 posts ") and l.endswith(" ms") for l in server["log"].read_text().splitlines())
    from fastapi.testclient import TestClient

    import serve
    from config import get_config
    args = get_config(["--quiet"], check=False)
    rt = server["rt"]
    lines = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(lines), TestClient(serve.make_app(rt, args)) as c:
        assert c.post("/predict", json={"text": "a"}).status_code == 200
    assert "POST /predict" not in lines.getvalue()


def test_busy_port_is_one_error_before_any_banner(tiny_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--bundle", str(tiny_run["bundle"]), "--port",
                            str(port)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "serving" not in r.stdout, r.stdout
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and f"--port {port}: cannot listen there" in err[0], r.stderr


def test_bomb_header_is_413_without_decoding():
    """A PNG whose header claims 20000 x 20000 pixels (a decompression bomb) is refused from its header alone."""
    import struct
    import zlib

    import serve
    from dataloader import ImagePrep
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")
    with pytest.raises(serve.BadRequest) as e:
        serve.image_pixels(png, ImagePrep(), type("L", (), LIMITS), "post")
    assert e.value.status == 413 and "decompression bomb" in e.value.msg
    limits = type("L", (), {**LIMITS, "max_image_pixels": 10_000})
    with pytest.raises(serve.BadRequest) as e:
        serve.image_pixels(png_bytes((200, 100)), ImagePrep(), limits, "post")
    assert e.value.status == 413 and "200x100" in e.value.msg


def test_openapi_documents_the_predict_request(server):
    spec = httpx.get(server["url"] + "/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    post_schema = body["application/json"]["schema"]["oneOf"][0]
    assert set(post_schema["properties"]) == {"text", "tokens", "image_b64", "id", "explain"}


def _chromium():
    """A headless Chromium driven by selenium, or the one-line reason there is none."""
    import shutil
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return None, "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (requirements-dev.txt)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1200,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts), ""


def test_page_tags_a_post_with_an_image_in_a_real_browser(server, tmp_path):
    """GET / in headless Chromium: type a post, attach an image, submit; the highlighted entities are the server's
    entities for that post and image (type and text), and the JSON shown is its answer."""
    driver, why = _chromium()
    if driver is None:
        pytest.skip(why)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    img = tmp_path / "p.png"
    img.write_bytes(png_bytes(colour=(240, 200, 30)))
    try:
        driver.get(server["url"] + "/")
        WebDriverWait(driver, 60).until(lambda d: "types" in d.find_element(By.ID, "info").text)
        driver.find_element(By.ID, "text").send_keys(TEXT)
        driver.find_element(By.ID, "image").send_keys(str(img))
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done"))
        shown = json.loads(driver.find_element(By.ID, "json").text)
        marks = [(m.get_attribute("data-type"), m.get_attribute("data-text"), m.text)
                 for m in driver.find_elements(By.CSS_SELECTOR, "#tagged mark")]
        overlay = driver.find_element(By.ID, "overlay")
        shown_att = (overlay.is_displayed(), overlay.get_attribute("data-peak"),
                     driver.find_element(By.ID, "overlay_note").text)
        png = Path(os.environ.get("MANGO_PAGE_SCREENSHOT", tmp_path / "page.png"))
        driver.save_screenshot(str(png))
    finally:
        driver.quit()
    want = post(server, {"text": TEXT, "image_b64": b64(img.read_bytes()), "explain": True}).json()
    assert shown["tags"] == want["tags"] and shown["image_used"] is True
    first = want["attention"]["entities"][0]  # the overlay shows the first entity's map, its range in the caption
    assert shown_att[0] and int(shown_att[1]) == first.index(max(first))
    assert f"from {min(first):.2f} to {max(first):.2f}x uniform" in shown_att[2]
    assert want["entities"][0]["text"] in shown_att[2]
    assert want["entities"], "the tiny model tags no entity in this post: nothing to highlight"
    assert [(t, w) for t, w, _ in marks] == [(e["type"], e["text"]) for e in want["entities"]]
    for (t, w, shown_text), e in zip(marks, want["entities"]):  # what a reader sees: the words, type and score
        assert shown_text.startswith(w) and f"{t} {e['score']:.2f}" in shown_text
    assert png.stat().st_size > 1000


def test_batcher_never_exceeds_max_batch_posts():
    """Requests that would take a batch past --max_batch_posts wait for the next one; a bigger request is a batch of
    its own."""
    import serve

    class Fake:
        uses_image = False

        def __init__(self):
            self.sizes = []

        def tag(self, words, feats, batch_size):
            self.sizes.append(len(words))
            return [{"tags": ["O"] * len(w)} for w in words]

    async def main():
        rt = Fake()
        b = serve.Batcher(rt, max_posts=4, window_s=0.2)
        task = asyncio.create_task(b.run())
        sizes = (3, 3, 1, 10, 2)
        out = await asyncio.gather(*(b.submit([["w"]] * n, [None] * n) for n in sizes))
        task.cancel()
        return rt.sizes, [len(r) for r in out]
    batches, answered = asyncio.run(main())
    assert answered == [3, 3, 1, 10, 2]
    assert sum(batches) == 19 and all(s <= 4 for s in batches if s != 10), batches
    assert 10 in batches  # the big request alone


def test_batcher_gives_each_post_its_own_picture():
    """Posts of several requests batched together, some without a picture: each post's tags come with the features
    of its own picture (one backbone pass for the batch)."""
    import serve

    class Fake:
        uses_image = True

        def vision_features(self, px):  # one number per picture: its pixel value
            return px.reshape(len(px), -1).mean(1, keepdims=True)

        def tag(self, words, feats, batch_size):
            return [{"word": w[0], "feat": None if f is None else float(f[0])} for w, f in zip(words, feats)]

    requests = [[1, None, 3], [None], [7, 8], [None, 10]]

    async def main():
        b = serve.Batcher(Fake(), max_posts=16, window_s=0.2)
        task = asyncio.create_task(b.run())
        out = await asyncio.gather(*(b.submit([[str(v)] for v in r],
                                              [None if v is None else np.full((3, 2, 2), v, np.float32) for v in r])
                                     for r in requests))
        task.cancel()
        return out
    for r, got in zip(requests, asyncio.run(main())):
        assert [(g["word"], g["feat"]) for g in got] == [(str(v), None if v is None else float(v)) for v in r]
