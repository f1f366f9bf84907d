"""FedLambda: the papers' adaptation of kNN-Per (Marfoq et al. 2022) to embeddings.

Prediction = lambda * p_local(y|x) + (1 - lambda) * p_global(y|x), p_global the FedAvg model. p_local
is, by default, a kNN over the client's own training embeddings (kNN-Per); `--fedlambda-local linear`
is the published code's variant (a linear classifier trained on the client's data). lambda (and k)
are chosen on validation data only: per client by default, or one lambda for all clients
(`--lambda-selection global`, the published code's choice).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from data.flags import section, setting
from data.io import UserError
from federated.clients import ClientData
from federated.methods.base import RunContext
from federated.methods.fedavg import FedAvg, FedAvgConfig
from federated.training import ClassifierConfig, downstream_default, predict_proba

LOCAL_MODELS = ("knn", "linear")


@dataclass(frozen=True)
class FedLambdaConfig(FedAvgConfig):
    local_model: str = setting("knn", "local model mixed with the global one: kNN (kNN-Per) or a linear classifier "
                               "(published code)", flag="--fedlambda-local", choices=("knn", "linear"))
    lambda_grid: tuple[float, ...] = setting(tuple(i / 10 for i in range(11)),
                                             "comma-separated lambda values searched on validation data", metavar="L,L,..")
    k_grid: tuple[int, ...] = setting((5, 10, 20, 50), "comma-separated k values for kNN", metavar="K,K,..", minimum=1)
    knn_temperature: float = setting(0.1, "kNN vote weights exp(-distance / T), distances of L2-normalised embeddings",
                                     metavar="T")
    lambda_selection: str = setting("client", "one lambda per client, or one for all clients (published code)",
                                    choices=("client", "global"))
    downstream: ClassifierConfig = section(downstream_default, "Downstream classifier")


def knn_proba(train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, k: int,
              n_classes: int, temperature: float) -> torch.Tensor:
    """Distance-weighted class votes of the k nearest training embeddings (cosine geometry)."""
    k = min(k, len(train_y))
    dist = torch.cdist(F.normalize(x, dim=1), F.normalize(train_x, dim=1))
    d, idx = dist.topk(k, dim=1, largest=False)
    w = torch.softmax(-d / temperature, dim=1)
    votes = torch.zeros(len(x), n_classes, device=x.device, dtype=w.dtype)
    return votes.scatter_add_(1, train_y[idx], w)


class FedLambda(FedAvg):
    name = "fedlambda"
    Config = FedLambdaConfig
    distributed = False  # not on Flower: --lambda-selection global pools the clients' validation scores

    def __init__(self, ctx: RunContext, cfg: FedLambdaConfig) -> None:
        super().__init__(ctx, cfg)
        if cfg.local_model not in LOCAL_MODELS:
            raise UserError(f"--fedlambda-local {cfg.local_model!r} is unknown; valid: {', '.join(LOCAL_MODELS)}")
        if cfg.lambda_selection not in ("client", "global"):
            raise UserError(f"--lambda-selection {cfg.lambda_selection!r}: valid: client, global")
        if not cfg.lambda_grid or any(not 0 <= lam <= 1 for lam in cfg.lambda_grid):
            raise UserError(f"--lambda-grid must be values in [0, 1], got {list(cfg.lambda_grid)}")
        self.choice: dict[int, dict] = {}
        self.local_models: dict[int, torch.nn.Module] = {}

    def local_proba(self, client: ClientData, x: torch.Tensor, k: int) -> torch.Tensor:
        if self.cfg.local_model == "knn":
            return knn_proba(client.x_train, client.y_train, x, k, self.ctx.n_classes, self.cfg.knn_temperature)
        return predict_proba(self.local_models[client.id], x)

    def finish_clients(self) -> None:
        ks = self.cfg.k_grid if self.cfg.local_model == "knn" else (0,)
        lams = torch.tensor(self.cfg.lambda_grid)
        # val_acc[client, k, lambda]
        val_acc = torch.zeros(len(self.ctx.clients), len(ks), len(lams))
        if self.cfg.local_model == "linear":
            self.local_models = self.fit_client_classifiers([(c.x_train, c.y_train) for c in self.ctx.clients],
                                                            self.cfg.downstream)
        for i, client in enumerate(self.ctx.clients):
            p_global = predict_proba(self.model, client.x_val)
            for j, k in enumerate(ks):
                p_local = self.local_proba(client, client.x_val, k)
                mixed = lams.view(-1, 1, 1).to(p_local) * p_local + (1 - lams.view(-1, 1, 1).to(p_local)) * p_global
                val_acc[i, j] = (mixed.argmax(-1) == client.y_val).float().mean(-1).cpu()
        if self.cfg.lambda_selection == "global":
            flat = val_acc.mean(0).flatten().argmax().item()  # first maximum: the smallest k, lambda
            picks = [divmod(flat, len(lams))] * len(self.ctx.clients)
        else:
            picks = [divmod(val_acc[i].flatten().argmax().item(), len(lams)) for i in range(len(self.ctx.clients))]
        self.choice = {c.id: {"k": int(ks[j]), "lambda": float(lams[l]), "val_acc": float(val_acc[i, j, l])}
                       for i, (c, (j, l)) in enumerate(zip(self.ctx.clients, picks))}

    def predict(self, client: ClientData, x: torch.Tensor) -> torch.Tensor:
        if not self.choice:  # during the rounds: the global model alone
            return super().predict(client, x)
        pick = self.choice[client.id]
        return pick["lambda"] * self.local_proba(client, x, pick["k"]) + (1 - pick["lambda"]) * super().predict(client, x)

    def report(self) -> dict:
        return {"fedlambda": {"local_model": self.cfg.local_model, "selection": self.cfg.lambda_selection,
                              "clients": [{"id": i, **v} for i, v in sorted(self.choice.items())]}}
