"""The interface every method implements, and what a run gives it (RunContext)."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager

import torch

from data.io import UserError
from federated.channel import FINAL_FIELDS, HELLO_FIELDS, SIZE_FIELD, Channel
from federated.clients import ClientData, make_generator, secret_generator
from federated.config import RANDOMNESS
from federated.rounds import InProcess, server_finish, server_round
from federated.training import ClassifierConfig, fit_downstream

# Purpose tags for make_generator(seed, client, PURPOSE): independent streams per use.
INIT, BATCHES, NOISE, LATENT, DOWNSTREAM, SYNTH = range(6)
META, RELEASE_EVAL = 7, 8  # FedHypeVAE's meta-code fit; fidelity / audit sampling
SERVER = 10_000  # the "client id" of server-side streams


@dataclass
class RunContext:
    clients: list[ClientData]
    n_classes: int
    dim: int
    seed: int
    rounds: int
    device: torch.device
    randomness: str = "seeded"  # "secret": privacy-relevant client streams from OS entropy
    uplink: Channel = field(default_factory=Channel)
    phase: Callable[[str], ContextManager] = lambda name: contextlib.nullcontext()  # the loop shows phases

    def __post_init__(self) -> None:
        if self.randomness not in RANDOMNESS:
            raise UserError(f"--randomness {self.randomness!r} is unknown; valid: {', '.join(RANDOMNESS)}")

    def private_generator(self, client_id: int, purpose: int) -> torch.Generator:
        """A client's stream for a privacy-relevant purpose (DP noise, Poisson masks, latents of DP
        steps). Seeded streams are rebuilt by anyone who knows the run seed and the client id (the
        server does): reproducible simulation only. Secret streams come from OS entropy."""
        if self.randomness == "secret":
            return secret_generator()
        return make_generator(self.seed, client_id, purpose)


class Method:
    """One strategy. The loop calls run_round() `ctx.rounds` times (checkpointing state_dict()
    after each), then finish(), then predict() on every client's test split."""

    name: ClassVar[str]
    Config: ClassVar[type]
    federated: ClassVar[bool] = True  # False: no rounds (local, centralized)

    def __init__(self, ctx: RunContext, cfg) -> None:
        self.ctx, self.cfg = ctx, cfg

    def prepare(self) -> None:
        """Before the first round (and on resume): work whose cost the terminal should name (DP noise
        calibration); nothing by default."""

    def run_round(self, rnd: int) -> dict:
        raise NotImplementedError

    def finish(self) -> None:
        """After the last round: anything the final predictions need (deterministic from state)."""

    def predict(self, client: ClientData, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C) of `client`'s final model."""
        raise NotImplementedError

    def fit_client_classifiers(self, datasets: list[tuple[torch.Tensor, torch.Tensor]],
                               cfg: ClassifierConfig, *,
                               synthetic: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[int, torch.nn.Module]:
        """{client id: a linear classifier trained on datasets[i]}, each from the client's own
        DOWNSTREAM stream (the papers' recipe: all clients in one batched loop), its choices made on
        the client's own validation split (the balanced recipe)."""
        clients = self.ctx.clients
        models = fit_downstream(datasets, [(c.x_val, c.y_val) for c in clients], self.ctx.n_classes, cfg,
                                [make_generator(self.ctx.seed, c.id, DOWNSTREAM) for c in clients], synthetic=synthetic)
        return {c.id: m for c, m in zip(clients, models)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def report(self) -> dict:
        """Extra top-level blocks of results.json (privacy, n_params, per-client choices...)."""
        return {}

    def epsilon_spent(self, i: int) -> float | None:
        """The epsilon client i has spent (None: the method makes no DP promise)."""
        return None


def weighted_average(states: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i, key by key (weights sum to one)."""
    return {k: sum(w * s[k] for w, s in zip(weights.tolist(), states)) for k in states[0]}


class FederatedMethod(Method):
    """A method whose clients and server only exchange payloads. The server's orchestration
    (federated/rounds.py) runs over an in-process transport in simulation (run_round, finish) and over
    Flower's in federated/flower_app.py, calling the same hooks, so no algorithm exists twice:

        each round   client i: receive(shared); train_clients([i], rnd) -> (payload, loss), upload_weight(i)
                     server:   aggregate(payloads, weights) -> shared, broadcast (receive)
        at the end   client i: client_release(i) -> server: finalize(releases, weights) -> final
                     client i: receive_final(final); finish_clients()

    A Flower client builds the method with RunContext.clients = [its own client], the server with [];
    indices i are positions in ctx.clients, random streams are keyed by the client's id."""

    distributed: ClassVar[bool] = True  # runs on Flower (federated/flower_app.py)

    # --- hooks -------------------------------------------------------------------------------
    def shared_state(self) -> dict[str, torch.Tensor]:
        """The server's current global model (what it broadcasts)."""
        raise NotImplementedError

    def receive(self, shared: dict[str, torch.Tensor]) -> None:
        """The server's broadcast: sets the global model (the server's copy and every client's)."""
        raise NotImplementedError

    def train_clients(self, indices: list[int], rnd: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        """One round of local training of the clients at `indices`: (payload each sends, its mean loss)."""
        raise NotImplementedError

    def upload_weight(self, i: int) -> float:
        """The size client i reports for aggregation (exact: a method without a DP promise)."""
        return float(self.ctx.clients[i].n_train)

    release_stages: ClassVar[int] = 1  # one-off release exchanges after the last round (e.g. centre, then statistics)

    def release_spec(self) -> dict[str, tuple[int, ...] | None]:
        """The fields (and tensor shapes) client_release may send, over all its stages; none by default."""
        return {}

    def ledger_names(self, i: int) -> set[str] | None:
        """What client i has released under DP (its ledger's entries); None: no DP promise."""
        return None

    # --- what may leave a client (federated/channel.py enforces it) --------------------------------
    def outgoing_spec(self, kind: str) -> dict[str, tuple[int, ...] | None]:
        if kind == "update":
            return self.update_spec
        if kind == "release":
            return self.release_spec()
        if kind == "size":
            return {SIZE_FIELD: (1,)}
        return dict.fromkeys(FINAL_FIELDS if kind == "final" else HELLO_FIELDS)

    @functools.cached_property
    def update_spec(self) -> dict[str, tuple[int, ...]]:
        """The update's keys and shapes, fixed for the run (read at every client's every round)."""
        return {k: tuple(v.shape) for k, v in self.update_template().items()}

    def update_template(self) -> dict[str, torch.Tensor]:
        """A round's payload has the keys and shapes of this (the shared model, by default)."""
        return self.shared_state()

    def size_message(self, i: int) -> dict[str, torch.Tensor]:
        return {SIZE_FIELD: torch.tensor([self.upload_weight(i)], dtype=torch.float64)}

    def final_message(self, i: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """What client i publishes at the end: its test metrics and epsilon spent, nothing else."""
        return {**{k: metrics[k] for k in FINAL_FIELDS if k != "epsilon_spent"}, "epsilon_spent": self.epsilon_spent(i)}

    def aggregate(self, payloads: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return weighted_average(payloads, weights)

    def client_release(self, i: int, stage: int = 0) -> dict[str, torch.Tensor]:
        """What client i sends once after the last round, at release stage `stage` (e.g. DP class
        statistics); nothing by default."""
        return {}

    def absorb(self, stage: int, releases: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Server, between release stages: what the clients need for the next stage (e.g. a pooled
        DP mean to centre on), broadcast to them."""
        raise NotImplementedError(f"{type(self).__name__} declares {self.release_stages} release stages")

    def receive_stage(self, stage: int, broadcast: dict[str, torch.Tensor]) -> None:
        """Client side: the server's broadcast before release stage `stage` (> 0)."""
        raise NotImplementedError(f"{type(self).__name__} declares {self.release_stages} release stages")

    def finalize(self, releases: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Server, after the last round: the final broadcast."""
        return self.shared_state()

    def receive_final(self, final: dict[str, torch.Tensor]) -> None:
        self.receive(final)

    def finish_clients(self) -> None:
        """Client side, after the final broadcast: anything the clients' predictions need."""

    def round_metrics(self, rnd: int, losses: list[float]) -> dict:
        """The simulation's per-round line. Prefixed local_: computed in-process from what the clients
        keep (never sent; on Flower each node writes its own)."""
        return {"local_train_loss_mean": sum(losses) / len(losses)}

    # --- the simulated run: the server's orchestration over the in-process transport -------------
    @staticmethod
    def normalized(sizes: list[float]) -> torch.Tensor:
        """Aggregation weights n_i / sum_j n_j of the reporting clients."""
        n = torch.tensor(sizes, dtype=torch.float64)
        return (n / n.sum()).float()

    def run_round(self, rnd: int) -> dict:
        transport = InProcess(self)
        return {**server_round(self, transport, rnd), **self.round_metrics(rnd, transport.losses)}

    def finish(self) -> None:
        server_finish(self, InProcess(self))
