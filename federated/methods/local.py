"""Reference rows: each client alone (`local`) and all training data pooled (`centralized`).

Both train the downstream linear classifier with the downstream optimiser settings, the same
trainer the anonymizers use on real + synthetic data, so `local` is their no-sharing baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from data.flags import section
from federated.clients import ClientData, make_generator
from federated.methods.base import DOWNSTREAM, SERVER, Method, RunContext
from federated.training import ClassifierConfig, downstream_default, fit_downstream, predict_proba


@dataclass(frozen=True)
class DownstreamConfig:
    downstream: ClassifierConfig = section(downstream_default, "Downstream classifier")
    # the strongest no-sharing yardstick: converged, class-balanced, its penalty chosen on validation
    PRESETS: ClassVar[dict] = {"balanced": {"downstream_recipe": "balanced"}}


class Local(Method):
    name = "local"
    Config = DownstreamConfig
    federated = False

    def __init__(self, ctx: RunContext, cfg: DownstreamConfig) -> None:
        super().__init__(ctx, cfg)
        self.models: dict[int, torch.nn.Module] = {}

    def finish(self) -> None:
        with self.ctx.phase("downstream classifiers"):
            self.models = self.fit_client_classifiers([(c.x_train, c.y_train) for c in self.ctx.clients],
                                                      self.cfg.downstream)

    def predict(self, client: ClientData, x: torch.Tensor) -> torch.Tensor:
        return predict_proba(self.models[client.id], x)

    def report(self) -> dict:
        """The balanced recipe's pick per client (penalty, validation BACC, whether its fit converged), as the
        anonymizers report theirs."""
        return choices_block({c.id: self.models.get(c.id) for c in self.ctx.clients})


class Centralized(Method):
    name = "centralized"
    Config = DownstreamConfig
    federated = False

    def finish(self) -> None:
        def pooled(part: str) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(torch.cat([getattr(c, f"{xy}_{part}") for c in self.ctx.clients]) for xy in "xy")
        with self.ctx.phase("downstream classifier"):
            [self.model] = fit_downstream([pooled("train")], [pooled("val")], self.ctx.n_classes, self.cfg.downstream,
                                          [make_generator(self.ctx.seed, SERVER, DOWNSTREAM)])

    def predict(self, client: ClientData, x: torch.Tensor) -> torch.Tensor:
        return predict_proba(self.model, x)

    def report(self) -> dict:
        return choices_block({"pooled": getattr(self, "model", None)})


def choices_block(models: dict) -> dict:
    """results.json's downstream_choice block {client: the balanced recipe's pick}; none under the papers' recipe."""
    chosen = {str(k): m.chosen for k, m in models.items() if hasattr(m, "chosen")}
    return {"downstream_choice": chosen} if chosen else {}
