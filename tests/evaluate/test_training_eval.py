"""The trainer's evaluation callback: a built-in suite on the model as it is, nothing written."""

from __future__ import annotations

import open_clip
import torch

from wit.evaluate.run import TrainingEval
from wit.train.models import no_random_init_warning


def test_training_eval_scores_the_model_it_is_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    with no_random_init_warning():
        model = open_clip.create_model("wit-tiny").eval()
    evaluate = TrainingEval("synthetic-colour", "wit-tiny")
    first = evaluate(model, 2)
    assert set(first) == {
        "synthetic-colour/acc1",
        "synthetic-colour/acc5",
        "synthetic-colour/mean_per_class_recall",
        "synthetic-colour/acc1_single_template",
    }
    assert all(0.0 <= v <= 1.0 for v in first.values())
    assert evaluate(model, 4) == first  # the same weights, the same numbers (no cache, no sampling)
    with torch.no_grad():
        model.text_projection.mul_(-1)  # other weights: other text classifiers, not the cached ones
    assert evaluate(model, 6) != first
    assert not list(tmp_path.iterdir())  # nothing written
