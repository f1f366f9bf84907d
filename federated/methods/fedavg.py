"""FedAvg (McMahan et al. 2017) on the linear downstream classifier."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from federated.clients import ClientData, make_generator
from federated.evaluation import client_metrics
from federated.methods.base import BATCHES, INIT, SERVER, Method, RunContext
from federated.training import OptimConfig, StackedPenalty, new_classifier, predict_proba, train_classifiers


def weighted_average(states: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i, key by key (weights sum to one)."""
    return {k: sum(w * s[k] for w, s in zip(weights.tolist(), states)) for k in states[0]}


@dataclass(frozen=True)
class FedAvgConfig:
    local: OptimConfig = field(default_factory=OptimConfig)


class FedAvg(Method):
    name = "fedavg"
    Config = FedAvgConfig

    def __init__(self, ctx: RunContext, cfg: FedAvgConfig) -> None:
        super().__init__(ctx, cfg)
        self.model = new_classifier(ctx.dim, ctx.n_classes, make_generator(ctx.seed, SERVER, INIT), ctx.device)
        self.gens = [make_generator(ctx.seed, c.id, BATCHES) for c in ctx.clients]

    # --- hooks -------------------------------------------------------------------------------
    def local_penalty(self, global_state: dict[str, torch.Tensor]) -> StackedPenalty | None:
        """An extra term of the local objective (FedProx's proximal term); none for FedAvg. It maps the
        stacked parameters of the clients training at a step, {"weight": (A, C, D), "bias": (A, C)},
        to one value per client (A,)."""
        return None

    def aggregate(self, payloads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return weighted_average(payloads, self.ctx.weights)

    # --- round -------------------------------------------------------------------------------
    def run_round(self, rnd: int) -> dict:
        global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        clients = self.ctx.clients
        local_models = [copy.deepcopy(self.model) for _ in clients]
        # all clients' local epochs in one batched loop (each exactly as alone, a fresh optimiser each
        # round: momentum is client state that FedAvg does not carry over)
        losses = train_classifiers(local_models, [(c.x_train, c.y_train) for c in clients], self.cfg.local,
                                   [self.gens[c.id] for c in clients], penalty=self.local_penalty(global_state))
        payloads = [self.ctx.uplink.send(c.id, {k: v.detach() for k, v in m.state_dict().items()})
                    for c, m in zip(clients, local_models)]
        self.model.load_state_dict(self.aggregate(payloads))
        val = [client_metrics(c.y_val, self.predict(c, c.x_val).argmax(1)) for c in self.ctx.clients]
        return {"train_loss": sum(losses) / len(losses),
                "val_acc_mean": sum(m["acc"] for m in val) / len(val),
                "val_bacc_mean": sum(m["bacc"] for m in val) / len(val)}

    def predict(self, client: ClientData, x: torch.Tensor) -> torch.Tensor:
        return predict_proba(self.model, x)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "gens": [g.get_state() for g in self.gens]}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for g, s in zip(self.gens, state["gens"]):
            g.set_state(s)
