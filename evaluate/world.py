"""The synthetic world: classes, a renderer and a captioner.

Both the built-in evaluation tasks (`shape`, `colour`, `digit`) and the synthetic web in
`wit.ingest.synthetic` draw from here, so a model trained on the synthetic web is evaluated on the
very classes its captions talk about.

A `Concept` is what one picture shows: a coloured shape or a coloured digit. `render` draws it with
nuisance variation (background, scale, position, rotation, light noise) so that only the class
words carry over between pictures; `caption` writes noisy alt text that mentions the class words.
Everything takes a `random.Random`, so one seed gives the same pictures and captions again.
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import handwriting

Kind = Literal["shape", "digit"]
Task = Literal["shape", "colour", "digit"]
Lang = Literal["en", "de", "fr", "es"]

TASKS: tuple[Task, ...] = ("shape", "colour", "digit")
LANGS: tuple[Lang, ...] = ("en", "de", "fr", "es")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")

# Chosen far apart in RGB so that a colour task is learnable from pixels; the renderer jitters them
# a little, never enough to cross over to a neighbour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 160, 60),
    "blue": (35, 75, 210),
    "purple": (125, 50, 165),
    "pink": (240, 120, 185),
    "black": (25, 25, 25),
}

DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
DIGIT_WORDS: dict[str, str] = dict(
    zip(DIGITS, ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"), strict=True)
)

# Backgrounds are neutral or pale; a background is only used under an object colour that is at
# least MIN_CONTRAST away from it, so the object never disappears into its background.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (250, 250, 250),
    (205, 205, 205),
    (140, 140, 140),
    (70, 70, 70),
    (235, 222, 195),
    (205, 225, 240),
    (250, 245, 225),
    (215, 235, 210),
)
MIN_CONTRAST = 120.0
# Pens write in black or blue: half the digits are drawn in an ink colour, and a handwritten digit
# in ink is on paper, as on a scanned form (real handwritten digits are dark ink on white paper).
INK_COLOURS: tuple[str, ...] = ("black", "black", "blue")
INK_SHARE = 0.5
PAPER: tuple[tuple[int, int, int], ...] = ((250, 250, 250), (250, 245, 225), (235, 222, 195))
# How the web draws a digit: a font, pen strokes, or pen strokes scanned at 8x8 (wit.evaluate.handwriting).
DIGIT_STYLE_SHARES: tuple[tuple[str, float], ...] = (("print", 0.4), ("hand", 0.3), ("scan", 0.3))
# Every style of each kind; `outline` (shape sketches) is for a held-out distribution shift only.
STYLES: dict[str, tuple[str, ...]] = {"shape": ("filled", "outline"), "digit": ("print", "hand", "scan")}
# Shapes stand roughly upright, as clipart and icons do. Any angle would make shape a rotation-
# invariance problem: measured on 4,000 pairs, a tiny CLIP then stays at chance on shape, while
# with this tilt its zero-shot shape accuracy passes 0.6 in a few hundred steps.
SHAPE_TILT = 30.0


@dataclass(frozen=True, slots=True)
class Concept:
    """What one picture shows: a `shape` or a `digit`, always in a `colour`."""

    kind: Kind
    colour: str
    shape: str | None = None
    digit: str | None = None

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.kind == "shape":
            if self.shape not in SHAPES or self.digit is not None:
                raise ValueError(f"a shape concept needs one of {SHAPES} and no digit")
        elif self.kind == "digit":
            if self.digit not in DIGITS or self.shape is not None:
                raise ValueError(f"a digit concept needs one of {DIGITS} and no shape")
        else:
            raise ValueError(f"unknown kind {self.kind!r}")

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape if self.kind == 'shape' else self.digit}"


def sample_concept(rng: random.Random, kind: Kind | None = None, shape_share: float = 0.6) -> Concept:
    if kind is None:
        kind = "shape" if rng.random() < shape_share else "digit"
    colour = rng.choice(tuple(COLOURS))
    if kind == "shape":
        return Concept("shape", colour, shape=rng.choice(SHAPES))
    if rng.random() < INK_SHARE:
        colour = rng.choice(INK_COLOURS)
    return Concept("digit", colour, digit=rng.choice(DIGITS))


def different_concept(concept: Concept, rng: random.Random) -> Concept:
    """A concept that differs from `concept` in every label it has, for mismatched captions."""
    while True:
        other = sample_concept(rng, kind=concept.kind)
        if other.colour != concept.colour and (other.shape, other.digit) != (concept.shape, concept.digit):
            return other


def task_classes(task: Task) -> list[str]:
    """Class names of a task, in label order (the index is the label)."""
    if task == "shape":
        return list(SHAPES)
    if task == "colour":
        return list(COLOURS)
    if task == "digit":
        return list(DIGITS)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def concept_label(concept: Concept, task: Task) -> str | None:
    """The class name of `concept` under `task`; None when the task does not apply (a digit has no shape)."""
    if task == "colour":
        return concept.colour
    if task == "shape":
        return concept.shape
    if task == "digit":
        return concept.digit
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# ---------------------------------------------------------------------------------------------
# rendering


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Unit outline of a shape, centred on 0 and fitting in the unit circle."""
    if shape == "square":
        return [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    if shape == "hexagon":
        return [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if shape == "cross":
        a, b = 0.3, 0.9
        quarter = [(-a, -b), (a, -b), (a, -a)]
        # The same three corners turned by 90 degrees four times make the twelve-corner outline.
        pts = []
        for k in range(4):
            ck, sk = round(math.cos(k * math.pi / 2)), round(math.sin(k * math.pi / 2))
            pts.extend((x * ck - y * sk, x * sk + y * ck) for x, y in quarter)
        return pts
    if shape == "heart":
        pts = []
        for k in range(32):
            t = 2 * math.pi * k / 32
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -y / 17.0 - 0.05))
        return pts
    raise ValueError(f"no polygon for {shape!r}")


_OUTLINES: dict[str, list[tuple[float, float]]] = {s: _polygon(s) for s in SHAPES if s != "circle"}


@functools.cache
def font_paths() -> tuple[str, ...]:
    """TrueType fonts on this machine, sorted so that a seed picks the same font on each run."""
    found: list[str] = []
    for root in (Path("/usr/share/fonts"), Path("/usr/local/share/fonts")):
        if root.is_dir():
            found.extend(str(p) for p in root.rglob("*.ttf"))
    # Hairline weights make a digit's colour hard to see at 32 px.
    found = [p for p in found if "ExtraLight" not in p and "Thin" not in p]
    preferred = [p for p in found if "DejaVuSans" in p or "DejaVuSerif" in p or "Liberation" in p]
    # Math and symbol fonts draw digits in odd glyphs or not at all.
    chosen = preferred or [p for p in found if "Math" not in p and "Symbol" not in p]
    return tuple(sorted(chosen))


@functools.lru_cache(maxsize=512)
def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size)


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
    return r, g, b


def background_choices(colour: str) -> list[tuple[int, int, int]]:
    """The backgrounds allowed under an object of `colour`."""
    rgb = COLOURS[colour]
    return [bg for bg in BACKGROUNDS if _distance(bg, rgb) >= MIN_CONTRAST]


def _canvas(w: int, h: int, bg: tuple[int, int, int], rng: random.Random) -> Image.Image:
    style = rng.random()
    if style < 0.6 or w * h < 64:
        return Image.new("RGB", (w, h), bg)
    np_rng = np.random.default_rng(rng.getrandbits(64))
    base = np.empty((h, w, 3), dtype=np.float32)
    base[:] = bg
    if style < 0.8:
        # A gentle gradient: real product shots and scans are rarely flat.
        shift = np.array([rng.randint(-30, 30) for _ in range(3)], dtype=np.float32)
        ramp = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)
        ramp = ramp[None, :, None] if ramp.shape[0] == w else ramp[:, None, None]
        base = base + ramp * shift
    else:
        base += np_rng.normal(0.0, 8.0, size=(h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def sample_style(concept: Concept, rng: random.Random) -> str:
    """The style the web draws `concept` in: shapes are always `filled`; a digit is `print` (a
    font), `hand` (pen strokes) or `scan` (pen strokes on a form scanned at 8x8) by
    :data:`DIGIT_STYLE_SHARES`."""
    if concept.kind == "shape":
        return "filled"
    r, acc = rng.random(), 0.0
    for style, share in DIGIT_STYLE_SHARES:
        acc += share
        if r < acc:
            return style
    return DIGIT_STYLE_SHARES[-1][0]


def render(
    concept: Concept,
    rng: random.Random,
    size: int | tuple[int, int] = 96,
    *,
    background: tuple[int, int, int] | None = None,
    style: str | None = None,
) -> Image.Image:
    """Draw `concept` on a canvas of `size` (an int for a square, or `(width, height)`) in `style`
    (None: :func:`sample_style`'s draw; see :data:`STYLES`).

    The background is never the object's colour (see `background_choices`); the object covers 35–80%
    of the shorter side, sits anywhere it fits and is tilted: shapes up to `SHAPE_TILT` degrees
    either way, digits up to 20 (so a 6 stays a 6). Handwritten digits fill most of the picture, as
    a form's box does.
    """
    w, h = (size, size) if isinstance(size, int) else size
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    if style is None:
        style = sample_style(concept, rng)
    if style not in STYLES[concept.kind]:
        raise ValueError(f"a {concept.kind} is drawn in one of {STYLES[concept.kind]}, not {style!r}")
    colour = COLOURS[concept.colour]
    if background is None and style in ("hand", "scan") and concept.colour in INK_COLOURS:
        background = rng.choice(PAPER)  # pen on paper
    elif background is None:
        background = rng.choice(background_choices(concept.colour))
    elif _distance(background, colour) < MIN_CONTRAST:
        raise ValueError(f"background {background} is too close to {concept.colour}")
    img = _canvas(w, h, _jitter(background, rng, 8), rng)
    fill = _jitter(colour, rng, 12)

    side = min(w, h)
    radius = max(1.0, side * rng.uniform(0.35, 0.8) / 2)
    cx = rng.uniform(min(radius, w / 2), max(w - radius, w / 2))
    cy = rng.uniform(min(radius, h / 2), max(h - radius, h / 2))

    if concept.kind == "shape":
        draw = ImageDraw.Draw(img)
        # an outline sketch: the same shape, its edge only (a style the synthetic web never shows)
        paint = {"fill": fill} if style == "filled" else {"outline": fill, "width": max(1, round(radius * 0.14))}
        if concept.shape == "circle":
            # A slight squash, so circles vary the way the other shapes vary by rotation.
            rx, ry = radius * rng.uniform(0.85, 1.0), radius * rng.uniform(0.85, 1.0)
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), **paint)
        else:
            angle = math.radians(rng.uniform(-SHAPE_TILT, SHAPE_TILT))
            ca, sa = math.cos(angle), math.sin(angle)
            outline = _OUTLINES[concept.shape or ""]
            pts = [(cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in outline]
            draw.polygon(pts, **paint)
        return img
    if style != "print":
        # most of the picture, as a form's box is filled; the border stays paper
        side = max(1, int(min(w, h) * rng.uniform(0.8, 0.92)))
        mask = handwriting.digit_mask(concept.digit or "", rng, side, scan=style == "scan")
        img.paste(fill, ((w - side) // 2, (h - side) // 2), mask)
        return img

    fonts = font_paths()
    font = _font(rng.choice(fonts) if fonts else None, max(6, int(radius * 2.2)))
    box = max(2, int(radius * 2.6))
    mask = Image.new("L", (box, box), 0)
    ImageDraw.Draw(mask).text((box / 2, box / 2), concept.digit or "", fill=255, font=font, anchor="mm")
    mask = mask.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR)
    img.paste(fill, (int(cx - box / 2), int(cy - box / 2)), mask)
    return img


# ---------------------------------------------------------------------------------------------
# captions

_EN_SHAPE_TEMPLATES: tuple[str, ...] = (
    "{a} {c} {s} on a plain background",
    "{C} {s} - clipart",
    "My little {c} {s} drawing :)",
    "{c} {s}",
    "{c} {s} icon",
    "simple {c} {s} shape, vector illustration",
    "hand-drawn {c} {s}",
    "{A} {adj}{c} {s}.",
    "{c}-coloured {s} sticker",
    "IMG_{n}: {c} {s}",
    "{s} in {c}",
    "cute {c} {s}!!",
    "Free {c} {s} png",
    "the {s} is {c}",
    "{C} {S} Wall Decal | Kids Room",
    "photo of {a} {adj}{c} {s}",
)
_EN_DIGIT_TEMPLATES: tuple[str, ...] = (
    "hand-drawn number {d} in {c}",
    "the digit {w}, written in {c}",
    "{c} number {d}",
    "{C} {d} - clipart",
    "Number {W} ({d}) sticker, {c}",
    "{a} {c} numeral {d} on a plain background",
    "house number {d} sign in {c}",
    "{W}! big {c} {d}",
    "{adj}{c} digit {d}",
    "IMG_{n} - {c} {w}",
)
_EN_ADJECTIVES: tuple[str, ...] = ("", "", "", "bright ", "deep ", "vivid ", "small ", "big ")
_EN_ENDINGS: tuple[str, ...] = ("", "", "", ".", "!", " :)", " #art", " ...")

# Gender of each noun and the forms of each colour word, enough to write agreeing noun phrases.
_DE_SHAPES: dict[str, tuple[str, str]] = {
    "circle": ("Kreis", "m"),
    "square": ("Quadrat", "n"),
    "triangle": ("Dreieck", "n"),
    "star": ("Stern", "m"),
    "hexagon": ("Sechseck", "n"),
    "diamond": ("Raute", "f"),
    "cross": ("Kreuz", "n"),
    "heart": ("Herz", "n"),
}
_DE_COLOURS: dict[str, tuple[str, str, bool]] = {  # stem, noun, declines
    "red": ("rot", "Rot", True),
    "orange": ("orangefarben", "Orange", True),
    "yellow": ("gelb", "Gelb", True),
    "green": ("grün", "Grün", True),
    "blue": ("blau", "Blau", True),
    "purple": ("lila", "Lila", False),
    "pink": ("rosa", "Rosa", False),
    "black": ("schwarz", "Schwarz", True),
}
_DE_DIGITS = ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")
_FR_SHAPES: dict[str, tuple[str, str]] = {
    "circle": ("cercle", "m"),
    "square": ("carré", "m"),
    "triangle": ("triangle", "m"),
    "star": ("étoile", "f"),
    "hexagon": ("hexagone", "m"),
    "diamond": ("losange", "m"),
    "cross": ("croix", "f"),
    "heart": ("cœur", "m"),
}
_FR_COLOURS: dict[str, tuple[str, str]] = {
    "red": ("rouge", "rouge"),
    "orange": ("orange", "orange"),
    "yellow": ("jaune", "jaune"),
    "green": ("vert", "verte"),
    "blue": ("bleu", "bleue"),
    "purple": ("violet", "violette"),
    "pink": ("rose", "rose"),
    "black": ("noir", "noire"),
}
_FR_DIGITS = ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf")
_ES_SHAPES: dict[str, tuple[str, str]] = {
    "circle": ("círculo", "m"),
    "square": ("cuadrado", "m"),
    "triangle": ("triángulo", "m"),
    "star": ("estrella", "f"),
    "hexagon": ("hexágono", "m"),
    "diamond": ("rombo", "m"),
    "cross": ("cruz", "f"),
    "heart": ("corazón", "m"),
}
_ES_COLOURS: dict[str, tuple[str, str]] = {
    "red": ("rojo", "roja"),
    "orange": ("naranja", "naranja"),
    "yellow": ("amarillo", "amarilla"),
    "green": ("verde", "verde"),
    "blue": ("azul", "azul"),
    "purple": ("morado", "morada"),
    "pink": ("rosa", "rosa"),
    "black": ("negro", "negra"),
}
_ES_DIGITS = ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve")


def class_words(concept: Concept, lang: Lang = "en") -> list[tuple[str, ...]]:
    """The concept's class words in `lang`, one tuple of accepted lower-case forms per class (colour,
    then shape or digit); every caption of the concept contains one form of each. Forms are stems
    where a language inflects ("roj" matches "rojo" and "roja")."""
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; expected one of {LANGS}")
    if concept.kind == "digit":
        d = concept.digit or ""
        i = int(d)
        words = {"en": DIGIT_WORDS[d], "de": _DE_DIGITS[i], "fr": _FR_DIGITS[i], "es": _ES_DIGITS[i]}
        thing: tuple[str, ...] = (d, words[lang])
    else:
        shape = concept.shape or ""
        names = {"en": shape, "de": _DE_SHAPES[shape][0], "fr": _FR_SHAPES[shape][0], "es": _ES_SHAPES[shape][0]}
        thing = (names[lang].lower(),)
    colours = {
        "en": concept.colour,
        "de": _DE_COLOURS[concept.colour][1],
        "fr": _FR_COLOURS[concept.colour][0],
        "es": os.path.commonprefix(_ES_COLOURS[concept.colour]),
    }
    return [(colours[lang].lower(),), thing]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _caption_en(concept: Concept, rng: random.Random) -> str:
    adj = rng.choice(_EN_ADJECTIVES)
    c = concept.colour
    first = (adj or c).strip()
    if concept.kind == "shape":
        s = concept.shape or ""
        text = rng.choice(_EN_SHAPE_TEMPLATES).format(
            a=_article(first),
            A=_article(first).capitalize(),
            adj=adj,
            c=c,
            C=c.capitalize(),
            s=s,
            S=s.capitalize(),
            n=rng.randint(1000, 9999),
        )
    else:
        d = concept.digit or ""
        w = DIGIT_WORDS[d]
        text = rng.choice(_EN_DIGIT_TEMPLATES).format(
            a=_article(c),
            adj=adj,
            c=c,
            C=c.capitalize(),
            d=d,
            w=w,
            W=w.capitalize(),
            n=rng.randint(1000, 9999),
        )
    style = rng.random()
    if style < 0.15:
        text = text.lower()
    elif style < 0.2:
        text = text.upper()
    elif style < 0.3:
        text = text.title()
    if text[-1:].isalnum():
        text += rng.choice(_EN_ENDINGS)
    return text


def _caption_de(concept: Concept, rng: random.Random) -> str:
    stem, noun, declines = _DE_COLOURS[concept.colour]
    if concept.kind == "digit":
        d = concept.digit or ""
        options = [f"die Zahl {d} in {noun}", f"Ziffer {_DE_DIGITS[int(d)]} ({d}), {stem}"]
        if declines:
            options.append(f"{stem.capitalize()}e {d} - Clipart")
        return rng.choice(options)
    word, gender = _DE_SHAPES[concept.shape or ""]
    adj = stem + {"m": "er", "n": "es", "f": "e"}[gender] if declines else stem
    art = "eine" if gender == "f" else "ein"
    mine = "meine" if gender == "f" else "mein"
    return rng.choice(
        (
            f"{art} {adj} {word}",
            f"{art.capitalize()} {adj} {word} auf hellem Hintergrund",
            f"{word} in {noun}",
            f"{mine} {adj} {word} :)",
            f"{adj.capitalize()} {word} - Clipart",
        )
    )


def _caption_fr(concept: Concept, rng: random.Random) -> str:
    masc, fem = _FR_COLOURS[concept.colour]
    if concept.kind == "digit":
        d = concept.digit or ""
        return rng.choice(
            (
                f"le chiffre {d} en {masc}",
                f"le nombre {_FR_DIGITS[int(d)]} ({d}) en {masc}",
                f"Chiffre {d} {masc} - clipart",
            )
        )
    word, gender = _FR_SHAPES[concept.shape or ""]
    adj = fem if gender == "f" else masc
    art = "une" if gender == "f" else "un"
    mine = "Ma petite" if gender == "f" else "Mon petit"
    return rng.choice(
        (
            f"{art} {word} {adj}",
            f"{mine} {word} {adj} :)",
            f"{word.capitalize()} {adj} - clipart",
            f"dessin d'{art} {word} {adj}",
        )
    )


def _caption_es(concept: Concept, rng: random.Random) -> str:
    masc, fem = _ES_COLOURS[concept.colour]
    if concept.kind == "digit":
        d = concept.digit or ""
        return rng.choice(
            (
                f"el número {d} en {masc}",
                f"número {_ES_DIGITS[int(d)]} ({d}) de color {masc}",
                f"Dígito {d} {masc}",
            )
        )
    word, gender = _ES_SHAPES[concept.shape or ""]
    adj = fem if gender == "f" else masc
    art = "una" if gender == "f" else "un"
    return rng.choice(
        (
            f"{art} {word} {adj}",
            f"mi {word} {adj} :)",
            f"{word.capitalize()} {adj} - imagen prediseñada",
            f"dibujo de {art} {word} {adj}",
        )
    )


def caption(concept: Concept, rng: random.Random, lang: Lang = "en") -> str:
    """Noisy alt text for `concept` in `lang`; it always contains the words of `class_words`."""
    if lang == "en":
        return _caption_en(concept, rng)
    if lang == "de":
        return _caption_de(concept, rng)
    if lang == "fr":
        return _caption_fr(concept, rng)
    if lang == "es":
        return _caption_es(concept, rng)
    raise ValueError(f"unknown language {lang!r}; expected one of {LANGS}")


def mismatched_caption(concept: Concept, rng: random.Random, lang: Lang = "en") -> str:
    """A caption of some other concept: the image–text mismatch that CLIP-score filtering should catch."""
    return caption(different_concept(concept, rng), rng, lang)
