"""DP-CGAN: the conditional GAN comparison of the DP-CVAE paper. The discriminator (the part that sees
real data) is trained with DP-SGD and stays on the client; the generator is averaged and broadcast.

Per step: the discriminator's gradient on the Poisson-sampled real batch is clipped per sample and
noised; its gradient on generated samples is exact (it depends on no real record). The generator
learns from the discriminator only, with labels drawn uniformly (the reference used real labels
without privacy). Unlike the reference, G and D persist across rounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from data.flags import section, setting
from federated.clients import make_generator
from federated.methods.anonymizer import Anonymizer, AnonymizerConfig
from federated.methods.dpsgd import DPSGDConfig, pad_records
from federated.methods.base import INIT, SERVER, RunContext
from models import count_parameters
from models.cgan import Discriminator, Generator
from models.init import init_linear_layers_
from models.stacked import stack_modules, unshare


@dataclass(frozen=True)
class DPCGANConfig(AnonymizerConfig):
    gen: DPSGDConfig = section(lambda: DPSGDConfig(lr=2e-4), "Generator training")
    latent: int = setting(100, "latent dimension of the generator", metavar="N", minimum=1)


class DPCGAN(Anonymizer):
    name = "dpcgan"
    Config = DPCGANConfig
    betas = (0.5, 0.999)
    STACKED = True

    def __init__(self, ctx: RunContext, cfg: DPCGANConfig) -> None:
        super().__init__(ctx, cfg)
        self.global_generator = init_linear_layers_(
            Generator(ctx.dim, ctx.n_classes, cfg.latent), make_generator(ctx.seed, SERVER, INIT)).to(ctx.device)
        self.generators, self.discriminators = [], []
        for c in ctx.clients:
            gen = make_generator(ctx.seed, c.id, INIT)
            self.generators.append(init_linear_layers_(Generator(ctx.dim, ctx.n_classes, cfg.latent), gen).to(ctx.device))
            self.discriminators.append(init_linear_layers_(Discriminator(ctx.dim, ctx.n_classes), gen).to(ctx.device))
        self.receive(self.global_generator.state_dict())
        self.g_opts = [torch.optim.Adam(g.parameters(), lr=cfg.gen.lr, betas=self.betas, foreach=True) for g in self.generators]
        self.d_opts = [torch.optim.Adam(d.parameters(), lr=cfg.gen.lr, betas=self.betas, foreach=True) for d in self.discriminators]

    def fake_inputs(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent codes and uniform labels of n generated records of client i (its private stream)."""
        z = torch.randn(n, self.cfg.latent, generator=self.latent_gens[i]).to(self.ctx.device)
        y = torch.randint(self.ctx.n_classes, (n,), generator=self.latent_gens[i]).to(self.ctx.device)
        return z, y

    def fake(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, y = self.fake_inputs(i, n)
        return self.generators[i](z, y), y

    def n_fake(self, i: int) -> int:
        return max(1, round(self.expected_batch(i)))

    def local_train(self, i: int, rnd: int) -> tuple[dict[str, torch.Tensor], float]:
        client, G, D = self.ctx.clients[i], self.generators[i], self.discriminators[i]
        n_fake = self.n_fake(i)
        total, steps = 0.0, 0
        for step in range(self.local_steps(i)):
            self.schedule_lr(i, rnd, step, self.d_opts[i], self.g_opts[i])
            # discriminator: private gradient on real records + exact gradient on generated ones
            idx = self.poisson_indices(i, self.batch_gens[i]).to(self.ctx.device)
            x, y = client.x_train[idx], client.y_train[idx]
            def real_loss():
                logits = D(x, y)
                return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
            private, _ = self.private_gradients(i, D, real_loss, len(idx))
            with torch.no_grad():
                x_fake, y_fake = self.fake(i, n_fake)
            logits = D(x_fake, y_fake)
            fake_loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
            fake_grads = torch.autograd.grad(fake_loss, list(D.parameters()))
            for (name, p), g in zip(D.named_parameters(), fake_grads):
                p.grad = private[name] + g
            self.d_opts[i].step()
            # generator: fool the (already private) discriminator
            x_fake, y_fake = self.fake(i, n_fake)
            logits = D(x_fake, y_fake)
            g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            self.g_opts[i].zero_grad(set_to_none=True)
            g_loss.backward(inputs=list(G.parameters()))  # D's weight gradients are neither needed nor computed
            self.g_opts[i].step()
            total, steps = total + float(g_loss.detach()), steps + 1
        return {k: v.detach().clone() for k, v in G.state_dict().items()}, total / max(steps, 1)

    def stacked_round(self, indices: list[int], rnd: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        """local_train for the clients `indices` at once, their generators and discriminators stacked
        (models.stacked): the same draws from each client's streams in the same order, one batched forward
        and backward per step; generated batches padded to the largest client's, padding masked out."""
        order = self.stacking_order(indices)
        Gs, Ds = [self.generators[i] for i in order], [self.discriminators[i] for i in order]
        G, D = stack_modules(Gs), stack_modules(Ds)
        totals = {i: 0.0 for i in indices}

        def fake_losses(clients: list[int], target: float, grad: bool) -> torch.Tensor:
            """Each client's mean BCE of D on a fresh generated batch of its own size: (K,)."""
            (z, y), mask = pad_records([self.fake_inputs(i, self.n_fake(i)) for i in clients], self.ctx.device)
            with torch.set_grad_enabled(grad):
                x = G(z, y)
            logits = D(x, y)
            bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
            return (bce * mask).sum(1) / mask.sum(1)

        def stacked_grads(loss: torch.Tensor, stacked: torch.nn.Module) -> dict[str, torch.Tensor]:
            names, params = zip(*stacked.named_parameters())  # (copies, *shape) each; copy k is order[k]
            return dict(zip(names, torch.autograd.grad(loss, params)))

        def real_loss(stacked: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = stacked(x, y)
            return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
        try:
            for step, clients in self.stacked_steps(order, G, D):
                for i in clients:
                    self.schedule_lr(i, rnd, step, self.d_opts[i], self.g_opts[i])
                batches = []
                for i in clients:
                    idx = self.poisson_indices(i, self.batch_gens[i]).to(self.ctx.device)
                    batches.append((self.ctx.clients[i].x_train[idx], self.ctx.clients[i].y_train[idx]))
                private, _ = self.stacked_private_gradients(clients, D, Ds, real_loss, batches)
                exact = stacked_grads(fake_losses(clients, 0.0, grad=False).sum(), D)
                for k, (i, own) in enumerate(zip(clients, private)):
                    for name, p in self.discriminators[i].named_parameters():
                        p.grad = own[name] + exact[name][k]
                    self.d_opts[i].step()
                g_losses = fake_losses(clients, 1.0, grad=True)
                g_grads = stacked_grads(g_losses.sum(), G)
                for k, (i, loss) in enumerate(zip(clients, g_losses.tolist())):
                    for name, p in self.generators[i].named_parameters():
                        p.grad = g_grads[name][k]
                    self.g_opts[i].step()
                    totals[i] += loss
        finally:  # the stacks are dropped: the clients' own parameters get their storage back
            unshare(Gs + Ds)
        return [({k: v.detach().clone() for k, v in self.generators[i].state_dict().items()}, totals[i] / self.local_steps(i))
                for i in indices]

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.global_generator.state_dict().items()}

    def receive(self, shared: dict[str, torch.Tensor]) -> None:
        self.global_generator.load_state_dict(shared)
        for g in self.generators:
            g.load_state_dict(shared)

    def sample(self, i: int, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        z = self.latent_noise(len(y), self.cfg.latent, gen)
        self.global_generator.eval()
        return self.global_generator(z, y)

    def state_dict(self) -> dict:
        return {"G": [g.state_dict() for g in self.generators], "D": [d.state_dict() for d in self.discriminators],
                "global": self.global_generator.state_dict(),
                "g_opts": [o.state_dict() for o in self.g_opts], "d_opts": [o.state_dict() for o in self.d_opts],
                **self.dp_state()}

    def load_state_dict(self, state: dict) -> None:
        for mods, key in ((self.generators, "G"), (self.discriminators, "D"), (self.g_opts, "g_opts"),
                          (self.d_opts, "d_opts")):
            for m, s in zip(mods, state[key]):
                m.load_state_dict(s)
        self.global_generator.load_state_dict(state["global"])
        self.load_dp_state(state)

    def shared_parameters(self) -> dict[str, int]:
        shared = count_parameters(self.global_generator)
        return {"shared": shared, "total": shared + count_parameters(self.discriminators[0]), "shared_model": "generator"}
