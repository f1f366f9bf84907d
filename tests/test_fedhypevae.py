"""FedHypeVAE: row-scaled generation, per-record clipping through the hypernetwork, MMD, the code
bound, what crosses the channel, the privacy ledger (training + statistics) and determinism."""
from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import RDPAccountant

from federated.privacy import clip_and_sum, clipped_grad_sum, per_sample_grads_vmap
from federated.fidelity import mmd2_unbiased
from models.hypervae import HyperClient, HyperNetwork, SquaredDistance, gaussian_kernel
from tests.test_federated import results_of, strip_timing
from tests.test_privacy import DP_FAST, run_interrupted_then_resumed
import train

HV_FAST = [*DP_FAST, "--method", "fedhypevae", "--code-dim", "3", "--hyper-hidden", "8", "--prior-hidden", "8",
           "--label-dim", "2", "--mmd-samples", "2", "--meta-steps", "20", "--meta-samples", "8", "--stats-clip", "30"]
KW = dict(beta=0.1, lambda_mmd=1.0, bandwidths=(0.5, 1.0))


def tiny_client(seed=0):
    torch.manual_seed(seed)
    m = HyperClient(6, 3, latent=4, hidden=8, code_dim=3, hyper_hidden=5, prior_hidden=5, label_dim=2, depth=2)
    with torch.no_grad():
        m.code.weight.normal_()
        m.hyper.h_theta[-1].weight.mul_(3)  # row scales clearly away from 1
    return m


def test_row_scaled_decoder_equals_explicit_linear_with_diag_d_times_W():
    m = tiny_client()
    hyper = m.hyper
    z, y = torch.randn(7, 4), torch.randint(3, (7,))
    scales, shifts = hyper.modulation(m.code(7))
    out = hyper.decode(z, y, scales, shifts)
    h = torch.cat([z, torch.nn.functional.one_hot(y, 3).float()], -1)
    for layer, (base, bias) in enumerate(zip(hyper.base, hyper.base_bias)):
        d, db = scales[layer][0], shifts[layer][0]
        explicit = torch.nn.Linear(base.in_features, base.out_features)
        with torch.no_grad():
            explicit.weight.copy_(torch.diag(d) @ base.weight)
            explicit.bias.copy_(bias.bias + db)
        h = explicit(h)
        if layer < len(hyper.base) - 1:
            h = torch.relu(h)
    assert not torch.allclose(scales[0], torch.ones_like(scales[0]))
    torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-6)


class Wrap(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, y, e, z):
        return self.m.per_sample_loss(x, y, e, z, **KW)


def test_per_record_clipping_through_the_hypernetwork_equals_vmap():
    m = tiny_client()
    x, y, eps, zeta = torch.randn(5, 6) * 2, torch.randint(3, (5,)), torch.randn(5, 4), torch.randn(5, 3, 4)
    fast, norms = clipped_grad_sum(m, lambda: m.per_sample_loss(x, y, eps, zeta, **KW), 15.0)
    per_sample = per_sample_grads_vmap(Wrap(m), lambda f, *s: f(*s).sum(), x, y, eps, zeta)
    reference, ref_norms = clip_and_sum({k[2:]: v for k, v in per_sample.items()}, 15.0)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-5)
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-4, atol=1e-5)
    assert {n.split(".")[0] for n in fast} == {"encoder", "code", "hyper"}
    assert (norms > 15.0).any() and (norms < 15.0).any()


def test_stacked_clients_clip_through_the_hypernetwork_as_each_client_alone():
    from federated.methods.dpsgd import pad_records
    from federated.privacy import clipped_grad_sums_stacked
    from models.stacked import select_first, stack_modules
    models = [tiny_client(seed) for seed in range(3)]
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(n, 6, generator=g) * 2, torch.randint(3, (n,), generator=g), torch.randn(n, 4, generator=g),
                torch.randn(n, 3, 4, generator=g)) for n in (6, 2, 0)]  # uneven, one empty batch
    alone = [clipped_grad_sum(m, lambda m=m, b=b: m.per_sample_loss(*b, **KW), 15.0) if len(b[0]) else None
             for m, b in zip(models, batches)]
    stacked = stack_modules(models)
    assert {type(m).__name__ for m in stacked.modules()} >= {"StackedLinear", "StackedRowBias", "StackedRowParameter"}
    for active in (3, 2):  # all copies, then the first two only (the third has no step left)
        select_first(stacked, None if active == 3 else active)
        padded, mask = pad_records(batches[:active], torch.device("cpu"))
        sums, norms = clipped_grad_sums_stacked(stacked, lambda: stacked.per_sample_loss(*padded, **KW), mask, 15.0)
        assert all(s.shape[0] == active for s in sums.values())
        for k, ref in enumerate(alone[:active]):
            for name, p in models[k].named_parameters():
                expected = torch.zeros_like(p) if ref is None else ref[0][name]
                torch.testing.assert_close(sums[name][k], expected, rtol=1e-4, atol=1e-5)
            if ref is not None:
                torch.testing.assert_close(norms[k, :len(ref[1])], ref[1], rtol=1e-5, atol=1e-6)
    assert (alone[0][1] > 15.0).any() and (alone[0][1] < 15.0).any()  # clipping active for some records only


def test_one_outlier_record_moves_the_hypernetwork_update_by_at_most_C():
    m = tiny_client()
    x, y, eps, zeta = torch.randn(6, 6), torch.randint(3, (6,)), torch.randn(6, 4), torch.randn(6, 2, 4)
    base, _ = clipped_grad_sum(m, lambda: m.per_sample_loss(x, y, eps, zeta, **KW), 1.5)
    x_out = x.clone()
    x_out[2] = 1e3
    moved, norms = clipped_grad_sum(m, lambda: m.per_sample_loss(x_out, y, eps, zeta, **KW), 1.5)
    assert norms[2] > 100
    diff = torch.sqrt(sum((moved[k] - base[k]).pow(2).sum() for k in base))
    assert diff <= 2 * 1.5 + 1e-4


def test_mmd_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    def kernel(x, y):  # the model's multi-bandwidth kernel (its MMD loss term), as a Gram matrix
        return gaussian_kernel(x[:, None], y[None], (0.5, 1.0, 2.0))
    same = mmd2_unbiased(a, b, kernel)
    shifted = mmd2_unbiased(a, b + 1.0, kernel)
    assert abs(same) < 0.005 and shifted > 0.05, (same, shifted)


@pytest.mark.parametrize("pairs", ["within", "across"])
def test_squared_distance_has_autograds_floats_forward_and_backward(pairs):
    # the MMD's (B, K, K, D) differences: the same floats as (a - b).pow(2).sum(-1) under autograd, to the bit
    g = torch.Generator().manual_seed(0)
    generated, x = torch.randn(7, 4, 33, generator=g), torch.randn(7, 33, generator=g)
    weights = torch.randn(7, 4, 4, generator=g) if pairs == "within" else torch.randn(7, 4, generator=g)
    results = []
    for distance in (lambda a, b: (a - b).pow(2).sum(-1), lambda a, b: SquaredDistance.apply(a, b)[0]):
        gen, xs = generated.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = (gen[:, :, None], gen[:, None]) if pairs == "within" else (xs[:, None], gen)
        sq = distance(a, b)
        (torch.exp(-sq / 50) * weights).sum().backward()
        results.append((sq.detach(), gen.grad, xs.grad))
    (sq0, gen0, x0), (sq1, gen1, x1) = results
    assert torch.equal(sq0, sq1) and torch.equal(gen0, gen1)
    assert (x0 is None and x1 is None) if pairs == "within" else torch.equal(x0, x1)
    assert gen0.abs().sum() > 0


def run_hv(db, out, *extra, seeds=("1",)):
    args = train.parse_args(["--db", str(db), "--out", str(out), *HV_FAST, "--seeds", *seeds, *extra])
    assert train.main(args) == 0


@pytest.mark.slow
def test_codes_and_encoders_stay_on_the_client_and_codes_stay_bounded(tiny_db, tmp_path, monkeypatch):
    from federated.channel import Channel
    from federated.methods.fedhypevae import FedHypeVAE
    seen, codes = [], []
    original_send, original_train = Channel.deliver, FedHypeVAE.local_train

    def spy(self, client_id, kind, payload):
        if kind != "final":
            seen.append({k: v.detach().clone() for k, v in payload.items()})
        return original_send(self, client_id, kind, payload)

    def train_and_check(self, i, rnd):
        out = original_train(self, i, rnd)
        codes.append(self.models[i].code.weight.detach().clone())
        return out
    monkeypatch.setattr(Channel, "deliver", spy)
    monkeypatch.setattr(FedHypeVAE, "local_train", train_and_check)
    run_hv(tiny_db, tmp_path / "r", "--code-radius", "0.5")
    hyper_keys = set(HyperNetwork(16, 4, 8, 32, 3, 3, 8, 8, 2).state_dict())
    for payload in seen:
        assert set(payload) in ({"size"}, {"class_stats"}, hyper_keys), set(payload)
        for t in payload.values():
            for code in codes:
                assert t.shape != code.shape or not torch.allclose(t, code)
    assert sum(set(p) == hyper_keys for p in seen) == 2 * 3
    assert codes and all(c.norm() <= 0.5 + 1e-5 for c in codes)


@pytest.mark.slow
def test_spent_epsilon_covers_training_and_statistics(tiny_db, tmp_path):
    run_hv(tiny_db, tmp_path / "r", "--epsilon", "2.0")
    res = results_of(tmp_path / "r", "fedhypevae")
    privacy = res["privacy"]
    assert privacy["epsilon_spent_max"] <= 2.0
    for c in privacy["clients"]:
        assert [r["what"] for r in c["releases"]] == ["n_train", "class_stats"]
        acc = RDPAccountant()
        for sigma, q, steps in c["history"]:
            for _ in range(steps):
                acc.step(noise_multiplier=sigma, sample_rate=q)
        total = acc.get_epsilon(delta=1e-4)
        assert total <= 2.0 and c["epsilon_spent"] == pytest.approx(total, rel=1e-6)
        assert 0 < c["epsilon_releases"] < total and 0 < c["epsilon_training"] < total
        assert [h for h in c["history"] if h[0] == 20.0] == [[20.0, 1.0, 1]]  # the statistics release
    assert res["n_params"]["shared_model"] == "hypernetwork" and res["communication"]["uplink_bytes_per_client_round"] > 0


@pytest.mark.slow
def test_same_seed_identical_and_meta_code_mixture(tiny_db, tmp_path):
    run_hv(tiny_db, tmp_path / "a", "--meta-codes", "2")
    run_hv(tiny_db, tmp_path / "b", "--meta-codes", "2")
    a, b = results_of(tmp_path / "a", "fedhypevae"), results_of(tmp_path / "b", "fedhypevae")
    assert json.dumps(strip_timing(a)) == json.dumps(strip_timing(b))
    assert a["meta_code"]["k"] == 2 and sum(a["meta_code"]["weights"]) == pytest.approx(1.0)


@pytest.mark.slow
def test_adam_on_the_hypernetwork_resumes_exactly_and_takes_effect(tiny_db, tmp_path):
    """Adam's moments are client state: a resumed run must restore them (else the results differ)."""
    run_hv(tiny_db, tmp_path / "a", "--hyper-optimizer", "adam", "--rounds", "3")
    run_interrupted_then_resumed(run_hv, tiny_db, tmp_path / "b", "--hyper-optimizer", "adam", "--rounds", "3")
    a, b = results_of(tmp_path / "a", "fedhypevae"), results_of(tmp_path / "b", "fedhypevae")
    assert json.dumps(strip_timing(a)) == json.dumps(strip_timing(b))
    run_hv(tiny_db, tmp_path / "s", "--rounds", "3")
    sgd = results_of(tmp_path / "s", "fedhypevae")
    assert json.dumps(strip_timing(a)) != json.dumps(strip_timing(sgd))


@pytest.mark.slow
def test_dpstats_targets_are_accounted_noised_deterministic_and_resumable(tiny_db, tmp_path, monkeypatch):
    """--meta-targets dpstats: the two DP-Gauss releases (centre, then centred class sums) are in every
    client's ledger, recomputed by a fresh accountant; what crosses is their noised sums; a run is
    deterministic and resumes exactly; the targets change the meta-code fit."""
    import math
    from federated import dpstats
    from federated.channel import Channel
    from data.database import load_database
    from federated.clients import build_clients
    from federated.config import parse_args, split_config
    from tests.test_federated import FAST
    seen, original = [], Channel.deliver

    def spy(self, client_id, kind, payload):
        if kind == "release":
            seen.append({k: v.clone() for k, v in payload.items()})
        return original(self, client_id, kind, payload)
    monkeypatch.setattr(Channel, "deliver", spy)
    run_hv(tiny_db, tmp_path / "a", "--meta-targets", "dpstats", "--epsilon", "2.0", "--stats-noise", "4")
    monkeypatch.setattr(Channel, "deliver", original)
    res = results_of(tmp_path / "a", "fedhypevae")
    sigmas = [4 / math.sqrt(0.25), 4 / math.sqrt(0.75)]
    assert res["meta_code"]["targets"] == "dpstats" and res["meta_code"]["stats_noise_multipliers"] == pytest.approx(sigmas)
    for c in res["privacy"]["clients"]:
        assert [r["what"] for r in c["releases"]] == ["n_train", "centre", "class_stats"]
        assert [h[0] for h in c["history"][-2:]] == pytest.approx(sigmas)
        acc = RDPAccountant()
        for sigma, q, steps in c["history"]:
            for _ in range(steps):
                acc.step(noise_multiplier=sigma, sample_rate=q)
        assert c["epsilon_spent"] == pytest.approx(acc.get_epsilon(delta=1e-4), rel=1e-6) and c["epsilon_spent"] <= 2.0
    centres = [p["centre"] for p in seen if "centre" in p]
    stats = [p["class_stats"] for p in seen if "class_stats" in p]
    assert len(centres) == len(stats) == 3 and all(set(p) in ({"centre"}, {"class_stats"}) for p in seen)
    centre = dpstats.centre_of(sum(centres), 10.0, 0.5)  # as the server pools them
    db = load_database(tiny_db)
    clients = build_clients(db, split_config(parse_args(["--db", str(tiny_db), *FAST])), 1, torch.device("cpu"))
    k = int(db.labels.max()) + 1
    weights = dpstats.PartWeights(0.1, 0.0, 0.5)
    for c, sent_centre, sent in zip(clients, centres, stats):
        assert (sent_centre - dpstats.centre_sums(c.x_train, 10.0)).norm() > 1.0
        noise = sent - dpstats.class_sums(c.x_train, c.y_train, centre, k, 10.0, weights)
        assert float(noise.std()) == pytest.approx(sigmas[1] * weights.sensitivity, rel=0.2)
    run_interrupted_then_resumed(run_hv, tiny_db, tmp_path / "b", "--meta-targets", "dpstats", "--epsilon", "2.0",
                                 "--stats-noise", "4")
    b = results_of(tmp_path / "b", "fedhypevae")
    assert json.dumps(strip_timing(res)) == json.dumps(strip_timing(b))
    run_hv(tiny_db, tmp_path / "s", "--epsilon", "2.0", "--stats-noise", "4")
    assert results_of(tmp_path / "s", "fedhypevae")["meta_code"]["fit_loss"] != res["meta_code"]["fit_loss"]


def test_dpstats_targets_without_noise_are_the_class_moments():
    """Noise-free dpstats targets: the DP class model's draws reproduce each class's mean direction."""
    from types import SimpleNamespace
    from federated import dpstats
    from federated.methods.fedhypevae import FedHypeVAE
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 12, generator=gen) * 0.3 + torch.ones(12) * 2
    y = torch.arange(3).repeat_interleave(400)
    x = centres[y] + 0.05 * torch.randn(len(y), 12, generator=gen)
    weights = dpstats.PartWeights(0.1, 0.0, 0.5)
    centre = dpstats.centre_of(dpstats.centre_sums(x, 10.0), 10.0, 5.0)  # a radius that clips nothing
    pooled = dpstats.class_sums(x, y, centre, 3, 10.0, weights)
    fake = SimpleNamespace(ctx=SimpleNamespace(n_classes=3, dim=12), cfg=SimpleNamespace(meta_pca_dims=12),
                           centre=centre, part_weights=weights)
    mean, var, counts = FedHypeVAE.dpstats_targets(fake, pooled, torch.Generator().manual_seed(1))
    assert counts.tolist() == pytest.approx([400, 400, 400])
    # no class norms are released (norm weight 0): the targets keep each class's direction, not its norm
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    for c in range(3):
        assert (mean[c] / mean[c].norm() - means[c] / means[c].norm()).norm() < 2e-3
        assert 0 < var[c].mean() < float(x.var(0).mean())  # within a class: less than the whole spread
