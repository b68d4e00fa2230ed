"""The mess planted in the synthetic web: its kinds, their rates, and the bytes of the nastiest ones."""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass, fields

# One kind per `<img>` occurrence; `clean` is what is left when no other kind is drawn.
MESS_KINDS: tuple[str, ...] = (
    "clean",
    "broken_link",  # 404
    "server_error",  # 500
    "rate_limited",  # 429 + Retry-After for the first requests, then the image
    "redirect",  # 302 to the real image
    "slow",  # the image after a delay
    "noai",  # X-Robots-Tag: noai
    "duplicate",  # same bytes as an earlier image, another URL
    "near_duplicate",  # an earlier image resized / cropped / re-encoded, within 4 bits of phash
    "mismatched_caption",  # alt text describes another concept
    "non_english",  # alt text in German, French or Spanish
    "tiny",  # 8x8 pixels
    "huge",  # a 20000x20000 PNG decompression bomb
    "corrupt",  # truncated or garbage bytes behind an image extension and content type
    "empty_alt",  # alt="" or no alt attribute
    "data_uri",  # src="data:image/png;base64,..."
    "tracking_pixel",  # width=1 height=1, a 1x1 GIF
    "eval_image",  # a test image of the built-in `digits` evaluation set (decontamination must catch it)
)


@dataclass(frozen=True, slots=True)
class MessConfig:
    """Per-image probabilities of each mess kind (the rest is `clean`), plus a few knobs.

    The defaults put every kind several times into a 1,000-page web (about 2,500 images).
    `huge` is a count, not a rate: its bytes are built once and shared, and one is plenty to
    test a downloader's guard.
    """

    broken_link: float = 0.015
    server_error: float = 0.012
    rate_limited: float = 0.008
    redirect: float = 0.015
    slow: float = 0.006
    noai: float = 0.012
    duplicate: float = 0.02
    near_duplicate: float = 0.02
    mismatched_caption: float = 0.03
    non_english: float = 0.03
    tiny: float = 0.012
    corrupt: float = 0.012
    empty_alt: float = 0.03
    data_uri: float = 0.01
    tracking_pixel: float = 0.012
    eval_image: float = 0.004
    huge_count: int = 2
    # Independent of the mess kind: how often a src is written relative to its page or <base href>.
    relative_rate: float = 0.2
    base_href_rate: float = 0.1
    slow_delay_s: float = 2.0
    retry_after_s: int = 1
    rate_limited_failures: int = 2
    huge_side: int = 20000
    # Small webs (tests) still get one example of every kind, placed over clean slots.
    guarantee_each: bool = True

    def __post_init__(self) -> None:
        rates = self.rates()
        bad = {k: v for k, v in rates.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"mess rates must lie in [0, 1]: {bad}")
        if sum(rates.values()) > 1.0:
            raise ValueError(f"mess rates add up to {sum(rates.values()):.3f} > 1")
        for name in ("relative_rate", "base_href_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.huge_count < 0 or self.slow_delay_s < 0 or self.rate_limited_failures < 0:
            raise ValueError("huge_count, slow_delay_s and rate_limited_failures must not be negative")
        if self.huge_side < 1:
            raise ValueError("huge_side must be positive")

    def rates(self) -> dict[str, float]:
        """Probabilities of the drawn kinds (all kinds but `clean` and `huge`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in MESS_KINDS}


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=4)
def bomb_png(side: int = 20000) -> bytes:
    """A valid grey 8-bit PNG of `side` x `side` black pixels, built without holding the pixels.

    Scanlines are fed to one zlib stream in batches, so memory stays at a few MB while the file
    claims `side`**2 pixels (400 MP at the default, past PIL's decompression-bomb limit). Cached:
    it costs about a second per process.
    """
    # grey, 8 bit, deflate, adaptive filtering (method 0), no interlace
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    comp = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    row = bytes(side + 1)  # filter byte 0 + the pixels
    batch = max(1, (4 << 20) // len(row))
    parts: list[bytes] = []
    left = side
    while left:
        n = min(batch, left)
        parts.append(comp.compress(row * n))
        left -= n
    parts.append(comp.flush())
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks
