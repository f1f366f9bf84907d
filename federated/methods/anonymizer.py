"""What every anonymizer shares: DP bookkeeping per client, noisy aggregation weights, synthesis with a
class policy, and the downstream classifier on real + synthetic data.

A subclass supplies the generative model through `local_train` (one round on one client, returns the
payload it sends), `shared_state`/`receive` (the shared model the server holds and broadcasts),
`sample` (synthetic embeddings for given labels, on a client, after training) and, where the server
does more than a weighted average, `aggregate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from data.flags import section, setting
from data.io import UserError
from federated.clients import ClientData, make_generator, poisson_batch
from federated.evaluation import client_metrics
from federated.fidelity import ReleaseEvalConfig, fidelity_report
from federated.channel import SIZE_LEDGER
from federated.methods.base import (BATCHES, DOWNSTREAM, LATENT, NOISE, RELEASE_EVAL, SERVER, SYNTH, FederatedMethod,
                                    RunContext)
from federated.privacy import ClientAccountant, PrivacyConfig, add_noise, calibrate_noise, clipped_grad_sum, epsilon_of
from federated.training import ClassifierConfig, downstream_default, fit_downstream, predict_proba

POLICIES = ("fill", "reference", "uniform")


@dataclass(frozen=True)
class GenTrainConfig:
    lr: float = setting(1e-3, "generator optimiser (Adam) learning rate", metavar="LR")
    batch_size: int = setting(256, "expected (Poisson) batch size of the DP steps", metavar="N", minimum=1)
    local_epochs: int = setting(5, "local epochs per round", metavar="N", minimum=1)


@dataclass(frozen=True)
class SynthesisConfig:
    policy: str = setting("fill", "fill: top up every class to the client's largest; reference: as many as each real "
                          "class (x factor, published code); uniform: --synthetic-per-class each",
                          flag="--synthesis", choices=POLICIES)
    factor: float = setting(1.0, "scales the fill target / the reference counts", flag="--generated-factor",
                            metavar="F", minimum=0)
    per_class: int = setting(0, "samples per class for --synthesis uniform", flag="--synthetic-per-class",
                             metavar="N", minimum=0)
    z_var: float = setting(1.0, "latent variance when sampling", flag="--z-var", metavar="VAR", minimum=0)


def synthetic_counts(class_counts: torch.Tensor, cfg: SynthesisConfig) -> torch.Tensor:
    """Synthetic samples per class for one client (its own counts never leave it)."""
    if cfg.policy == "fill":
        target = math.ceil(cfg.factor * int(class_counts.max()))
        return (target - class_counts).clamp(min=0)
    if cfg.policy == "reference":
        return (cfg.factor * class_counts).round().long()
    if cfg.policy == "uniform":
        return torch.full_like(class_counts, cfg.per_class)
    raise UserError(f"--synthesis {cfg.policy!r} is unknown; valid: {', '.join(POLICIES)}")


@dataclass(frozen=True)
class SynthesizerConfig:
    """What every anonymizer has: its privacy, its synthesis, the downstream classifier, the audit."""
    privacy: PrivacyConfig = section(PrivacyConfig, "Privacy")
    synthesis: SynthesisConfig = section(SynthesisConfig, "Synthesis")
    downstream: ClassifierConfig = section(downstream_default, "Downstream classifier")
    evaluation: ReleaseEvalConfig = section(ReleaseEvalConfig, "Fidelity and membership audit")


@dataclass(frozen=True)
class AnonymizerConfig(SynthesizerConfig):
    """An anonymizer whose generator is trained by DP-SGD over rounds."""
    gen: GenTrainConfig = section(GenTrainConfig, "Generator training")


class Anonymizer(FederatedMethod):
    """DP-trained federated generator -> local synthesis -> downstream classifier on real + synthetic."""

    def __init__(self, ctx: RunContext, cfg: AnonymizerConfig) -> None:
        super().__init__(ctx, cfg)
        if cfg.synthesis.policy not in POLICIES:
            raise UserError(f"--synthesis {cfg.synthesis.policy!r} is unknown; valid: {', '.join(POLICIES)}")
        self.privacy = cfg.privacy
        self.noise_gens = [ctx.private_generator(c.id, NOISE) for c in ctx.clients]
        self.batch_gens = [ctx.private_generator(c.id, BATCHES) for c in ctx.clients]
        self.latent_gens = [ctx.private_generator(c.id, LATENT) for c in ctx.clients]
        self.accountants = [ClientAccountant(self.privacy) for _ in ctx.clients]
        self._noise_multipliers: list[float] | None = None  # calibrated when first needed (see below)
        self._released_sizes: list[float] | None = None     # released when first needed (see below)
        self._steps_per_epoch: list[int] | None = None       # derived from the released sizes
        self._sample_rates: list[float] | None = None
        self.synthetic_sizes: dict[int, int] = {}
        self.downstream_models: dict[int, torch.nn.Module] = {}
        self.release_eval: dict = {}

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
            self._steps_per_epoch = [math.ceil(self.public_size(i) / self.cfg.gen.batch_size)
                                     for i in range(len(self.ctx.clients))]
        return self._steps_per_epoch

    @property
    def sample_rates(self) -> list[float]:
        if self._sample_rates is None:
            self._sample_rates = [1 / s for s in self.steps_per_epoch]
        return self._sample_rates

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
        rates, steps = self.sample_rates, self.steps_per_epoch
        for i in range(len(self.ctx.clients)):
            q, total = rates[i], self.ctx.rounds * self.cfg.gen.local_epochs * steps[i]
            if (q, total) not in calibrated:  # clients with the same plan share one calibration
                calibrated[q, total] = calibrate_noise(
                    lambda s: [(count_sigma, 1.0, 1), *self.planned_history(s, q, total)], self.privacy)
            out.append(calibrated[q, total])
        return out

    def planned_history(self, sigma: float, sample_rate: float, steps: int) -> list[tuple[float, float, int]]:
        """The noisy training steps the whole run will take (a subclass may add releases)."""
        return [(sigma, sample_rate, steps)]

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

    def latent_noise(self, n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
        """Latent draws for synthesis, with the configured variance."""
        return torch.randn(n, dim, generator=gen).to(self.ctx.device) * self.cfg.synthesis.z_var ** 0.5

    # --- hooks -------------------------------------------------------------------------------
    def local_train(self, i: int, rnd: int) -> tuple[dict[str, torch.Tensor], float]:
        """One round on client i: returns (the payload it sends, its mean local loss)."""
        raise NotImplementedError

    def sample(self, i: int, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Synthetic embeddings for labels y, on client i, after training."""
        raise NotImplementedError

    # --- round and downstream ----------------------------------------------------------------
    def train_clients(self, indices: list[int], rnd: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        return [self.local_train(i, rnd) for i in indices]

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

    def synthesize(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        client = self.ctx.clients[i]
        counts = torch.bincount(client.y_train.cpu(), minlength=self.ctx.n_classes)
        n_syn = synthetic_counts(counts, self.cfg.synthesis)
        y = torch.repeat_interleave(torch.arange(self.ctx.n_classes), n_syn).to(self.ctx.device)
        if len(y) == 0:
            return client.x_train[:0], client.y_train[:0]
        with torch.no_grad():
            return self.sample(i, y, make_generator(self.ctx.seed, client.id, SYNTH)), y

    def finish_clients(self) -> None:
        synthetic = []
        with self.ctx.phase("synthesis and downstream classifiers"):
            for i, c in enumerate(self.ctx.clients):
                synthetic.append(self.synthesize(i))
                self.synthetic_sizes[c.id] = len(synthetic[-1][1])
            self.downstream_models = self.fit_client_classifiers([(c.x_train, c.y_train) for c in self.ctx.clients],
                                                                 self.cfg.downstream, synthetic=synthetic)
        if self.cfg.evaluation.enabled:
            self.release_eval = self.evaluate_release()

    def evaluate_release(self) -> dict:
        """Fidelity, train-on-synthetic-test-on-real and a membership audit of what the trained
        generator releases: each client draws as many synthetic records as it has training records,
        with the same labels (its own stream); real held-out = the clients' test splits, members =
        their training records, the attack's reference population = their validation splits, which
        no generator saw."""
        from federated.audit import membership_audit  # sklearn: seconds per process, needed only here
        cfg, clients, seed = self.cfg.evaluation, self.ctx.clients, self.ctx.seed
        with torch.no_grad():
            syn_x = torch.cat([self.sample(i, c.y_train, make_generator(seed, c.id, RELEASE_EVAL))
                               for i, c in enumerate(clients)])
        syn_y = torch.cat([c.y_train for c in clients])

        def pooled(attr: str) -> torch.Tensor:
            return torch.cat([getattr(c, attr) for c in clients])
        x_test, y_test = pooled("x_test"), pooled("y_test")
        with self.ctx.phase("release fidelity and TSTR"):
            [tstr_model] = fit_downstream([(syn_x, syn_y)], [(pooled("x_val"), pooled("y_val"))], self.ctx.n_classes,
                                          self.cfg.downstream, [make_generator(seed, SERVER, RELEASE_EVAL, DOWNSTREAM)])
            tstr = client_metrics(y_test, predict_proba(tstr_model, x_test).argmax(1))
            gen = make_generator(seed, SERVER, RELEASE_EVAL)
            fidelity = fidelity_report(x_test, y_test, syn_x, syn_y, self.ctx.n_classes, cfg, gen)
        with self.ctx.phase("membership audit"):
            audit = membership_audit(pooled("x_train"), x_test, syn_x, pooled("x_val"), cfg, gen)
        return {"fidelity": {"tstr": tstr, **fidelity}, "audit": audit}

    def predict(self, client: ClientData, x: torch.Tensor) -> torch.Tensor:
        return predict_proba(self.downstream_models[client.id], x)

    # --- state and report ----------------------------------------------------------------------
    GENERATORS = ("noise_gens", "batch_gens", "latent_gens")

    def anonymizer_state(self) -> dict:
        """Random streams and privacy ledgers: the state every anonymizer checkpoints."""
        return {**{key: [g.get_state() for g in getattr(self, key)] for key in self.GENERATORS},
                "accountants": [a.state_dict() for a in self.accountants], "noise_multipliers": self._noise_multipliers,
                "released_sizes": self._released_sizes}

    def load_anonymizer_state(self, state: dict) -> None:
        for key in self.GENERATORS:
            for g, s in zip(getattr(self, key), state[key]):
                g.set_state(s)
        for a, s in zip(self.accountants, state["accountants"]):
            a.load_state_dict(s)
        self._noise_multipliers = state["noise_multipliers"]
        self._released_sizes = state["released_sizes"]
        self._steps_per_epoch = self._sample_rates = None  # derived again from the restored sizes

    def shared_parameters(self) -> dict[str, int]:
        raise NotImplementedError

    def epsilon_alone(self, history) -> float:
        """The epsilon one part of the ledger would cost on its own (the parts compose to epsilon_spent)."""
        return epsilon_of(history, self.privacy.delta, self.privacy.accountant)

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
                            "n_synthetic": self.synthetic_sizes.get(c.id, 0),
                            "downstream_choice": getattr(self.downstream_models.get(c.id), "chosen", None)})

        def worst(key: str) -> float | None:
            spent = [c[key] for c in clients if c[key] is not None]
            return max(spent) if spent else None
        return {
            "privacy": {"enabled": self.privacy.enabled, "target_epsilon": self.privacy.target_epsilon if self.privacy.enabled else None,
                        "delta": self.privacy.delta, "accountant": self.privacy.accountant,
                        "max_grad_norm": self.privacy.max_grad_norm, "randomness": self.ctx.randomness, "clients": clients,
                        "epsilon_spent_max": worst("epsilon_spent"), f"epsilon_spent_max_{other}": worst(f"epsilon_spent_{other}")},
            "n_params": self.shared_parameters(),
            "synthesis": {"policy": self.cfg.synthesis.policy, "factor": self.cfg.synthesis.factor,
                          "per_class": self.cfg.synthesis.per_class},
            **self.release_eval,
        }
