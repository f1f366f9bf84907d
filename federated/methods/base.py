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

    @property
    def weights(self) -> torch.Tensor:
        """Aggregation weights n_i / sum_j n_j."""
        n = torch.tensor([c.n_train for c in self.clients], dtype=torch.float64)
        return (n / n.sum()).float()


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
