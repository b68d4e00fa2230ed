import io
import math
import random
import re
import time

import numpy as np
import pytest
from PIL import Image

from wit.evaluate import world
from wit.evaluate.world import COLOURS, DIGITS, LANGS, SHAPES, TASKS, Concept


def all_concepts() -> list[Concept]:
    shapes = [Concept("shape", c, shape=s) for s in SHAPES for c in COLOURS]
    digits = [Concept("digit", c, digit=d) for d in DIGITS for c in COLOURS]
    return shapes + digits


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def object_colour(img: Image.Image) -> tuple[np.ndarray, np.ndarray, int]:
    """Background estimated from the border; the object is every pixel far from it."""
    a = np.asarray(img, dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    far = np.linalg.norm(a - bg, axis=2) > 60
    return bg, np.median(a[far], axis=0) if far.any() else bg, int(far.sum())


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: math.dist(COLOURS[name], rgb))


def test_vocabularies_are_sized_and_distinct():
    assert len(SHAPES) == len(set(SHAPES)) >= 8
    assert len(COLOURS) >= 8 and DIGITS == tuple("0123456789")
    names = list(COLOURS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert math.dist(COLOURS[a], COLOURS[b]) > 60, (a, b)


def test_same_seed_gives_identical_pictures_and_captions():
    def make(seed: int) -> list[bytes | str]:
        rng = random.Random(seed)
        out: list[bytes | str] = []
        for _ in range(30):
            c = world.sample_concept(rng)
            size = rng.choice((32, 96, (120, 80)))
            out += [png(world.render(c, rng, size)), world.caption(c, rng, rng.choice(LANGS))]
        return out

    assert make(7) == make(7)
    assert make(7) != make(8)


@pytest.mark.parametrize("concept", all_concepts(), ids=lambda c: c.name.replace(" ", "-"))
def test_every_class_renders_in_its_colour_on_a_different_background(concept: Concept):
    for seed in range(3):
        img = world.render(concept, random.Random(seed), 96)
        assert img.size == (96, 96) and img.mode == "RGB"
        bg, obj, n = object_colour(img)
        assert n > 40, "the object is missing or tiny"
        assert math.dist(bg, COLOURS[concept.colour]) > 60, "background too close to the object colour"
        assert nearest_colour(obj) == concept.colour


def test_background_choices_never_match_the_object():
    for name, rgb in COLOURS.items():
        choices = world.background_choices(name)
        assert len(choices) >= 2
        assert all(math.dist(bg, rgb) >= world.MIN_CONTRAST for bg in choices)
    with pytest.raises(ValueError):
        world.render(Concept("shape", "black", shape="star"), random.Random(0), background=(30, 30, 30))


def test_render_sizes_and_speed():
    rng = random.Random(0)
    c = Concept("digit", "blue", digit="7")
    assert world.render(c, rng, (120, 40)).size == (120, 40)
    assert world.render(c, rng, 8).size == (8, 8)
    with pytest.raises(ValueError):
        world.render(c, rng, 0)
    concepts = [world.sample_concept(rng) for _ in range(300)]
    start = time.perf_counter()
    for c in concepts:
        world.render(c, rng, 96)
    assert (time.perf_counter() - start) / len(concepts) < 0.002


@pytest.mark.parametrize("lang", LANGS)
def test_captions_mention_their_class_words(lang):
    rng = random.Random(1)
    for concept in all_concepts():
        for _ in range(4):
            text = world.caption(concept, rng, lang)
            low = text.lower()
            for forms in world.class_words(concept, lang):
                assert any(f in low for f in forms), (lang, concept, text)


def test_captions_vary():
    rng = random.Random(2)
    c = Concept("shape", "red", shape="star")
    assert len({world.caption(c, rng) for _ in range(100)}) > 30


def test_non_english_captions_agree_in_gender():
    c = Concept("shape", "red", shape="circle")
    seen = {world.caption(c, random.Random(s), "de") for s in range(40)}
    assert any("roter Kreis" in t for t in seen)
    assert "un cercle rouge" in {world.caption(c, random.Random(s), "fr") for s in range(40)}
    star = {world.caption(Concept("shape", "green", shape="star"), random.Random(s), "es") for s in range(40)}
    assert "una estrella verde" in star


def test_mismatched_caption_names_other_classes():
    rng = random.Random(3)
    for concept in all_concepts():
        text = world.mismatched_caption(concept, rng).lower()
        assert not re.search(rf"\b{concept.colour}\b", text), text
        thing = concept.shape or world.DIGIT_WORDS[concept.digit or ""]
        assert not re.search(rf"\b{thing}\b", text), text


def test_tasks_and_labels():
    assert world.task_classes("shape") == list(SHAPES)
    assert world.task_classes("colour") == list(COLOURS)
    assert world.task_classes("digit") == list(DIGITS)
    star = Concept("shape", "red", shape="star")
    seven = Concept("digit", "pink", digit="7")
    assert [world.concept_label(star, t) for t in TASKS] == ["star", "red", None]
    assert [world.concept_label(seven, t) for t in TASKS] == [None, "pink", "7"]
    with pytest.raises(ValueError):
        world.task_classes("texture")  # type: ignore[arg-type]


def test_concept_validation():
    with pytest.raises(ValueError):
        Concept("shape", "red")
    with pytest.raises(ValueError):
        Concept("digit", "red", digit="12")
    with pytest.raises(ValueError):
        Concept("shape", "teal", shape="star")
