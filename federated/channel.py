"""What may leave a client: one allowlist, enforced in `check_outgoing`, which the simulated channel
(`Channel.send`) and the Flower ClientApp (federated/flower_app.py) both call before anything is sent.

A client sends five kinds of message; each may carry only these fields:
  hello    (Flower) its database's public facts: client id, number of clients, split settings, run
           seed, dataset name, embedding dim, class names, backbone name (no record, no count)
  size     "size": the number behind its aggregation weight. A method with a DP promise releases it
           with Gaussian noise, so its ledger must hold the release ("n_train")
  update   its model payload of a round: exactly the keys and shapes of the method's shared model
           (for DP methods: built from privatised gradients only)
  release  a one-off statistic (e.g. FedHypeVAE's class statistics): the method's declared release
           fields, each of which a DP method must have entered in its ledger
  final    its test metrics (acc, bacc, f1_macro, f1_weighted) and the epsilon it spent

Everything else (losses, exact counts, sigma, q and steps, release fidelity and audit figures,
projections) stays with the client. A violation is a bug in the method, so it raises, loudly.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

KINDS = ("hello", "size", "update", "release", "final")
HELLO_FIELDS = ("id", "n_clients", "split", "seed", "dataset", "dim", "classes", "backbone")
FINAL_FIELDS = ("acc", "bacc", "f1_macro", "f1_weighted", "epsilon_spent")
SIZE_FIELD, SIZE_LEDGER = "size", "n_train"


class ChannelViolation(RuntimeError):
    """A client was about to send something the allowlist does not permit."""


def check_outgoing(method, i: int, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Raises ChannelViolation unless `payload` is an allowed `kind` message of client i of `method`
    (a FederatedMethod); returns the payload unchanged."""
    who = f"client {method.ctx.clients[i].id} ({method.name})"
    if kind not in KINDS:
        raise ChannelViolation(f"{who}: unknown message kind {kind!r}; valid: {', '.join(KINDS)}")
    spec = method.outgoing_spec(kind)  # field -> tensor shape (None: any value)
    extra = sorted(set(payload) - set(spec))
    if extra:
        raise ChannelViolation(f"{who} tried to send {extra} in a {kind!r} message; allowed: {sorted(spec)}")
    if kind in ("update", "size") and set(payload) != set(spec):
        raise ChannelViolation(f"{who}: a {kind!r} message must carry exactly {sorted(spec)}, got {sorted(payload)}")
    for name, value in payload.items():
        shape = spec[name]
        if shape is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape)):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ChannelViolation(f"{who}: {kind} field {name!r} must be a tensor of shape {tuple(shape)}, got {got}")
    ledger = method.ledger_names(i)  # None: the method makes no DP promise (FedAvg, --no-dp)
    if ledger is not None and kind in ("size", "release"):
        unaccounted = sorted({SIZE_LEDGER} - ledger if kind == "size" else set(payload) - ledger)
        if unaccounted:
            raise ChannelViolation(f"{who}: {unaccounted} would leave without a noised release in its ledger")
    return payload


class Channel:
    """The simulated client->server channel: every message is checked against the allowlist, then
    seen by the observers (tests) and counted. The Flower server counts what it received with
    `deliver` (the ClientApp already checked it)."""

    def __init__(self) -> None:
        self.observers: list[Callable[[int, str, dict], None]] = []
        self.bytes_sent = 0

    def send(self, method, i: int, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self.deliver(method.ctx.clients[i].id, kind, check_outgoing(method, i, kind, payload))

    def deliver(self, client_id: int, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        for observe in self.observers:
            observe(client_id, kind, payload)
        self.bytes_sent += sum(t.numel() * t.element_size() for t in payload.values() if isinstance(t, torch.Tensor))
        return payload
