"""The server's side of a federated run, once: the simulated loop and the Flower ServerApp both call
`server_round` and `server_finish`; only the transport that carries the messages differs.

    each round   broadcast the shared model -> every client trains and replies (update, size)
                 -> aggregate(updates, size weights) -> the new shared model
    at the end   every client replies with its one-off release (and size) -> finalize -> final broadcast
                 -> every client evaluates (and, on Flower, replies with what it publishes); a method with
                 several release stages has the server absorb each stage and broadcast what the next needs

`InProcess` is the simulation's transport: the clients live in the same method object, and every
message still goes through the allowlist of federated/channel.py. Flower's is in federated/flower_app.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from federated.channel import SIZE_FIELD

if TYPE_CHECKING:
    from federated.methods.base import FederatedMethod


@dataclass
class Reply:
    client: int                          # the client's id
    payload: dict[str, torch.Tensor]     # its update (a round) or release (the end)
    size: float                          # the size behind its aggregation weight (noisy under DP)


class Transport(Protocol):
    def train(self, shared: dict[str, torch.Tensor], rnd: int) -> list[Reply]: ...

    def release(self, stage: int, broadcast: dict[str, torch.Tensor]) -> list[Reply]: ...

    def evaluate(self, final: dict[str, torch.Tensor]) -> dict[int, dict[str, Any]]: ...


def server_round(method: FederatedMethod, transport: Transport, rnd: int) -> dict:
    """One round; returns the server's per-round line."""
    replies = transport.train(method.shared_state(), rnd)
    method.receive(method.aggregate([r.payload for r in replies], method.normalized([r.size for r in replies])))
    return {"clients": len(replies)}


def server_finish(method: FederatedMethod, transport: Transport) -> dict[int, dict[str, Any]]:
    """After the last round: the clients' releases (stage by stage) -> the final broadcast -> what the
    clients publish."""
    broadcast: dict[str, torch.Tensor] = {}
    for stage in range(method.release_stages):
        replies = transport.release(stage, broadcast)
        releases, weights = [r.payload for r in replies], method.normalized([r.size for r in replies])
        if stage + 1 < method.release_stages:
            broadcast = method.absorb(stage, releases, weights)
    return transport.evaluate(method.finalize(releases, weights))


class InProcess:
    """The simulated transport: every client of `method` answers in this process. The clients' losses
    stay here (`losses`) for the simulation's local_ diagnostics; they are never sent."""

    def __init__(self, method: FederatedMethod) -> None:
        self.method = method
        self.losses: list[float] = []

    def sizes(self) -> list[float]:
        m = self.method
        return [float(m.ctx.uplink.send(m, i, "size", m.size_message(i))[SIZE_FIELD]) for i in range(len(m.ctx.clients))]

    def train(self, shared: dict[str, torch.Tensor], rnd: int) -> list[Reply]:
        m = self.method  # its clients already hold `shared` (receive sets every copy)
        results = m.train_clients(list(range(len(m.ctx.clients))), rnd)
        self.losses = [loss for _, loss in results]
        payloads = [m.ctx.uplink.send(m, i, "update", payload) for i, (payload, _) in enumerate(results)]
        return [Reply(c.id, p, s) for c, p, s in zip(m.ctx.clients, payloads, self.sizes())]

    def release(self, stage: int, broadcast: dict[str, torch.Tensor]) -> list[Reply]:
        m = self.method
        if stage:
            m.receive_stage(stage, broadcast)
        releases = [m.client_release(i, stage) for i in range(len(m.ctx.clients))]
        releases = [m.ctx.uplink.send(m, i, "release", r) if r else r for i, r in enumerate(releases)]
        return [Reply(c.id, r, s) for c, r, s in zip(m.ctx.clients, releases, self.sizes())]

    def evaluate(self, final: dict[str, torch.Tensor]) -> dict[int, dict[str, Any]]:
        """The final broadcast; the loop then evaluates each client and sends its final message."""
        self.method.receive_final(final)
        self.method.finish_clients()
        return {}
