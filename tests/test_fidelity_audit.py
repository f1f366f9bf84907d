"""Fidelity metrics and the membership audit against hand-computed values and known extremes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import ROOT
from federated.audit import attack_metrics, canary_release, membership_audit
from federated.fidelity import (ReleaseEvalConfig, fidelity_report, frechet_distance, gaussian_gram, median_bandwidth,
                                mmd2_unbiased, pooled_distances, prdc_metrics, subsample)


def test_mmd2_unbiased_by_hand():
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    e = math.exp
    expected = e(-0.5) + e(-2) - 2 * (1 + e(-2) + 2 * e(-0.5)) / 4
    assert mmd2_unbiased(x, y, lambda a, b: gaussian_gram(a, b, 1.0)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_x, n_y", [(1, 1), (2, 3), (17, 40), (60, 61)])
def test_median_bandwidth_is_the_median_pairwise_distance(n_x, n_y):
    """Read off the whole pooled matrix, it is torch.median (the lower median) of the distinct pairs' distances."""
    g = torch.Generator().manual_seed(n_x + n_y)
    x, y = torch.randn(n_x, 5, generator=g), torch.randn(n_y, 5, generator=g) + 1
    d = pooled_distances(x, y)
    pairs = d[torch.triu_indices(len(d), len(d), 1).unbind()]
    assert median_bandwidth(d) == float(pairs.median())


def test_frechet_distance_by_hand():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])  # mean (1, 1), cov 4/3 I
    y = 2 * x + 1                                                         # mean (3, 3), cov 16/3 I
    # |mu_x - mu_y|^2 = 8; tr = 2 (4/3 + 16/3) - 2 * 2 * sqrt(64/9) = 8/3
    assert frechet_distance(x, y) == pytest.approx(8 + 8 / 3, abs=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_prdc_extremes():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=gen)
    same = prdc_metrics(real, real.clone(), nearest_k=5)
    assert same == pytest.approx({"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0})
    far = prdc_metrics(real, real + 100.0, nearest_k=5)
    assert far["precision"] == 0.0 and far["coverage"] == 0.0 and far["density"] == 0.0


@pytest.mark.parametrize("n, defined", [(6, False), (7, True)])
def test_prdc_is_nan_below_k_plus_two_records(n, defined):
    """k-th neighbour radii need k + 1 other records; a rare class of a small client must not crash."""
    gen = torch.Generator().manual_seed(0)
    out = prdc_metrics(torch.randn(n, 4, generator=gen), torch.randn(50, 4, generator=gen), nearest_k=5)
    assert all((v == v) == defined for v in out.values())


def test_fidelity_report_per_class_and_projection():
    gen = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat_interleave(60)
    real = torch.randn(180, 6, generator=gen) + 5 * torch.nn.functional.one_hot(y, 6).float()
    fake = torch.randn(180, 6, generator=gen) + 5 * torch.nn.functional.one_hot(y, 6).float()
    shuffled = fake[torch.randperm(180, generator=gen)]  # right marginal, wrong class pairing
    cfg = ReleaseEvalConfig(max_samples=100, max_per_class=40, projection_per_class=10)
    good = fidelity_report(real, y, fake, y, 3, cfg, torch.Generator().manual_seed(2))
    bad = fidelity_report(real, y, shuffled, y, 3, cfg, torch.Generator().manual_seed(2))
    assert [c["class"] for c in good["per_class"]] == [0, 1, 2]
    assert good["overall"]["n_real"] == 100 and good["per_class"][0]["n_real"] == 40
    for metric in ("frechet", "mmd2"):
        assert max(c[metric] for c in good["per_class"]) < min(c[metric] for c in bad["per_class"])
    assert len(good["projection"]["real"]["xy"]) == 30 and len(good["projection"]["real"]["xy"][0]) == 2


def test_attack_metrics_by_hand():
    assert attack_metrics(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == {"auc": 1.0, "tpr_at_0.01_fpr": 1.0}
    # pairs (member > non-member): only 2 > 1 of four; at FPR 0 no member is above both non-members
    assert attack_metrics(np.array([0.0, 2.0]), np.array([1.0, 3.0])) == {"auc": 0.25, "tpr_at_0.01_fpr": 0.0}


def population(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=gen) @ torch.randn(32, 32, generator=torch.Generator().manual_seed(99))


def test_audit_catches_a_copying_generator_and_not_an_independent_one():
    members, non_members, reference = population(800, 1), population(800, 2), population(800, 3)
    cfg = ReleaseEvalConfig(max_samples=800)
    copied = membership_audit(members, non_members, members.clone(), reference, cfg, torch.Generator().manual_seed(0))
    assert copied["dcr"]["auc"] == 1.0 and copied["dcr"]["tpr_at_0.01_fpr"] == 1.0
    assert copied["density_ratio"]["auc"] > 0.95
    fresh = membership_audit(members, non_members, population(3200, 4), reference, cfg, torch.Generator().manual_seed(0))
    for attack in ("dcr", "density_ratio"):
        assert abs(fresh[attack]["auc"] - 0.5) < 0.06, (attack, fresh[attack])
    # the chance level of unseen against held-out records: 0.5 for exchangeable splits, even for the copying
    # generator (it copies neither), and off 0.5 when the held-out split differs (no membership involved)
    assert abs(copied["null"]["dcr"]["auc"] - 0.5) < 0.06 and copied["null"]["n_per_side"] == 800
    shifted = membership_audit(members, non_members * 1.3, population(3200, 4), reference, cfg, torch.Generator().manual_seed(0))
    assert shifted["null"]["dcr"]["auc"] > 0.6


@pytest.mark.slow
def test_canary_a_generator_returning_its_training_records_plus_5pct_noise_is_detected():
    """The leak the old audit missed (DCR AUC 0.77, because it attacked a subsample of the release): on
    the embedded real database, a release = every training record + 5 % noise must score AUC >= 0.95,
    and every audit reports that canary's AUC as its power."""
    from data.database import load_database
    db = load_database(ROOT / "assets" / "organamnist_vits14_224")
    x = torch.from_numpy(db.embeddings)
    members, non_members, reference = (x[torch.from_numpy(db.source_split == k)] for k in range(3))
    leaking = canary_release(members, torch.Generator().manual_seed(7))
    report = membership_audit(members, non_members, leaking, reference, ReleaseEvalConfig(), torch.Generator().manual_seed(0))
    assert report["n_synthetic"] == len(members) > ReleaseEvalConfig().max_samples  # the whole release is attacked
    assert report["dcr"]["auc"] >= 0.95, report["dcr"]
    assert report["canary"]["dcr"]["auc"] >= 0.95 and report["canary"]["noise_std_fraction"] == 0.05
    # an independent release of the same population is not flagged, while the audit's power stays high
    # (thirds of one split: the official train and test splits differ slightly in distribution)
    fresh = membership_audit(members[0::3], members[1::3], members[2::3], reference,
                             ReleaseEvalConfig(), torch.Generator().manual_seed(0))
    assert abs(fresh["dcr"]["auc"] - 0.5) < 0.06 and fresh["canary"]["dcr"]["auc"] >= 0.95
    # the chance level: unseen reference records against held-out ones, neither in any release
    assert abs(report["null"]["dcr"]["auc"] - 0.5) < 0.06 and report["null"]["n_per_side"] > 0


def test_subsample_is_seeded_and_bounded():
    a = subsample(100, 10, torch.Generator().manual_seed(5))
    b = subsample(100, 10, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len(a) == 10 and len(set(a.tolist())) == 10
    assert torch.equal(subsample(4, 10, torch.Generator()), torch.arange(4))


def test_frechet_distance_equals_the_matrix_square_root_formula():
    from scipy import linalg
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    y = torch.randn(200, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen, dtype=torch.float64) + 1
    s_x, s_y = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    reference = (np.sum((x.numpy().mean(0) - y.numpy().mean(0)) ** 2) + np.trace(s_x) + np.trace(s_y)
                 - 2 * np.trace(linalg.sqrtm(s_x @ s_y).real))
    assert frechet_distance(x, y) == pytest.approx(reference, rel=1e-8)


def test_kde_log_density_is_sklearns_scott_kde_summed_exactly():
    """The density-ratio attack's KDE: sklearn's KernelDensity(bandwidth='scott') (a tree search, close to the
    sum inside the data cloud) and the definition, log mean_j N(x; s_j, h^2 I) with h = n^(-1/(d+4))."""
    from scipy.stats import multivariate_normal
    from sklearn.neighbors import KernelDensity
    from federated.audit import gaussian_kde_log_density
    gen = torch.Generator().manual_seed(0)
    data, x = torch.randn(300, 3, generator=gen, dtype=torch.float64), 0.5 * torch.randn(20, 3, generator=gen, dtype=torch.float64)
    ours = gaussian_kde_log_density(x, data, chunk=7).numpy()
    h = 300 ** (-1 / 7)
    direct = np.log([np.mean([multivariate_normal.pdf(p, mean=s, cov=h * h) for s in data.numpy()]) for p in x.numpy()])
    np.testing.assert_allclose(ours, direct, rtol=1e-10)
    np.testing.assert_allclose(ours, KernelDensity(bandwidth="scott").fit(data.numpy()).score_samples(x.numpy()), atol=1e-4)


@pytest.mark.parametrize("n_real, n_fake, shift", [(120, 90, 0.0), (80, 150, 0.7)])
def test_prdc_equals_the_prdc_package(n_real, n_fake, shift):
    """Ours reads one pooled distance matrix; the package computes its own three (sklearn, float32)."""
    import contextlib
    import io
    from prdc import compute_prdc
    gen = torch.Generator().manual_seed(n_real)
    real, fake = torch.randn(n_real, 6, generator=gen), torch.randn(n_fake, 6, generator=gen) * 1.3 + shift
    with contextlib.redirect_stdout(io.StringIO()):
        expected = compute_prdc(real.numpy(), fake.numpy(), 5)
    assert prdc_metrics(real, fake, nearest_k=5) == pytest.approx({k: float(v) for k, v in expected.items()}, abs=1e-12)
