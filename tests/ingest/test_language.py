"""BatchIdentifier gives py3langid's label for every text, one batch at a time."""

import random

import pytest
from py3langid.langid import MODEL_FILE, LanguageIdentifier

from wit.ingest import language
from wit.ingest.language import BatchIdentifier

SAMPLES = [
    "a red bicycle leaning on a wall",
    "Ein rotes Fahrrad an einer Wand",
    "un vélo rouge contre un mur",
    "красный велосипед у стены",
    "赤い自転車が壁に立てかけてある",
    "墙边的一辆红色自行车",
    "벽에 기대어 있는 빨간 자전거",
    "دراجة حمراء بجانب الجدار",
    "HELLO WORLD",  # all capitals: py3langid lower-cases it
    "IMG_3886.jpg",
    "2024",
    "",  # no byte, no feature: py3langid's first column
    " ",
    "\udcff lone surrogate",
    "x" * 3000,  # one long text walked past the grid on its own
]


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    blocks = [(0x20, 0x7E), (0xC0, 0x17F), (0x400, 0x44F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0x600, 0x6FF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(blocks)
        k = rng.choice([0, 1, 2, 5, 12, 40, 120, 400])
        out.append("".join(chr(rng.randint(lo, hi)) if rng.random() > 0.2 else " " for _ in range(k)))
    return out + rng.sample(SAMPLES * 3, len(SAMPLES) * 3)


def _reference(languages):
    model = LanguageIdentifier.from_model_file(MODEL_FILE)
    if languages:
        model.set_languages(list(languages))
    return model


@pytest.mark.parametrize("languages", [(), ("de", "en", "fr", "ja", "ru", "sr", "zh")])
def test_labels_are_py3langids(languages, monkeypatch):
    # Small grids, so the test crosses batch and tail boundaries.
    monkeypatch.setattr(language, "GRID_BYTES", 2048)
    reference = _reference(languages)
    texts = _texts(0, 400)
    got = BatchIdentifier(languages).classify_many(texts)
    assert got == [reference.classify(t)[0] for t in texts]


def test_one_text_and_none():
    identifier = BatchIdentifier()
    assert identifier.classify_many([]) == []
    reference = _reference(())
    for text in SAMPLES:
        assert identifier.classify_many([text]) == [reference.classify(text)[0]], text
    # the label of a text does not depend on the batch it comes in
    assert identifier.classify_many(SAMPLES) == [reference.classify(t)[0] for t in SAMPLES]


def test_restricted_labels_only_from_the_set():
    identifier = BatchIdentifier(("en", "fr"))
    assert set(identifier.classify_many(SAMPLES)) <= {"en", "fr"}
    with pytest.raises(ValueError, match="Unknown language"):
        BatchIdentifier(("en", "zz"))
