"""Fusion scorers: seed ensembles, JSON round trips, and which packaged model a search picks."""

from __future__ import annotations

import numpy as np
import pytest

from adapters_db.fusion import HAND_SET, Fusion, FusionRegistry, MLPScorer, average_mlps, scorer_from_json
from adapters_db.retrieval import FEATURES


def _mlp(seed: int, features: tuple[str, ...] = ("a", "b", "c"), hidden: int = 4) -> MLPScorer:
    rng = np.random.default_rng(seed)
    f = len(features)
    return MLPScorer(
        features,
        np.array([0.5, -1.0, 2.0], np.float32)[:f],
        np.array([1.0, 2.0, 0.5], np.float32)[:f],
        rng.normal(size=(f, hidden)).astype(np.float32),
        rng.normal(size=hidden).astype(np.float32),
        rng.normal(size=hidden).astype(np.float32),
        float(rng.normal()),
    )


def test_average_of_mlps_scores_the_mean_of_their_scores() -> None:
    members = [_mlp(s) for s in range(3)]
    feats = {name: np.random.default_rng(9).normal(size=50).astype(np.float32) for name in "abc"}
    merged = average_mlps(members)
    assert merged.w1.shape == (3, 12)
    expected = np.mean([m.score(feats) for m in members], axis=0)
    np.testing.assert_allclose(merged.score(feats), expected, rtol=1e-5, atol=1e-5)
    back = scorer_from_json(merged.to_json())
    np.testing.assert_allclose(back.score(feats), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same features"):
        average_mlps([_mlp(0), _mlp(1, ("a", "b"))])


def test_registry_picks_the_classifier_model_only_when_asked_and_packaged() -> None:
    lexical = Fusion(_mlp(0), _mlp(1))
    with_clf = Fusion(_mlp(2), _mlp(3))
    reg = FusionRegistry({"lexical": lexical, "lexical+classifier": with_clf})
    assert reg.pick("minilm", dense=False) is lexical
    assert reg.pick("minilm", dense=True, classifier=True) is with_clf
    assert FusionRegistry({"lexical": lexical}).pick("minilm", False, classifier=True) is lexical
    assert FusionRegistry({}).pick("minilm", False, classifier=True) is HAND_SET


def test_registry_picks_the_most_complete_learned_channel_variant() -> None:
    models = {
        name: Fusion(_mlp(i), _mlp(i + 10))
        for i, name in enumerate(
            ("lexical", "lexical+classifier", "lexical+matcher", "lexical+classifier+matcher")
        )
    }
    reg = FusionRegistry(dict(models))
    for classifier, matcher, name in (
        (False, False, "lexical"),
        (True, False, "lexical+classifier"),
        (False, True, "lexical+matcher"),
        (True, True, "lexical+classifier+matcher"),
    ):
        assert reg.pick("minilm", False, classifier, matcher) is models[name]
    del reg.models["lexical+classifier+matcher"]
    assert reg.pick("minilm", False, True, True) is models["lexical+classifier"]
    del reg.models["lexical+classifier"]
    assert reg.pick("minilm", False, True, True) is models["lexical+matcher"]


def test_packaged_models_read_known_features() -> None:
    reg = FusionRegistry.load()
    assert {"lexical", "lexical+classifier", "lexical+matcher", "lexical+classifier+matcher"} <= set(
        reg.models
    )
    clf = reg.models["lexical+classifier"]
    assert {"k_lp", "r_k_lp"} <= set(clf.warm.features)
    assert not {"k_lp", "r_k_lp"} & set(clf.cold.features)  # metadata-only queries never use it
    for name in ("lexical+matcher", "lexical+classifier+matcher"):
        model = reg.models[name]
        assert {"s_meta", "r_s_meta"} <= set(model.warm.features) & set(model.cold.features)
    assert {"k_lp", "r_k_lp"} <= set(reg.models["lexical+classifier+matcher"].warm.features)
    for model in reg.models.values():
        for scorer in (model.warm, model.cold):
            assert set(scorer.features) <= set(FEATURES)
