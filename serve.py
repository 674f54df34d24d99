"""Tag posts over HTTP (FastAPI + uvicorn) with an export.py bundle or a run's checkpoint.

    python serve.py --bundle save_models/NAME/bundle_int8 [--host 127.0.0.1 --port 8000]
    python serve.py --save_name NAME                        # the torch checkpoint, same answers

POST /predict   JSON: one post {"text": "..." | "tokens": [...], "image_b64": "<base64 image or data URI>"?,
                "id": <yours, echoed>?, "explain": true?} or a list of them; or multipart/form-data with fields
                text | tokens (a JSON list), id, explain and a file field "image". Any other key or field is a 422
                naming it. The answer is predict.py's prediction record per post (input keys, text, tokens, tags,
                entities with type, words, word and character spans and score, image_used): one object for one
                post, a list for a list. With "explain": true also "attention": {"side": G, "entities": per entity
                G*G weights over the image's cells, in multiples of uniform} (or {"why": ...} when there is none).
GET  /          a page to try the model (serve.html): a post, an image, the highlighted entities, the attention
                over the image and the JSON
GET  /health    {"status": "ok"}
GET  /info      model, labels, encoders, bundle or checkpoint, int8 or not, limits, batching

Requests that arrive within --batch_window_ms of each other are tagged together, at most --max_batch_posts
posts per batch (a bigger request is one batch of its own). Images are decoded and preprocessed in a pool of
--image_workers threads as requests arrive; the vision backbone then runs once per batch.
Limits, each a flag, each a 4xx JSON answer {"error": "..."} that names the flag: --max_body_bytes (413),
--max_posts per request (413), --max_words per post (413), --max_image_bytes (413), --max_image_pixels (413;
images.load_image's decompression-bomb guard applies as in training). A malformed request is a 400/415/422
and never disturbs the requests batched with it. Binds to 127.0.0.1 unless --host says otherwise. Each request
prints one access line (method, path, status, posts, ms) unless --quiet.
"""
from __future__ import annotations

import asyncio
import contextlib
import base64
import binascii
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import bundle as BU
import dataloader as D
from config import ConfigError, cli, get_config
from predict import NewPost, entities, post_from_record, prediction_record


class BadRequest(Exception):
    """A request the server refuses: HTTP status and a one-line reason."""

    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status, self.msg = status, msg


@dataclass
class Job:
    """One request's posts waiting for a batch: words and preprocessed image pixels [3, S, S] (None: text-only)
    per post."""
    words: list[list[str]]
    pixels: list[np.ndarray | None]
    future: asyncio.Future = field(default=None)


# ----------------------------------------------------------------------------- images

def image_pixels(data: bytes, prep: D.ImagePrep, limits, where: str) -> np.ndarray:
    """Image file bytes -> pixels [3, S, S]; BadRequest for too many bytes or pixels, or an unusable file.

    The header is read first (no decoding) for the pixel limit; then images.load_image decodes with the
    training guards (zero bytes, truncated, non-image, decompression bomb), from a private temporary file.
    """
    from PIL import Image
    if len(data) > limits.max_image_bytes:
        raise BadRequest(413, f"{where}: image of {len(data)} bytes is over --max_image_bytes {limits.max_image_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError:  # over twice Pillow's own pixel limit: refused before our check
        raise BadRequest(413, f"{where}: image is a decompression bomb (over --max_image_pixels "
                              f"{limits.max_image_pixels})") from None
    except Exception as e:  # not an image at all
        raise BadRequest(422, f"{where}: not a readable image ({type(e).__name__}); send a JPEG/PNG/GIF/WebP/BMP "
                              "file") from None
    if w * h > limits.max_image_pixels:
        raise BadRequest(413, f"{where}: image of {w}x{h} pixels is over --max_image_pixels {limits.max_image_pixels}")
    fd, tmp = tempfile.mkstemp(prefix="mango_img_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        x, why = BU.prep_image(tmp, prep)
    finally:
        os.unlink(tmp)
    if x is None:
        raise BadRequest(422, f"{where}: image is {why}; send a complete JPEG/PNG/GIF/WebP/BMP file")
    return x


# ----------------------------------------------------------------------------- requests

_POST = {"type": "object", "additionalProperties": False, "properties": {
    "text": {"type": "string", "description": "the post; split on whitespace and punctuation"},
    "tokens": {"type": "array", "items": {"type": "string"}, "description": "the post's words, instead of text"},
    "image_b64": {"type": "string", "description": "the image file in base64, or a data:image/...;base64, URI"},
    "id": {"description": "yours, echoed back"},
    "explain": {"type": "boolean", "description": "add each entity's attention over the image's cells"}}}
PREDICT_SCHEMA = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"oneOf": [_POST, {"type": "array", "items": _POST}]}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "text": {"type": "string"}, "tokens": {"type": "string", "description": "a JSON list of words"},
        "id": {"type": "string"}, "explain": {"type": "string", "enum": ["true", "false"]},
        "image": {"type": "string", "format": "binary"}}}}}}}
# "id" is the client's own, echoed back; "explain": true adds the attention over the image; anything else is refused
POST_KEYS = {"text", "tokens", "image_b64", "id", "explain"}


def decode_b64(value, limits, at: str) -> bytes:
    """An "image_b64" value (plain base64, or a data URI "data:image/...;base64,...") -> the image file's bytes."""
    if not isinstance(value, str):
        raise BadRequest(422, f'{at}: "image_b64" must be a base64 string')
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(422, f'{at}: "image_b64" data URI must be data:image/...;base64,<data>')
    if len(value) > 4 * (limits.max_image_bytes // 3 + 2):
        raise BadRequest(413, f"{at}: image is over --max_image_bytes {limits.max_image_bytes}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(422, f'{at}: "image_b64" is not valid base64') from None


def parse_posts(recs, limits, where: str = "post") -> list[tuple[NewPost, bytes | None]]:
    """Request JSON (one object or a list) -> [(post, image bytes or None)]; BadRequest for bad ones.

    Posts are read by predict.post_from_record (text / tokens, the same word splitting); "image_b64" carries the
    image itself: the server never opens a path a client names.
    """
    many = isinstance(recs, list)
    recs = recs if many else [recs]
    if not recs:
        raise BadRequest(422, "empty list: send at least one post")
    if len(recs) > limits.max_posts:
        raise BadRequest(413, f"{len(recs)} posts in one request is over --max_posts {limits.max_posts}")
    out = []
    for k, rec in enumerate(recs):
        at = f"{where} {k}" if many else where
        if isinstance(rec, dict) and "image" in rec:
            raise BadRequest(422, f'{at}: "image" (a server path) is not accepted; send the file as "image_b64" '
                                  "or as a multipart file")
        unknown = sorted(set(rec) - POST_KEYS) if isinstance(rec, dict) else []
        if unknown:
            raise BadRequest(422,
                             f"{at}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                                  f"a post has {', '.join(map(repr, sorted(POST_KEYS)))}")
        if isinstance(rec, dict) and not isinstance(rec.get("explain", False), bool):
            raise BadRequest(422, f'{at}: "explain" must be true or false')
        img = None
        if isinstance(rec, dict) and rec.get("image_b64") is not None:
            img = decode_b64(rec["image_b64"], limits, at)
        try:
            p = post_from_record({k2: v for k2, v in rec.items() if k2 != "image_b64"} if isinstance(rec, dict)
                                 else rec, at)
        except ValueError as e:
            raise BadRequest(422, f"{at}: {e}") from None
        if len(p.words) > limits.max_words:
            raise BadRequest(413, f"{at}: {len(p.words)} words is over --max_words {limits.max_words}")
        out.append((p, img))
    return out


class Batcher:
    """Collects jobs for up to window_s and tags them as one batch in one worker thread: at most max_posts posts a
    batch, but a request bigger than that is a batch of its own."""

    def __init__(self, rt: BU.Runtime, max_posts: int, window_s: float):
        self.rt, self.max_posts, self.window_s = rt, max_posts, window_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="tagger")  # one batch at a time owns the cores
        self.batches = self.posts = 0

    async def submit(self, words, pixels) -> list[dict]:
        job = Job(words, pixels, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def run(self):
        loop = asyncio.get_running_loop()
        held = None  # the job that would have taken the last batch past max_posts: it opens the next one
        while True:
            jobs, held = [held or await self.queue.get()], None
            n, deadline = len(jobs[0].words), loop.time() + self.window_s
            while n < self.max_posts:
                try:
                    job = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except (asyncio.TimeoutError, TimeoutError):
                    break
                if n + len(job.words) > self.max_posts:
                    held = job
                    break
                jobs.append(job)
                n += len(job.words)
            try:
                res = await loop.run_in_executor(self.worker, self.tag, jobs)
            except Exception as e:  # a bug, not bad input (that is refused before it gets here): fail these jobs only
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            for j, r in zip(jobs, res):
                if not j.future.done():  # the client may have gone
                    j.future.set_result(r)

    def tag(self, jobs: list[Job]) -> list[list[dict]]:
        """All jobs' posts in one pass: the backbone on every image at once, then the tagger."""
        words = [w for j in jobs for w in j.words]
        pixels = [x for j in jobs for x in j.pixels]
        feats = [None] * len(words)
        have = [i for i, x in enumerate(pixels) if x is not None]
        if have and self.rt.uses_image:
            for i, f in zip(have, self.rt.vision_features(np.stack([pixels[i] for i in have]))):
                feats[i] = f
        out = self.rt.tag(words, feats, batch_size=max(len(words), 1))
        for r, f in zip(out, feats):
            r["image_feats"] = f  # for "explain": true, so its image is not encoded twice
        self.batches, self.posts = self.batches + 1, self.posts + len(words)
        res, k = [], 0
        for j in jobs:
            res.append(out[k:k + len(j.words)])
            k += len(j.words)
        return res


# ----------------------------------------------------------------------------- app

def load_runtime(args) -> BU.Runtime:
    if bool(args.bundle) == bool(args.save_name):
        raise ConfigError("give either --bundle DIR (an export.py bundle) or --save_name NAME (a run's checkpoint)")
    if args.bundle:
        return BU.Bundle(args.bundle)
    from runtime import CheckpointRuntime
    return CheckpointRuntime(args.save_dir, args.save_name, {"save_dir": args.save_dir})


def check_limits(args) -> None:
    for f in ("port", "max_batch_posts", "max_body_bytes", "max_posts", "max_words", "max_image_bytes",
              "max_image_pixels", "image_workers"):
        if getattr(args, f) < (0 if f == "port" else 1):
            raise ConfigError(f"--{f} must be {'>= 0' if f == 'port' else '> 0'}, got {getattr(args, f)}")
    if args.batch_window_ms < 0:
        raise ConfigError(f"--batch_window_ms must be >= 0, got {args.batch_window_ms}")


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (Content-Length or streamed)."""
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > limit:
        raise BadRequest(413, f"body of {n} bytes is over --max_body_bytes {limit}")
    chunks, size = [], 0
    async for c in request.stream():
        size += len(c)
        if size > limit:
            raise BadRequest(413, f"body is over --max_body_bytes {limit}")
        chunks.append(c)
    body = b"".join(chunks)
    request._body = body  # Starlette's body cache: request.form() parses these bytes instead of the spent stream
    return body


async def access_log(request, call_next):
    """One line per request: method, path, status, posts tagged, milliseconds."""
    t0 = time.perf_counter()
    response = await call_next(request)
    print(f"{request.method} {request.url.path} {response.status_code} "
          f"{getattr(request.state, 'posts', 0)} posts {1000 * (time.perf_counter() - t0):.1f} ms", flush=True)
    return response


def make_app(rt: BU.Runtime, args):
    """The FastAPI app around a runtime; args carries the limits and batching flags."""
    pool = ThreadPoolExecutor(args.image_workers, thread_name_prefix="image")
    batcher = Batcher(rt, args.max_batch_posts, args.batch_window_ms / 1000)
    state = {"started": time.time(), "requests": 0, "refused": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        batcher.worker.shutdown(wait=False, cancel_futures=True)
        print(f"stopped: {state['requests']} requests ({state['refused']} refused), {batcher.posts} posts in "
              f"{batcher.batches} batches", flush=True)

    app = FastAPI(title="MANGO", lifespan=lifespan)

    if not args.quiet:
        app.middleware("http")(access_log)
    @app.exception_handler(BadRequest)
    async def bad_request(request, e: BadRequest):
        state["refused"] += 1
        return JSONResponse({"error": e.msg}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):  # unknown routes and methods: the same {"error"} shape
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    page = (Path(__file__).resolve().parent / "serve.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():  # a page to try the model: a post, an image, the highlighted entities and the JSON
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return {**rt.info(), "uses_image": rt.uses_image,
                "limits": {k: getattr(args, k) for k in ("max_body_bytes", "max_posts", "max_words", "max_image_bytes",
                                                          "max_image_pixels")},
                "batching": {"max_batch_posts": args.max_batch_posts, "batch_window_ms": args.batch_window_ms,
                             "image_workers": args.image_workers, "batches": batcher.batches, "posts": batcher.posts},
                "requests": state["requests"], "refused": state["refused"]}

    @app.post("/predict", openapi_extra=PREDICT_SCHEMA)
    async def predict_route(request: Request):
        state["requests"] += 1
        many, items = await request_posts(request, args)
        loop = asyncio.get_running_loop()
        pixels = await asyncio.gather(*[
            loop.run_in_executor(pool, image_pixels, img, rt.prep, args, p.source)
            if img is not None and rt.uses_image else _none() for p, img in items])
        request.state.posts = len(items)
        res = await batcher.submit([p.words for p, _ in items], list(pixels))
        recs_out = []
        for (p, _), r in zip(items, res):
            r["entities"] = entities(p, r["tags"], r["probs"], rt.meta["eval_mode"])
            rec = prediction_record(p, r)
            if p.record.get("explain"):
                # on the tagger's own thread: the explain graph shares the tagger's modules and their kept weights
                rec["attention"] = await loop.run_in_executor(batcher.worker, attention, rt, p, r)
            recs_out.append(rec)
        return recs_out if many else recs_out[0]

    return app


async def request_posts(request, args) -> tuple[bool, list[tuple[NewPost, bytes | None]]]:
    """A /predict request -> (whether it sent a list, [(post, image bytes or None)]); BadRequest for a bad body."""
    body = await read_body(request, args.max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return False, await multipart_post(request, args)
    if ctype not in ("application/json", ""):
        raise BadRequest(415, f"content type {ctype!r}: send application/json or multipart/form-data (or a "
                              "urlencoded form without an image)")
    try:
        recs = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"body is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    return isinstance(recs, list), parse_posts(recs, args)


def attention(rt: BU.Runtime, p: NewPost, r: dict) -> dict:
    """"attention" of a post asked with "explain": true: per entity, the mean attention of its words over the
    image's side x side cells (row-major over the model's square view: the centred square of the picture), in
    multiples of uniform attention (1 = as if spread evenly); or why there is none."""
    if not rt.explains:
        return {"why": "this model or bundle has no attention graph (a text-only model, or a bundle exported "
                       "before explain.onnx: export it again)"}
    if r.get("image_feats") is None or not r["image_used"]:
        return {"why": "no image was used for this post"}
    att = rt.explain(p.words, r["image_feats"])
    side = int(rt.meta["explain_side"])
    maps = [np.round(att[e["word_start"]:e["word_end"]].mean(0) * side * side, 3).tolist() for e in r["entities"]]
    return {"side": side, "entities": maps}


async def _none():
    return None


async def multipart_post(request, args) -> list[tuple[NewPost, bytes | None]]:
    """One post from a form (multipart, or urlencoded without an image): text or tokens (a JSON list) and an
    optional file field "image"."""
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=args.max_body_bytes)
    except Exception as e:  # malformed multipart, too many parts
        raise BadRequest(400, f"malformed multipart body ({str(e).splitlines()[0][:80]})") from None
    unknown = sorted(set(form) - {"text", "tokens", "image", "id", "explain"})
    if unknown:
        raise BadRequest(422, f"post: unknown form field{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}; a form has text or tokens, an optional file "
                              "field 'image', an optional id and explain")
    if "explain" in form and not isinstance(form["explain"], str):
        raise BadRequest(422, 'post: form field "explain" must be true or false, not a file')
    if isinstance(form.get("image"), str):  # a path or a name: the server never opens files it is told of
        raise BadRequest(422, 'post: form field "image" must be an uploaded file, not text')
    rec = {k: v for k, v in form.items() if isinstance(v, str)}
    if "explain" in rec:
        if rec["explain"] not in ("true", "false"):
            raise BadRequest(422, 'post: form field "explain" must be true or false')
        rec["explain"] = rec["explain"] == "true"
    if "tokens" in rec:
        try:
            rec["tokens"] = json.loads(rec["tokens"])
        except ValueError:
            raise BadRequest(422, 'post: form field "tokens" must be a JSON list of strings') from None
    img, data = form.get("image"), None
    if img is not None:
        data = await img.read(args.max_image_bytes + 1)
        if len(data) > args.max_image_bytes:
            raise BadRequest(413, f"post: image is over --max_image_bytes {args.max_image_bytes}")
    items = parse_posts(rec, args)
    return [(items[0][0], data)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_config(argv, check=False, tool="serve")
    check_limits(args)
    rt = load_runtime(args)
    import uvicorn
    sock = bind(args.host, args.port)  # before any banner: a busy port is one error line, not a banner then a failure
    app = make_app(rt, args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host} serves beyond this machine; there is no authentication", flush=True)
    print(f"serving {rt.info()['source']} ({rt.meta['model']}, {'int8' if rt.meta['int8'] else 'fp32'}) on "
          f"http://{args.host}:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


def bind(host: str, port: int):
    """A listening TCP socket on host:port; ConfigError naming the flag when the address cannot be had."""
    import socket
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pick a free "
                          "--port or stop what holds it") from None
    return sock


if __name__ == "__main__":
    cli(main)
