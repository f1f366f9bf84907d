"""The methods on Flower (ServerApp + ClientApp, Message API), for hospitals running them across machines.

Every step calls the hooks the simulated loop calls (federated/methods/base.py: FederatedMethod), so no
algorithm exists twice. Per round the server broadcasts the shared model ("train"); each SuperNode's
ClientApp rebuilds its method for its own client, restores the state kept in its Flower context
(encoder, private code, optimisers, random streams, privacy ledger: never on the server), trains and
replies with its payload and (noisy, for DP) size. After the last round: "query.release" (e.g.
FedHypeVAE's DP class statistics) -> server `finalize` -> "evaluate" (the final broadcast; each client
synthesises, trains its downstream classifier, audits its release and reports test metrics and ε spent).
The server writes config.json, metrics.jsonl and results.json in train.py's layout and contract; it
never opens a database. An interrupted Flower run starts again from round 0 (client state belongs to
the Flower run); a finished run folder is skipped.

Run config (pyproject.toml [tool.flwr.app.config]; `flwr run --run-config` overrides):
  train-args       train.py's flags without --db: method, privacy, --rounds, --seed, --out (absolute), ...
  client-dbs       simulation only: folder of client_<partition-id>/ databases
  min-nodes        SuperNodes to wait for before the first round, and node-wait: for how many seconds
  round-timeout    seconds to wait for the replies of one exchange
  on-node-failure  "fail": stop with a message naming the node (finished rounds stay in metrics.jsonl);
                   "continue": go on with the others (results.json lists the lost clients)
Node config (`flower-supernode --node-config "client-db='/data/client_3' device='cuda'"`): the node's client
database and, optionally, its own device (default: train-args' --device) and `results-dir` (default:
<client-db>_results), where the node keeps what never leaves it: its per-round losses, exact counts,
privacy ledger and the audit of its release, in the run's layout (<dataset>/<method>/<tag>/seed=<s>/).

What a node sends is checked against one allowlist (federated/channel.py: hello facts, its noisy
size, model payloads, noised releases, final test metrics and epsilon). Its DP noise, Poisson masks and
latents come from OS entropy by default (`--randomness secret`): the server knows the run seed and
the client id, so seeded streams would let it rebuild them.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shlex
import time
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from data.database import Database, load_database
from data.io import UserError, package_versions
from data.partition import split_info
from federated.channel import FINAL_FIELDS, SIZE_FIELD, check_outgoing
from federated.clients import client_from_database, client_info
from federated.config import folder_tag, git_commit, method_setup, parse_args, run_config
from federated.loop import RunInfo, client_results, results_record
from federated.methods import METHODS
from federated.methods.base import FederatedMethod, RunContext
from federated.rounds import Reply, server_finish, server_round
from federated.runfolder import RunFolder

FAILURE_POLICIES = ("fail", "continue")
REPLY_POLL_S = 0.5  # how often the server asks the SuperLink for replies (Flower's own loop waits 3 s)
STATE_KEY = "method-state"


@dataclass(frozen=True)
class FlowerConfig:
    train_args: str
    client_dbs: str = ""
    min_nodes: int = 2
    node_wait: float = 120.0
    round_timeout: float = 600.0
    on_node_failure: str = "fail"

    @classmethod
    def from_run_config(cls, run_config: dict) -> FlowerConfig:
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(fields))
        if unknown:
            raise UserError(f"run config: unknown key(s) {unknown}; valid: {', '.join(sorted(fields))}")
        if "train-args" not in run_config:
            raise UserError("run config: 'train-args' (train.py's flags, e.g. \"--method dpcvae --out /abs/results\") is required")
        values = {}
        for key, value in run_config.items():
            kind = {"int": int, "float": float, "str": str}[fields[key].type]
            try:
                values[fields[key].name] = kind(value)
            except (TypeError, ValueError):
                raise UserError(f"run config: {key} = {value!r} is not a valid {kind.__name__}") from None
        cfg = cls(**values)
        if cfg.on_node_failure not in FAILURE_POLICIES:
            raise UserError(f"run config: on-node-failure = {cfg.on_node_failure!r}; valid: {', '.join(FAILURE_POLICIES)}")
        if cfg.min_nodes < 1 or cfg.round_timeout <= 0 or cfg.node_wait < 0:
            raise UserError("run config: min-nodes must be >= 1, round-timeout > 0 and node-wait >= 0")
        return cfg


def parse_train_args(text: str, db: Path | None) -> argparse.Namespace:
    """train.py's flags from the run config (the package's config layer), so both sides build exactly
    train.py's method config; a mistake is a UserError, never an exit of the app's process."""
    argv = shlex.split(text)
    if "--db" in argv:
        raise UserError("run config train-args: leave out --db (each SuperNode reads its own client-db)")
    args = parse_args([*argv, *(["--db", str(db)] if db else [])], error_prefix="run config train-args")
    if len(args.seeds) != 1:
        raise UserError(f"run config train-args: one --seed per Flower run, got {args.seeds}")
    return args


def method_of(args: argparse.Namespace) -> tuple[str, type[FederatedMethod], object]:
    name, cls, cfg = method_setup(args)
    if not getattr(cls, "distributed", False):
        valid = sorted(n for n, c in METHODS.items() if getattr(c, "distributed", False))
        raise UserError(f"--method {name} does not run on Flower; valid: {', '.join(valid)}")
    return name, cls, cfg


# --- client -----------------------------------------------------------------------------------------
client_app = ClientApp()


def client_db_path(context: Context) -> Path:
    if "client-db" in context.node_config:
        return Path(str(context.node_config["client-db"]))
    dbs = str(context.run_config.get("client-dbs", ""))
    if dbs and "partition-id" in context.node_config:  # the simulation engine numbers its virtual nodes
        return Path(dbs) / f"client_{int(context.node_config['partition-id'])}"
    raise UserError("this SuperNode has no client database: start it with "
                    "--node-config \"client-db='/path/to/client_<id>'\" (data/partition.py --client-dbs)")


@dataclass
class Node:
    """What one ClientApp call works with: this node's method (its one client, its kept state), its
    database and its own results folder."""
    method: FederatedMethod
    db: Database
    folder: RunFolder


def node_folder(context: Context, args: argparse.Namespace, db, method_name: str, method_cfg) -> RunFolder:
    """The node's own results folder for this run, in the server's layout."""
    path = client_db_path(context)
    root = Path(str(context.node_config.get("results-dir", f"{path}_results")))
    tag = folder_tag(args.tag, client_info(db)["split"], method_cfg, args.preset)
    dataset = args.dataset_name or db.manifest.get("dataset") or "dataset"
    return RunFolder(root / dataset / method_name / tag / f"seed={args.seeds[0]}")


def open_client(context: Context) -> Node:
    """This node's method, for its one client, with the state it kept from earlier messages."""
    cfg = FlowerConfig.from_run_config(context.run_config)
    path = client_db_path(context)
    args = parse_train_args(cfg.train_args, path)
    name, cls, method_cfg = method_of(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    db = load_database(path)
    run_cfg = run_config(args)
    device = torch.device(str(context.node_config.get("device", run_cfg.device)))  # a hospital's own GPU
    ctx = RunContext(clients=[client_from_database(db, device)], n_classes=len(db.classes), dim=db.dim,
                     seed=args.seeds[0], rounds=run_cfg.rounds, device=device, randomness=run_cfg.randomness or "secret")
    method = cls(ctx, method_cfg)
    if STATE_KEY in context.state:
        blob = context.state[STATE_KEY]["state"]
        method.load_state_dict(torch.load(io.BytesIO(blob), map_location=device, weights_only=True))
    return Node(method, db, node_folder(context, args, db, name, method_cfg))


def keep_state(context: Context, method: FederatedMethod) -> None:
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    context.state[STATE_KEY] = ConfigRecord({"state": buf.getvalue()})


def reply(msg: Message, node: Node, *parts: tuple[str, str, dict]) -> Message:
    """The one way a reply leaves this node: each (kind, record name, payload) part is checked against
    the allowlist first; tensors travel as ArrayRecords, the rest as JSON."""
    records = {}
    for kind, record, payload in parts:
        payload = check_outgoing(node.method, 0, kind, payload)
        records[record] = (ArrayRecord(payload) if kind in ("update", "size", "release")
                           else ConfigRecord({"json": json.dumps(payload)}))
    return Message(RecordDict(records), reply_to=msg)


@client_app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    node = open_client(context)
    info = client_info(node.db)
    about = {"id": int(info["id"]), "n_clients": int(info["n_clients"]), "seed": int(info["seed"]),
             "split": info["split"], "dataset": node.db.manifest.get("dataset") or "", "dim": node.db.dim,
             "classes": node.db.classes, "backbone": node.db.manifest.get("backbone") or ""}
    return reply(msg, node, ("hello", "about", about))


@client_app.train()
def train_round(msg: Message, context: Context) -> Message:
    node = open_client(context)
    method, rnd = node.method, int(msg.content["config"]["round"])
    method.receive(msg.content["shared"].to_torch_state_dict())
    [(payload, loss)] = method.train_clients([0], rnd)
    keep_state(context, method)
    kept = [json.loads(line) for line in node.folder.metrics_lines()[:rnd]] if rnd else []
    node.folder.write_metrics([*kept, {"round": rnd, "train_loss": loss}])  # the loss stays on the node
    return reply(msg, node, ("update", "payload", payload), ("size", "size", method.size_message(0)))


@client_app.query("release")
def release(msg: Message, context: Context) -> Message:
    node = open_client(context)
    stage = int(msg.content["config"]["stage"])
    if stage:
        node.method.receive_stage(stage, msg.content["broadcast"].to_torch_state_dict())
    released = node.method.client_release(0, stage)
    keep_state(context, node.method)  # the ledger now holds the release
    return reply(msg, node, ("release", "release", released), ("size", "size", node.method.size_message(0)))


@client_app.evaluate()
def finish(msg: Message, context: Context) -> Message:
    node = open_client(context)
    method = node.method
    method.receive_final(msg.content["final"].to_torch_state_dict())
    method.finish_clients()
    [result] = client_results(method)
    node.folder.finish({"client": result, "randomness": method.ctx.randomness, **method.report()})
    return reply(msg, node, ("final", "result", method.final_message(0, result)))



# --- server -----------------------------------------------------------------------------------------
server_app = ServerApp()


class NodeFailure(UserError):
    pass


def wait_for_nodes(grid: Grid, n: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise UserError(f"only {len(nodes)} of min-nodes = {n} SuperNodes connected within node-wait = "
                            f"{seconds:g} s; start the others or lower min-nodes")
        time.sleep(1.0)


def exchange(grid: Grid, nodes: list[int], message_type: str, content: dict, timeout: float,
             group: str) -> tuple[dict[int, RecordDict], dict[int, str]]:
    """Sends `content` (record name -> record) to every node: (replies by node, failures by node).

    Replies are matched to nodes by the message they answer, not by their sender: when a node is gone
    the SuperLink itself answers for it, with an error sent from the SuperLink's own node id."""
    msgs = [Message(RecordDict(dict(content)), dst_node_id=node, message_type=message_type, group_id=group)
            for node in nodes]
    grid.push_messages(msgs)  # gives each message its id (a message the SuperLink refused is never answered)
    node_of = {msg.metadata.message_id: node for msg, node in zip(msgs, nodes)}
    replies, failed = {}, {}
    deadline = time.monotonic() + timeout
    while True:
        for reply in grid.pull_messages([m for m, n in node_of.items() if n not in replies and n not in failed]):
            node = node_of.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            if reply.has_error():
                failed[node] = f"error {reply.error.code}: {reply.error.reason}".strip()
            else:
                replies[node] = reply.content
        if len(replies) + len(failed) == len(nodes) or time.monotonic() > deadline:
            break
        time.sleep(REPLY_POLL_S)
    for node in nodes:
        if node not in replies and node not in failed:
            failed[node] = f"no reply within round-timeout = {timeout:g} s (node gone?)"
    return replies, failed


class Federation:
    """The server's view: live nodes -> client ids, the failure policy, and what was lost. It is the
    Flower transport of federated/rounds.py: each call is one exchange with every live node."""

    def __init__(self, grid: Grid, cfg: FlowerConfig, clients: dict[int, int], uplink) -> None:
        self.grid, self.cfg, self.clients, self.uplink = grid, cfg, dict(clients), uplink
        self.lost: list[dict] = []

    def received(self, client: int, kind: str, record) -> dict[str, torch.Tensor]:
        return self.uplink.deliver(client, kind, record.to_torch_state_dict())

    def replies(self, answers: list[tuple[int, RecordDict]], payload: str, kind: str) -> list[Reply]:
        return [Reply(c, self.received(c, kind, r[payload]), float(self.received(c, "size", r["size"])[SIZE_FIELD]))
                for c, r in answers]

    def train(self, shared: dict[str, torch.Tensor], rnd: int) -> list[Reply]:
        content = {"shared": ArrayRecord(shared), "config": ConfigRecord({"round": rnd})}
        return self.replies(self.ask("train", content, f"round {rnd}"), "payload", "update")

    def release(self, stage: int, broadcast: dict[str, torch.Tensor]) -> list[Reply]:
        content = {"config": ConfigRecord({"stage": stage}), "broadcast": ArrayRecord(broadcast)}
        return self.replies(self.ask("query.release", content, f"release {stage}" if stage else "release"), "release",
                            "release")

    def evaluate(self, final: dict[str, torch.Tensor]) -> dict[int, dict]:
        return {c: json.loads(r["result"]["json"]) for c, r in self.ask("evaluate", {"final": ArrayRecord(final)},
                                                                          "final evaluation")}

    def ask(self, message_type: str, content: dict, stage: str) -> list[tuple[int, RecordDict]]:
        """(client id, reply) of the live nodes, in client order; a failure stops or drops the node."""
        replies, failed = exchange(self.grid, sorted(self.clients), message_type, content, self.cfg.round_timeout, stage)
        for node, why in sorted(failed.items()):
            client = self.clients.pop(node)
            what = f"SuperNode {node} (client {client}) failed at {stage}: {why}"
            if self.cfg.on_node_failure == "fail":
                raise NodeFailure(f"{what}; stopping (on-node-failure = fail; finished rounds are in metrics.jsonl)")
            log(WARNING, "%s; continuing without it (on-node-failure = continue)", what)
            self.lost.append({"client": client, "node": node, "stage": stage, "reason": why})
        if not self.clients:
            raise NodeFailure(f"no SuperNode left at {stage}")
        return sorted(((self.clients[node], reply) for node, reply in replies.items()), key=lambda r: r[0])


def introduce(grid: Grid, cfg: FlowerConfig, seed: int) -> tuple[dict[int, int], dict]:
    """Node -> client id, and what all clients' databases agree on (dataset, dim, classes, split)."""
    nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait)
    replies, failed = exchange(grid, nodes, "query.hello", {}, cfg.round_timeout, "hello")
    if failed:
        raise UserError("SuperNode(s) could not open their client database: "
                        + "; ".join(f"{n}: {why}" for n, why in sorted(failed.items())))
    about = {node: json.loads(r["about"]["json"]) for node, r in replies.items()}
    ids = sorted(a["id"] for a in about.values())
    if len(set(ids)) != len(ids):
        raise UserError(f"two SuperNodes hold the same client database (client ids {ids}); give each its own client-db")
    shared = {k: about[nodes[0]][k] for k in ("dataset", "dim", "classes", "split", "seed", "n_clients", "backbone")}
    for node, a in about.items():
        differ = [k for k in shared if a[k] != shared[k]]
        if differ:
            raise UserError(f"SuperNode {node}'s client database differs from the others in {differ}: "
                            "write all client databases with one data/partition.py --client-dbs call")
    if shared["seed"] != seed:
        raise UserError(f"the client databases were written for --seed {shared['seed']} (it picks the validation "
                        f"split), train-args has --seed {seed}; use the same seed")
    return {node: a["id"] for node, a in about.items()}, shared


# What each node keeps in its own results folder and the server never receives (results.json says so).
NOT_RECEIVED = ["per-round training losses", "exact split sizes (n_train, n_val, n_test) and per-class counts",
                "privacy ledgers (noise multiplier, sample rate, steps, history, releases)", "synthetic-sample counts",
                "release fidelity, TSTR and membership audit", "2-D projections"]


def server_report(method_cfg, finals: dict[int, dict], randomness: str) -> dict:
    """The privacy block the server can write from its config and the clients' final messages."""
    privacy = getattr(method_cfg, "privacy", None)
    if privacy is None:
        return {}
    spent = [f["epsilon_spent"] for f in finals.values() if f["epsilon_spent"] is not None]
    return {"privacy": {"enabled": privacy.enabled, "target_epsilon": privacy.target_epsilon if privacy.enabled else None,
                        "delta": privacy.delta, "accountant": privacy.accountant, "randomness": randomness,
                        "clients": [{"id": c, "epsilon_spent": f["epsilon_spent"]} for c, f in sorted(finals.items())],
                        "epsilon_spent_max": max(spent) if spent else None}}


def run_server(grid: Grid, cfg: FlowerConfig) -> Path:
    args = parse_train_args(cfg.train_args, None)
    name, cls, method_cfg = method_of(args)
    run_cfg = run_config(args)
    seed = args.seeds[0]
    clients, about = introduce(grid, cfg, seed)
    split = about["split"]
    dataset = args.dataset_name or about["dataset"] or "dataset"
    tag = folder_tag(args.tag, split, method_cfg, args.preset)
    folder = RunFolder(Path(args.out) / dataset / name / tag / f"seed={seed}")
    if folder.finished:
        log(INFO, "%s: finished, skipped", folder)
        return folder.path
    with folder.lock():
        folder.write_config({
            "method": name, "seed": seed, "runtime": "flower", "flower": dataclasses.asdict(cfg),
            "method_config": dataclasses.asdict(method_cfg), "split": split, "clients": sorted(clients.values()),
            "database": {k: about[k] for k in ("dataset", "backbone", "dim")}, "git_commit": git_commit(),
            "packages": package_versions()})
        tic = time.perf_counter()
        randomness = run_cfg.randomness or "secret"
        ctx = RunContext(clients=[], n_classes=len(about["classes"]), dim=about["dim"], seed=seed,
                         rounds=run_cfg.rounds, device=torch.device("cpu"), randomness=randomness)
        method = cls(ctx, method_cfg)  # the server's part: the shared model, no client
        fed = Federation(grid, cfg, clients, ctx.uplink)
        history: list[dict] = []
        folder.write_metrics(history)
        rounds = run_cfg.rounds if cls.federated else 0  # a one-shot method has only its releases
        for rnd in range(rounds):
            history.append({"round": rnd, **server_round(method, fed, rnd)})
            folder.write_metrics(history)
            log(INFO, "[%s] round %d/%d: %d clients", name, rnd + 1, rounds, history[-1]["clients"])
        finals = server_finish(method, fed)
        info = RunInfo(method=name, dataset=dataset, seed=seed, split=split_info(split))
        clients_out = [{"id": c, **{k: f[k] for k in FINAL_FIELDS if k != "epsilon_spent"}} for c, f in sorted(finals.items())]
        results = results_record(info, rounds=rounds, clients=clients_out, uplink_bytes=ctx.uplink.bytes_sent,
                                 report=server_report(method_cfg, finals, randomness), wall_s=time.perf_counter() - tic)
        results["randomness"] = randomness
        results["flower"] = {"nodes": len(clients), "lost_clients": fed.lost, "not_received": NOT_RECEIVED,
                             "node_results": "each node's results-dir (node config; default <client-db>_results)"}
        folder.finish(results)
    log(INFO, "[%s] results: %s (bacc %.4f)", name, folder.path / "results.json", results["summary"]["bacc_mean"])
    return folder.path


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    try:
        run_server(grid, FlowerConfig.from_run_config(context.run_config))
    except UserError as err:  # one clear line first; Flower then marks the run failed with the same message
        log(ERROR, "%s", err)
        raise
