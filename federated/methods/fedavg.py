"""FedAvg (McMahan et al. 2017) on the linear downstream classifier."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from data.flags import section
from federated.clients import ClientData, make_generator
from federated.evaluation import client_metrics
from federated.methods.base import BATCHES, INIT, SERVER, FederatedMethod, RunContext
from federated.training import OptimConfig, StackedPenalty, new_classifier, predict_proba, train_classifiers


@dataclass(frozen=True)
class FedAvgConfig:
    local: OptimConfig = section(OptimConfig, "Local training of the classifier", flags={
        "optimizer": "--optimizer", "lr": "--lr", "momentum": "--momentum", "weight_decay": "--weight-decay",
        "batch_size": "--batch-size"})


class FedAvg(FederatedMethod):
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

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def receive(self, shared: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(shared)

    def train_clients(self, indices: list[int], rnd: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        global_state = self.shared_state()
        clients = [self.ctx.clients[i] for i in indices]
        local_models = [copy.deepcopy(self.model) for _ in clients]
        # all clients' local epochs in one batched loop (each exactly as alone, a fresh optimiser each
        # round: momentum is client state that FedAvg does not carry over)
        losses = train_classifiers(local_models, [(c.x_train, c.y_train) for c in clients], self.cfg.local,
                                   [self.gens[i] for i in indices], penalty=self.local_penalty(global_state))
        return [({k: v.detach() for k, v in m.state_dict().items()}, loss) for m, loss in zip(local_models, losses)]

    def round_metrics(self, rnd: int, losses: list[float]) -> dict:
        val = [client_metrics(c.y_val, self.predict(c, c.x_val).argmax(1)) for c in self.ctx.clients]
        return {**super().round_metrics(rnd, losses),
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
