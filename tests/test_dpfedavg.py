"""DP-FedAvg (federated/methods/dpfedavg.py): the private-model yardstick. Its ledger is recomputed by a
fresh PRV accountant, only its noised model and noisy size cross, a step moves by the clipped bound,
same seed = same file (also across a kill), and the optional local mix is chosen on validation data."""
from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import PRVAccountant
from torch.nn import functional as F

from federated.privacy import clip_and_sum, clipped_grad_sum, per_sample_grads_vmap
from models.classifier import LinearClassifier
from tests.test_federated import results_of, strip_timing
from tests.test_privacy import run_dp, run_interrupted_then_resumed

SMALL = ["--dp-batch-size", "32", "--dp-lr", "0.3"]


def test_a_bare_linear_classifier_is_clipped_per_record_exactly():
    """The model is one nn.Linear (its parameters have no module prefix): ghost clipping = vmap."""
    gen = torch.Generator().manual_seed(0)
    model = LinearClassifier(6, 3)
    x, y = F.normalize(torch.randn(20, 6, generator=gen), dim=-1), torch.randint(3, (20,), generator=gen)
    fast, norms = clipped_grad_sum(model, lambda: F.cross_entropy(model(x), y, reduction="none"), 0.7)
    ref, ref_norms = clip_and_sum(per_sample_grads_vmap(model, lambda f, x1, y1: F.cross_entropy(f(x1), y1), x, y), 0.7)
    torch.testing.assert_close(norms, ref_norms)
    for name in ("weight", "bias"):
        torch.testing.assert_close(fast[name], ref[name])
    # a normalised record's gradient |p - e_y| sqrt(|x|^2 + 1) is at most 2: a radius any backbone shares
    assert norms.max() <= 2 + 1e-6 and (norms > 0.7).any()


@pytest.mark.slow
def test_spent_epsilon_recomputed_by_a_fresh_prv_accountant(tiny_db, tmp_path):
    run_dp(tiny_db, tmp_path / "r", "--method", "dpfedavg", *SMALL, "--accountant", "prv", "--epsilon", "1.0")
    res = results_of(tmp_path / "r", "dpfedavg")
    privacy = res["privacy"]
    assert privacy["accountant"] == "prv" and privacy["epsilon_spent_max"] <= 1.0
    for c in privacy["clients"]:
        acc = PRVAccountant()
        acc.history = [tuple(h) for h in c["history"]]
        recomputed = acc.get_epsilon(delta=privacy["delta"])
        assert recomputed <= 1.0 + 1e-3 and c["epsilon_spent"] == pytest.approx(recomputed, rel=1e-3)
        assert c["steps"] == 2 * round(1 / c["sample_rate"])  # rounds x 1 local epoch x steps per epoch
        assert [r["what"] for r in c["releases"]] == ["n_train"] and c["mix"] is None
    assert res["n_params"]["shared_model"] == "classifier" and res["summary"]["bacc_mean"] > 0


@pytest.mark.slow
def test_same_seed_same_file_across_a_kill_and_seed_matters(tiny_db, tmp_path):
    flags = ("--method", "dpfedavg", *SMALL, "--rounds", "3")
    run_dp(tiny_db, tmp_path / "a", *flags)
    run_interrupted_then_resumed(run_dp, tiny_db, tmp_path / "b", *flags)
    a, b = results_of(tmp_path / "a", "dpfedavg"), results_of(tmp_path / "b", "dpfedavg")
    assert json.dumps(strip_timing(a)) == json.dumps(strip_timing(b))
    run_dp(tiny_db, tmp_path / "c", *flags, seeds=("2",))
    other = results_of(tmp_path / "c", "dpfedavg", 2)["privacy"]["clients"]
    assert [c["released_size"] for c in other] != [c["released_size"] for c in a["privacy"]["clients"]]


def test_the_mix_is_chosen_per_client_on_validation_bacc():
    """Client 0 never saw class 3 (its local model cannot predict it), client 1 did; the global model
    is a noisy nearest-centre rule. Each client's lambda maximises its own validation BACC over the grid
    (ties: the smaller), and its predictions are that mix."""
    from federated.clients import ClientData
    from federated.evaluation import client_metrics
    from federated.methods.base import RunContext
    from federated.methods.dpfedavg import DPFedAvg, DPFedAvgConfig
    from federated.training import downstream_default, predict_proba
    import dataclasses
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 3

    def draw(classes, n):
        y = torch.tensor(classes).repeat_interleave(n)
        return centers[y] + 1.5 * torch.randn(len(y), 8, generator=g), y
    clients = [ClientData(i, *draw([0, 1, 2] if i == 0 else [0, 1, 2, 3], 40), *draw([0, 1, 2, 3], 15),
                          *draw([0, 1, 2, 3], 15)) for i in range(2)]
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    cfg = DPFedAvgConfig(lambda_grid=grid, downstream=dataclasses.replace(downstream_default(), recipe="balanced"))
    method = DPFedAvg(RunContext(clients, 4, 8, seed=0, rounds=1, device=torch.device("cpu")), cfg)
    with torch.no_grad():
        method.model.weight.copy_(F.normalize(centers, dim=-1) * 5 + torch.randn(4, 8, generator=g) * 2)
        method.model.bias.zero_()
    method.finish_clients()
    for c in clients:
        p_g, p_l = predict_proba(method.model, c.x_val), predict_proba(method.local_models[c.id], c.x_val)
        scores = [client_metrics(c.y_val, (lam * p_l + (1 - lam) * p_g).argmax(1))["bacc"] for lam in grid]
        best = scores.index(max(scores))
        assert method.choice[c.id] == {"lambda": grid[best], "val_bacc": scores[best]}
        lam = grid[best]
        torch.testing.assert_close(method.predict(c, c.x_test),
                                   lam * predict_proba(method.local_models[c.id], c.x_test)
                                   + (1 - lam) * predict_proba(method.model, c.x_test))
    assert method.choice[0]["lambda"] < 1  # client 0 needs the global model for class 3


@pytest.mark.slow
def test_a_mixed_run_names_its_folder_and_reports_each_choice(tiny_db, tmp_path):
    run_dp(tiny_db, tmp_path / "r", "--method", "dpfedavg", *SMALL, "--dp-lambda-grid", "0,0.5,1",
           "--downstream-recipe", "balanced")
    [run_dir] = (tmp_path / "r").glob("*/dpfedavg/*/seed=1")
    assert run_dir.parent.name.endswith("_balanced_mix")
    clients = json.loads((run_dir / "results.json").read_text())["privacy"]["clients"]
    assert all(c["mix"]["lambda"] in (0.0, 0.5, 1.0) and c["downstream_choice"]["C"] > 0 for c in clients)


@pytest.mark.slow
def test_only_the_noised_model_and_the_noisy_size_cross(tiny_db, tmp_path, monkeypatch):
    from data.database import load_database
    from federated.channel import Channel
    seen = []
    original = Channel.deliver

    def spy(self, client_id, kind, payload):
        seen.append((kind, {k: v.detach().clone() for k, v in payload.items()} if kind != "final" else dict(payload)))
        return original(self, client_id, kind, payload)
    monkeypatch.setattr(Channel, "deliver", spy)
    run_dp(tiny_db, tmp_path / "r", "--method", "dpfedavg", *SMALL)
    records = torch.from_numpy(load_database(tiny_db).embeddings)
    updates = [p for kind, p in seen if kind == "update"]
    assert len(updates) == 2 * 3 and all(set(p) == {"weight", "bias"} for p in updates)
    sizes = [float(p["size"]) for kind, p in seen if kind == "size"]
    assert sizes and all(s != round(s) for s in sizes)  # noised, not a count
    for p in updates:  # no row of the model is a (normalised) record
        assert torch.cdist(p["weight"].float(), F.normalize(records, dim=-1)).min() > 1e-3
