"""The interface every method implements, and the simulated client->server channel."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from federated.clients import ClientData, make_generator
from federated.training import OptimConfig, fit_classifiers

# Purpose tags for make_generator(seed, client, PURPOSE): independent streams per use.
INIT, BATCHES, NOISE, LATENT, DOWNSTREAM, SYNTH = range(6)
META, RELEASE_EVAL = 7, 8  # FedHypeVAE's meta-code fit; fidelity / audit sampling
SERVER = 10_000  # the "client id" of server-side streams


class Channel:
    """Everything a client sends to the server passes through send(); observers see each message
    (tests use them to check that only model weights/privatised gradients ever leave a client)."""

    def __init__(self) -> None:
        self.observers: list[Callable[[int, dict[str, torch.Tensor]], None]] = []
        self.bytes_sent = 0

    def send(self, client_id: int, payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for observe in self.observers:
            observe(client_id, payload)
        self.bytes_sent += sum(t.numel() * t.element_size() for t in payload.values())
        return payload


@dataclass
class RunContext:
    clients: list[ClientData]
    n_classes: int
    dim: int
    seed: int
    rounds: int
    device: torch.device
    uplink: Channel = field(default_factory=Channel)


class Method:
    """One strategy. The loop calls run_round() `ctx.rounds` times (checkpointing state_dict()
    after each), then finish(), then predict() on every client's test split."""

    name: ClassVar[str]
    Config: ClassVar[type]
    federated: ClassVar[bool] = True  # False: no rounds (local, centralized)

    def __init__(self, ctx: RunContext, cfg) -> None:
        self.ctx, self.cfg = ctx, cfg

    def run_round(self, rnd: int) -> dict:
        raise NotImplementedError

    def finish(self) -> None:
        """After the last round: anything the final predictions need (deterministic from state)."""

    def predict(self, client: ClientData, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C) of `client`'s final model."""
        raise NotImplementedError

    def fit_client_classifiers(self, datasets: list[tuple[torch.Tensor, torch.Tensor]],
                               cfg: OptimConfig) -> dict[int, torch.nn.Module]:
        """{client id: a linear classifier trained on datasets[i]}, each from the client's own
        DOWNSTREAM stream, all clients in one batched loop."""
        clients = self.ctx.clients
        models = fit_classifiers(datasets, self.ctx.n_classes, cfg,
                                 [make_generator(self.ctx.seed, c.id, DOWNSTREAM) for c in clients])
        return {c.id: m for c, m in zip(clients, models)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def report(self) -> dict:
        """Extra top-level blocks of results.json (privacy, n_params, per-client choices...)."""
        return {}


def weighted_average(states: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i, key by key (weights sum to one)."""
    return {k: sum(w * s[k] for w, s in zip(weights.tolist(), states)) for k in states[0]}


class FederatedMethod(Method):
    """A method whose clients and server only exchange payloads. The simulated loop (run_round, finish)
    and the Flower app (federated/flower_app.py) call the same hooks, so no algorithm exists twice:

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
        """The size client i reports for aggregation."""
        return float(self.ctx.clients[i].n_train)

    def aggregate(self, payloads: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return weighted_average(payloads, weights)

    def client_release(self, i: int) -> dict[str, torch.Tensor]:
        """What client i sends once after the last round (e.g. DP class statistics); nothing by default."""
        return {}

    def finalize(self, releases: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Server, after the last round: the final broadcast."""
        return self.shared_state()

    def receive_final(self, final: dict[str, torch.Tensor]) -> None:
        self.receive(final)

    def finish_clients(self) -> None:
        """Client side, after the final broadcast: anything the clients' predictions need."""

    def round_metrics(self, rnd: int, losses: list[float]) -> dict:
        return {"train_loss": sum(losses) / len(losses)}

    # --- the simulated round -------------------------------------------------------------------
    @staticmethod
    def normalized(sizes: list[float]) -> torch.Tensor:
        """Aggregation weights n_i / sum_j n_j of the reporting clients."""
        n = torch.tensor(sizes, dtype=torch.float64)
        return (n / n.sum()).float()

    def run_round(self, rnd: int) -> dict:
        clients = self.ctx.clients
        results = self.train_clients(list(range(len(clients))), rnd)
        payloads = [self.ctx.uplink.send(c.id, payload) for c, (payload, _) in zip(clients, results)]
        self.receive(self.aggregate(payloads, self.normalized([self.upload_weight(i) for i in range(len(clients))])))
        return self.round_metrics(rnd, [loss for _, loss in results])

    def finish(self) -> None:
        clients = self.ctx.clients
        releases = [self.client_release(i) for i in range(len(clients))]
        releases = [self.ctx.uplink.send(c.id, r) if r else r for c, r in zip(clients, releases)]
        self.receive_final(self.finalize(releases, self.normalized([self.upload_weight(i) for i in range(len(clients))])))
        self.finish_clients()
