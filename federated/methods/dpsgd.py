"""What every method with a DP promise shares: one accountant per client, the noisy size release that
sets its aggregation weight and sampling rate, a noise multiplier calibrated to the whole run, the
DP-SGD step (Poisson batch, exact per-record clipping, Gaussian noise), optionally several clients' steps
stacked into batched matmuls (train_stacked), and the privacy block of
results.json. The anonymizers (a DP-trained generator) and DP-FedAvg (a DP-trained classifier) build
on it; a subclass names its DP-SGD settings through `sgd` and its extra ledger entries through
`planned_history`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from data.flags import setting
from data.io import UserError
from federated.channel import SIZE_LEDGER
from federated.clients import poisson_batch
from federated.methods.base import BATCHES, NOISE, FederatedMethod, RunContext
from federated.privacy import (ClientAccountant, add_noise, calibrate_noise, clipped_grad_sum,
                               clipped_grad_sums_stacked, epsilon_of)
from models.stacked import select_first, stack_modules, unshare


LR_SCHEDULES = ("constant", "cosine")


def pad_records(batches: list[tuple[torch.Tensor, ...]], device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """K clients' per-record tuples padded with zeros to the longest: the tensors (K, width, ...) and the
    (K, width) mask of the real records."""
    width = max(len(b[0]) for b in batches)
    mask = torch.zeros(len(batches), width, device=device)
    padded = [torch.zeros(len(batches), width, *t.shape[1:], dtype=t.dtype, device=device) for t in batches[0]]
    for j, batch in enumerate(batches):
        mask[j, :len(batch[0])] = 1
        for full, t in zip(padded, batch):
            full[j, :len(t)] = t
    return padded, mask


@dataclass(frozen=True)
class DPSGDConfig:
    lr: float = setting(1e-3, "Adam learning rate of the DP steps", metavar="LR")
    batch_size: int = setting(256, "expected (Poisson) batch size of the DP steps", metavar="N", minimum=1)
    local_epochs: int = setting(5, "local epochs per round", metavar="N", minimum=1)
    steps: int = setting(0, "DP steps per client per round, a fixed budget whatever the client's size (0: local "
                         "epochs x the client's batches per epoch)", metavar="N", minimum=0)
    lr_schedule: str = setting("constant", "learning rate over each client's DP steps of the whole run: constant, or "
                               "cosine (from the learning rate down to 0 at the last step)", choices=LR_SCHEDULES)
    batch_clients: bool = setting(False, "train the clients' DP steps together, their models stacked (one batched "
                                  "matmul per layer instead of one per client; each keeps its own batches, clipping, "
                                  "noise, optimiser and accountant; equal to one client after another up to float "
                                  "rounding, which a GAN's training amplifies: DP-CGAN's metrics move by up to ~1 "
                                  "point). Methods with a stacked step: dpcgan, dpcvae, fedhypevae")


class DPClients(FederatedMethod):
    """Per-client DP bookkeeping over cfg.privacy (a PrivacyConfig) and the DP-SGD plan `sgd`."""

    GENERATORS: tuple[str, ...] = ("noise_gens", "batch_gens")  # the private streams a checkpoint keeps
    STACKED = False  # True where the method has a stacked round (train_stacked) for --gen-batch-clients

    def __init__(self, ctx: RunContext, cfg) -> None:
        super().__init__(ctx, cfg)
        plan = getattr(cfg, "gen", None) or getattr(cfg, "sgd", None)  # None: no DP-SGD (one-shot DP-Gauss)
        if plan is not None and plan.batch_clients and not self.STACKED:
            from federated.methods import METHODS  # here: the registry imports this module
            able = ", ".join(sorted(n for n, m in METHODS.items() if getattr(m, "STACKED", False)))
            raise UserError(f"--gen-batch-clients/--dp-batch-clients: {self.name} has no stacked step; drop the flag "
                            f"(available for: {able})")
        self.privacy = cfg.privacy
        self.noise_gens = [ctx.private_generator(c.id, NOISE) for c in ctx.clients]
        self.batch_gens = [ctx.private_generator(c.id, BATCHES) for c in ctx.clients]
        self.accountants = [ClientAccountant(self.privacy) for _ in ctx.clients]
        self._noise_multipliers: list[float] | None = None  # calibrated when first needed (see below)
        self._released_sizes: list[float] | None = None     # released when first needed (see below)
        self._steps_per_epoch: list[int] | None = None       # derived from the released sizes
        self._sample_rates: list[float] | None = None

    @property
    def sgd(self) -> DPSGDConfig:
        """The DP-SGD plan: expected batch, local epochs, learning rate."""
        raise NotImplementedError

    # --- public sizes --------------------------------------------------------------------------
    @property
    def released_sizes(self) -> list[float]:
        """Each client's size as the server sees it: under DP, n_i + N(0, count_noise^2) (sensitivity 1,
        one Gaussian release in the ledger), released once and kept in state (a Flower client
        rebuilds its method for every message and repeats the same number: no new release)."""
        if self._released_sizes is None:
            sizes = []
            for i, c in enumerate(self.ctx.clients):
                if self.privacy.enabled:
                    self.accountants[i].release(SIZE_LEDGER, self.privacy.count_noise)
                    sizes.append(c.n_train + self.privacy.count_noise * float(torch.randn(1, generator=self.noise_gens[i])))
                else:
                    sizes.append(float(c.n_train))
            self._released_sizes = sizes
        return self._released_sizes

    def public_size(self, i: int) -> float:
        """The size that shapes client i's training (q, steps, the gradient's scale, fake batches):
        the released one, never the exact n_i (post-processing of the release)."""
        return max(self.released_sizes[i], 1.0)

    @property
    def steps_per_epoch(self) -> list[int]:
        # Opacus's convention: q = 1 / (batches per epoch), that many Poisson steps per epoch; fixed
        # once the sizes are released, and read at every step
        if self._steps_per_epoch is None:
            self._steps_per_epoch = [math.ceil(self.public_size(i) / self.sgd.batch_size)
                                     for i in range(len(self.ctx.clients))]
        return self._steps_per_epoch

    @property
    def sample_rates(self) -> list[float]:
        if self._sample_rates is None:
            self._sample_rates = [1 / s for s in self.steps_per_epoch]
        return self._sample_rates

    def local_steps(self, i: int) -> int:
        """Client i's DP steps in one round (the accountant's plan is rounds x this)."""
        return self.sgd.steps or self.sgd.local_epochs * self.steps_per_epoch[i]

    def schedule_lr(self, i: int, rnd: int, step: int, *optimizers: torch.optim.Optimizer) -> None:
        """Sets the learning rate of client i's `step`-th DP step of round `rnd` (0-based): a function of
        the position in the run only, so a resumed or rebuilt (Flower) client continues the schedule."""
        if self.sgd.lr_schedule == "constant":
            return
        per_round = self.local_steps(i)
        scale = 0.5 * (1 + math.cos(math.pi * (rnd * per_round + step) / (self.ctx.rounds * per_round)))
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * scale

    def expected_batch(self, i: int) -> float:
        return self.sample_rates[i] * self.public_size(i)

    @property
    def noise_multipliers(self) -> list[float]:
        """Each client's DP-SGD noise multiplier, calibrated so that its whole planned ledger (size
        release, every step of every round, later releases) meets the target. Calibration is seconds of
        accountant work: done once, on first use, and kept in state_dict (a Flower client rebuilds its
        method for every message)."""
        if self._noise_multipliers is None:
            self._noise_multipliers = self.calibrate()
        return self._noise_multipliers

    def calibrate(self) -> list[float]:
        if not self.privacy.enabled:
            return [0.0] * len(self.ctx.clients)
        count_sigma, calibrated, out = self.privacy.count_noise, {}, []
        rates = self.sample_rates
        for i in range(len(self.ctx.clients)):
            q, total = rates[i], self.ctx.rounds * self.local_steps(i)
            if (q, total) not in calibrated:  # clients with the same plan share one calibration
                calibrated[q, total] = calibrate_noise(
                    lambda s: [(count_sigma, 1.0, 1), *self.planned_history(s, q, total)], self.privacy)
            out.append(calibrated[q, total])
        return out

    def planned_history(self, sigma: float, sample_rate: float, steps: int) -> list[tuple[float, float, int]]:
        """The noisy training steps the whole run will take (a subclass may add releases)."""
        return [(sigma, sample_rate, steps)]

    def gaussian_release(self, i: int, sums: torch.Tensor, what: str, sigma: float, sensitivity: float) -> torch.Tensor:
        """The Gaussian mechanism on one-off sums of client i: noise std sigma x their L2 sensitivity, one
        ledger entry (float64 noise from its private stream)."""
        if not self.privacy.enabled:
            return sums
        self.accountants[i].release(what, sigma)
        noise = torch.randn(sums.shape, generator=self.noise_gens[i], dtype=torch.float64)
        return sums + sigma * sensitivity * noise.to(sums.device)

    # --- DP-SGD ------------------------------------------------------------------------------
    def poisson_indices(self, i: int, gen: torch.Generator) -> torch.Tensor:
        return poisson_batch(self.ctx.clients[i].n_train, self.sample_rates[i], gen)

    def privatize(self, i: int, summed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Noise + scaling of a clipped gradient sum, and one accountant step for client i."""
        expected = self.expected_batch(i)
        if not self.privacy.enabled:
            return {n: g / expected for n, g in summed.items()}
        self.accountants[i].step(self.noise_multipliers[i], self.sample_rates[i])
        return add_noise(summed, noise_multiplier=self.noise_multipliers[i],
                         max_grad_norm=self.privacy.max_grad_norm, expected_batch_size=expected,
                         generator=self.noise_gens[i])

    @property
    def clip_norm(self) -> float:
        return self.privacy.max_grad_norm if self.privacy.enabled else float("inf")

    def private_gradients(self, i: int, model: torch.nn.Module, per_sample_loss: Callable[[], torch.Tensor],
                          n_records: int) -> tuple[dict[str, torch.Tensor], float | None]:
        """One DP-SGD gradient of client i over a Poisson batch of n_records: clipped per-record sum,
        noise, accountant step. Also the batch's mean loss. An empty batch (it happens at small
        expected batch sizes) is a zero sum plus noise, as in Opacus, and has no loss (None)."""
        if n_records == 0:
            summed = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
            return self.privatize(i, summed), None
        losses = []

        def recorded() -> torch.Tensor:
            losses.append(per_sample_loss())
            return losses[-1]
        summed, _ = clipped_grad_sum(model, recorded, self.clip_norm)
        return self.privatize(i, summed), float(losses[0].detach().mean())

    def stacked_private_gradients(self, clients: list[int], stacked: torch.nn.Module, models: list[torch.nn.Module],
                                  per_sample_loss: Callable[..., torch.Tensor], batches: list[tuple[torch.Tensor, ...]]
                                  ) -> tuple[list[dict[str, torch.Tensor]], list[float | None]]:
        """private_gradients for several clients at once: `stacked` holds their models (the copies that
        run, in the order of `clients`), batches[j] is client j's per-record inputs, padded here to one
        length. One batched forward and ghost-clipped backward, then each client's own noise and
        accountant step. Returns each client's gradients (named as its model's parameters) and mean
        batch loss (None for an empty batch)."""
        padded, mask = pad_records(batches, self.ctx.device)
        if not mask.shape[1]:  # every batch is empty: zero sums plus noise
            summed = {n: torch.zeros(len(clients), *p.shape, device=p.device) for n, p in models[0].named_parameters()}
            return [self.privatize(i, {n: g[j] for n, g in summed.items()}) for j, i in enumerate(clients)], [None] * len(clients)
        losses = []

        def recorded() -> torch.Tensor:
            losses.append(per_sample_loss(stacked, *padded))
            return losses[-1]
        summed, _ = clipped_grad_sums_stacked(stacked, recorded, mask, self.clip_norm)
        counts = mask.sum(1)
        batch_loss = ((losses[0].detach() * mask).sum(1) / counts.clamp(min=1)).tolist()
        grads = [self.privatize(i, {n: g[j] for n, g in summed.items()}) for j, i in enumerate(clients)]
        return grads, [loss if n else None for loss, n in zip(batch_loss, counts.tolist())]

    def train_stacked(self, indices: list[int], rnd: int, models: list[torch.nn.Module],
                      optimizers: list[list[torch.optim.Optimizer]], draw: Callable[[int, torch.Tensor], tuple],
                      per_sample_loss: Callable[..., torch.Tensor]) -> list[float]:
        """One round of DP-SGD for the clients `indices` at once: their models stacked into one
        (models.stacked), one batched forward and ghost-clipped backward per step over their Poisson
        batches padded to one length, then each client's own noise, accountant step and optimisers.
        draw(i, idx): client i's per-record inputs for its batch idx (drawn from its private streams, in
        the order its sequential loop draws them); per_sample_loss(stacked, *inputs) -> (K, B). A client
        with fewer steps than another sits out (no draw, no noise, no step). Equals each client trained
        alone up to the order of float sums. Returns each client's mean batch loss, in the order of `indices`."""
        order = self.stacking_order(indices)
        chosen = [models[i] for i in order]
        stacked = stack_modules(chosen)
        totals, counts = {i: 0.0 for i in indices}, {i: 0 for i in indices}
        try:
            for step, clients in self.stacked_steps(order, stacked):
                batches = [draw(i, self.poisson_indices(i, self.batch_gens[i]).to(self.ctx.device)) for i in clients]
                grads, losses = self.stacked_private_gradients(clients, stacked, models, per_sample_loss, batches)
                for i, own, loss in zip(clients, grads, losses):
                    self.schedule_lr(i, rnd, step, *optimizers[i])
                    self.apply_gradients(i, models[i], own, optimizers[i])
                    if loss is not None:
                        totals[i], counts[i] = totals[i] + loss, counts[i] + 1
        finally:  # the stack is dropped: only the clients' own parameters need their storage back
            unshare(chosen)
        return [totals[i] / max(counts[i], 1) for i in indices]

    def apply_gradients(self, i: int, model: torch.nn.Module, grads: dict[str, torch.Tensor],
                        optimizers: list[torch.optim.Optimizer]) -> None:
        """Client i's update from its private gradients (named as model's parameters): each parameter's
        gradient set, then its optimisers stepped. A method with record-free terms or a projection
        overrides this one hook, for its sequential and its stacked steps alike."""
        for n, p in model.named_parameters():
            p.grad = grads[n]
        for opt in optimizers:
            opt.step()

    def stacking_order(self, indices: list[int]) -> list[int]:
        """The clients in the order they are stacked: most steps first (ties in their order), so that the
        clients with a step left are always the first ones of the stack."""
        return sorted(indices, key=lambda i: -self.local_steps(i))

    def stacked_steps(self, order: list[int], *stacks: torch.nn.Module) -> Iterator[tuple[int, list[int]]]:
        """The steps of a stacked round over clients stacked in `order` (stacking_order): (step, the clients
        with that step in their plan, the first ones of `order`), every stack set to run only their copies
        (the others' are not computed)."""
        plan = [self.local_steps(i) for i in order]
        for step in range(max(plan)):
            active = sum(step < n for n in plan)
            for stacked in stacks:
                select_first(stacked, None if active == len(order) else active)
            yield step, order[:active]

    # --- hooks of the round loop -------------------------------------------------------------
    def upload_weight(self, i: int) -> float:
        return self.released_sizes[i]

    def ledger_names(self, i: int) -> set[str] | None:
        return {r["what"] for r in self.accountants[i].releases} if self.privacy.enabled else None

    def epsilon_spent(self, i: int) -> float | None:
        return self.accountants[i].epsilon() if self.privacy.enabled else None

    def round_metrics(self, rnd: int, losses: list[float]) -> dict:
        metrics = super().round_metrics(rnd, losses)
        every = max(1, self.ctx.rounds // 5)
        if self.privacy.enabled and ((rnd + 1) % every == 0 or rnd + 1 == self.ctx.rounds):
            # the reporting accountant's epsilon so far (seconds of PRV work: 5 times a run, the last
            # one reused by the report)
            metrics["local_epsilon_spent_max"] = max(a.epsilon() for a in self.accountants)
        return metrics

    def prepare(self) -> None:
        with self.ctx.phase("noise calibration"):
            self.noise_multipliers  # noqa: B018  (calibrated and kept in state)

    # --- state and report ----------------------------------------------------------------------
    def dp_state(self) -> dict:
        """Private random streams and privacy ledgers: the state every DP method checkpoints."""
        return {**{key: [g.get_state() for g in getattr(self, key)] for key in self.GENERATORS},
                "accountants": [a.state_dict() for a in self.accountants], "noise_multipliers": self._noise_multipliers,
                "released_sizes": self._released_sizes}

    def load_dp_state(self, state: dict) -> None:
        for key in self.GENERATORS:
            for g, s in zip(getattr(self, key), state[key]):
                g.set_state(s)
        for a, s in zip(self.accountants, state["accountants"]):
            a.load_state_dict(s)
        self._noise_multipliers = state["noise_multipliers"]
        self._released_sizes = state["released_sizes"]
        self._steps_per_epoch = self._sample_rates = None  # derived again from the restored sizes

    def epsilon_alone(self, history) -> float:
        """The epsilon one part of the ledger would cost on its own (the parts compose to epsilon_spent)."""
        return epsilon_of(history, self.privacy.delta, self.privacy.accountant)

    def client_report(self, i: int) -> dict:
        """Extra fields of client i's entry in the privacy block (none by default)."""
        return {}

    def report(self) -> dict:
        """results.json's privacy block. epsilon_spent is the chosen accountant's; the other Opacus
        accountant's figure for the same ledger stands beside it (PRV is tight, RDP an upper bound), so
        no reader takes one accountant's number for all."""
        other = {"prv": "rdp", "rdp": "prv"}[self.privacy.accountant]
        clients = []
        for i, c in enumerate(self.ctx.clients):
            steps, dp, ledger = self.accountants[i].steps, self.privacy.enabled, self.accountants[i]
            clients.append({"id": c.id, "epsilon_spent": ledger.epsilon() if dp else None,
                            f"epsilon_spent_{other}": epsilon_of(ledger.history, self.privacy.delta, other) if dp else None,
                            "epsilon_training": self.epsilon_alone([(self.noise_multipliers[i], self.sample_rates[i], steps)]) if dp else None,
                            "epsilon_releases": self.epsilon_alone([(r["noise_multiplier"], 1.0, 1) for r in ledger.releases]) if dp else None,
                            "noise_multiplier": self.noise_multipliers[i], "sample_rate": self.sample_rates[i],
                            "released_size": self.released_sizes[i],
                            "steps": steps, "history": ledger.history, "releases": ledger.releases,
                            **self.client_report(i)})

        def worst(key: str) -> float | None:
            spent = [c[key] for c in clients if c[key] is not None]
            return max(spent) if spent else None
        return {"privacy": {"enabled": self.privacy.enabled,
                            "target_epsilon": self.privacy.target_epsilon if self.privacy.enabled else None,
                            "delta": self.privacy.delta, "accountant": self.privacy.accountant,
                            "max_grad_norm": self.privacy.max_grad_norm, "randomness": self.ctx.randomness,
                            "clients": clients, "epsilon_spent_max": worst("epsilon_spent"),
                            f"epsilon_spent_max_{other}": worst(f"epsilon_spent_{other}")}}
