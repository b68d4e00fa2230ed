"""Safe image decoding and perceptual hashing for the filter and shard stages.

Bytes from the web flow in; out come an :class:`ImageCheck` (the decoded size, or the reason the
image cannot be used) and a 64-bit perceptual hash. Two rules make this safe on hostile input:

- the pixel count is read from the header *before* anything is decoded, so a 20000×20000 PNG
  (a few hundred kB on disk, 400 MB once decoded) is refused without allocating it; PIL's own
  ``MAX_IMAGE_PIXELS`` check is a second line behind ours;
- each image is decoded once, fully (``load``), so a truncated or corrupt file is caught here
  rather than in a training worker, and the same decoded pixels feed the hash (and, when asked
  with ``keep_image``, the CLIP-score model: :mod:`.clipscore`).

:func:`phash` computes the same bits as ``imagehash.phash`` (greyscale, 32×32 Lanczos, 2-D DCT-II,
top-left 8×8 against its median) with a precomputed DCT matrix instead of two scipy calls, which
is several times faster on small images; ``tests/ingest/test_filter.py`` checks the bits agree.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

HASH_SIZE = 8  # 8×8 low frequencies: a 64-bit hash
_DCT_SIDE = HASH_SIZE * 4  # imagehash's highfreq_factor 4: the image is first shrunk to 32×32

UNDECODABLE = "undecodable"
TOO_MANY_PIXELS = "too_many_pixels"

# Only what PIL raises for bad input. Anything else (MemoryError, a bug) is not a property of the
# image and must stop the stage rather than be recorded as a sample failure.
DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)


@dataclass(slots=True)
class ImageCheck:
    """What decoding one image told us: its size and format, or why it cannot be used."""

    width: int | None
    height: int | None
    format: str | None  # PIL's format name (JPEG, PNG, ...)
    reason: str | None  # None: decoded fine
    detail: str | None = None  # the decoder's message, for the curious
    phash: int | None = None  # set only when decoded and asked for
    image: Image.Image | None = None  # the decoded pixels as RGB, only with keep_image


def check_image(data: bytes, max_pixels: int, want_hash: bool = True, keep_image: bool = False) -> ImageCheck:
    """Open ``data``, refuse it when the header claims more than ``max_pixels``, else decode it fully.

    ``keep_image`` returns the decoded pixels (converted to RGB) in ``image``, so a later consumer
    does not decode the bytes a second time.
    """
    with warnings.catch_warnings():
        # PIL warns past MAX_IMAGE_PIXELS and raises past twice that; our own limit decides first.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            return ImageCheck(None, None, None, TOO_MANY_PIXELS, _first_line(exc))
        except DECODE_ERRORS as exc:
            return ImageCheck(None, None, None, UNDECODABLE, _first_line(exc))
        with img:
            w, h, fmt = img.width, img.height, img.format
            if w * h > max_pixels:
                return ImageCheck(w, h, fmt, TOO_MANY_PIXELS, f"{w}x{h} > {max_pixels} pixels")
            if w < 1 or h < 1:
                return ImageCheck(w, h, fmt, UNDECODABLE, "empty image")
            try:
                img.load()
                code = phash(img) if want_hash else None
                rgb = _rgb(img) if keep_image else None
            except DECODE_ERRORS as exc:
                return ImageCheck(w, h, fmt, UNDECODABLE, _first_line(exc))
    return ImageCheck(w, h, fmt, None, None, code, rgb)


def _rgb(img: Image.Image) -> Image.Image:
    # convert() copies, so the pixels outlive the closed file; animated images keep their first frame
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _dct_matrix(n: int, rows: int) -> np.ndarray:
    # scipy.fftpack.dct type II, unnormalised: X_k = 2 sum_n x_n cos(pi k (2n + 1) / 2N). The factor
    # 2 does not change a comparison against the median, but is kept so values match imagehash's.
    k = np.arange(rows)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(math.pi * k * (2 * i + 1) / (2 * n))


_DCT = _dct_matrix(_DCT_SIDE, HASH_SIZE)
_BIT_WEIGHTS = (1 << np.arange(HASH_SIZE * HASH_SIZE - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash(img: Image.Image) -> int:
    """The 64-bit perceptual hash of a decoded image, bit-compatible with ``imagehash.phash``."""
    small = img.convert("L").resize((_DCT_SIDE, _DCT_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float64)
    low = _DCT @ pixels @ _DCT.T  # the 8×8 lowest frequencies of the 2-D DCT
    bits = (low > np.median(low)).ravel()
    # row-major, first bit most significant: the order of imagehash's hex string
    return int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))


def hash_hex(code: int) -> str:
    return f"{code:016x}"


def hash_int(text: str) -> int:
    return int(text, 16)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class HashIndex:
    """Find stored 64-bit hashes within Hamming distance ``d`` of a query without a full scan.

    Pigeonhole (multi-index hashing): split the 64 bits into ``d + 1`` bands; two hashes at most
    ``d`` bits apart agree exactly on at least one band. Each band is a dict from band value to
    the items having it, so a query looks at a few candidates instead of every stored hash.
    """

    def __init__(self, distance: int):
        if not 0 <= distance < 32:
            raise ValueError(f"Hamming distance must be in [0, 32), got {distance}")
        self.distance = distance
        bands = distance + 1
        edges = [round(64 * i / bands) for i in range(bands + 1)]
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:], strict=False)]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self.hashes: list[int] = []
        self.items: list = []

    def add(self, code: int, item) -> None:
        pos = len(self.hashes)
        self.hashes.append(code)
        self.items.append(item)
        for (shift, mask), table in zip(self._bands, self._tables, strict=True):
            table.setdefault((code >> shift) & mask, []).append(pos)

    def near(self, code: int) -> list[int]:
        """Positions (in insertion order) of the stored hashes within the distance of ``code``."""
        seen: set[int] = set()
        for (shift, mask), table in zip(self._bands, self._tables, strict=True):
            for pos in table.get((code >> shift) & mask, ()):
                if pos not in seen and (self.hashes[pos] ^ code).bit_count() <= self.distance:
                    seen.add(pos)
        return sorted(seen)
