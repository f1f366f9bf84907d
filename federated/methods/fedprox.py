"""FedProx (Li et al. 2020): FedAvg plus the proximal term mu/2 * ||w - w_global||^2."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data.flags import setting
from federated.methods.fedavg import FedAvg, FedAvgConfig


@dataclass(frozen=True)
class FedProxConfig(FedAvgConfig):
    mu: float = setting(0.05, "FedProx proximal weight", metavar="MU", minimum=0)


class FedProx(FedAvg):
    name = "fedprox"
    Config = FedProxConfig

    def local_penalty(self, global_state):
        mu = self.cfg.mu

        def proximal(params: dict[str, torch.Tensor]) -> torch.Tensor:  # (A, ...) stacked -> (A,)
            return 0.5 * mu * sum((p - global_state[k]).pow(2).flatten(1).sum(1) for k, p in params.items())
        return proximal
