"""Image URLs: made absolute, normalised, and turned into the `uid` every manifest row carries.

`extract` resolves each `<img src>` with a per-page :class:`Resolver` (:func:`absolutize` against
`<base href>`, itself resolved against the page URL, then :func:`normalize_url`, with a fast path for
plain URLs), and names the pair with :func:`uid_of`. Later stages (curate's URL de-duplication,
download, filter) import the same functions, so one image URL written two ways
(`HTTP://Host:80/a#top` and `http://host/a`) is one URL everywhere.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}

# Characters left as they are: RFC 3986 reserved and unreserved ones, plus `%` (existing escapes
# are kept; a `%` not followed by two hex digits is escaped below).
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CLEAN = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=\-._~?]*")  # nothing to escape, no % at all
_ESCAPE = re.compile(r"%[0-9a-f]{2}|%[0-9A-F][a-f]|%[a-f][0-9A-F]")


class BadURL(ValueError):
    """A URL that cannot be normalised (bad port, unencodable host, no host for http)."""


def _quote(part: str, safe: str) -> str:
    if _CLEAN.fullmatch(part):
        return part  # the common case, already valid: quote() is the slow part of normalising
    part = quote(_BAD_PERCENT.sub("%25", part), safe=safe)
    # %7e and %7E are the same escape; one spelling keeps one URL one uid.
    return _ESCAPE.sub(lambda m: m.group(0).upper(), part)


def _host(netloc: str, hostname: str | None, port: int | None, scheme: str) -> str:
    userinfo, _, _ = netloc.rpartition("@")
    host = (hostname or "").rstrip(".")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise BadURL(f"host {hostname!r} cannot be IDNA-encoded: {exc}") from None
    if ":" in host:  # IPv6 literal: urlsplit strips the brackets
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return f"{userinfo}@{host}" if userinfo else host


def normalize_url(url: str) -> str:
    """One spelling per URL: scheme and host lower-cased, default port dropped, fragment removed,
    path and query percent-encoded validly (spaces and non-ASCII escaped, existing escapes kept).

    Idempotent: ``normalize_url(normalize_url(u)) == normalize_url(u)``. Raises :class:`BadURL`.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:  # a bad port, an unbalanced IPv6 bracket
        raise BadURL(f"{url[:200]!r}: {exc}") from None
    scheme = parts.scheme.lower()
    netloc = _host(parts.netloc, parts.hostname, port, scheme) if parts.netloc else ""
    if scheme in DEFAULT_PORTS and not parts.hostname:
        raise BadURL(f"{url[:200]!r}: no host")
    path = _quote(parts.path, _PATH_SAFE) or ("/" if netloc else "")
    query = _quote(parts.query, _QUERY_SAFE)
    return urlunsplit((scheme, netloc, path, query, ""))


def absolutize(src: str, page_url: str, base_href: str | None = None) -> str:
    """``src`` as an absolute URL: resolved against ``<base href>`` (itself resolved against the
    page URL, since it may be relative too) or, without one, against the page URL."""
    try:
        base = urljoin(page_url, base_href.strip()) if base_href and base_href.strip() else page_url
        return urljoin(base, src.strip())
    except ValueError as exc:  # an unbalanced IPv6 bracket: `//[host/x.jpg`
        raise BadURL(f"{src[:200]!r}: {exc}") from None


# --- the fast path of absolutize + normalize_url ------------------------------------------------
# Most image URLs on real pages are plain: `https://host/a/b.jpg`, `//host/x.png`, `/img/x.jpg`,
# `img/x.jpg`, in characters normalize_url leaves alone. For those, resolving against a plain base
# and normalising is string concatenation; urllib's urljoin + urlsplit cost ~25 µs an image, most
# of extract's time after parsing. Anything else takes the general path, which stays the definition
# (tests/ingest/test_urls_fast.py checks the two agree on many generated URLs).
# No `;` in the path: urljoin splits `;params` off the last segment and drops an empty one.
_PATH_CHARS = r"[A-Za-z0-9/:@!$&'()*+,=\-._~]"
# A query of at least one character (urlunsplit drops an empty one), in _CLEAN's characters.
_PLAIN_QUERY = r"((?:\?[A-Za-z0-9/:@!$&'()*+,;=\-._~?]+)?)"
# The scheme's case spelt out: re.IGNORECASE would make every character class fold case too (and
# match the Kelvin sign as a `k`), which took three times as long on a typical image URL.
_PLAIN_ABSOLUTE = re.compile(
    rf"([Hh][Tt][Tt][Pp][Ss]?)://([A-Za-z0-9.\-]*[A-Za-z0-9])(?::([0-9]{{1,5}}))?((?:/{_PATH_CHARS}*)?){_PLAIN_QUERY}"
)
_PLAIN_PATH = re.compile(rf"({_PATH_CHARS}*){_PLAIN_QUERY}")


def _plain_absolute(url: str) -> str | None:
    """normalize_url(url) for a plain absolute http(s) URL (no userinfo, escapes, fragment,
    non-ASCII or trailing-dot host); None for any other URL."""
    m = _PLAIN_ABSOLUTE.fullmatch(url)
    if m is None:
        return None
    scheme, host, port, path, query = m.groups()
    scheme = scheme.lower()
    if port is not None:
        number = int(port)
        if number > 65535:
            return None  # normalize_url's BadURL
        host = host if number == DEFAULT_PORTS[scheme] else f"{host}:{number}"
    return f"{scheme}://{host.lower()}{path or '/'}{query}"


class Resolver:
    """``absolutize`` then ``normalize_url`` for the images of one page, the base worked out once.

    :meth:`resolve` returns the normalised absolute URL, or None for one that is not http(s)
    (``javascript:``, ``file:``, a relative URL on a ``file://`` page); it raises :class:`BadURL`
    as normalize_url does.
    """

    __slots__ = ("_base", "_origin", "_scheme", "_dir", "_not_http")

    def __init__(self, page_url: str, base_href: str | None = None) -> None:
        self._origin = self._scheme = self._dir = None
        self._not_http = False
        try:
            self._base = absolutize("", page_url, base_href)
        except BadURL:
            self._base = None  # every image of the page is then a BadURL
            return
        # A base that is not http(s) (a saved file's file:// URL): an image URL with no scheme of its
        # own resolves to that scheme (or stays relative), so it is not an http URL either.
        self._not_http = self._base.split(":", 1)[0].lower() not in DEFAULT_PORTS
        plain = _plain_absolute(self._base)
        if plain is not None and plain == self._base:
            scheme, rest = plain.split("://", 1)
            slash = rest.find("/")
            path = rest[slash:].split("?", 1)[0]
            # urljoin drops empty segments and dot segments when it merges a relative path with
            # the base's: only a base path with neither is joined by concatenation.
            if "//" not in path and "/." not in path:
                self._scheme, self._origin = scheme, f"{scheme}://{rest[:slash]}"
                self._dir = path[: path.rfind("/") + 1]

    def resolve(self, src: str) -> str | None:
        if self._not_http and ":" not in src and "[" not in src and "]" not in src:
            return None  # no scheme (urlsplit finds none without a colon); no IPv6 bracket to refuse
        if self._origin is not None and src:
            first = src[0]
            if first == "/":
                if src[1:2] == "/":  # scheme-relative: the base's scheme, then a URL of its own
                    url = _plain_absolute(f"{self._scheme}:{src}")
                    if url is not None:
                        return url
                else:
                    m = _PLAIN_PATH.fullmatch(src)
                    if m is not None and "/." not in m.group(1):
                        return self._origin + src
            elif first != "?" and ":" not in src:
                folder, rest = self._dir, src
                while rest[:1] == ".":  # leading ./ and ../ (a ../ above the root stays at the root)
                    if rest[:3] == "../":
                        folder, rest = folder[: folder.rstrip("/").rfind("/") + 1] or "/", rest[3:]
                    elif rest[:2] == "./":
                        rest = rest[2:]
                    else:
                        break
                m = _PLAIN_PATH.fullmatch(rest)
                path = "/" + m.group(1) if m is not None else ""
                if len(path) > 1 and "//" not in path and "/." not in path:
                    return self._origin + folder + rest
        if self._base is not None and src[:4].lower() == "http":
            # An absolute URL is itself whatever the base: a plain one as the page's, a saved file's
            # file:// URL, or one whose path the fast path does not join relative URLs to.
            url = _plain_absolute(src)
            if url is not None:
                return url
        return self._general(src)

    def _general(self, src: str) -> str | None:
        if self._base is None:
            raise BadURL(f"the page's base URL does not parse; {src[:200]!r}")
        url = absolutize(src, self._base)
        if url.split(":", 1)[0].lower() not in DEFAULT_PORTS:
            return None
        return normalize_url(url)


def uid_of_normalized(url: str, text: str) -> str:
    """The uid of a URL that is already normalised (saves normalising twice in a hot loop)."""
    return hashlib.sha256(f"{url}\n{text}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def uid_of(url: str, text: str) -> str:
    """128-bit hex id of an (image URL, text) pair: sha256 of the normalised URL, ``\\n``, text."""
    return uid_of_normalized(normalize_url(url), text)
