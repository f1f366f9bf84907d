"""DP-FedAvg: FedAvg of the linear classifier with every local step a DP-SGD step (Poisson batches,
exact per-record clipping, Gaussian noise, one accountant per client, the noisy size as aggregation
weight), so the shared model is differentially private. It is the yardstick of sharing a private
*model*, against which private *data* sharing (the anonymizers) must be measured.

Embeddings are L2-normalised (each record's gradient is then bounded by about 2, so the clip loses
little whatever the backbone's scale), and its defaults take few, large steps: one local epoch of
expected batch 512 per round. Optionally (--dp-lambda-grid) each client mixes the final global model
with its own local classifier, lambda * p_local + (1 - lambda) * p_global, lambda chosen on its own
validation balanced accuracy: post-processing on data that never leaves the client, no privacy cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from data.flags import section, setting
from data.io import UserError
from federated.clients import ClientData, make_generator
from federated.evaluation import client_metrics
from federated.methods.base import INIT, SERVER, RunContext
from federated.methods.dpsgd import DPClients, DPSGDConfig
from federated.privacy import PrivacyConfig
from federated.training import ClassifierConfig, downstream_default, predict_proba
from models import count_parameters
from models.classifier import LinearClassifier, NormalizedLinearClassifier
from models.init import init_linear_layers_


@dataclass(frozen=True)
class DPFedAvgConfig:
    privacy: PrivacyConfig = section(PrivacyConfig, "Privacy")
    sgd: DPSGDConfig = section(lambda: DPSGDConfig(lr=0.3, batch_size=512, local_epochs=1),
                               "DP-SGD training of the shared classifier", prefix="dp")
    lambda_grid: tuple[float, ...] = setting((0.0,), "weights of the client's local classifier in the final mix "
                                             "lambda * p_local + (1 - lambda) * p_global, chosen per client on its "
                                             "validation BACC (0: the global model alone; e.g. 0,0.25,0.5,0.75,1)",
                                             flag="--dp-lambda-grid", dest="dp_lambda_grid", metavar="L,L,..")
    downstream: ClassifierConfig = section(downstream_default, "Downstream classifier (the local model of the mix)")
    # the strongest private-model yardstick: the global model mixed with the balanced local classifier
    PRESETS: ClassVar[dict] = {"mix": {"dp_lambda_grid": (0.0, 0.25, 0.5, 0.75, 1.0), "downstream_recipe": "balanced"}}

    def __post_init__(self) -> None:
        if not self.lambda_grid or any(not 0 <= lam <= 1 for lam in self.lambda_grid):
            raise UserError(f"--dp-lambda-grid must be values in [0, 1], got {list(self.lambda_grid)}")

    @property
    def mixes(self) -> bool:
        return tuple(self.lambda_grid) != (0.0,)

    def tag_parts(self) -> list[str]:
        """The run folder's tag names the mix (a mixed run is another row than the global model alone)."""
        return ["mix"] if self.mixes else []


class DPFedAvg(DPClients):
    name = "dpfedavg"
    Config = DPFedAvgConfig

    def __init__(self, ctx: RunContext, cfg: DPFedAvgConfig) -> None:
        super().__init__(ctx, cfg)
        self.model = init_linear_layers_(NormalizedLinearClassifier(ctx.dim, ctx.n_classes),
                                         make_generator(ctx.seed, SERVER, INIT)).to(ctx.device)
        self._inputs: dict[int, torch.Tensor] = {}  # a client's normalised training embeddings
        self.local_models: dict[int, torch.nn.Module] = {}
        self.choice: dict[int, dict] = {}

    @property
    def sgd(self) -> DPSGDConfig:
        return self.cfg.sgd

    def inputs(self, i: int) -> torch.Tensor:
        if i not in self._inputs:
            self._inputs[i] = F.normalize(self.ctx.clients[i].x_train.float(), dim=-1)
        return self._inputs[i]

    # --- rounds ------------------------------------------------------------------------------
    def shared_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def receive(self, shared: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(shared)

    def train_clients(self, indices: list[int], rnd: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        return [self.local_train(i, rnd) for i in indices]

    def local_train(self, i: int, rnd: int) -> tuple[dict[str, torch.Tensor], float]:
        """One round of client i: local epochs of DP-SGD steps (Adam on the noisy gradients, a fresh
        optimiser each round as FedAvg's) from the global model; sends the new model."""
        # a plain linear layer over pre-normalised inputs: the clipping hook sees the layer's real input
        model = LinearClassifier(self.ctx.dim, self.ctx.n_classes).to(self.ctx.device)
        model.load_state_dict(self.model.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=self.sgd.lr, foreach=True)
        x_all, y_all = self.inputs(i), self.ctx.clients[i].y_train
        total, steps = 0.0, 0
        for step in range(self.local_steps(i)):
            self.schedule_lr(i, rnd, step, opt)
            idx = self.poisson_indices(i, self.batch_gens[i]).to(self.ctx.device)
            x, y = x_all[idx], y_all[idx]
            grads, loss = self.private_gradients(i, model, lambda: F.cross_entropy(model(x), y, reduction="none"), len(idx))
            self.apply_gradients(i, model, grads, [opt])
            if loss is not None:
                total, steps = total + loss, steps + 1
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, total / max(steps, 1)

    def round_metrics(self, rnd: int, losses: list[float]) -> dict:
        val = [client_metrics(c.y_val, predict_proba(self.model, c.x_val).argmax(1)) for c in self.ctx.clients]
        return {**super().round_metrics(rnd, losses), "local_val_bacc_mean": sum(m["bacc"] for m in val) / len(val)}

    # --- the final mix -------------------------------------------------------------------------
    def finish_clients(self) -> None:
        if not self.cfg.mixes:
            return
        clients, lams = self.ctx.clients, sorted(self.cfg.lambda_grid)
        with self.ctx.phase("local classifiers and the mix"):
            self.local_models = self.fit_client_classifiers([(c.x_train, c.y_train) for c in clients], self.cfg.downstream)
            for c in clients:
                p_global, p_local = predict_proba(self.model, c.x_val), predict_proba(self.local_models[c.id], c.x_val)
                scores = [client_metrics(c.y_val, (lam * p_local + (1 - lam) * p_global).argmax(1))["bacc"] for lam in lams]
                best = max(range(len(lams)), key=lambda j: (scores[j], -j))  # ties: the smaller lambda
                self.choice[c.id] = {"lambda": lams[best], "val_bacc": scores[best]}

    def predict(self, client: ClientData, x: torch.Tensor) -> torch.Tensor:
        p_global = predict_proba(self.model, x)
        if client.id not in self.choice:  # no mix (or during the rounds): the global model alone
            return p_global
        lam = self.choice[client.id]["lambda"]
        return lam * predict_proba(self.local_models[client.id], x) + (1 - lam) * p_global

    # --- state and report ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), **self.dp_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.load_dp_state(state)

    def client_report(self, i: int) -> dict:
        c = self.ctx.clients[i]
        return {"mix": self.choice.get(c.id),
                "downstream_choice": getattr(self.local_models.get(c.id), "chosen", None)}

    def report(self) -> dict:
        return {**super().report(), "n_params": {"shared": count_parameters(self.model), "total": count_parameters(self.model),
                                                 "shared_model": "classifier"}}
