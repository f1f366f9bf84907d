"""What every anonymizer shares: the DP bookkeeping of every DP method (federated/methods/dpsgd.py),
synthesis with a class policy, and the downstream classifier on real + synthetic data.

A subclass supplies the generative model through `local_train` (one round on one client, returns the
payload it sends), `shared_state`/`receive` (the shared model the server holds and broadcasts),
`sample` (synthetic embeddings for given labels, on a client, after training) and, where the server
does more than a weighted average, `aggregate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from data.flags import section, setting
from data.io import UserError
from federated.clients import ClientData, make_generator
from federated.evaluation import client_metrics
from federated.fidelity import ReleaseEvalConfig, fidelity_report
from federated.methods.base import DOWNSTREAM, LATENT, RELEASE_EVAL, SERVER, SYNTH, RunContext
from federated.methods.dpsgd import DPClients, DPSGDConfig
from federated.privacy import PrivacyConfig
from federated.training import ClassifierConfig, downstream_default, fit_downstream, predict_proba

POLICIES = ("fill", "reference", "uniform")
CLASS_SETS = ("all", "present")


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
    classes: str = setting("all", "classes synthesised: all (the papers'), or present: only those the client has "
                           "real records of, so that its classifier keeps the label space Local's has and the "
                           "shared data only strengthen its rare classes", flag="--synthetic-classes",
                           choices=CLASS_SETS)


def _pooled(clients: list[ClientData], attr: str) -> torch.Tensor:
    return torch.cat([getattr(c, attr) for c in clients])


def synthetic_counts(class_counts: torch.Tensor, cfg: SynthesisConfig) -> torch.Tensor:
    """Synthetic samples per class for one client (its own counts never leave it)."""
    if cfg.policy == "fill":
        target = math.ceil(cfg.factor * int(class_counts.max()))
        counts = (target - class_counts).clamp(min=0)
    elif cfg.policy == "reference":
        counts = (cfg.factor * class_counts).round().long()
    elif cfg.policy == "uniform":
        counts = torch.full_like(class_counts, cfg.per_class)
    else:
        raise UserError(f"--synthesis {cfg.policy!r} is unknown; valid: {', '.join(POLICIES)}")
    return counts if cfg.classes == "all" else torch.where(class_counts > 0, counts, 0)


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
    gen: DPSGDConfig = section(DPSGDConfig, "Generator training")


class Anonymizer(DPClients):
    """DP-trained federated generator -> local synthesis -> downstream classifier on real + synthetic."""

    def __init__(self, ctx: RunContext, cfg: AnonymizerConfig) -> None:
        super().__init__(ctx, cfg)
        if cfg.synthesis.policy not in POLICIES:
            raise UserError(f"--synthesis {cfg.synthesis.policy!r} is unknown; valid: {', '.join(POLICIES)}")
        self.latent_gens = [ctx.private_generator(c.id, LATENT) for c in ctx.clients]
        self.synthetic_sizes: dict[int, int] = {}
        self.downstream_models: dict[int, torch.nn.Module] = {}
        self.release_eval: dict = {}

    @property
    def sgd(self) -> DPSGDConfig:
        return self.cfg.gen

    def latent_noise(self, n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
        """Latent draws for synthesis, with the configured variance."""
        return torch.randn(n, dim, generator=gen).to(self.ctx.device) * self.cfg.synthesis.z_var ** 0.5

    # --- hooks -------------------------------------------------------------------------------
    def local_train(self, i: int, rnd: int) -> tuple[dict[str, torch.Tensor], float]:
        """One round on client i: returns (the payload it sends, its mean local loss)."""
        raise NotImplementedError

    def sample(self, i: int, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Synthetic embeddings for labels y, on client i, after training: what the shared generator
        releases (the release evaluation samples this)."""
        raise NotImplementedError

    def synthetic_scale(self, i: int, y: torch.Tensor) -> torch.Tensor | None:
        """Per-class factors (n_classes,) on the synthetic records' weight in client i's balanced-recipe
        classifier, for its synthetic labels y; None: the same weight for every class."""
        return None

    def sample_local(self, i: int, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The synthetic embeddings client i trains its own downstream classifier on; they never leave
        it, so a variant may combine the shared generator with the client's own data."""
        return self.sample(i, y, gen)

    # --- round and downstream ----------------------------------------------------------------
    def stacked_round(self, indices: list[int], rnd: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        """A round of the clients `indices` with their models stacked (DPClients.train_stacked), for a
        method with STACKED = True."""
        raise NotImplementedError

    def train_clients(self, indices: list[int], rnd: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        if self.cfg.gen.batch_clients and len(indices) > 1:
            return self.stacked_round(indices, rnd)
        return [self.local_train(i, rnd) for i in indices]

    def synthesize(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        client = self.ctx.clients[i]
        counts = torch.bincount(client.y_train.cpu(), minlength=self.ctx.n_classes)
        n_syn = synthetic_counts(counts, self.cfg.synthesis)
        y = torch.repeat_interleave(torch.arange(self.ctx.n_classes), n_syn).to(self.ctx.device)
        if len(y) == 0:
            return client.x_train[:0], client.y_train[:0]
        with torch.no_grad():
            return self.sample_local(i, y, make_generator(self.ctx.seed, client.id, SYNTH)), y

    def finish_clients(self) -> None:
        clients, cfg, seed = self.ctx.clients, self.cfg, self.ctx.seed
        with self.ctx.phase("synthesis and downstream classifiers"):
            synthetic = [self.synthesize(i) for i in range(len(clients))]
            self.synthetic_sizes = {c.id: len(s[1]) for c, s in zip(clients, synthetic)}
            datasets, vals = [(c.x_train, c.y_train) for c in clients], [(c.x_val, c.y_val) for c in clients]
            gens = [make_generator(seed, c.id, DOWNSTREAM) for c in clients]
            scales = [self.synthetic_scale(i, s[1]) for i, s in enumerate(synthetic)]
            release = self.release_samples() if cfg.evaluation.enabled else None
            if release is not None:
                # the TSTR classifier trains in the same batched loop as the clients' (its own stream and
                # arithmetic), on the release the evaluation samples
                datasets.append(release)
                vals.append((_pooled(clients, "x_val"), _pooled(clients, "y_val")))
                gens.append(make_generator(seed, SERVER, RELEASE_EVAL, DOWNSTREAM))
                synthetic.append(None)
                scales.append(None)
            models = fit_downstream(datasets, vals, self.ctx.n_classes, cfg.downstream, gens, synthetic=synthetic,
                                    synthetic_scales=scales)
            self.downstream_models = {c.id: m for c, m in zip(clients, models)}
        if release is not None:
            self.release_eval = self.evaluate_release(release[0], models[-1])

    def release_samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the trained generator releases, for its evaluation: each client draws as many synthetic
        records as it has training records, with the same labels (its own stream)."""
        clients = self.ctx.clients
        with torch.no_grad():
            syn_x = torch.cat([self.sample(i, c.y_train, make_generator(self.ctx.seed, c.id, RELEASE_EVAL))
                               for i, c in enumerate(clients)])
        return syn_x, _pooled(clients, "y_train")

    def evaluate_release(self, syn_x: torch.Tensor, tstr_model: torch.nn.Module) -> dict:
        """Fidelity, train-on-synthetic-test-on-real (tstr_model, trained on the release) and a
        membership audit of the release syn_x (labels: the clients' training labels): real held-out =
        the clients' test splits, members = their training records, the attack's reference
        population = their validation splits, which no generator saw."""
        from federated.audit import membership_audit  # sklearn: seconds per process, needed only here
        cfg, clients = self.cfg.evaluation, self.ctx.clients
        x_test, y_test = _pooled(clients, "x_test"), _pooled(clients, "y_test")
        with self.ctx.phase("release fidelity and TSTR"):
            tstr = client_metrics(y_test, predict_proba(tstr_model, x_test).argmax(1))
            gen = make_generator(self.ctx.seed, SERVER, RELEASE_EVAL)
            fidelity = fidelity_report(x_test, y_test, syn_x, _pooled(clients, "y_train"), self.ctx.n_classes, cfg, gen)
        with self.ctx.phase("membership audit"):
            audit = membership_audit(_pooled(clients, "x_train"), x_test, syn_x, _pooled(clients, "x_val"), cfg, gen)
        return {"fidelity": {"tstr": tstr, **fidelity}, "audit": audit}

    def predict(self, client: ClientData, x: torch.Tensor) -> torch.Tensor:
        return predict_proba(self.downstream_models[client.id], x)

    # --- state and report ----------------------------------------------------------------------
    GENERATORS = (*DPClients.GENERATORS, "latent_gens")

    def shared_parameters(self) -> dict[str, int]:
        raise NotImplementedError

    def client_report(self, i: int) -> dict:
        c = self.ctx.clients[i]
        return {"n_synthetic": self.synthetic_sizes.get(c.id, 0),
                "downstream_choice": getattr(self.downstream_models.get(c.id), "chosen", None)}

    def report(self) -> dict:
        return {**super().report(), "n_params": self.shared_parameters(),
                "synthesis": {"policy": self.cfg.synthesis.policy, "factor": self.cfg.synthesis.factor,
                              "per_class": self.cfg.synthesis.per_class},
                **self.release_eval}
