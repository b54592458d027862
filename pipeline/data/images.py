"""Image decoding: an image's original bytes -> RGB pixels, at full or JPEG-reduced size.

Shards keep the original bytes; the loaders decode them here, through simplejpeg (libjpeg-turbo) for JPEGs,
OpenCV for what simplejpeg refuses, and PIL for what OpenCV cannot read (PIL names the problem).
"""

import functools
import io

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError


def decode_image(data: bytes, origin: str, reduce: int = 1) -> Image.Image:
    """Fully decoded RGB image (a JPEG at 1/`reduce` scale when reduce is 2, 4 or 8); a corrupt or
    truncated file raises UserError naming `origin`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if reduce > 1:
                img.draft("RGB", (img.width // reduce, img.height // reduce))
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise UserError(f"corrupt or unreadable image {origin}: {err}; fix or remove it, "
                        "or pass --on-bad-image skip") from None


@functools.cache
def opencv():
    """OpenCV with its own thread pool off: images are decoded and views rendered in parallel, one per loader
    worker and core, and OpenCV's threads on top of those only cost CPU."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


class Source:
    """An image's original bytes, decoded on demand at full or reduced (JPEG DCT-scaled) size, each
    size once: a renderer that only needs a 1/4-size decode of a large crop asks for that."""

    def __init__(self, data: bytes, origin: str):
        self.data, self.origin, self._decoded = data, origin, {}
        self.size = _jpeg_size(data)  # from the header: no pixels decoded (simplejpeg's: 40x less CPU than PIL's)
        if self.size is None:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    self.size = img.size
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError):
                decode_image(data, origin)  # raises the one-line error naming the image

    def decoded(self, reduce: int = 1) -> Image.Image:
        if reduce not in self._decoded:
            self._decoded[reduce] = decode_image(self.data, self.origin, reduce)
        return self._decoded[reduce]

    def pixels(self, reduce: int = 1) -> np.ndarray:
        """uint8 RGB [H, W, 3], a JPEG at 1/`reduce` scale (2, 4, 8) in the DCT; EXIF orientation ignored,
        as PIL does. JPEGs go through simplejpeg (libjpeg-turbo straight to RGB: ~13% less CPU than
        OpenCV's decode of the same file, and the same pixels: tests/test_views.py), anything else or a
        JPEG it refuses (damaged data: its strict mode) through OpenCV, what OpenCV cannot read through PIL."""
        if ("cv", reduce) not in self._decoded:
            out = _turbo_decode(self.data, reduce)
            if out is None:
                out = _opencv_decode(self.data, reduce)
            if out is None:
                out = np.asarray(self.decoded(reduce))  # PIL names the problem, or reads what OpenCV cannot
            self._decoded["cv", reduce] = out
        return self._decoded["cv", reduce]


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG from its header, or None (not a JPEG, or one simplejpeg cannot read)."""
    if not simplejpeg.is_jpeg(data):
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return width, height


def _turbo_decode(data: bytes, reduce: int) -> np.ndarray | None:
    size = _jpeg_size(data)
    if size is None:
        return None
    try:  # at 1/reduce exactly, the size rounded up, as OpenCV's reduced modes give it
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=reduce,
                                      min_height=-(-size[1] // reduce), min_width=-(-size[0] // reduce))
    except ValueError:
        return None


def _opencv_decode(data: bytes, reduce: int) -> np.ndarray | None:
    cv2 = opencv()
    flags = {1: cv2.IMREAD_COLOR_RGB, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
    out = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if out is not None and reduce > 1:
        out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)  # the reduced modes decode to BGR only
    return out
