"""Robust image decoding: every file either becomes an RGB ``PIL.Image`` or an ``ImageDecodeError``.

Web and user data hold truncated downloads, zero-byte files, HTML saved as ``.jpg``, CMYK and
16-bit files, palette images with transparency, phone photos stored sideways with an EXIF
orientation tag, and the occasional decompression bomb. A feature-extraction or training run must
count and skip those with a message naming the file, never crash (docs/architecture.md, Robustness). Decisions:

- EXIF orientation is applied (``ImageOps.exif_transpose``), so a phone photo is seen upright.
- Transparency is composited onto **white** (not dropped): dropping alpha exposes whatever colour
  the encoder left under transparent pixels (often black), and white is what transformers' image
  processors (``convert_to_rgb``) do, so features match HF pipelines.
- 16-bit / 32-bit integer and float greyscale images are *scaled* to 8 bits, never clipped (a plain
  ``convert("RGB")`` clips a 16-bit PNG to mostly white). See ``_high_bit_depth_to_l``.
- CMYK is converted with PIL's formula (no colour management; PIL already undoes Adobe's inverted
  CMYK JPEGs on decode).
- Decompression bombs are refused from the header size, before any pixel is decoded.
- ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set here, so a truncated file raises instead of
  yielding a half-grey picture (a caller who sets that global switch opts out of this).
- Colour and greyscale JPEGs are decoded by libjpeg-turbo through ``simplejpeg`` when it is
  installed: about 1.5x faster than Pillow's decoder here and bit-identical to it, including
  ``draft`` scaling (we ask for exactly the scale Pillow would pick). Everything else (CMYK JPEGs,
  other formats, any file simplejpeg rejects) goes through Pillow, which also words the error.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # optional fast path; Pillow decodes everything without it
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a declared dependency
    _simplejpeg = None

__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "open_image"]

#: PIL's own default ``Image.MAX_IMAGE_PIXELS`` (a 1024x1024x3 24-bit bomb guard: ~179 M pixels).
DEFAULT_MAX_PIXELS = 178_956_970

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]  # noqa: UP007 (runtime alias)


class ImageDecodeError(Exception):
    """A file that could not be turned into an RGB image; ``reason`` is short and human-readable."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)  # keeps the exception picklable across DataLoader workers
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _source_name(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))


def open_image(
    source: ImageSource,
    *,
    draft_size: tuple[int, int] | int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decoder: str = "auto",
    as_array: bool = False,
) -> Image.Image | np.ndarray:
    """Decode ``source`` (a path, bytes or a binary file object) to an RGB image, fully loaded.

    ``draft_size`` (w, h) or an int for (s, s): for JPEG, decode at 1/2, 1/4 or 1/8 scale when the
    result is still at least that large in both dimensions, which is several times faster for big
    photos that get resized down anyway. Pass the size the transform resizes to, never the crop.
    ``max_pixels``: refuse images with more pixels than this (None: no limit of ours; PIL's own
    guard at twice ``Image.MAX_IMAGE_PIXELS`` still applies).

    ``decoder``: ``"auto"`` (libjpeg-turbo via simplejpeg for colour/greyscale JPEGs, else Pillow)
    or ``"pil"`` (always Pillow; the results are the same, only slower).
    ``as_array``: return a writable (H, W, 3) uint8 array instead of a PIL image -- what tensor
    transforms want; it skips two copies through Pillow's 4-byte pixel storage (~0.8 ms per photo).

    Raises ``ImageDecodeError(path, reason)`` for every unreadable input; never anything else for a
    bad file.
    """
    if decoder not in ("auto", "pil"):
        raise ValueError(f"decoder must be 'auto' or 'pil', got {decoder!r}")
    name = _source_name(source)
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageDecodeError(name, "zero bytes")
        fp: str | BinaryIO = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            if os.path.getsize(source) == 0:
                raise ImageDecodeError(name, "zero bytes")
        except FileNotFoundError:
            raise ImageDecodeError(name, "file not found") from None
        except OSError as exc:
            raise ImageDecodeError(name, f"cannot read: {exc.strerror or exc}") from None
        fp = os.fspath(source)
    else:
        fp = source

    if decoder == "auto" and _simplejpeg is not None:
        data = _jpeg_bytes(source, fp)
        if data is not None:
            pixels = _decode_jpeg_turbo(data, name, draft_size, max_pixels)
            if pixels is not None:
                return pixels if as_array else Image.fromarray(pixels, "RGB")
            fp = io.BytesIO(data)  # already read: Pillow decodes (and words the error) from memory

    try:
        with warnings.catch_warnings():
            # PIL warns about bombs (we check ourselves), odd EXIF, palette transparency...
            warnings.simplefilter("ignore")
            with Image.open(fp) as img:
                pixels = img.width * img.height
                if max_pixels is not None and pixels > max_pixels:
                    raise ImageDecodeError(
                        name, f"decompression bomb: {pixels} pixels > limit {max_pixels}"
                    )
                if draft_size is not None and img.format in ("JPEG", "MPO"):
                    ds = (draft_size, draft_size) if isinstance(draft_size, int) else draft_size
                    # "RGB" only matters for colour JPEGs; greyscale and CMYK keep their mode.
                    img.draft("RGB", (int(ds[0]), int(ds[1])))
                img.load()  # decode now, inside the try: truncated data raises here
                img = _apply_exif_orientation(img)
                try:
                    rgb = _to_rgb(img)
                    return np.array(rgb, dtype=np.uint8) if as_array else rgb
                except (ValueError, OSError) as exc:
                    raise ImageDecodeError(
                        name, f"unsupported image mode {img.mode} (cannot convert to RGB)"
                    ) from exc
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(name, "is a directory") from None
    except PermissionError:
        raise ImageDecodeError(name, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image (cannot identify)") from None
    except Image.DecompressionBombError as exc:  # PIL's own guard, at 2x Image.MAX_IMAGE_PIXELS
        raise ImageDecodeError(name, _bomb_reason(exc, max_pixels)) from None
    except MemoryError:
        raise ImageDecodeError(name, "out of memory while decoding") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, not a crash
        raise ImageDecodeError(name, _describe(exc)) from None


def _jpeg_bytes(source: ImageSource, fp) -> bytes | None:
    """The file's bytes when it starts like a JPEG (SOI marker), else None (and nothing consumed)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source) if source[:2] == b"\xff\xd8" else None
    if isinstance(fp, str):
        try:
            with open(fp, "rb") as f:
                if f.read(2) != b"\xff\xd8":
                    return None
                return b"\xff\xd8" + f.read()
        except OSError:
            return None  # Pillow reports it with the usual wording
    return None  # a stream: leave it to Pillow rather than consume it


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _decode_jpeg_turbo(data: bytes, name: str, draft_size, max_pixels) -> np.ndarray | None:
    """Decode a YCbCr/greyscale JPEG with libjpeg-turbo to (H, W, 3) uint8, upright; None hands
    the file back to Pillow.

    Pillow still parses the header (cheap: no pixels), so the EXIF orientation and the bomb limit
    are read exactly as on the Pillow path. The draft scale is Pillow's rule -- the largest of
    8, 4, 2, 1 that keeps both sides >= the requested size -- passed as minimum output sizes, so
    both decoders produce the same pixels.
    """
    try:
        h, w, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    except Exception:  # noqa: BLE001 - not a JPEG simplejpeg understands: Pillow decides
        return None
    if colorspace not in ("YCbCr", "Gray"):
        return None  # CMYK / YCCK / odd transforms: Pillow's conversions apply
    if max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError(name, f"decompression bomb: {w * h} pixels > limit {max_pixels}")
    orientation = 1
    if b"Exif" in data[:65536]:  # APP1 sits in the first 64 KiB; most web JPEGs have none
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as header:
                    if header.format != "JPEG":
                        return None  # MPO and friends: Pillow's path
                    orientation = int(header.getexif().get(0x0112, 1) or 1)
        except Exception:  # noqa: BLE001 - unreadable metadata: Pillow decides about the file
            return None
    scale = 1
    if draft_size is not None:
        dw, dh = (draft_size, draft_size) if isinstance(draft_size, int) else draft_size
        fit = min(w // max(int(dw), 1), h // max(int(dh), 1))
        scale = next((s for s in (8, 4, 2, 1) if fit >= s), 1)
    try:
        pixels = _simplejpeg.decode_jpeg(
            data, "RGB", min_width=-(-w // scale), min_height=-(-h // scale), strict=True
        )
    except Exception:  # noqa: BLE001 - truncated/corrupt: Pillow raises with the usual reason
        return None
    if orientation in _ORIENTATION:  # rare: let Pillow do the transpose it is known for
        pixels = np.asarray(Image.fromarray(pixels, "RGB").transpose(_ORIENTATION[orientation]))
        pixels = pixels.copy()  # writable
    return pixels


def _bomb_reason(exc: Exception, max_pixels: int | None) -> str:
    """PIL refused in ``Image.open``: report it in our format (pixels, the limit that applied)."""
    m = re.search(r"\((\d+) pixels\)", str(exc))
    pil_limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    limits = [v for v in (max_pixels, pil_limit) if v is not None]
    if m is None or not limits:
        return f"decompression bomb: {exc}"
    return f"decompression bomb: {m.group(1)} pixels > limit {min(limits)}"


def _describe(exc: Exception) -> str:
    msg = str(exc)
    low = msg.lower()
    if "truncated" in low or "premature end" in low:
        return "truncated file"
    if "broken data stream" in low:
        return "corrupt image data (broken data stream)"
    msg = msg.splitlines()[0] if msg else type(exc).__name__
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"corrupt image: {msg}"


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF orientation tag; a corrupt EXIF block leaves the image as stored."""
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - bad metadata must not cost the pixels
        return img
    return img if out is None else out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited onto white, high bit depth scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa") or (
        mode in ("L", "RGB") and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_l(img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float greyscale image to 8 bits without clipping.

    - ``I;16*``: 0..65535 maps linearly to 0..255 (divide by 257), the file's own meaning.
    - ``I`` (32-bit int; also how some plugins return 16-bit data): values inside 0..255 are kept,
      inside 0..65535 divided by 257, anything else min-max stretched.
    - ``F``: values in [0, 1] times 255, inside [0, 255] kept, otherwise min-max stretched.
    Non-finite float values become 0.
    """
    arr = np.asarray(img)
    if arr.ndim != 2:  # defensive: these modes are single-band
        arr = arr[..., 0]
    a = arr.astype(np.float64)
    if img.mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        a = a / 257.0
    elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif img.mode != "F" and lo >= 0.0 and hi <= 65535.0:
        a = a / 257.0
    elif hi > lo:
        a = (a - lo) * (255.0 / (hi - lo))
    else:
        a = np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
