"""Writes a synthetic web: HTML pages, images, routes, a WARC copy and the ground truth."""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from wit.evaluate import world
from wit.evaluate.world import Concept
from wit.ingest.synthetic.mess import MESS_KINDS, MessConfig, bomb_png
from wit.ingest.synthetic.server import BASE_PLACEHOLDER, Route

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
SECTIONS: tuple[str, ...] = ("blog", "news", "shop", "gallery")
PAGES_PER_WARC = 250
TRACKING_PIXEL_PATH = "/px.gif"
_SIDES = (32, 48, 64, 64, 96, 96, 96, 128, 128, 160, 200, 256, 320, 512)
_WARC_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)

TRUTH_SCHEMA = pa.schema(
    [
        ("img_id", pa.int64()),
        ("page_id", pa.int64()),
        ("page_path", pa.string()),
        ("page_url", pa.string()),
        ("img_src", pa.string()),  # as written in the HTML (may hold BASE_PLACEHOLDER)
        ("img_path", pa.string()),  # the URL path on the server; null for data: URIs
        ("img_url", pa.string()),  # absolute, under the web's base_url
        ("base_href", pa.string()),
        ("alt", pa.string()),  # null when the attribute is missing
        ("title", pa.string()),
        ("figcaption", pa.string()),
        ("declared_width", pa.int32()),
        ("declared_height", pa.int32()),
        ("mess", pa.string()),
        ("detail", pa.string()),  # how the mess was made (e.g. near_duplicate: resize)
        ("relative", pa.bool_()),
        ("lang", pa.string()),
        ("duplicate_of", pa.string()),  # img_url of the original
        ("redirect_to", pa.string()),  # absolute Location of a redirect
        ("http_status", pa.int32()),  # status of a first plain GET; null for data: URIs
        ("kind", pa.string()),
        ("shape", pa.string()),
        ("colour", pa.string()),
        ("digit", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("sha256", pa.string()),  # of the bytes served; null when nothing is
        ("n_bytes", pa.int64()),
    ]
)


@dataclass(slots=True)
class TruthRow:
    img_id: int
    page_id: int
    page_path: str
    page_url: str
    img_src: str
    img_path: str | None
    img_url: str
    base_href: str | None
    alt: str | None
    title: str | None
    figcaption: str | None
    declared_width: int | None
    declared_height: int | None
    mess: str
    detail: str | None
    relative: bool
    lang: str | None
    duplicate_of: str | None
    redirect_to: str | None
    http_status: int | None
    kind: str | None
    shape: str | None
    colour: str | None
    digit: str | None
    width: int | None
    height: int | None
    format: str | None
    sha256: str | None
    n_bytes: int | None


@dataclass(slots=True)
class WebInfo:
    """What `generate_web` wrote; `WebInfo.load(out_dir)` reads it back from `web.json`."""

    root: Path
    base_url: str
    seed: int
    pages: int
    images: int
    counts: dict[str, int]
    warc_paths: list[Path]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def site_dir(self) -> Path:
        return self.root / "site"

    @property
    def truth_path(self) -> Path:
        return self.root / "truth.parquet"

    @property
    def routes_path(self) -> Path:
        return self.root / "routes.json"

    def truth(self) -> pa.Table:
        return pq.read_table(self.truth_path)

    @classmethod
    def load(cls, root: str | Path) -> WebInfo:
        root = Path(root)
        meta = json.loads((root / "web.json").read_text())
        return cls(
            root=root,
            base_url=meta["base_url"],
            seed=meta["seed"],
            pages=meta["pages"],
            images=meta["images"],
            counts=meta["counts"],
            warc_paths=[root / p for p in meta["warc"]],
            timings=meta["timings"],
        )


@dataclass(slots=True)
class _Original:
    """A served image that duplicates may copy."""

    url: str
    data: bytes
    image: Image.Image
    concept: Concept
    fmt: str


@dataclass(slots=True)
class _Content:
    """An image's bytes: `data` as made, `served` as the server sends them (differs when corrupt)."""

    data: bytes | None = None
    served: bytes | None = None
    image: Image.Image | None = None
    size: tuple[int, int] | None = None
    detail: str | None = None


_TOPICS = ("shapes and numbers", "new drawings", "stickers", "gallery", "clipart of the day")
_EXTENSIONS = {"jpeg": "jpg", "png": "png", "gif": "gif"}
# Kinds whose bytes are a plain rendering, fit to be copied by duplicate and near_duplicate.
_COPYABLE = frozenset({"clean", "noai", "slow", "mismatched_caption", "non_english", "empty_alt"})


def _encode(img: Image.Image, fmt: str, rng: random.Random) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=rng.randint(60, 95))
    elif fmt == "png":
        # Level 1: PNG size does not matter here, generation time does.
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, fmt.upper())
    return buf.getvalue()


def _size(rng: random.Random) -> tuple[int, int]:
    side = rng.choice(_SIDES)
    if rng.random() < 0.7:
        return side, side
    other = max(16, int(side * rng.uniform(0.55, 0.95)))
    return (side, other) if rng.random() < 0.5 else (other, side)


# A near duplicate is what perceptual hashing is meant to catch: the reference implementation
# (imagehash.phash) puts it within this many bits of its original. Translations are not planted:
# phash moves by 7-18 bits for a 2-6% shift, further than distinct synthetic images lie apart.
NEAR_DUPLICATE_BITS = 4


@functools.cache
def _eval_digits() -> list[tuple[Image.Image, int]]:
    # Imported here: generating a web needs the evaluation package only for this kind
    from wit.evaluate.datasets import open_builtin

    return [(s.image, s.label) for s in open_builtin("digits").split("test").samples()]


def _eval_digit(rng: random.Random) -> tuple[Image.Image, int]:
    """A test image of the built-in `digits` task: the web leaks an evaluation image."""
    return rng.choice(_eval_digits())


# What a web of one seed holds changes with the generator: 2 = handwritten digits, near duplicates
# checked on their served bytes; 3 = digits in pen ink on paper, near-duplicate fallbacks checked.
# A web of another version is never reused for this one.
WEB_VERSION = 3


def _near_duplicate(orig: _Original, fmt: str, rng: random.Random) -> tuple[Image.Image, bytes, str]:
    """A variant of ``orig`` and its bytes in ``fmt``, within NEAR_DUPLICATE_BITS of the original as
    both are served (decoded bytes against decoded bytes: a JPEG's blocks move the hash too)."""
    import imagehash

    def served_hash(data: bytes) -> imagehash.ImageHash:
        return imagehash.phash(Image.open(io.BytesIO(data)))

    base = served_hash(orig.data)
    for _ in range(4):
        how = rng.choice(("resize", "crop", "reencode", "brightness"))
        img = _variant(orig.image, how, rng)
        data = _encode(img, fmt, rng)
        # half the bound: room for what a downloader does to both (resize, re-encode)
        if data != orig.data and served_hash(data) - base <= NEAR_DUPLICATE_BITS // 2:
            return img, data, how
    # the original's pixels, re-encoded near losslessly: other bytes, (almost) the same hash. A smooth
    # picture (a flat circle) can still move 4 bits at quality 100: take the first copy within the
    # bound, else the closest, so the planted pair stays one the filter can catch
    served = Image.open(io.BytesIO(orig.data)).convert("RGB")
    best = None
    for img, quality in ((served, 100), (orig.image.convert("RGB"), 100), (served, 98), (served, 95)):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality, subsampling=0)
        data = buf.getvalue()
        distance = served_hash(data) - base
        if data != orig.data and (best is None or distance < best[0]):
            best = distance, img, data
        if best is not None and best[0] <= NEAR_DUPLICATE_BITS // 2:
            break
    assert best is not None
    # beyond the margin: recorded, so a check of the filter does not count on catching this pair
    return best[1], best[2], "reencode" if best[0] <= NEAR_DUPLICATE_BITS // 2 else f"reencode, {best[0]} bits"


def _variant(img: Image.Image, how: str, rng: random.Random) -> Image.Image:
    if how == "resize":
        f = rng.uniform(0.7, 0.92)
        return img.resize((max(8, int(img.width * f)), max(8, int(img.height * f))), Image.Resampling.BILINEAR)
    if how == "crop":
        # a re-cropped copy: 1-2% off each border, scaled back to the original size
        k = max(1, int(min(img.size) * rng.uniform(0.01, 0.02)))
        return img.crop((k, k, img.width - k, img.height - k)).resize(img.size, Image.Resampling.BILINEAR)
    if how == "brightness":
        return ImageEnhance.Brightness(img).enhance(rng.choice((0.88, 0.92, 1.08, 1.12)))
    return img


def _page_text(rng: random.Random, concept_hint: Concept | None) -> str:
    subjects = ("Our workshop", "This week", "The kids", "My sister", "The catalogue", "Today", "Everyone")
    verbs = ("made", "printed", "painted", "collected", "sorted", "cut out", "photographed", "found")
    objects = ("some stickers", "a few drawings", "new clipart", "the shapes", "house numbers", "a poster")
    tails = ("for the fair.", "last weekend.", "in the studio.", "for fun.", "again!", "- more below.")
    sentences = [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}"
        for _ in range(rng.randint(2, 5))
    ]
    if concept_hint is not None and rng.random() < 0.4:
        sentences.append(f"Here is one I like: {concept_hint.name}.")
    return " ".join(sentences)


def _attr(name: str, value: str | int | None) -> str:
    return "" if value is None else f' {name}="{html.escape(str(value), quote=True)}"'


class _WebWriter:
    """Builds the web one page at a time, keeping the draws in a single seeded order."""

    def __init__(self, root: Path, rng: random.Random, mess: MessConfig, base_url: str) -> None:
        self.root = root
        self.site = root / "site"
        self.rng = rng
        self.mess = mess
        self.base_url = base_url.rstrip("/")
        self.rows: list[TruthRow] = []
        self.routes: dict[str, Route] = {}
        self.originals: list[_Original] = []
        self._dirs: set[Path] = set()
        self._pixel: bytes = _encode(Image.new("RGB", (1, 1), (255, 255, 255)), "gif", rng)

    def write_file(self, url_path: str, data: bytes) -> None:
        target = self.site / url_path.lstrip("/")
        if target.parent not in self._dirs:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(target.parent)
        target.write_bytes(data)

    def absolute(self, ref: str) -> str:
        return ref.replace(BASE_PLACEHOLDER, self.base_url)

    def keep_original(self, orig: _Original) -> None:
        # A bounded pool keeps memory flat on big webs while still spreading duplicates around.
        if len(self.originals) < 64:
            self.originals.append(orig)
        else:
            self.originals[self.rng.randrange(64)] = orig

    def image(
        self, img_id: int, page_id: int, page_path: str, section: str, base_href: str | None, kind: str
    ) -> tuple[TruthRow, str]:
        """One `<img>`: its bytes, file and route, and its truth row and HTML tag."""
        rng = self.rng
        page_url = self.base_url + page_path
        if kind in ("duplicate", "near_duplicate") and not self.originals:
            kind = "clean"  # nothing to copy yet this early in the web
        orig = rng.choice(self.originals) if kind in ("duplicate", "near_duplicate") else None
        concept: Concept | None
        eval_sample = _eval_digit(rng) if kind == "eval_image" else None
        if orig is not None:
            concept = orig.concept
        elif eval_sample is not None:
            concept = Concept(kind="digit", colour="black", digit=str(eval_sample[1]))
        else:
            concept = None if kind in ("tracking_pixel", "huge") else world.sample_concept(rng)
        fmt = {"huge": "png", "tracking_pixel": "gif", "data_uri": "png", "near_duplicate": "jpeg"}.get(kind)
        if fmt is None:
            fmt = orig.fmt if orig is not None else ("jpeg" if rng.random() < 0.65 else "png")
        name = f"i{img_id:06d}.{_EXTENSIONS[fmt]}"
        relative = kind not in ("data_uri", "tracking_pixel") and rng.random() < self.mess.relative_rate
        src = self._src(kind, name, section, page_id, img_id, relative, base_href)
        content = self._content(kind, concept, orig, fmt, eval_sample[0] if eval_sample else None)

        status: int | None = None
        redirect_to: str | None = None
        if kind == "data_uri":
            src = img_url = "data:image/png;base64," + base64.b64encode(content.served or b"").decode("ascii")
            img_path = None
        else:
            doc_base = urljoin(page_url, self.absolute(base_href)) if base_href else page_url
            img_url = urljoin(doc_base, self.absolute(src))
            img_path = urlsplit(img_url).path
            status, redirect_to = self._serve(kind, img_path, name, content.served)
        alt, lang, alt_detail = self._alt(kind, concept)

        tag, title, figcaption, (width, height) = self._img_tag(kind, img_id, src, alt, concept, content)

        copyable = content.image is not None and content.data is not None and concept is not None
        if kind in _COPYABLE and copyable:
            self.keep_original(_Original(img_url, content.data, content.image, concept, fmt))

        served = content.served
        row = TruthRow(
            img_id=img_id,
            page_id=page_id,
            page_path=page_path,
            page_url=page_url,
            img_src=src,
            img_path=img_path,
            img_url=img_url,
            base_href=base_href,
            alt=alt,
            title=title,
            figcaption=figcaption,
            declared_width=width,
            declared_height=height,
            mess=kind,
            detail=content.detail or alt_detail,
            relative=relative,
            lang=lang,
            duplicate_of=orig.url if orig is not None else None,
            redirect_to=redirect_to,
            http_status=status,
            kind=concept.kind if concept else None,
            shape=concept.shape if concept else None,
            colour=concept.colour if concept else None,
            digit=concept.digit if concept else None,
            width=content.size[0] if content.size else None,
            height=content.size[1] if content.size else None,
            format=fmt if served is not None else None,
            sha256=hashlib.sha256(served).hexdigest() if served is not None else None,
            n_bytes=len(served) if served is not None else None,
        )
        return row, tag

    def _img_tag(
        self, kind: str, img_id: int, src: str, alt: str | None, concept: Concept | None, content: _Content
    ) -> tuple[str, str | None, str | None, tuple[int | None, int | None]]:
        """The `<img>` tag (in a `<figure>` when it has a caption), its title, caption and declared size."""
        rng = self.rng
        title = figcaption = None
        described = concept or world.sample_concept(rng)
        if kind != "tracking_pixel" and rng.random() < 0.15:
            title = rng.choice(("Click to enlarge", "view full size", world.caption(described, rng)))
        if kind != "tracking_pixel" and rng.random() < 0.15:
            figcaption = f"Figure {img_id % 50 + 1}: " + world.caption(described, rng)
        declared: tuple[int, int] | None = (1, 1) if kind == "tracking_pixel" else None
        if declared is None and content.size is not None and rng.random() < 0.3:
            declared = content.size
        width, height = declared if declared else (None, None)
        attrs = [("src", src), ("alt", alt), ("title", title), ("width", width), ("height", height)]
        tag = "<img" + "".join(_attr(k, v) for k, v in attrs) + ">"
        if figcaption is not None:
            tag = f"<figure>{tag}<figcaption>{html.escape(figcaption)}</figcaption></figure>"
        return tag, title, figcaption, (width, height)

    def _src(
        self,
        kind: str,
        name: str,
        section: str,
        page_id: int,
        img_id: int,
        relative: bool,
        base_href: str | None,
    ) -> str:
        """The src attribute as written in the page (absolute ones with the placeholder host)."""
        rng = self.rng
        if relative:
            if base_href:
                return name
            return f"../img/{section}/{name}" if rng.random() < 0.5 else f"img/{name}"
        if kind == "tracking_pixel":
            src = f"{TRACKING_PIXEL_PATH}?p={page_id}&i={img_id}"
        else:
            src = f"/img/{section}/{name}"
        return BASE_PLACEHOLDER + src if rng.random() < 0.4 else src

    def _content(
        self, kind: str, concept: Concept | None, orig: _Original | None, fmt: str, eval_image: Image.Image | None
    ) -> _Content:
        rng, mess = self.rng, self.mess
        out = _Content()
        if kind in ("broken_link", "server_error"):
            out.size = _size(rng)  # what would have been there; no bytes are written
            return out
        if kind == "duplicate" and orig is not None:
            out.data, out.size = orig.data, orig.image.size
        elif kind == "near_duplicate" and orig is not None:
            out.image, out.data, out.detail = _near_duplicate(orig, fmt, rng)
        elif kind == "huge":
            out.data, out.size = bomb_png(mess.huge_side), (mess.huge_side, mess.huge_side)
        elif kind == "tracking_pixel":
            out.data, out.size = self._pixel, (1, 1)
        elif eval_image is not None:
            out.image = eval_image.convert("RGB")
            out.data = _encode(out.image, fmt, rng)
        elif concept is not None:
            size = {"tiny": 8, "data_uri": rng.choice((12, 16, 24))}.get(kind) or _size(rng)
            out.image = world.render(concept, rng, size)
            out.data = _encode(out.image, fmt, rng)
        if out.image is not None:
            out.size = out.image.size
        out.served = out.data
        if kind == "corrupt" and out.data is not None:
            if rng.random() < 0.5:
                out.detail = "truncated"
                out.served = out.data[: max(16, int(len(out.data) * rng.uniform(0.2, 0.6)))]
            else:
                out.detail = "garbage"
                out.served = rng.randbytes(rng.randint(200, 2000))
        return out

    def _serve(self, kind: str, path: str, name: str, data: bytes | None) -> tuple[int, str | None]:
        """Write the file and route for an image path; returns the status of a first GET and the
        redirect target."""
        mess = self.mess
        if kind == "tracking_pixel":
            if TRACKING_PIXEL_PATH not in self.routes:
                self.write_file(TRACKING_PIXEL_PATH, self._pixel)
                self.routes[TRACKING_PIXEL_PATH] = Route(headers={"Cache-Control": "no-store"})
            return 200, None
        if kind in ("broken_link", "server_error"):
            status = 404 if kind == "broken_link" else 500
            self.routes[path] = Route(status=status)
            return status, None
        if kind == "redirect":
            target = f"/img/full/{name}"
            self.routes[path] = Route(status=302, location=BASE_PLACEHOLDER + target)
            self.write_file(target, data or b"")
            return 302, self.base_url + target
        self.write_file(path, data or b"")
        if kind == "slow":
            self.routes[path] = Route(delay_s=mess.slow_delay_s)
        elif kind == "noai":
            self.routes[path] = Route(headers={"X-Robots-Tag": "noai, noimageai"})
        elif kind == "rate_limited" and mess.rate_limited_failures:
            self.routes[path] = Route(status=429, fail_first=mess.rate_limited_failures, retry_after=mess.retry_after_s)
            return 429, None
        return 200, None

    def _alt(self, kind: str, concept: Concept | None) -> tuple[str | None, str | None, str | None]:
        """The alt text (None: no attribute), its language and, for empty_alt, which emptiness."""
        rng = self.rng
        if kind == "empty_alt":
            detail = rng.choice(("empty", "missing"))
            return ("" if detail == "empty" else None), None, detail
        if kind == "tracking_pixel":
            return "", None, None
        if concept is None:
            # A huge image shows nothing, but its page still describes something.
            return world.caption(world.sample_concept(rng), rng), "en", None
        if kind == "mismatched_caption":
            return world.mismatched_caption(concept, rng), "en", None
        if kind == "non_english":
            lang = rng.choice(("de", "fr", "es"))
            return world.caption(concept, rng, lang), lang, None
        return world.caption(concept, rng), "en", None


def _assign_kinds(n: int, rng: random.Random, mess: MessConfig) -> list[str]:
    rates = mess.rates()
    kinds: list[str] = []
    for _ in range(n):
        r, acc, chosen = rng.random(), 0.0, "clean"
        for kind, rate in rates.items():
            acc += rate
            if r < acc:
                chosen = kind
                break
        kinds.append(chosen)
    for i in rng.sample(range(n), min(mess.huge_count, n)):
        kinds[i] = "huge"
    if mess.guarantee_each:
        present = set(kinds)
        for kind in rates:
            if kind in present or not rates[kind]:
                continue
            # Copies go late so that an original exists before them.
            lo = n // 2 if kind in ("duplicate", "near_duplicate") else 0
            clean = [i for i in range(lo, n) if kinds[i] == "clean"]
            if clean:
                kinds[rng.choice(clean)] = kind
    return kinds


def _page_html(title: str, base_href: str | None, body: list[str]) -> str:
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title>'
    if base_href:
        head += f'<base href="{html.escape(base_href, quote=True)}">'
    html_head = f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head>\n<body>\n'
    return html_head + "\n".join(body) + "\n</body></html>\n"


def _write_page(
    writer: _WebWriter, page_id: int, page_paths: list[str], count: int, kinds: list[str], img_id: int
) -> int:
    """Page ``page_id`` with ``count`` images from ``img_id`` on; returns the next image id."""
    rng, mess, page_path = writer.rng, writer.mess, page_paths[page_id]
    section = page_path.split("/")[1]
    base_href = None
    if rng.random() < mess.base_href_rate:
        base_href = (BASE_PLACEHOLDER if rng.random() < 0.5 else "") + f"/media/{section}/"
    body = ['<header><a href="/index.html">Home</a></header>', "<main>"]
    topic = rng.choice(_TOPICS)
    title = f"{section.capitalize()} #{page_id}: {topic}"
    body.append(f"<h1>{html.escape(title)}</h1>")
    for _ in range(count):
        row, tag = writer.image(img_id, page_id, page_path, section, base_href, kinds[img_id])
        writer.rows.append(row)
        hint = None
        if row.kind in ("shape", "digit") and row.colour:
            hint = world.Concept(row.kind, row.colour, row.shape, row.digit)  # type: ignore[arg-type]
        body.append(f"<p>{html.escape(_page_text(rng, hint))}</p>")
        body.append(tag)
        img_id += 1
    body.append(f"<p>{html.escape(_page_text(rng, None))}</p>")
    links = []
    pages = len(page_paths)
    for other in rng.sample(range(pages), min(3, pages)):
        href = (BASE_PLACEHOLDER if rng.random() < 0.3 else "") + page_paths[other]
        links.append(f'<a href="{href}">more #{other}</a>')
    body.append("</main>\n<footer>" + " | ".join(links) + "</footer>")
    writer.write_file(page_path, _page_html(title, base_href, body).encode("utf-8"))
    return img_id


def generate_web(
    out_dir: str | Path,
    pages: int = 1000,
    seed: int = 0,
    images_per_page: tuple[int, int] = (1, 4),
    mess: MessConfig = MessConfig(),
    base_url: str = DEFAULT_BASE_URL,
    pages_per_warc: int = PAGES_PER_WARC,
    overwrite: bool = False,
) -> WebInfo:
    """Write a seeded synthetic web into `out_dir` (see the package docstring for the layout).

    `base_url` is the host the WARC copy and the ground truth's absolute URLs are written under; the
    served pages get the server's real address instead (see `BASE_PLACEHOLDER`).
    """
    if pages < 1:
        raise ValueError("pages must be at least 1")
    lo, hi = images_per_page
    if not 0 <= lo <= hi:
        raise ValueError(f"images_per_page must be (low, high) with 0 <= low <= high, got {images_per_page}")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
    root = Path(out_dir)
    if (root / "web.json").exists() or (root / "site").exists():
        if not overwrite:
            raise FileExistsError(f"{root} already holds a web; pass overwrite=True to replace it")
        for sub in ("site", "warc"):
            shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base_url = base_url.rstrip("/")

    rng = random.Random(seed)
    per_page = [rng.randint(lo, hi) for _ in range(pages)]
    kinds = _assign_kinds(sum(per_page), rng, mess)
    writer = _WebWriter(root, rng, mess, base_url)
    page_paths = [f"/{rng.choice(SECTIONS)}/p{i:05d}.html" for i in range(pages)]

    img_id = 0
    for page_id, count in enumerate(per_page):
        img_id = _write_page(writer, page_id, page_paths, count, kinds, img_id)

    return _finish_web(writer, seed, page_paths, pages_per_warc, t0)


def _finish_web(writer: _WebWriter, seed: int, page_paths: list[str], pages_per_warc: int, t0: float) -> WebInfo:
    """The index page, robots.txt, ground truth, routes, WARC copy and web.json of a written site."""
    root, base_url, mess, pages = writer.root, writer.base_url, writer.mess, len(page_paths)
    index = [f'<li><a href="{p}">{p}</a></li>' for p in page_paths]
    index_html = _page_html("wit synthetic web", None, ["<ul>", *index, "</ul>"])
    writer.write_file("/index.html", index_html.encode("utf-8"))
    writer.write_file("/robots.txt", b"User-agent: *\nAllow: /\n")
    t_site = time.perf_counter()

    table = pa.Table.from_pylist([asdict(r) for r in writer.rows], schema=TRUTH_SCHEMA)
    pq.write_table(table, root / "truth.parquet")
    routes = {
        "placeholder": BASE_PLACEHOLDER,
        "routes": {p: r.to_json() for p, r in sorted(writer.routes.items())},
    }
    (root / "routes.json").write_text(json.dumps(routes, indent=1, ensure_ascii=False))
    warcs = write_warc(root, base_url, page_paths, pages_per_warc)
    t_end = time.perf_counter()

    counts = {k: 0 for k in MESS_KINDS}
    for row in writer.rows:
        counts[row.mess] += 1
    info = WebInfo(
        root=root,
        base_url=base_url,
        seed=seed,
        pages=pages,
        images=len(writer.rows),
        counts=counts,
        warc_paths=warcs,
        timings={
            "site_s": round(t_site - t0, 3),
            "warc_and_truth_s": round(t_end - t_site, 3),
            "total_s": round(t_end - t0, 3),
        },
    )
    meta = {
        "version": WEB_VERSION,
        "seed": seed,
        "pages": pages,
        "images": info.images,
        "base_url": base_url,
        "placeholder": BASE_PLACEHOLDER,
        "counts": counts,
        "relative": sum(r.relative for r in writer.rows),
        "mess_config": asdict(mess),
        "warc": [str(p.relative_to(root)) for p in warcs],
        "truth": "truth.parquet",
        "routes": "routes.json",
        "index": "/index.html",
        "timings": info.timings,
    }
    (root / "web.json").write_text(json.dumps(meta, indent=1))
    return info


def _record_id(*parts: str) -> str:
    return f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, '|'.join(parts))}>"


def write_warc(
    web_dir: str | Path,
    base_url: str = DEFAULT_BASE_URL,
    page_paths: list[str] | None = None,
    pages_per_file: int = PAGES_PER_WARC,
) -> list[Path]:
    """Write the pages of a generated web as gzipped WARC files (Common Crawl layout) under `warc/`.

    Each page becomes a `request` and a `response` record whose URLs and bodies use `base_url` in
    place of the placeholder; `page_paths` defaults to every `p*.html` page under `site/`.
    """
    root = Path(web_dir)
    site = root / "site"
    base_url = base_url.rstrip("/")
    if page_paths is None:
        found = sorted(site.glob("*/p*.html"), key=lambda p: p.name)
        page_paths = ["/" + str(p.relative_to(site)) for p in found]
    if pages_per_file < 1:
        raise ValueError("pages_per_file must be at least 1")
    out = root / "warc"
    out.mkdir(parents=True, exist_ok=True)
    host = urlsplit(base_url).netloc
    paths: list[Path] = []
    for part, start in enumerate(range(0, len(page_paths), pages_per_file)):
        path = out / f"wit-synthetic-{part:05d}.warc.gz"
        with open(path, "wb") as fh:
            writer = WARCWriter(fh, gzip=True)
            info = writer.create_warcinfo_record(
                path.name,
                {
                    "software": "wit.ingest.synthetic",
                    "format": "WARC File Format 1.0",
                    "isPartOf": "wit-synthetic-web",
                },
            )
            # Fixed ids and dates, so one seed gives byte-identical WARC files (and record offsets)
            info.rec_headers.replace_header("WARC-Record-ID", _record_id(base_url, path.name, "warcinfo"))
            info.rec_headers.replace_header("WARC-Date", _WARC_EPOCH.strftime("%Y-%m-%dT%H:%M:%SZ"))
            writer.write_record(info)
            for k, page_path in enumerate(page_paths[start : start + pages_per_file]):
                url = base_url + page_path
                text = (site / page_path.lstrip("/")).read_text("utf-8")
                body = text.replace(BASE_PLACEHOLDER, base_url).encode("utf-8")
                date = (_WARC_EPOCH + timedelta(seconds=start + k)).strftime("%Y-%m-%dT%H:%M:%SZ")
                resp_headers = StatusAndHeaders(
                    "200 OK",
                    [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))],
                    protocol="HTTP/1.1",
                )
                response = writer.create_warc_record(
                    url,
                    "response",
                    payload=io.BytesIO(body),
                    http_headers=resp_headers,
                    warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": _record_id(url, "response")},
                )
                req_headers = StatusAndHeaders(
                    f"GET {page_path} HTTP/1.1",
                    [("Host", host), ("User-Agent", "wit-synthetic-crawler/1.0"), ("Accept", "text/html")],
                    is_http_request=True,
                )
                request = writer.create_warc_record(
                    url,
                    "request",
                    http_headers=req_headers,
                    warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": _record_id(url, "request")},
                )
                writer.write_request_response_pair(request, response)
        paths.append(path)
    return paths
