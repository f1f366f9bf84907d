"""The privacy promise against an honest-but-curious server: only allowlisted fields leave a client (in
simulation and on Flower), the server cannot rebuild secret noise from the run seed and client ids,
and tiny expected batches (empty Poisson batches) run."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import write_db
from federated.channel import Channel, ChannelViolation
from federated.clients import make_generator
from federated.methods import METHODS
from federated.methods.anonymizer import Anonymizer
from federated.methods.base import NOISE, FederatedMethod
from tests.test_federated import results_of
from tests.test_flower import EXTRA, SEED, in_process_run, write_client_dbs
from tests.test_privacy import run_dp, run_interrupted_then_resumed

DISTRIBUTED = sorted(n for n, c in METHODS.items() if getattr(c, "distributed", False))
ANONYMIZERS = sorted(n for n, c in METHODS.items() if issubclass(c, Anonymizer) and c.federated)  # DP-SGD over rounds
HV = ["--code-dim", "3", "--hyper-hidden", "8", "--prior-hidden", "8", "--label-dim", "2", "--mmd-samples", "2",
      "--meta-steps", "20", "--meta-samples", "8"]
# Written out here, independently of federated/channel.py: what the server may ever receive from a client.
HELLO = {"id", "n_clients", "split", "seed", "dataset", "dim", "classes", "backbone"}
FINAL = {"acc", "bacc", "f1_macro", "f1_weighted", "epsilon_spent"}
RELEASES = {"fedhypevae": {"class_stats"}, "dpgauss": {"centre", "class_stats"}}  # over all release stages


def shared_keys(method: str, tmp_path) -> set[str]:
    """The shared model's parameter names (what an update may carry), from a server-side instance."""
    from data.database import load_database
    from federated.methods.base import RunContext
    from federated.config import method_setup, parse_args
    db = load_database(write_db(tmp_path / "keys_db", n_classes=3))
    args = parse_args(["--db", str(db.path), "--method", method, *EXTRA.get(method, "").split()])
    _, cls, cfg = method_setup(args)
    return set(cls(RunContext([], 3, db.dim, 1, 1, torch.device("cpu")), cfg).shared_state())


def flower_flags(method: str, out, *extra: str) -> str:
    return (f"--method {method} --rounds 2 --seed {SEED} --n-clients 3 --downstream-epochs 5 --out {out} "
            f"{EXTRA.get(method, '')} {' '.join(extra)}")


# --- allowlist -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", DISTRIBUTED)
def test_allowlist_every_flower_reply_of_every_client_carries_only_allowed_fields(tmp_path, method):
    db = write_db(tmp_path / "db", n=400, dim=16, n_classes=3, spread=2.5)
    dbs = write_client_dbs(db, tmp_path / "clients", 3)
    in_process_run(dbs, flower_flags(method, tmp_path / "out"))
    shared, seen = shared_keys(method, tmp_path), in_process_run.grid.seen
    trained = {"train"} if METHODS[method].federated else set()  # a one-shot method has no round
    assert {t for _, t, _ in seen} == {"query.hello", "query.release", "evaluate"} | trained
    for node, message_type, reply in seen:
        records = dict(reply.content.items())
        if message_type == "query.hello":
            assert set(records) == {"about"} and set(json.loads(records["about"]["json"])) == HELLO
        elif message_type == "train":
            assert set(records) == {"payload", "size"}
            assert set(records["payload"].to_torch_state_dict()) == shared
            assert set(records["size"].to_torch_state_dict()) == {"size"}
        elif message_type == "query.release":
            assert set(records) == {"release", "size"}
            assert set(records["release"].to_torch_state_dict()) <= RELEASES.get(method, set())
            assert set(records["size"].to_torch_state_dict()) == {"size"}
        else:
            assert set(records) == {"result"} and set(json.loads(records["result"]["json"])) == FINAL


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(n for n, c in METHODS.items() if issubclass(c, FederatedMethod)))
def test_allowlist_every_simulated_message_carries_only_allowed_fields(tmp_path, method):
    seen = []
    channel_deliver = Channel.deliver

    def spy(self, client_id, kind, payload):
        seen.append((client_id, kind, set(payload)))
        return channel_deliver(self, client_id, kind, payload)
    Channel.deliver = spy
    try:
        run_dp(write_db(tmp_path / "db", n_classes=3), tmp_path / "r", "--method", method,
               *(HV if method == "fedhypevae" else []))
    finally:
        Channel.deliver = channel_deliver
    shared = shared_keys(method, tmp_path)
    kinds = {kind for _, kind, _ in seen}
    trained = {"update"} if METHODS[method].federated else set()  # a one-shot method sends no update
    assert {"size", "final"} | trained <= kinds <= {"size", "release", "final"} | trained
    for _, kind, fields in seen:
        if kind == "release":
            assert fields <= RELEASES[method], fields
        else:
            assert fields == {"size": {"size"}, "update": shared, "final": FINAL}[kind], (kind, fields)
    assert set().union(*(f for _, k, f in seen if k == "release")) == RELEASES.get(method, set())


@pytest.mark.slow
def test_allowlist_an_extra_field_stops_the_run_in_simulation_and_on_flower(tmp_path, monkeypatch):
    from federated.methods.dpcvae import DPCVAE
    db = write_db(tmp_path / "db", n=400, dim=16, n_classes=3, spread=2.5)
    dbs = write_client_dbs(db, tmp_path / "clients", 3)
    size_message = DPCVAE.size_message
    monkeypatch.setattr(DPCVAE, "size_message", lambda self, i: {**size_message(self, i), "n_exact": torch.tensor([1.0])})
    with pytest.raises(ChannelViolation, match=r"tried to send \['n_exact'\] in a 'size' message"):
        run_dp(db, tmp_path / "sim", "--method", "dpcvae")
    monkeypatch.setattr(DPCVAE, "size_message", size_message)
    final_message = DPCVAE.final_message
    monkeypatch.setattr(DPCVAE, "final_message", lambda self, i, m: {**final_message(self, i, m), "n_test": m["n_test"]})
    with pytest.raises(ChannelViolation, match=r"tried to send \['n_test'\] in a 'final' message"):
        in_process_run(dbs, flower_flags("dpcvae", tmp_path / "flower"))


@pytest.mark.slow
def test_allowlist_a_release_missing_from_the_ledger_does_not_leave(tmp_path, monkeypatch):
    from federated.methods.fedhypevae import FedHypeVAE, class_stat_sums
    # the statistics without their Gaussian release: exact sums, no ledger entry
    monkeypatch.setattr(FedHypeVAE, "release_class_stats", lambda self, i: class_stat_sums(
        self.ctx.clients[i].x_train, self.ctx.clients[i].y_train, self.ctx.n_classes, self.cfg.stats_clip))
    with pytest.raises(ChannelViolation, match=r"\['class_stats'\] would leave without a noised release in its ledger"):
        run_dp(write_db(tmp_path / "db", n_classes=3), tmp_path / "r", "--method", "fedhypevae", *HV)


# --- reconstruction ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("randomness, rebuilt", [("seeded", True), ("secret", False)])
def test_reconstruct_the_server_rebuilds_seeded_noise_but_not_secret_noise(tmp_path, randomness, rebuilt):
    """The server knows the run seed (train-args) and each client id (hello). With seeded streams it
    regenerates the count noise and recovers every exact n_train; with secret streams it cannot."""
    db = write_db(tmp_path / "db", n=600, dim=16, n_classes=3, spread=2.5)
    dbs = write_client_dbs(db, tmp_path / "clients", 3)
    run_dir, results = in_process_run(dbs, flower_flags("dpcvae", tmp_path / "out", "--rounds 1", f"--randomness {randomness}"))
    assert results["randomness"] == randomness
    seen = in_process_run.grid.seen
    ids = {n: json.loads(r.content["about"]["json"])["id"] for n, t, r in seen if t == "query.hello"}
    sizes = {ids[n]: float(r.content["size"].to_torch_state_dict()["size"]) for n, t, r in seen if t == "train"}
    guesses = {c: s - 100.0 * float(torch.randn(1, generator=make_generator(SEED, c, NOISE))) for c, s in sizes.items()}
    exact = {}
    for c in ids.values():  # the truth, from each node's own results (never sent)
        node_dir = dbs / f"client_{c}_results" / run_dir.relative_to(tmp_path / "out")
        exact[c] = json.loads((node_dir / "results.json").read_text())["client"]["n_train"]
    recovered = [abs(guesses[c] - exact[c]) < 1e-6 * exact[c] for c in exact]
    assert all(recovered) if rebuilt else not all(recovered), (guesses, exact)


@pytest.mark.slow
def test_secret_randomness_in_simulation_is_recorded_differs_between_runs_and_resumes(tiny_db, tmp_path):
    for out in ("a", "b"):
        run_dp(tiny_db, tmp_path / out, "--method", "dpcvae", "--randomness", "secret")
    a, b = results_of(tmp_path / "a", "dpcvae"), results_of(tmp_path / "b", "dpcvae")
    assert a["randomness"] == b["randomness"] == a["privacy"]["randomness"] == "secret"
    assert [c["released_size"] for c in a["privacy"]["clients"]] != [c["released_size"] for c in b["privacy"]["clients"]]
    run_interrupted_then_resumed(run_dp, tiny_db, tmp_path / "c", "--method", "dpcvae", "--rounds", "3", "--randomness", "secret")
    resumed = results_of(tmp_path / "c", "dpcvae")["privacy"]
    assert all(c["steps"] == 3 * round(1 / c["sample_rate"]) for c in resumed["clients"])
    assert len({c["released_size"] for c in resumed["clients"]}) == 3


# --- tiny expected batches -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ANONYMIZERS)
def test_empty_poisson_batches_at_expected_batch_size_2_run_and_are_accounted(tmp_path, monkeypatch, method):
    sizes = []
    poisson = Anonymizer.poisson_indices
    monkeypatch.setattr(Anonymizer, "poisson_indices", lambda self, i, gen: sizes.append(len(idx := poisson(self, i, gen))) or idx)
    run_dp(write_db(tmp_path / "db", n_classes=3), tmp_path / "r", "--method", method, "--gen-batch-size", "2",
           *(HV if method == "fedhypevae" else []))
    assert 0 in sizes  # empty batches happened
    privacy = results_of(tmp_path / "r", method)["privacy"]
    assert privacy["epsilon_spent_max"] <= 1.0
    for c in privacy["clients"]:  # every step, empty or not, was a noisy step in the ledger
        assert c["steps"] == 2 * round(1 / c["sample_rate"])
