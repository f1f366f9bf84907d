"""DP-Gauss (one-shot DP class statistics, federated/dpstats.py) and the balanced downstream recipe."""
from __future__ import annotations

import json
import math

import pytest
import torch

from federated import dpstats
from federated.solvers import SOLVERS
from tests.test_federated import results_of, strip_timing
from tests.test_privacy import run_dp


@pytest.mark.parametrize("case", range(20))
def test_the_released_sums_move_by_at_most_their_sensitivity_when_one_record_leaves(case):
    """Neighbouring datasets (one record removed), including records far outside the data: the
    centre sums differ by at most sqrt(3) in L2, the centred, clipped class statistics by at most their
    weights' sensitivity (2 at the default weights)."""
    gen = torch.Generator().manual_seed(case)
    n, d, k = 50, 8, 3
    x = torch.randn(n, d, generator=gen) * 5 + 3
    x[0] *= 1e4 if case % 2 else 1e-4  # an extreme norm
    y = torch.randint(0, k, (n,), generator=gen)
    centre = dpstats.centre_of(dpstats.centre_sums(x, 10.0), 10.0, 0.5 + case / 10)
    weights = dpstats.PartWeights() if case < 10 else dpstats.PartWeights(0.1 * case, (case % 3) / 2, 0.05 * case)
    drop = case % n
    keep = torch.arange(n) != drop
    pairs = ((dpstats.centre_sums(x, 10.0), dpstats.centre_sums(x[keep], 10.0), dpstats.CENTRE_SENSITIVITY),
             (dpstats.class_sums(x, y, centre, k, 10.0, weights),
              dpstats.class_sums(x[keep], y[keep], centre, k, 10.0, weights), weights.sensitivity))
    assert dpstats.PartWeights().sensitivity == 2.0
    for full, fewer, sensitivity in pairs:
        assert (full - fewer).norm() <= sensitivity + 1e-9
    v = dpstats.centred(x, centre)
    assert v.norm(dim=1).max() <= 1 + 1e-9


@pytest.mark.parametrize("weights", [dpstats.PartWeights(), dpstats.PartWeights(0.3, 0.0, 0.5)])
def test_the_class_statistics_sensitivity_is_reached_by_a_record_at_the_clip_radius(weights):
    """Not an overestimate either: a record clipped to |v| = 1 with its log-norm at the range's end moves the
    release by exactly the stated sensitivity."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen) + 4
    y = torch.randint(0, 2, (40,), generator=gen)
    centre = dpstats.centre_of(dpstats.centre_sums(x, 2.0), 2.0, 0.1)
    x[0] = -x[0] * 100  # opposite the centre (clipped to the unit ball) with a norm beyond e^2
    keep = torch.arange(40) != 0
    diff = dpstats.class_sums(x, y, centre, 2, 2.0, weights) - dpstats.class_sums(x[keep], y[keep], centre, 2, 2.0, weights)
    assert dpstats.centred(x[:1], centre).norm() == pytest.approx(1.0)
    assert float(diff.norm()) == pytest.approx(weights.sensitivity, rel=1e-9)


def test_weighted_parts_give_the_same_model_of_exact_statistics():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(300, 6, generator=gen) + 3, torch.randint(0, 3, (300,), generator=gen)
    centre = dpstats.centre_of(dpstats.centre_sums(x, 10.0), 10.0, 1.0)
    plain = dpstats.class_gaussians(dpstats.class_sums(x, y, centre, 3, 10.0), 3, 6, "lowrank", 3, 10.0, centre)
    weights = dpstats.PartWeights(0.2, 0.5, 0.3)
    weighted = dpstats.class_gaussians(dpstats.class_sums(x, y, centre, 3, 10.0, weights), 3, 6, "lowrank", 3, 10.0,
                                       centre, weights)
    for field in dpstats.FIELDS:
        assert torch.allclose(getattr(plain, field), getattr(weighted, field), atol=1e-9), field
    no_norms = dpstats.PartWeights(0.2, 0.0, 0.3)
    model = dpstats.class_gaussians(dpstats.class_sums(x, y, centre, 3, 10.0, no_norms), 3, 6, "lowrank", 3, 10.0,
                                    centre, no_norms)
    assert torch.allclose(model.means, plain.means, atol=1e-9)
    assert torch.equal(model.log_norms, torch.full((3,), centre.log_norm, dtype=torch.float64))


def test_the_model_of_exact_statistics_recovers_the_class_means():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 6, generator=gen) * 3 + 10
    y = torch.arange(3).repeat_interleave(400)
    x = means[y] + torch.randn(len(y), 6, generator=gen) * 0.3
    centre = dpstats.centre_of(dpstats.centre_sums(x, 10.0), 10.0, 2.0)
    for covariance in ("lowrank", "diagonal"):
        model = dpstats.class_gaussians(dpstats.class_sums(x, y, centre, 3, 10.0), 3, 6, covariance, 4, 10.0, centre)
        syn = dpstats.embeddings(model.sample(y, torch.Generator().manual_seed(1)), y, centre, model)
        for c in range(3):
            assert (syn[y == c].mean(0) - x[y == c].mean(0)).norm() < 0.05 * x[y == c].mean(0).norm(), covariance


@pytest.mark.parametrize("covariance", ["diagonal", "lowrank"])
def test_release_quality_measures_the_dp_means_error_and_signal(covariance):
    """Checked against the noise itself over many releases: s^2 / effective_records is the DP mean's error
    per coordinate plus s^2 / n_c, and signal_to_noise estimates |exact model mean|^2 / expected noise; without
    noise a class is worth its own records."""
    gen = torch.Generator().manual_seed(5)
    n, d, k = 600, 12, 3
    y = torch.arange(n) % k
    x = torch.randn(n, d, generator=gen) * 0.5 + 4 + 2 * torch.nn.functional.one_hot(y, d).double()[:, :d].float()
    centre = dpstats.centre_of(dpstats.centre_sums(x, 10.0), 10.0, 1.0)
    sums = dpstats.class_sums(x, y, centre, k, 10.0)
    exact = dpstats.class_gaussians(sums, k, d, covariance, 4, 10.0, centre)
    clean = dpstats.release_quality(exact, 0.0)
    assert clean["effective_records"] == pytest.approx([n / k] * k) and clean["signal_to_noise"] is None
    std = 12.0  # per coordinate of a pooled class sum: tau = 0.06 against class means of norm ~0.5
    errors, snrs, effective = [], [], []
    for _ in range(200):
        noised = sums + std * torch.randn(sums.shape, generator=gen, dtype=torch.float64)
        model = dpstats.class_gaussians(noised, k, d, covariance, 4, 10.0, centre)
        errors.append((model.class_means - exact.class_means).pow(2).mean(1))
        quality = dpstats.release_quality(model, std)
        snrs.append(torch.tensor(quality["signal_to_noise"]))
        effective.append(torch.tensor(quality["effective_records"]))
    error, s2 = torch.stack(errors).mean(0), exact.covariance().diagonal().mean()
    assert float(exact.variance()) == pytest.approx(float(s2), rel=1e-9)  # without forming the D x D matrix
    assert (s2 / torch.stack(effective).mean(0)).tolist() == pytest.approx((s2 / (n / k) + error).tolist(), rel=0.15)
    dims = d if covariance == "diagonal" else 4
    truth = exact.means.pow(2).sum(1) / (dims * (std / (n / k)) ** 2)
    assert torch.stack(snrs).mean(0).tolist() == pytest.approx(truth.tolist(), rel=0.25)
    assert truth.min() > 2  # a signal to find, so the estimate is not 0 by the clamp


def test_a_clients_local_model_has_its_own_within_class_covariance_and_the_projected_dp_means():
    gen = torch.Generator().manual_seed(2)
    d = 6
    means = torch.randn(3, d, generator=gen) * 3 + 10
    shape = torch.randn(d, d, generator=gen) * 0.2  # a within-class covariance far from isotropic
    y = torch.arange(3).repeat_interleave(3000)
    x = means[y] + torch.randn(len(y), d, generator=gen) @ shape.T
    centre = dpstats.centre_of(dpstats.centre_sums(x, 10.0), 10.0, 4.0)
    shared = dpstats.class_gaussians(dpstats.class_sums(x, y, centre, 3, 10.0), 3, d, "lowrank", 2, 10.0, centre)
    assert not torch.allclose(shared.means, shared.class_means, atol=1e-3)  # the unprojected means are kept too
    v = dpstats.centred(x, centre)
    local = dpstats.local_gaussians(x, y, centre, shared, d)  # all directions: the DP means unprojected
    assert torch.allclose(local.means, shared.class_means, atol=1e-9)
    draws = local.sample(y, torch.Generator().manual_seed(3))
    for c in range(3):
        r, real = draws[y == c], v[y == c]
        assert (r.mean(0) - real.mean(0)).norm() < 0.05 * real.std(0).norm()
    within = lambda z: torch.cov(torch.cat([z[y == c] - z[y == c].mean(0) for c in range(3)]).T)  # noqa: E731
    assert torch.allclose(within(draws), within(v), atol=0.05 * float(within(v).diagonal().max()))
    # the shared model's rank-2 covariance cannot match it; fewer local directions project the means
    assert not torch.allclose(within(shared.sample(y, torch.Generator().manual_seed(3))), within(v),
                              atol=0.05 * float(within(v).diagonal().max()))
    two = dpstats.local_gaussians(x, y, centre, shared, 2)
    assert torch.linalg.matrix_rank(two.means - two.means.mean(0)) <= 2
    # the blend: w = 1 draws with the shared covariance, w = 0.5 halfway between the two
    cov = lambda m: m.basis @ m.chol @ m.chol.T @ m.basis.T  # noqa: E731  (full-rank local models: no rest)
    torch.testing.assert_close(cov(dpstats.local_gaussians(x, y, centre, shared, d, shared_weight=1.0)),
                               shared.covariance())
    half = cov(dpstats.local_gaussians(x, y, centre, shared, d, shared_weight=0.5))
    torch.testing.assert_close(half, (cov(local) + shared.covariance()) / 2)
    draws = shared.sample(torch.zeros(200_000, dtype=torch.long), torch.Generator().manual_seed(4))
    torch.testing.assert_close(torch.cov(draws.T), shared.covariance(), atol=0.02 * float(shared.covariance().max()),
                               rtol=0)  # covariance() is what sample() draws from


def test_local_covariance_changes_only_the_clients_training_data_never_a_release_or_its_evaluation(tiny_db, tmp_path,
                                                                                                    monkeypatch):
    from federated.channel import Channel
    seen: dict[str, list] = {"a": [], "b": []}
    original = Channel.deliver
    target = []

    def spy(self, client_id, kind, payload):
        target[-1].append((client_id, kind, {k: v.clone() for k, v in payload.items() if isinstance(v, torch.Tensor)}))
        return original(self, client_id, kind, payload)
    monkeypatch.setattr(Channel, "deliver", spy)
    from federated.methods.dpgauss import DPGauss
    trained_on: dict[str, list] = {"a": [], "b": []}
    local = DPGauss.sample_local
    monkeypatch.setattr(DPGauss, "sample_local", lambda self, i, y, gen: trained_on[name].append(local(self, i, y, gen))
                        or trained_on[name][-1])
    for name, extra in (("a", ()), ("b", ("--local-covariance", "--local-dims", "4"))):
        target.append(seen[name])
        run_dp(tiny_db, tmp_path / name, "--method", "dpgauss", *extra)
    assert len(seen["a"]) == len(seen["b"]) > 0
    for (ia, ka, pa), (ib, kb, pb) in zip(seen["a"], seen["b"]):
        assert (ia, ka, sorted(pa)) == (ib, kb, sorted(pb)) and all(torch.equal(pa[k], pb[k]) for k in pa)
    a, b = results_of(tmp_path / "a", "dpgauss"), results_of(tmp_path / "b", "dpgauss")
    assert a["privacy"] == b["privacy"] and a["fidelity"] == b["fidelity"] and a["audit"] == b["audit"]
    assert len(trained_on["a"]) == len(trained_on["b"]) > 0  # what the clients trained on did change
    assert all(ta.shape == tb.shape and not torch.equal(ta, tb) for ta, tb in zip(trained_on["a"], trained_on["b"]))


@pytest.mark.parametrize("preset", [(), ("--preset", "dp-tuned-sums")])  # default weights, and the weighted parts
def test_accounting_recomputed_and_only_noised_releases_cross(tiny_db, tmp_path, monkeypatch, preset):
    from opacus.accountants import PRVAccountant
    from federated.channel import Channel
    seen = []
    original = Channel.deliver

    def spy(self, client_id, kind, payload):
        seen.append((client_id, kind, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in payload.items()}))
        return original(self, client_id, kind, payload)
    monkeypatch.setattr(Channel, "deliver", spy)
    run_dp(tiny_db, tmp_path / "r", "--method", "dpgauss", "--accountant", "prv", *preset)
    res = results_of(tmp_path / "r", "dpgauss")
    privacy = res["privacy"]
    assert privacy["epsilon_spent_max"] <= 1.0 and privacy["epsilon_spent_max"] > 0.95
    for c in privacy["clients"]:
        assert [r["what"] for r in c["releases"]] == ["n_train", "centre", "class_stats"] and c["steps"] == 0
        acc = PRVAccountant()  # a fresh accountant, from the recorded history alone
        for sigma, q, steps in c["history"]:
            for _ in range(steps):
                acc.step(noise_multiplier=sigma, sample_rate=q)
        assert acc.get_epsilon(delta=1e-4) <= 1.0
        assert c["epsilon_spent"] == pytest.approx(acc.get_epsilon(delta=1e-4), rel=1e-6)
    assert {kind for _, kind, _ in seen} == {"size", "release", "final"}
    centres = [p["centre"] for _, kind, p in seen if kind == "release" and "centre" in p]
    assert len(centres) == 3
    from data.database import load_database
    from federated.clients import build_clients
    from federated.config import parse_args, split_config
    from tests.test_federated import FAST
    db = load_database(tiny_db)
    clients = build_clients(db, split_config(parse_args(["--db", str(tiny_db), *FAST])), 1, torch.device("cpu"))
    for c, sent in zip(clients, centres):  # what crossed is the noised sum, never the exact one
        exact = dpstats.centre_sums(c.x_train, 10.0)
        assert (sent - exact).norm() > 1.0
    # the class statistics crossed with noise of std sigma x the sensitivity of their part weights
    centre = dpstats.centre_of(sum(centres), 10.0, 0.5 if preset else 1.5)  # as the server pools them
    assert centre.radius == pytest.approx(res["dpgauss"]["clip_radius"])
    weights = dpstats.PartWeights(0.1, 0.0, 0.5) if preset else dpstats.PartWeights()
    assert res["dpgauss"]["stats_sensitivity"] == pytest.approx(weights.sensitivity)
    stats = [p["class_stats"] for _, kind, p in seen if kind == "release" and "class_stats" in p]
    k = int(db.labels.max()) + 1
    for c, sent in zip(clients, stats):
        noise = sent - dpstats.class_sums(c.x_train, c.y_train, centre, k, 10.0, weights)
        assert float(noise.std()) == pytest.approx(res["dpgauss"]["stats_noise_multiplier"] * weights.sensitivity, rel=0.2)
    assert res["rounds"] == 0 and "dpgauss" in res and res["fidelity"]["tstr"]["bacc"] > 0
    quality = res["dpgauss"]["release_quality"]  # the noise's toll, reported: fewer effective records than real ones
    assert len(quality["effective_records"]) == len(quality["signal_to_noise"]) == k
    real = torch.bincount(torch.cat([c.y_train for c in clients]), minlength=k)
    assert all(e < int(r) for e, r in zip(quality["effective_records"], real) if r > 0)


def test_same_seed_same_results_and_no_dp_reports_no_epsilon(tiny_db, tmp_path):
    run_dp(tiny_db, tmp_path / "a", "--method", "dpgauss")
    run_dp(tiny_db, tmp_path / "b", "--method", "dpgauss")
    a, b = results_of(tmp_path / "a", "dpgauss"), results_of(tmp_path / "b", "dpgauss")
    assert json.dumps(strip_timing(a)) == json.dumps(strip_timing(b))
    run_dp(tiny_db, tmp_path / "c", "--method", "dpgauss", "--no-dp")
    assert results_of(tmp_path / "c", "dpgauss")["privacy"]["epsilon_spent_max"] is None


def test_a_run_killed_after_its_release_leaves_no_results_and_reruns_to_the_same_file(tiny_db, tmp_path, monkeypatch):
    """A one-shot method has no round to checkpoint: killed in its final phase (after the release), it leaves
    neither results.json nor a lock, and the rerun (the same seeded release) writes the uninterrupted run's file."""
    from federated.methods import anonymizer
    run_dp(tiny_db, tmp_path / "full", "--method", "dpgauss")
    original = anonymizer.fit_downstream

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(anonymizer, "fit_downstream", killed)
    with pytest.raises(KeyboardInterrupt):
        run_dp(tiny_db, tmp_path / "resumed", "--method", "dpgauss")
    run_dir = next((tmp_path / "resumed").glob("toy/dpgauss/*/seed=1"))
    assert not (run_dir / "results.json").exists() and not list(run_dir.glob("*.lock"))
    monkeypatch.setattr(anonymizer, "fit_downstream", original)
    run_dp(tiny_db, tmp_path / "resumed", "--method", "dpgauss")
    a, b = results_of(tmp_path / "full", "dpgauss"), results_of(tmp_path / "resumed", "dpgauss")
    assert json.dumps(strip_timing(a)) == json.dumps(strip_timing(b))


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_the_balanced_recipe_solves_scikit_learns_problem_and_chooses_c_on_validation(solver):
    from sklearn.linear_model import LogisticRegression
    from federated.training import downstream_default, fit_balanced, predict_proba
    import dataclasses
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 5, generator=gen) * 2
    y = torch.cat([torch.zeros(200), torch.ones(30), torch.full((10,), 2)]).long()
    x = centres[y] + torch.randn(len(y), 5, generator=gen) + 4
    cfg = dataclasses.replace(downstream_default(), recipe="balanced", c_grid=(3.0,), solver=solver)
    model = fit_balanced(x, y, x, y, 3, cfg)
    xs = torch.nn.functional.normalize(x.double(), dim=1).numpy()
    ref = LogisticRegression(C=3.0, class_weight="balanced", tol=1e-10, max_iter=10_000).fit(xs, y.numpy())
    assert torch.allclose(predict_proba(model, x).double(), torch.from_numpy(ref.predict_proba(xs)), atol=2e-3)
    # validation data that only a nearly unregularised model fits well picks the largest C
    wide = dataclasses.replace(cfg, c_grid=(1e-3, 1e3))
    picked = fit_balanced(x, y, x, y, 3, wide)
    assert picked.weight.norm() > fit_balanced(x, y, x, y, 3, dataclasses.replace(cfg, c_grid=(1e-3,))).weight.norm()
    assert math.isclose(float(predict_proba(model, x).sum(1).mean()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("c", [100.0, 1000.0])
def test_the_preconditioned_solver_gets_closer_to_the_optimum_of_a_weakly_penalised_ill_conditioned_fit(c):
    """Anisotropic features and a weak penalty: the plain L-BFGS stops (by its tolerances) well short of
    scikit-learn's optimum; the same problem in whitened coordinates reaches it."""
    from sklearn.linear_model import LogisticRegression
    from federated.training import downstream_default, fit_balanced, predict_proba
    import dataclasses
    gen = torch.Generator().manual_seed(4)
    mixing = torch.randn(24, 24, generator=gen) * torch.logspace(0, -2.5, 24)
    y = torch.cat([torch.full((n,), k) for k, n in enumerate((150, 60, 30, 12))])
    x = (torch.randn(4, 24, generator=gen) * 0.6)[y] + torch.randn(len(y), 24, generator=gen) @ mixing + 3
    xs = torch.nn.functional.normalize(x.double(), dim=1).numpy()
    optimum = torch.from_numpy(LogisticRegression(C=c, class_weight="balanced", tol=1e-12, max_iter=100_000)
                               .fit(xs, y.numpy()).predict_proba(xs))
    gaps = {}
    for solver in SOLVERS:
        cfg = dataclasses.replace(downstream_default(), recipe="balanced", c_grid=(c,), max_iter=150, solver=solver)
        model = fit_balanced(x, y, x, y, 4, cfg)
        gaps[solver] = float((predict_proba(model, x).double() - optimum).abs().max())
        assert model.chosen["reached_max_iter"] is False
    assert gaps["preconditioned"] < 5e-4 and gaps["preconditioned"] < gaps["lbfgs"] / 5


def test_another_solver_needs_the_balanced_recipe_and_gets_its_own_run_folder(tiny_db, tmp_path):
    from data.io import UserError
    from federated.training import ClassifierConfig
    from tests.test_federated import run_train
    with pytest.raises(UserError, match="--downstream-solver preconditioned: only the balanced recipe"):
        ClassifierConfig(solver="preconditioned")
    with pytest.raises(UserError, match="--downstream-solver 'newton' is unknown; valid: lbfgs, preconditioned"):
        ClassifierConfig(recipe="balanced", solver="newton")
    run_train(tiny_db, tmp_path / "r", "--method", "local", "--preset", "balanced", "--downstream-solver", "preconditioned")
    [folder] = [p.parent.parent.name for p in (tmp_path / "r").rglob("results.json")]
    assert folder.endswith("_balanced_preconditioned")


def test_the_balanced_recipe_says_whether_its_chosen_fit_stopped_at_the_iteration_limit():
    """model.chosen counts the chosen fit's L-BFGS iterations and flags a fit cut off by --downstream-max-iter
    (not converged), as against one a tolerance stopped."""
    from federated.training import downstream_default, fit_balanced
    import dataclasses
    gen = torch.Generator().manual_seed(3)
    y = torch.arange(3).repeat(40)
    x = torch.randn(3, 8, generator=gen)[y] + torch.randn(len(y), 8, generator=gen)
    cfg = dataclasses.replace(downstream_default(), recipe="balanced", c_grid=(1.0,))
    cut = fit_balanced(x, y, x, y, 3, dataclasses.replace(cfg, max_iter=4)).chosen  # or its 5 evaluations
    assert 1 <= cut["lbfgs_iterations"] <= 4 and cut["reached_max_iter"] is True
    done = fit_balanced(x, y, x, y, 3, dataclasses.replace(cfg, max_iter=2000)).chosen
    assert 2 < done["lbfgs_iterations"] < 2000 and done["reached_max_iter"] is False


def test_the_balanced_recipe_weighs_synthetic_records_by_validation():
    from federated.training import downstream_default, fit_balanced, predict_proba
    import dataclasses
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 6, generator=gen) * 3
    y = torch.cat([torch.zeros(100), torch.ones(100)]).long()  # class 2 is absent from the real data
    x = centres[y] + torch.randn(len(y), 6, generator=gen) + 5
    y_syn = torch.full((60,), 2)
    x_syn = centres[y_syn] + torch.randn(60, 6, generator=gen) + 5
    cfg = dataclasses.replace(downstream_default(), recipe="balanced", c_grid=(10.0,), synthetic_weights=(0.0,))
    # weight 0: exactly the real data alone, and the synthetic-only class is never predicted
    alone = fit_balanced(x, y, x, y, 3, cfg)
    zero = fit_balanced(x, y, x, y, 3, cfg, synthetic=(x_syn, y_syn))
    assert torch.allclose(predict_proba(zero, x_syn), predict_proba(alone, x_syn), atol=1e-5)
    assert (predict_proba(zero, x_syn).argmax(1) != 2).all() and zero.chosen["synthetic_weight"] == 0.0
    # validation data holding class 2 picks a positive weight, and the model then predicts it
    x_val, y_val = torch.cat([x, x_syn]), torch.cat([y, y_syn])
    picked = fit_balanced(x, y, x_val, y_val, 3, dataclasses.replace(cfg, synthetic_weights=(0.0, 0.5)),
                          synthetic=(x_syn, y_syn))
    assert picked.chosen["synthetic_weight"] == 0.5 and picked.chosen["val_bacc"] > 0.9
    assert (predict_proba(picked, x_syn).argmax(1) == 2).float().mean() > 0.9
    # validation without class 2 gains nothing from it: the grid's order does not matter, w = 0 is kept
    tied = fit_balanced(x, y, x, y, 3, dataclasses.replace(cfg, synthetic_weights=(0.5, 0.0)), synthetic=(x_syn, y_syn))
    assert tied.chosen["synthetic_weight"] == 0.0


def test_per_class_synthetic_scales_weigh_each_class_as_a_fixed_weight_would():
    """A synthetic_scale of s_c is the same fit as the fixed weight w s_c when one class is synthesised (the
    weight is per record, so a uniform scale is a plain weight); scales of 1 change nothing."""
    from federated.training import downstream_default, fit_balanced
    import dataclasses
    gen = torch.Generator().manual_seed(2)
    centres = torch.randn(3, 6, generator=gen) * 2
    y = torch.cat([torch.zeros(80), torch.ones(80), torch.full((10,), 2)]).long()
    x = centres[y] + torch.randn(len(y), 6, generator=gen) + 3
    y_syn = torch.full((40,), 2)
    x_syn = centres[y_syn] + torch.randn(40, 6, generator=gen) + 3
    cfg = dataclasses.replace(downstream_default(), recipe="balanced", c_grid=(10.0,), synthetic_weights=(0.2,))
    fixed = fit_balanced(x, y, x, y, 3, cfg, synthetic=(x_syn, y_syn))
    ones = fit_balanced(x, y, x, y, 3, cfg, synthetic=(x_syn, y_syn), synthetic_scale=torch.ones(3))
    assert torch.equal(fixed.weight, ones.weight) and torch.equal(fixed.bias, ones.bias)
    scaled = fit_balanced(x, y, x, y, 3, cfg, synthetic=(x_syn, y_syn), synthetic_scale=torch.tensor([9.0, 9.0, 2.5]))
    heavier = fit_balanced(x, y, x, y, 3, dataclasses.replace(cfg, synthetic_weights=(0.5,)), synthetic=(x_syn, y_syn))
    assert torch.allclose(scaled.weight, heavier.weight, atol=1e-5) and not torch.allclose(scaled.weight, fixed.weight)


def test_effective_synthetic_mass_gives_each_class_w_times_its_effective_records(tiny_db, tmp_path, monkeypatch):
    """--synthetic-mass effective: a class's synthetic records weigh W x release_quality's effective records in
    all (scale x count = effective records), from the DP release alone; it refuses the papers' recipe."""
    from federated.methods import dpgauss
    seen = []
    original = dpgauss.DPGauss.synthetic_scale

    def spy(self, i, y):
        scale = original(self, i, y)
        seen.append((scale, torch.bincount(y.cpu(), minlength=self.ctx.n_classes),
                     dpstats.release_quality(self.model, self.pooled_noise_std())["effective_records"]))
        return scale
    monkeypatch.setattr(dpgauss.DPGauss, "synthetic_scale", spy)
    run_dp(tiny_db, tmp_path / "r", "--method", "dpgauss", "--preset", "dp-tuned-ess")
    assert seen and results_of(tmp_path / "r", "dpgauss")["privacy"]["epsilon_spent_max"] <= 1.0
    for scale, counts, effective in seen:
        has = counts > 0
        assert torch.allclose((scale * counts)[has], torch.tensor(effective, dtype=scale.dtype)[has])
    from data.io import UserError
    with pytest.raises(UserError, match="balanced recipe"):
        run_dp(tiny_db, tmp_path / "p", "--method", "dpgauss", "--synthetic-mass", "effective")


def test_the_noise_probe_rebuilds_a_run_and_scores_each_noised_part(tiny_db, tmp_path):
    import importlib.util
    from pathlib import Path
    from data.io import UserError
    spec = importlib.util.spec_from_file_location("probe", Path(__file__).parent.parent / "experiments" / "dpgauss_noise_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    run_dp(tiny_db, tmp_path / "r", "--method", "dpgauss")
    run = next((tmp_path / "r").rglob("results.json")).parent
    out = probe.probe(run, None, 0)
    assert set(out["tstr_val_bacc"]) == {"none", "all", "rows", "second"}
    assert all(0 <= v <= 1 for v in out["tstr_val_bacc"].values()) and out["tstr_val_bacc"]["none"] > 0.5
    assert out == probe.probe(run, None, 0)  # the noise seed fixes it
    run_dp(tiny_db, tmp_path / "n", "--method", "dpgauss", "--no-dp")
    with pytest.raises(UserError, match="not a DP-Gauss run with DP"):
        probe.probe(next((tmp_path / "n").rglob("results.json")).parent, None, 0)


@pytest.mark.parametrize("policy", ["fill", "reference", "uniform"])
def test_present_synthesises_only_the_classes_a_client_has_and_all_keeps_the_papers_counts(policy):
    from federated.methods.anonymizer import SynthesisConfig, synthetic_counts
    counts = torch.tensor([50, 0, 3, 0, 20])
    papers = synthetic_counts(counts, SynthesisConfig(policy=policy, per_class=7))
    present = synthetic_counts(counts, SynthesisConfig(policy=policy, per_class=7, classes="present"))
    assert torch.equal(present, torch.where(counts > 0, papers, 0))
    expected = {"fill": [0, 50, 47, 50, 30], "reference": [50, 0, 3, 0, 20], "uniform": [7] * 5}[policy]
    assert papers.tolist() == expected


def test_pooled_local_means_weigh_the_dp_mean_and_the_clients_own_by_their_variances():
    import dataclasses
    gen = torch.Generator().manual_seed(4)
    d, n = 12, 2000
    means = torch.randn(3, d, generator=gen) * 3 + 10
    y = torch.cat([torch.zeros(n), torch.ones(n)]).long()  # class 2: no record on this client
    x = means[y] + torch.randn(len(y), d, generator=gen) * 0.5
    centre = dpstats.centre_of(dpstats.centre_sums(x, 10.0), 10.0, 4.0)
    v = dpstats.centred(x, centre)
    own = torch.stack([v[y == c].mean(0) for c in range(2)])
    exact = dpstats.class_gaussians(dpstats.class_sums(x, y, centre, 3, 10.0), 3, d, "lowrank", 4, 10.0, centre)
    noisy = dataclasses.replace(exact, class_means=exact.class_means + 0.3 * torch.randn(3, d, generator=gen,
                                                                                       dtype=torch.float64))
    plain = dpstats.local_gaussians(x, y, centre, noisy, d // 2)
    pooled = dpstats.local_gaussians(x, y, centre, noisy, d // 2, pool_means=True)
    top = torch.linalg.eigh(v.T @ v)[1][:, -d // 2:]

    def top_err(model):  # distance to the client's own class means, in the directions the model keeps
        return (model.means[:2] - own @ top @ top.T).norm(dim=1)
    # 2000 own records per class outweigh noise 0.3 per coordinate: the pooled means sit on the client's own
    assert (top_err(pooled) < 0.2 * top_err(plain)).all()
    assert torch.allclose(pooled.means[2], plain.means[2])  # a class the client lacks keeps the DP mean
