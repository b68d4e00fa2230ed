"""Caption clean-up and caption filters, one row at a time and vectorised over Arrow arrays.

Clean-up (:func:`clean_text`): HTML entities, mojibake (ftfy), runs of whitespace to one space,
ends stripped. ftfy is slow (tens of microseconds a text), so it only runs on texts that can need
it: non-ASCII, an ``&``, or an ASCII control character. Pure-ASCII texts, nearly all alt texts
of an English crawl, only get their whitespace collapsed, which Arrow does in C.

Filters give a reason or None. They are tried in this order and the first one that fails names
the row (curate puts its URL checks, :mod:`wit.ingest.safety`, before them):

==================  ====================================================================
``empty_text``      nothing left after clean-up (no alt text, or only spaces)
``too_short``       fewer than ``min_chars`` characters
``too_long``        more than ``max_chars`` characters
``boilerplate``     "image", "photo 3", "untitled-1", "click here", file names
                    (``IMG_1234.jpg``), camera and screenshot names (``DSC0001``,
                    ``Screenshot 2023-04-01 at 10.11.12``), hashes, numbers and punctuation only
``too_few_words``   fewer than ``min_words`` space-separated words
``blocklisted``     a word or phrase of the blocklist, on word boundaries, any case
``lang_not_allowed`` the row's language (its ``lang`` column; detected with py3langid only
                    when that is null) is not in ``langs`` (an empty ``langs`` allows any);
                    an undetermined language (``und``) passes, see MIN_LANG_CONFIDENCE
==================  ====================================================================

Boilerplate is tried before the word count so that ``IMG_1234.jpg`` is named for what it is.
:func:`text_problem` is the one-row reference; :func:`text_problems` gives the same reasons for
a whole column, with Arrow kernels for everything but the blocklist and language detection,
which run in Python on the rows still standing.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass

import ftfy
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .queries import QueryMatcher

EMPTY_TEXT = "empty_text"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
BOILERPLATE = "boilerplate"
TOO_FEW_WORDS = "too_few_words"
BLOCKLISTED = "blocklisted"
LANG_NOT_ALLOWED = "lang_not_allowed"
REASONS = (EMPTY_TEXT, TOO_SHORT, TOO_LONG, BOILERPLATE, TOO_FEW_WORDS, BLOCKLISTED, LANG_NOT_ALLOWED)

# Python's str.split() whitespace within ASCII; RE2's \s lacks \v and the separators \x1c-\x1f.
_ASCII_SPACE_RE = r"[\t\n\v\f\r \x1c-\x1f]+"
# Texts that take the slow path: an entity may hide behind "&", ftfy removes control characters,
# and only non-ASCII text can hold mojibake or Unicode spaces.
_NEEDS_FTFY_RE = r"[&\x00-\x08\x0e-\x1b\x7f]|[^\x00-\x7f]"

_GENERIC = (
    r"(?:an? |the )?(?:image|img|images|photo|photos|photograph|picture|pic|pics|foto|untitled|"
    r"untitled document|click here|click to enlarge|logo|thumbnail|thumb|icon|banner|placeholder|"
    r"spacer|blank|null|none|undefined|alt|alt text|default|avatar|screenshot|no image|"
    r"image not found|no photo|loading|gallery|slide|slider|header|button|arrow|download|"
    r"advertisement|ad|featured image|main image|product image)"
)
_IMAGE_EXT = r"(?:jpe?g|jpe|jfif|png|gif|webp|bmp|tiff?|svg|heic|heif|avif|ico)"
BOILERPLATE_PATTERNS: tuple[str, ...] = (
    # a generic word, maybe numbered: "image", "Photo 3", "untitled-1", "image (2)", "logo."
    rf"^{_GENERIC}[\s_\-#.:(]*(?:\d+\)?)?[\s.!:]*$",
    # a file name: "IMG_1234.jpg", "my photo (1).PNG"
    rf"^[\w\s\-.()\[\]~+,'&]*\.{_IMAGE_EXT}$",
    # camera, phone and scanner names: "DSC0001", "PXL_20230101_123456789", "P1000123"
    r"^(?:img|dsc|dscn|dscf|dsf|dcim|pict|pxl|mvimg|gopr|dji|sam|wp|p|vid|imag|photo|image|pic|scan|"
    r"capture)[\s_\-]*\d[\d\s_\-.:]*(?:\s?[ap]m)?(?:\s*\(\d+\))?$",
    # screenshots: "Screenshot 2023-04-01 at 10.11.12", "screen shot_20230401-101112"
    r"^screen[\s_\-]?shot[\s_\-]*(?:from|at|on)?[\s_\-]*\d[\w\s\-.:,()]*$",
    # hashes and ids: hex runs, UUIDs
    r"^[0-9a-f]{8,}$",
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    # nothing but digits, punctuation, symbols and spaces (in any script)
    r"^[\p{N}\p{P}\p{S}\p{Z}\s]+$",
)
BOILERPLATE_RE = "|".join(f"(?:{p})" for p in BOILERPLATE_PATTERNS)


@dataclass(frozen=True, slots=True)
class TextRules:
    """The limits of the text filters. ``blocklist`` is a matcher over the blocklist's phrases."""

    min_chars: int = 5
    max_chars: int = 1000
    min_words: int = 2
    langs: tuple[str, ...] = ("en",)
    blocklist: QueryMatcher | None = None

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.min_words < 0:
            raise ValueError("min_chars and min_words must not be negative")
        if self.max_chars < max(self.min_chars, 1):
            raise ValueError(f"max_chars ({self.max_chars}) must be at least min_chars ({self.min_chars}) and 1")
        if any(lang != normalize_lang(lang) for lang in self.langs):
            raise ValueError(f"langs must be lower-case ISO 639-1 codes like 'en', got {self.langs}")


# ---------------------------------------------------------------------------------------------
# clean-up


def clean_text(text: str | None) -> str:
    """Entities decoded, mojibake fixed, whitespace collapsed, ends stripped; None becomes ''."""
    if not text:
        return ""
    if not text.isascii() or "&" in text or _has_control(text):
        text = ftfy.fix_text(html.unescape(text))
    return " ".join(text.split())


def _has_control(text: str) -> bool:
    return any(c < " " and c not in "\t\n\v\f\r\x1c\x1d\x1e\x1f" or c == "\x7f" for c in text)


def clean_texts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """:func:`clean_text` over a string column: Arrow for the ASCII rows, Python for the others."""
    texts = _flat(texts)
    texts = pc.fill_null(texts, "")
    cleaned = pc.utf8_trim(pc.replace_substring_regex(texts, _ASCII_SPACE_RE, " "), " ")
    slow = pc.match_substring_regex(texts, _NEEDS_FTFY_RE)
    idx = np.flatnonzero(slow.to_numpy(zero_copy_only=False))
    if idx.size:
        fixed = [clean_text(t) for t in texts.take(pa.array(idx)).to_pylist()]
        cleaned = pc.replace_with_mask(cleaned, slow, pa.array(fixed, pa.string()))
    return cleaned


def _flat(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


# ---------------------------------------------------------------------------------------------
# language


def normalize_lang(lang: str | None) -> str | None:
    """'en-US', 'EN_gb' → 'en'; the primary subtag is what the language filter compares."""
    if not lang:
        return None
    return lang.strip().lower().replace("_", "-").split("-")[0] or None


UNDETERMINED = "und"
# Alt texts are short, and on a few words py3langid's guess is close to noise ("blue star icon"
# comes out Spanish at 7%). Below this normalised confidence the language is undetermined, and an
# undetermined language does not drop a row: losing English captions to a coin toss costs more
# than keeping a few foreign ones, which the confident detections on longer texts still catch.
MIN_LANG_CONFIDENCE = 0.5


@functools.cache
def _identifier():
    # Imported lazily: loading the model takes a few hundred milliseconds, and most rows carry
    # the language extract detected.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_lang(text: str) -> str | None:
    """The language py3langid sees in ``text``; ``und`` when unsure, None for an empty text."""
    if not text:
        return None
    lang, confidence = _identifier().classify(text)
    return lang if confidence >= MIN_LANG_CONFIDENCE else UNDETERMINED


# ---------------------------------------------------------------------------------------------
# filters


def is_boilerplate(text: str) -> bool:
    return bool(pc.match_substring_regex(pa.array([text]), BOILERPLATE_RE, ignore_case=True)[0].as_py())


def text_problem(text: str, lang: str | None, rules: TextRules) -> tuple[str | None, str | None]:
    """(reason or None, language) for one cleaned text; the language is detected when None."""
    lang = normalize_lang(lang)
    n = len(text)
    if n == 0:
        return EMPTY_TEXT, lang
    if n < rules.min_chars:
        return TOO_SHORT, lang
    if n > rules.max_chars:
        return TOO_LONG, lang
    if is_boilerplate(text):
        return BOILERPLATE, lang
    if text.count(" ") + 1 < rules.min_words:
        return TOO_FEW_WORDS, lang
    if rules.blocklist is not None and rules.blocklist.matches_any(text):
        return BLOCKLISTED, lang
    if rules.langs:
        if lang is None:
            lang = detect_lang(text)
        if lang not in rules.langs and lang not in (None, UNDETERMINED):
            return LANG_NOT_ALLOWED, lang
    return None, lang


def text_problems(
    texts: pa.Array, langs: pa.Array, rules: TextRules, skip: pa.Array | None = None
) -> tuple[pa.Array, pa.Array]:
    """(reasons, languages) for a column of cleaned texts, as :func:`text_problem` row by row.

    Rows where ``skip`` is true (already dropped for their URL) get a null reason and are left out
    of the Python steps; their language is passed through.
    """
    texts, langs = _flat(texts), _flat(langs)
    n_rows = len(texts)
    reason = pa.nulls(n_rows, pa.string())
    open_ = pc.invert(skip) if skip is not None else pa.array(np.ones(n_rows, dtype=bool))

    def mark(cond: pa.Array, name: str) -> None:
        nonlocal reason, open_
        hit = pc.and_(open_, cond)
        reason = pc.if_else(hit, pa.scalar(name), reason)
        open_ = pc.and_not(open_, hit)

    chars = pc.utf8_length(texts)
    mark(pc.equal(chars, 0), EMPTY_TEXT)
    mark(pc.less(chars, rules.min_chars), TOO_SHORT)
    mark(pc.greater(chars, rules.max_chars), TOO_LONG)
    mark(pc.match_substring_regex(texts, BOILERPLATE_RE, ignore_case=True), BOILERPLATE)
    # Clean texts have single spaces between words, so words = spaces + 1.
    mark(pc.less(pc.add(pc.count_substring(texts, " "), 1), rules.min_words), TOO_FEW_WORDS)

    if rules.blocklist is not None:
        idx = _indices(open_)
        if idx.size:
            hits = [rules.blocklist.matches_any(t) for t in texts.take(pa.array(idx)).to_pylist()]
            mark(_scatter(n_rows, idx, hits), BLOCKLISTED)

    langs = _normalize_langs(langs)
    if rules.langs:
        # Detect only where the candidate has no language and the row is still standing.
        need = pc.and_(open_, pc.is_null(langs))
        idx = _indices(need)
        if idx.size:
            found = [detect_lang(t) for t in texts.take(pa.array(idx)).to_pylist()]
            langs = pc.replace_with_mask(langs, need, pa.array(found, pa.string()))
        allowed = pc.is_in(langs, value_set=pa.array([*rules.langs, UNDETERMINED], pa.string()))
        mark(pc.invert(pc.fill_null(allowed, True)), LANG_NOT_ALLOWED)
    return reason, langs


def _normalize_langs(langs: pa.Array) -> pa.Array:
    if langs.null_count == len(langs):
        return langs.cast(pa.string())
    low = pc.utf8_lower(pc.utf8_trim_whitespace(langs.cast(pa.string())))
    primary = pc.replace_substring_regex(low, r"[-_].*$", "")
    # An empty code is no code: detect instead.
    return pc.if_else(pc.equal(primary, ""), pa.scalar(None, pa.string()), primary)


def _indices(mask: pa.Array) -> np.ndarray:
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))


def _scatter(n: int, idx: np.ndarray, values: list[bool]) -> pa.Array:
    out = np.zeros(n, dtype=bool)
    out[idx] = values
    return pa.array(out)
