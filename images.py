"""Images: finding and decoding a post's picture, the backbones' preprocessing (-> [3, S, S]), the feature cache."""
from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from readers import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")  # tried in this order for an IMGID without one
EXT_CANDIDATES = IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS)  # cameras and Windows tools write .JPG


# ----------------------------------------------------------------------------- images

def find_image(image_root, imgid: str | None) -> Path | None:
    """`<image_root>/<imgid>` (a sub-path for NewsMKG: a/b/c); when no candidate exists the first is returned."""
    if not imgid or image_root is None:
        return None
    base = Path(image_root) / imgid.lstrip("/")  # a sub-path stays below the image folder
    has_ext = base.suffix.lower() in IMAGE_EXTS
    if has_ext and base.exists():
        return base
    cands = [base.with_suffix(ext) if has_ext else base.with_name(base.name + ext) for ext in EXT_CANDIDATES]
    found = next((p for p in cands if p.exists()), None) or (base if base.is_file() else None)  # a file named as is
    return found or (base if has_ext else cands[0])


MAX_IMAGE_PIXELS = 64_000_000  # above this a file is treated as a decompression bomb, not decoded


def load_image(path) -> tuple[Image.Image | None, str]:
    """(RGB image, "ok"), or (None, reason) for the placeholder path: missing, zero-byte, unreadable, truncated and
    oversized files. Other modes (CMYK, palette, 16-bit, animated -> first frame) become RGB, transparency on white.
    """
    if path is None:
        return None, "no image id"
    path = Path(path)
    if not path.exists():
        return None, "missing"
    if not path.is_file():
        return None, "not a file"
    if path.stat().st_size == 0:
        return None, "zero bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    return None, f"too large ({im.width}x{im.height})"
                im.seek(0)
                im.load()
                # MPO: the JPEG of many phone cameras (a second, preview picture inside)
                return _to_rgb(ImageOps.exif_transpose(im) if im.format in ("JPEG", "MPO") else im), "ok"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "decompression bomb"
    except (OSError, SyntaxError, ValueError) as e:
        return None, f"unreadable ({type(e).__name__})"


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        # the range of the bit depth, not of the picture: a dark 16-bit image stays dark
        hi = 255.0 if a.max() <= 255 else 65535.0 if a.max() <= 65535 else a.max()
        im = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "RGB", "L") and "transparency" in im.info:  # a colour marked transparent (tRNS)
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return bg
    return im.convert("RGB")


@dataclass(frozen=True)
class ImagePrep:
    """PIL image -> normalised float tensor [3, size, size]. fit "crop": short side to `short` (0: round(size * 256 /
    224), the ImageNet convention; truncate: the long side as CLIPImageProcessor computes it), centre crop; fit
    "pad": the whole picture, long side to size, centred on the mean colour (about 0 after normalisation).
    An rng (--image_aug): random crop (crop) and flip."""
    size: int = 224
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    short: int = 0
    truncate: bool = False
    fit: str = "crop"

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(self.mean))  # lists from a bundle's meta.json compare equal
        object.__setattr__(self, "std", tuple(self.std))
        if not self.short:
            object.__setattr__(self, "short", round(self.size * 256 / 224))

    def resized(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) of a w x h image after the resize (crop: of the short side; pad: of the long side)."""
        if self.fit == "pad":
            scale = self.size / max(w, h)
            return min(self.size, max(1, round(w * scale))), min(self.size, max(1, round(h * scale)))
        if self.truncate:  # transformers' get_resize_output_image_size, operation for operation
            return (self.short, int(self.short * h / w)) if w <= h else (int(self.short * w / h), self.short)
        scale = self.short / min(w, h)
        return max(self.short, round(w * scale)), max(self.short, round(h * scale))

    def placed(self, w: int, h: int) -> tuple[int, int, int, int]:
        """(width, height, left, top) of a w x h picture in the S x S view: its size after the resize and where its
        top-left corner lands (negative where the centre crop cuts it off, positive where padding surrounds it)."""
        rw, rh = self.resized(w, h)
        if self.fit == "pad":
            return rw, rh, (self.size - rw) // 2, (self.size - rh) // 2
        return rw, rh, -((rw - self.size) // 2), -((rh - self.size) // 2)

    def __call__(self, im: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rw, rh, left, top = self.placed(*im.size)
        if rng is not None and self.fit == "crop":  # a random crop; a padded picture is only flipped
            left, top = -rng.randint(0, rw - self.size), -rng.randint(0, rh - self.size)
        view = Image.new("RGB", (self.size, self.size), tuple(round(255 * m) for m in self.mean))
        if rw * rh > 16 * self.size ** 2:  # a very long strip: resize only the part the crop keeps, not all of it
            sx, sy = im.width / rw, im.height / rh
            region = (-left * sx, -top * sy, (self.size - left) * sx, (self.size - top) * sy)
            view.paste(im.resize((self.size, self.size), Image.BICUBIC, box=region))
        else:
            view.paste(im.resize((rw, rh), Image.BICUBIC), (left, top))  # a crop where the offset is negative
        if rng is not None and rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def key(self) -> str:
        return (f"size={self.size},short={self.short},mean={self.mean},std={self.std},bicubic"
                + (",truncate" if self.truncate else "") + (",pad" if self.fit == "pad" else ""))


EFFNET_PREP = ImagePrep(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite0 as trained (mean = std = 0.5)


def image_prep_for(config) -> ImagePrep:
    """The preprocessing each vision backbone was trained with (the model file owns no data code). A CLIP directory:
    its preprocessor_config.json as CLIPImageProcessor reads it (size.shortest_edge, crop_size, image_mean,
    image_std); without one, CLIPImageProcessor's defaults at the model's image_size."""
    fit = config.image_fit
    if config.use_dual_granularity and config.vision_stem == "conv":
        return ImagePrep(config.vision_img_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), fit=fit)
    # EfficientNet-Lite0's own normalisation (mean = std = 0.5) at --vision_img_size, under either encoder
    if config.use_dual_granularity or config.image_encoder == "efficientnet_lite0":
        return ImagePrep(config.vision_img_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), fit=fit)
    cfg_file, vcfg = Path(config.image_encoder) / "preprocessor_config.json", Path(config.image_encoder) / "config.json"
    size, short, mean, std = 224, None, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    if cfg_file.exists():
        pc = json.loads(cfg_file.read_text())
        crop = pc.get("crop_size", size)
        size = crop.get("height", size) if isinstance(crop, dict) else crop
        mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
        edge = pc.get("size", size)
        if isinstance(edge, dict) and "shortest_edge" not in edge:
            raise DataError(f"{cfg_file}: size {edge} is not a shortest_edge resize; MANGO feeds CLIP as "
                            "CLIPImageProcessor does with size {\"shortest_edge\": N}: write that there")
        short = edge["shortest_edge"] if isinstance(edge, dict) else edge
    elif vcfg.exists():
        c = json.loads(vcfg.read_text())
        size = c.get("vision_config", c).get("image_size", size)
    return ImagePrep(int(size), mean, std, short=int(short or size), truncate=True, fit=fit)


# ----------------------------------------------------------------------------- feature cache

# Bump when the code that turns an image into cached features changes (decoding, ImagePrep, a backbone's forward):
# every entry written by older code is then recomputed.
FEATURE_CODE_VERSION = "4"


def file_digest(path) -> str:
    """sha1 of a file's bytes: the cache key of its features (an image overwritten in place gets new features)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


class FeatureCache:
    """Frozen-backbone features, one fp16 file per image: <cache_dir>/<key>/<d[:2]>/<d>.pt, d the sha1 of the
    image's bytes; the key changes with the backbone, its weights file, the preprocessing or FEATURE_CODE_VERSION.
    Entries are written to a temporary file and renamed, so runs sharing a cache never read half-written ones."""

    def __init__(self, cache_dir, backbone_id: str, weights_file, prep: ImagePrep):
        wf = Path(weights_file) if weights_file else None
        wsig = f"{wf.resolve()}:{wf.stat().st_size}:{wf.stat().st_mtime_ns}" if wf and wf.exists() else "none"
        self.key = hashlib.sha1(f"{backbone_id}|{wsig}|{prep.key()}|v{FEATURE_CODE_VERSION}".encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / self.key
        self.prep = prep
        self.write_ok = True

    def entry(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.pt"

    def get(self, paths: list[Path | None], encode, batch_size: int = 32, desc: str = "features"):
        """Features of each readable image ({str(path): fp16 tensor}); `encode` maps [B,3,S,S] -> [B, ...]."""
        feats: dict[str, torch.Tensor] = {}
        todo: dict[str, list[str]] = {}  # digest -> paths holding those bytes, still to compute
        for p in sorted({str(p) for p in paths if p is not None}):
            if not os.path.isfile(p):
                continue
            d = file_digest(p)
            f = self.entry(d)
            if d not in todo and f.exists():
                try:
                    feats[p] = torch.load(f, weights_only=True)
                    continue
                except Exception as e:  # a damaged entry (disk trouble, a copy cut short): recompute it
                    print(f"warning: {f}: unreadable feature cache entry ({type(e).__name__}); recomputing it")
            todo.setdefault(d, []).append(p)
        pending = tqdm(list(todo.items()), desc=f"extract {desc}", unit="img", leave=False, disable=not todo)
        # an unreadable image is not stored: the next run tries again (MNERDataset reports why it is unused)
        loaded = ((d, im) for d, ps in pending if (im := load_image(ps[0])[0]) is not None)
        while batch := list(islice(loaded, batch_size)):  # decoded one batch at a time
            with torch.no_grad():
                out = encode(torch.stack([self.prep(im) for _, im in batch])).to(torch.float16).cpu()
            for (d, _), o in zip(batch, out):
                o = o.clone()
                for p in todo[d]:
                    feats[p] = o
                self._write(self.entry(d), o)
        return feats

    def _write(self, f: Path, t: torch.Tensor):
        if not self.write_ok:
            return
        tmp = f.with_name(f"{f.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # concurrent writers never mix
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                torch.save(t, fh)
            os.replace(tmp, f)
        except (OSError, RuntimeError) as e:  # the features are in memory: the run goes on without caching them
            if tmp.is_file():
                tmp.unlink()
            self.write_ok = False
            print(f"warning: could not write the feature cache under {self.dir} "
                  f"({getattr(e, 'strerror', None) or e}); features are recomputed next time")


def grey_pixels(prep: ImagePrep) -> torch.Tensor:
    """The --image_control blank picture through `prep`: [3, S, S]."""
    return prep(Image.new("RGB", (prep.size, prep.size), (128, 128, 128)))


def image_sources(has_image: list[bool], control: str, seed: int) -> list[int]:
    """For each post, the post whose image it is shown (--image_control): none: itself; shuffle: the next one's in a
    seeded cycle of the posts with an image; blank: -1, the grey image. Posts without an image stay text-only."""
    if control == "blank":
        return [-1 if h else i for i, h in enumerate(has_image)]
    src, have = list(range(len(has_image))), [i for i, h in enumerate(has_image) if h]
    if control == "shuffle" and len(have) > 1:
        random.Random(f"image_control/{seed}").shuffle(have)
        for i, j in zip(have, have[1:] + have[:1]):
            src[i] = j
    return src


def cached_features(config, vision, paths, desc: str, prep: ImagePrep):
    """FeatureCache.get for a frozen vision module (duck-typed: `features` on pixels [B,3,S,S], `backbone_id`,
    `weights_file`); also returns the features of the constant grey image (--image_control blank)."""
    param = next(vision.parameters())

    def encode(x):
        return vision.features(x.to(param.device, param.dtype))
    feats = FeatureCache(config.cache_dir, vision.backbone_id, vision.weights_file, prep).get(paths, encode, desc=desc)
    with torch.no_grad():
        blank = encode(grey_pixels(prep)[None])[0].to(torch.float16).cpu()
    return feats, blank
