"""The Flower app (federated/flower_app.py): a real SuperLink and SuperNode processes on loopback, Flower's
simulation engine with 10 virtual clients, SuperNodes dying mid-run, and agreement with the simulated loop."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_db

import train
from data.database import load_database
from data.io import UserError
from data.partition import SplitConfig, get_args_parser as partition_args, main as partition_main
from federated import flower_app
from federated.clients import build_clients, client_from_database
from federated.methods import METHODS
from flwr.app import Context, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode of this environment
SEED = 1
FLOWER_TIMEOUT = 420  # seconds one `flwr run` may take before the test fails
SMALL_DP = "--accountant rdp --gen-batch-size 64 --gen-local-epochs 1 --latent 8 --cvae-hidden 32"


def write_client_dbs(db: Path, out: Path, n_clients: int, kind: str = "dirichlet") -> Path:
    partition_main(partition_args().parse_args(["--db", str(db), "--split", kind, "--n-clients", str(n_clients),
                                                "--seed", str(SEED), "--client-dbs", str(out)]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """A SuperLink and SuperNodes as separate processes (each in its own process group), driven by `flwr run`."""

    def __init__(self, root: Path, *, simulation: bool = False) -> None:
        self.root, self.port = root, free_port()
        home = root / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FLWR_DISABLE_UPDATE_CHECK": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.start("superlink", [BIN / "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                 *(["--simulation"] if simulation else [])])
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline or self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"SuperLink did not start: {self.log('superlink')}")
            time.sleep(0.5)

    def start(self, name: str, argv: list) -> None:
        with open(self.root / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                                                env=self.env, start_new_session=True)

    def start_node(self, client_db: Path) -> None:
        self.start(f"node-{client_db.name}", [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                              "--port", free_port(), "--node-config", f"client-db='{client_db}'"])

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the node and any ClientApp process it started
        except ProcessLookupError:
            pass
        proc.wait()

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()[-3000:]

    def flwr_run(self, train_args: str, config: dict, virtual_nodes: int) -> list:
        config = {"train-args": train_args, "node-wait": 120, **config}
        overrides = " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in config.items())
        simulation = ["--federation-config", f"num-supernodes={virtual_nodes}"] if virtual_nodes else []
        return [BIN / "flwr", "run", ROOT, "test", "--run-config", overrides, *simulation, "--stream"]

    def run(self, train_args: str, virtual_nodes: int = 0, **config) -> subprocess.CompletedProcess:
        return subprocess.run(self.flwr_run(train_args, config, virtual_nodes), env=self.env, capture_output=True,
                              text=True, timeout=FLOWER_TIMEOUT)

    def run_in_background(self, train_args: str, **config) -> subprocess.Popen:
        return subprocess.Popen(self.flwr_run(train_args, config, 0), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
    """A SuperLink and three SuperNodes, each with its own client database (3 clients of one split)."""
    root = tmp_path_factory.mktemp("hospitals")
    db = write_db(root / "db", n=600, dim=16, n_classes=3, spread=2.5)
    clients = write_client_dbs(db, root / "clients", 3)
    fed = Federation(root)
    fed.db, fed.clients = db, clients
    try:
        for i in range(3):
            fed.start_node(clients / f"client_{i}")
        yield fed
    finally:
        fed.close()


def wait_for_rounds(metrics: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"no round {n} within {timeout} s"
        time.sleep(0.5)


# --- fast checks ---------------------------------------------------------------------------------------
def test_client_databases_hold_exactly_the_simulated_clients(tmp_path):
    db = write_db(tmp_path / "db", n_classes=3)
    dbs = write_client_dbs(db, tmp_path / "clients", 3)
    simulated = build_clients(load_database(db), SplitConfig(n_clients=3), SEED, torch.device("cpu"))
    for c in simulated:
        node = client_from_database(load_database(dbs / f"client_{c.id}"), torch.device("cpu"))
        assert node.id == c.id
        for attr in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            assert torch.equal(getattr(node, attr), getattr(c, attr)), attr


def test_a_plain_database_is_refused_as_a_client_database(tiny_db):
    with pytest.raises(UserError, match="not a client database"):
        client_from_database(load_database(tiny_db), torch.device("cpu"))


@pytest.mark.parametrize("config, message", [
    ({"train-args": "--method dpcvae", "rounds": 3}, "unknown key"),
    ({"min-nodes": 2}, "'train-args'"),
    ({"train-args": "--method dpcvae", "on-node-failure": "retry"}, "valid: fail, continue"),
    ({"train-args": "--method dpcvae", "round-timeout": "soon"}, "round-timeout"),
])
def test_bad_run_config_is_one_clear_error(config, message):
    with pytest.raises(UserError, match=message):
        flower_app.FlowerConfig.from_run_config(config)


@pytest.mark.parametrize("flags, message", [
    ("--method dpcvae --db x", "leave out --db"),
    ("--method dpcvae --seeds 1 2", "one --seed"),
    ("--method dpcvae --rounds", "--rounds: expected one argument"),
])
def test_bad_train_args_are_one_clear_error(flags, message):
    with pytest.raises(UserError, match=message):
        flower_app.parse_train_args(flags, None)


def test_methods_that_pool_clients_are_refused_with_the_valid_ones():
    with pytest.raises(UserError, match=f"does not run on Flower; valid: {', '.join(DISTRIBUTED)}$"):
        flower_app.method_of(flower_app.parse_train_args("--method fedlambda", None))


# --- real processes ----------------------------------------------------------------------------------
def simulated(db: Path, out: Path, flags: str) -> dict:
    args = train.parse_args(["--db", str(db), "--out", str(out), "--no-progress", *flags.split()])
    assert train.main(args) == 0
    return json.loads(next(out.rglob("results.json")).read_text())


def published(client: dict) -> dict:
    """What a client's final message carries of its simulated record (the server's results.json)."""
    return {k: client[k] for k in ("id", "acc", "bacc", "f1_macro", "f1_weighted")}


def node_records(client_dbs: Path, run_dir: Path, out: Path) -> tuple[list[dict], list[list[dict]]]:
    """Each node's own results.json and metrics.jsonl (in <client-db>_results, the server's layout)."""
    rel = run_dir.relative_to(out)
    dirs = [client_dbs / f"client_{i}_results" / rel for i in range(len(list(client_dbs.glob("client_*[0-9]"))))]
    return ([json.loads((d / "results.json").read_text()) for d in dirs],
            [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
             if (d / "metrics.jsonl").exists() else [] for d in dirs])  # a one-shot method trains no round


def assert_nodes_equal_simulation(nodes: list[dict], node_metrics: list[list[dict]], sim: dict, sim_dir: Path,
                                  loss_rel: float = 0.0) -> None:
    """Every client's computation is the simulated one: its own record, privacy ledger and losses."""
    assert [n["client"] for n in nodes] == sim["clients"]
    if "privacy" in sim:
        assert [n["privacy"]["clients"][0] for n in nodes] == sim["privacy"]["clients"]
    sim_losses = [json.loads(line)["local_train_loss_mean"] for line in (sim_dir / "metrics.jsonl").read_text().splitlines()]
    node_losses = [sum(m[r]["train_loss"] for m in node_metrics) / len(node_metrics) for r in range(len(sim_losses))]
    assert node_losses == pytest.approx(sim_losses, rel=loss_rel or 1e-12)


@pytest.mark.slow
def test_dpcvae_on_three_supernodes_agrees_with_the_simulated_loop(hospitals, tmp_path):
    flags = f"--method dpcvae --rounds 2 --epsilon 1 {SMALL_DP} --seed {SEED} --threads 1 --n-clients 3 --randomness seeded"
    done = hospitals.run(f"{flags} --out {tmp_path / 'flower'}", **{"min-nodes": 3})
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = next((tmp_path / "flower").rglob("results.json")).parent
    assert run_dir.relative_to(tmp_path / "flower").as_posix() == f"toy/dpcvae/dirichlet_a0.3_c3/seed={SEED}"
    flower = json.loads((run_dir / "results.json").read_text())
    sim = simulated(hospitals.db, tmp_path / "sim", flags)
    # the server holds each client's published metrics and epsilon; each node holds the rest, as simulated
    assert flower["clients"] == [published(c) for c in sim["clients"]]
    assert flower["summary"] == sim["summary"]
    assert flower["privacy"]["epsilon_spent_max"] == sim["privacy"]["epsilon_spent_max"] <= 1.0
    nodes, node_metrics = node_records(hospitals.clients, run_dir, tmp_path / "flower")
    assert_nodes_equal_simulation(nodes, node_metrics, sim, next((tmp_path / "sim").rglob("metrics.jsonl")).parent)
    assert all({"fidelity", "audit"} <= set(n) for n in nodes)
    # the same payloads crossed the network (sizes included: both send them with every update and release)
    assert flower["communication"]["uplink_bytes_total"] == sim["communication"]["uplink_bytes_total"]
    assert flower["flower"]["lost_clients"] == [] and flower["flower"]["nodes"] == 3
    # the results contract: experiments/tables.py reads Flower runs like simulated ones
    table = subprocess.run([sys.executable, ROOT / "experiments" / "tables.py", "--results", tmp_path / "flower",
                            "--dataset", "toy", "--out", tmp_path / "t"], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "DP-CVAE" in (tmp_path / "t.md").read_text()


@pytest.mark.slow
def test_a_supernode_dying_mid_run_is_dropped_when_configured_to_continue(hospitals, tmp_path):
    flags = f"--method fedavg --rounds 2 --seed {SEED} --threads 1 --n-clients 3 --out {tmp_path}"
    proc = hospitals.run_in_background(flags, **{"min-nodes": 3, "round-timeout": 45, "on-node-failure": "continue"})
    metrics = tmp_path / f"toy/fedavg/dirichlet_a0.3_c3/seed={SEED}/metrics.jsonl"
    try:
        wait_for_rounds(metrics, 1, proc)
        hospitals.kill("node-client_2")
        out, _ = proc.communicate(timeout=FLOWER_TIMEOUT)
    finally:
        proc.kill()
        hospitals.start_node(hospitals.clients / "client_2")
    done = metrics.parent / "results.json"
    assert done.exists(), f"no results.json; flwr run printed:\n{out[-3000:]}\nSuperLink log:\n{hospitals.log('superlink')}"
    results = json.loads(done.read_text())
    assert [c["id"] for c in results["clients"]] == [0, 1], out
    assert [lost["client"] for lost in results["flower"]["lost_clients"]] == [2]
    assert [json.loads(line)["clients"] for line in metrics.read_text().splitlines()] == [3, 2]
    assert "(client 2) failed at round" in out and "continuing without it" in out


@pytest.mark.slow
def test_the_simulation_engine_runs_the_app_with_ten_virtual_clients(tmp_path):
    db = write_db(tmp_path / "db", n=1500, dim=16, n_classes=3, spread=3.0)
    dbs = write_client_dbs(db, tmp_path / "clients", 10, kind="iid")
    fed = Federation(tmp_path, simulation=True)
    flags = f"--method fedavg --split iid --rounds 3 --seed {SEED} --threads 1 --n-clients 10"
    try:
        done = fed.run(f"{flags} --out {tmp_path / 'flower'}", virtual_nodes=10, **{"client-dbs": str(dbs), "min-nodes": 10})
    finally:
        fed.close()
    assert done.returncode == 0, done.stdout + done.stderr
    flower = json.loads(next((tmp_path / "flower").rglob("results.json")).read_text())
    sim = simulated(db, tmp_path / "sim", flags)
    assert [c["id"] for c in flower["clients"]] == list(range(10))
    assert flower["clients"] == [published(c) for c in sim["clients"]]


# --- every distributed method, in one process --------------------------------------------------------
class InProcessGrid:
    """Flower's Grid contract without processes: each node runs the ClientApp on its own Context (its
    state kept across messages as on a SuperNode); records are (de)serialised as on the wire.
    `fail` maps a node to the stage (message group) at which it disappears: from then on its messages go
    unanswered, or, with `superlink_answers`, the SuperLink answers them with its own NODE_UNAVAILABLE error."""

    def __init__(self, client_dbs: list[Path], run_config: dict, fail: dict[int, str] | None = None,
                 superlink_answers: bool = False) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as in a ServerApp process
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"client-db": str(p)},
                                          state=RecordDict(), run_config=run_config) for i, p in enumerate(client_dbs)}
        self.fail, self.superlink_answers = fail or {}, superlink_answers
        self.replies: dict[str, Message] = {}
        self.seen: list[tuple[int, str, Message]] = []  # (node, message type, reply): all the server received

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's own grids do on push
            node = msg.metadata.dst_node_id
            if self.fail.get(node) == msg.metadata.group_id:
                self.contexts.pop(node)
            if node in self.contexts:
                self.replies[msg.metadata.message_id] = flower_app.client_app(message=msg, context=self.contexts[node])
                self.seen.append((node, msg.metadata.message_type, self.replies[msg.metadata.message_id]))
            elif self.superlink_answers:
                self.replies[msg.metadata.message_id] = create_message_error_unavailable_res_message(msg.metadata, "node")
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


def in_process_run(client_dbs: Path, flags: str, fail: dict[int, str] | None = None, superlink_answers: bool = False,
                   **config) -> tuple[Path, dict]:
    dbs = sorted(client_dbs.glob("client_*"))
    run_config = {"train-args": flags, "min-nodes": len(dbs), "node-wait": 0, "round-timeout": 1, **config}
    grid = InProcessGrid(dbs, run_config, fail, superlink_answers)
    in_process_run.grid = grid  # tests inspect what the server received
    run_dir = flower_app.run_server(grid, flower_app.FlowerConfig.from_run_config(run_config))
    return run_dir, json.loads((run_dir / "results.json").read_text())


DISTRIBUTED = sorted(name for name, cls in METHODS.items() if getattr(cls, "distributed", False))
EXTRA = {"dpcvae": SMALL_DP, "dpcgan": SMALL_DP,
         "fedhypevae": f"{SMALL_DP} --code-dim 3 --hyper-hidden 8 --prior-hidden 8 --label-dim 2 --mmd-samples 2 "
                       "--meta-steps 20 --meta-samples 8"}


@pytest.mark.slow
@pytest.mark.parametrize("method", [*DISTRIBUTED, "dpgauss --preset dp-tuned-local",  # + a node's own covariance
                                    "dpgauss --preset dp-tuned-sums",  # + weighted release parts
                                    "fedhypevae --meta-targets dpstats"])  # + release stages after training
def test_every_distributed_method_on_flower_equals_the_simulated_loop(tmp_path, method):
    db = write_db(tmp_path / "db", n=400, dim=16, n_classes=3, spread=2.5)
    dbs = write_client_dbs(db, tmp_path / "clients", 3)
    flags = (f"--method {method} --rounds 2 --seed {SEED} --n-clients 3 --downstream-epochs 10 --randomness seeded "
             f"{EXTRA.get(method.split()[0], '')}")
    method = method.split()[0]
    run_dir, flower = in_process_run(dbs, f"{flags} --out {tmp_path / 'flower'}")
    sim = simulated(db, tmp_path / "sim", flags)
    assert flower["clients"] == [published(c) for c in sim["clients"]]
    nodes, node_metrics = node_records(dbs, run_dir, tmp_path / "flower")
    # the simulation trains FedAvg/FedProx clients in one batched step, Flower each alone: equal up to float rounding
    assert_nodes_equal_simulation(nodes, node_metrics, sim, next((tmp_path / "sim").rglob("metrics.jsonl")).parent,
                                  loss_rel=0.0 if "privacy" in sim else 1e-6)
    if "privacy" in sim:
        assert flower["privacy"]["epsilon_spent_max"] == sim["privacy"]["epsilon_spent_max"]
        assert flower["privacy"]["clients"] == [{"id": c["id"], "epsilon_spent": c["epsilon_spent"]} for c in sim["privacy"]["clients"]]
    if method == "fedhypevae":
        assert all(n["meta_code"] == sim["meta_code"] for n in nodes), ([n["meta_code"] for n in nodes], sim["meta_code"])


@pytest.mark.slow
@pytest.mark.parametrize("superlink_answers", [False, True], ids=["silent", "superlink-error"])
@pytest.mark.parametrize("policy", ["continue", "fail"])
def test_a_node_lost_mid_run_continues_or_stops_as_configured(tmp_path, policy, superlink_answers):
    db = write_db(tmp_path / "db", n=400, dim=16, n_classes=3)
    dbs = write_client_dbs(db, tmp_path / "clients", 3)
    flags = f"--method fedavg --rounds 3 --seed {SEED} --n-clients 3 --out {tmp_path}"
    lost = dict(fail={101: "round 1"}, superlink_answers=superlink_answers)
    reason = "error 5: .*" if superlink_answers else "no reply .*"  # 5: Flower's NODE_UNAVAILABLE
    if policy == "fail":
        with pytest.raises(UserError, match=rf"SuperNode 101 \(client 1\) failed at round 1: {reason}on-node-failure = fail"):
            in_process_run(dbs, flags, **lost, **{"on-node-failure": policy})
        run_dir = tmp_path / f"toy/fedavg/dirichlet_a0.3_c3/seed={SEED}"
        assert not (run_dir / "results.json").exists() and not (run_dir / "run.lock").exists()
        assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0]
        return
    run_dir, results = in_process_run(dbs, flags, **lost, **{"on-node-failure": policy})
    assert [c["id"] for c in results["clients"]] == [0, 2]
    assert [(x["client"], x["node"], x["stage"]) for x in results["flower"]["lost_clients"]] == [(1, 101, "round 1")]
    assert [json.loads(line)["clients"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [3, 2, 2]
