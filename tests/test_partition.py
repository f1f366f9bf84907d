"""Client splits: exact coverage, determinism, skew vs alpha, natural = groups, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from data.io import UserError
from data.partition import SplitConfig, partition, split_clients, split_manifest

LABELS = np.random.default_rng(0).integers(0, 6, size=3000)


@pytest.mark.parametrize("kind", ["dirichlet", "iid"])
def test_every_sample_in_exactly_one_client(kind):
    clients = partition(LABELS, None, SplitConfig(kind=kind, n_clients=10))
    merged = np.concatenate(clients)
    assert len(merged) == len(LABELS) and np.array_equal(np.sort(merged), np.arange(len(LABELS)))
    splits = split_clients(LABELS, None, SplitConfig(kind=kind, n_clients=10), seed=1)
    merged = np.concatenate([np.concatenate([s.train, s.val, s.test]) for s in splits])
    assert np.array_equal(np.sort(merged), np.arange(len(LABELS)))


def test_deterministic_for_a_seed_and_the_seed_matters():
    a = partition(LABELS, None, SplitConfig(split_seed=1))
    b = partition(LABELS, None, SplitConfig(split_seed=1))
    c = partition(LABELS, None, SplitConfig(split_seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def test_run_seed_changes_validation_not_test():
    cfg = SplitConfig()
    s1, s2 = split_clients(LABELS, None, cfg, seed=1), split_clients(LABELS, None, cfg, seed=2)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(s1, s2))
    assert not all(np.array_equal(a.val, b.val) for a, b in zip(s1, s2))
    sizes = np.array([[len(s.train), len(s.val), len(s.test)] for s in s1]).sum(0) / len(LABELS)
    np.testing.assert_allclose(sizes, [0.64, 0.16, 0.20], atol=0.02)


def label_skew(clients) -> float:
    """Mean total-variation distance between client label distributions and the global one."""
    glob = np.bincount(LABELS, minlength=6) / len(LABELS)
    return float(np.mean([0.5 * np.abs(np.bincount(LABELS[c], minlength=6) / len(c) - glob).sum()
                          for c in clients]))


def test_skew_grows_as_alpha_shrinks():
    skews = [np.mean([label_skew(partition(LABELS, None, SplitConfig(alpha=a, split_seed=s))) for s in range(5)])
             for a in (100.0, 1.0, 0.1)]
    iid = label_skew(partition(LABELS, None, SplitConfig(kind="iid")))
    assert skews[0] < skews[1] < skews[2] and iid < skews[1], (iid, skews)


def test_natural_split_equals_groups():
    groups = np.random.default_rng(1).integers(0, 5, size=len(LABELS))
    clients = partition(LABELS, groups, SplitConfig(kind="natural", n_clients=5))
    for g, idx in enumerate(clients):
        assert np.array_equal(idx, np.flatnonzero(groups == g))


def test_min_samples_and_manifest():
    cfg = SplitConfig(alpha=0.3, min_samples=150)
    clients = partition(LABELS, None, cfg)
    assert min(map(len, clients)) >= 150
    manifest = split_manifest(split_clients(LABELS, None, cfg, 0), LABELS, 6, cfg, 0)
    assert sum(sum(c["train_class_counts"]) + sum(c["val_class_counts"]) + sum(c["test_class_counts"])
               for c in manifest["clients"]) == len(LABELS)


@pytest.mark.parametrize("settings,message", [
    (dict(alpha=0.0), "--alpha must be > 0"),
    (dict(alpha=-1.0), "--alpha must be > 0"),
    (dict(n_clients=0), "--n-clients must be >= 1"),
    (dict(test_frac=1.0), "must lie in"),
    (dict(kind="pathological"), "is unknown; valid: dirichlet, iid, natural"),
])
def test_invalid_split_settings_are_refused_when_the_flags_are_read(settings, message):
    with pytest.raises(UserError, match=message):
        SplitConfig(**settings)


@pytest.mark.parametrize("cfg,groups,message", [
    (SplitConfig(n_clients=5000), None, "exceeds the 3000 samples"),
    pytest.param(SplitConfig(n_clients=200, alpha=0.01, min_samples=10), None, "no Dirichlet draw", marks=pytest.mark.slow),
    (SplitConfig(kind="natural"), None, "needs a database with groups"),
    (SplitConfig(kind="natural", n_clients=3), np.zeros(3000, int), "has 1 groups"),
])
def test_impossible_splits_are_clear_errors(cfg, groups, message):
    with pytest.raises(UserError, match=message):
        partition(LABELS, groups, cfg)
