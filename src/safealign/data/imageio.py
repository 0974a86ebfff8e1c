"""Reading one image file as the 8-bit RGB picture it shows, or a one-line error.

PIL's ``convert("RGB")`` is not enough for files people actually have: it clips 16-bit greyscale ("I;16", "I")
to 255, so a 16-bit PNG becomes a white image; it drops alpha, so a transparent background becomes whatever colour
the hidden pixels hold; and it decodes a 30000 x 30000 "decompression bomb" before anything can refuse it. Here:

- the size is checked from the header, before decoding: at most :data:`MAX_PIXELS` pixels, sides >= :data:`MIN_SIDE`;
- 16-bit values are scaled to 8 bits (v / 257, rounded: 65535 -> 255, 32896 -> 128), not clipped;
- alpha (RGBA, LA, palette transparency) is composited over white; palette, 1-bit, L, CMYK, YCbCr convert as usual;
- the EXIF orientation is applied (a phone photo is not trained sideways);
- a truncated or undecodable file is an error, not a partial image.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import SafealignError

#: the largest image read, in pixels (50 MP: a 7000 x 7000 photo passes, a decompression bomb does not)
MAX_PIXELS = 50_000_000
#: the smallest side read, in pixels
MIN_SIDE = 8
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb8(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB: 16-bit scaled (not clipped), alpha over white."""
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.int64)
        a = np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(np.repeat(a[..., None], 3, axis=2), "RGB")
    if im.mode in ("F",):
        raise ValueError("32-bit float pixels have no agreed range; save the image as an 8- or 16-bit PNG")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _check_size(w: int, h: int, what: str) -> None:
    if w * h > MAX_PIXELS:
        raise SafealignError(f"{what} is {w}x{h} pixels, more than the {MAX_PIXELS // 1_000_000} MP safealign reads; "
                             "downscale it first")
    if min(w, h) < MIN_SIDE:
        raise SafealignError(f"{what} is {w}x{h} pixels; images must be at least {MIN_SIDE} pixels on each side")


def read_image(path: str | os.PathLike, size: int | None = None, what: str | None = None) -> Image.Image:
    """The image at ``path`` as 8-bit RGB; ``size``: centre-cropped to a square and resized to size x size."""
    path = Path(path)
    what = what or f"image {path}"
    if not path.is_file():
        raise SafealignError(f"{what} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(*im.size, what)  # from the header: nothing decoded yet
                im.load()
                im = to_rgb8(ImageOps.exif_transpose(im))
    except SafealignError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SafealignError(f"{what} is too large to decode safely (more than {MAX_PIXELS // 1_000_000} MP); "
                             "downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise SafealignError(f"{what} is corrupt or not an image ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); replace or remove it") from None
    if size is not None and im.size != (size, size):
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.BICUBIC)
    return im
