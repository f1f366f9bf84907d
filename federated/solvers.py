"""The balanced recipe's solvers (federated.training.fit_balanced): full-batch L-BFGS on the class-balanced
multinomial logistic loss sum_i r_i CE_i + penalty |W|^2 / 2 with an unpenalised bias. Each moves (weight,
bias) in place, from where they are (the C grid warm-starts), and returns (iterations, reached the limit).

- lbfgs: on the weights as they are, the recipe as Table 1 and the utility study ran it. Its weakly penalised
  fits with synthetic records (C = 1000) mostly stop at max_iter unconverged, and then their validation BACC
  moves with float rounding (docs/results.md, 2026-12-06).
- preconditioned: the same problem in coordinates where it is well conditioned. The loss's Hessian in W is
  about s Sigma + penalty I per class, where Sigma is the records' weighted second moment and s the softmax
  curvature. With Sigma = U diag(lam) U^T and z = x U diag(lam + penalty / s)^(-1/2), it is about s I. s is
  p (1 - p) at the uniform start (p = 1 / the classes present): no constant fitted to a database. Same optimum;
  it converges in fewer iterations, and the fitted model no longer depends on the float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Problem:
    x: torch.Tensor              # (n, D) the centred, L2-normalised records
    onehot: torch.Tensor         # (n, K) their labels
    record_weight: torch.Tensor  # (n,) the balanced weights of the mean objective, summing to 1
    offset: torch.Tensor         # (K,) 0, or -1e4 for a class without training weight
    penalty: float               # 1 / (C n)
    classes_present: int


def run_lbfgs(params: list[torch.Tensor], objective: Callable[[], torch.Tensor], max_iter: int) -> tuple[int, bool]:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-5,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")
    opt.step(objective)
    # torch's L-BFGS stops at max_iter iterations or max_iter * 5 / 4 evaluations, else by a tolerance
    state = opt.state[params[0]]
    iterations = state.get("n_iter", 0)
    return iterations, iterations >= max_iter or state.get("func_evals", 0) >= opt.defaults["max_eval"]


def data_term(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted cross-entropy of records x under (weight, bias), and its gradient in the logits (the
    residual r_i (softmax_i - onehot_i)); it sets bias.grad, which no penalty touches."""
    logits = torch.addmm(bias + p.offset, x, weight.T)
    lse = torch.logsumexp(logits, 1)
    loss = torch.dot(p.record_weight, lse - (logits * p.onehot).sum(1))
    residual = (torch.exp(logits - lse[:, None]) - p.onehot).mul_(p.record_weight[:, None])
    bias.grad = residual.sum(0)
    return loss, residual


def lbfgs(weight: torch.Tensor, bias: torch.Tensor, p: Problem, max_iter: int) -> tuple[int, bool]:
    def objective() -> torch.Tensor:
        loss, residual = data_term(weight, bias, p.x, p)
        weight.grad = torch.addmm(weight, residual.T, p.x, beta=p.penalty)
        return loss + 0.5 * p.penalty * weight.pow(2).sum()
    return run_lbfgs([weight, bias], objective, max_iter)


def preconditioned(weight: torch.Tensor, bias: torch.Tensor, p: Problem, max_iter: int) -> tuple[int, bool]:
    uniform = 1.0 / p.classes_present
    second = (p.x * p.record_weight[:, None]).T @ p.x
    lam, u = torch.linalg.eigh(second.double())
    scale = lam.clamp(min=0) + p.penalty / (uniform * (1 - uniform))
    to_z = (u / scale.sqrt()).to(p.x)                     # z = x to_z, W = W' to_z^T
    z, penalty_scale = p.x @ to_z, (1 / scale).to(p.x)    # |W|^2 = sum_j |W'_j|^2 / scale_j
    moved = weight @ (u * scale.sqrt()).to(p.x)           # W' of the warm start

    def objective() -> torch.Tensor:
        loss, residual = data_term(moved, bias, z, p)
        moved.grad = torch.mm(residual.T, z).add_(moved * penalty_scale, alpha=p.penalty)
        return loss + 0.5 * p.penalty * (moved.pow(2) * penalty_scale).sum()
    out = run_lbfgs([moved, bias], objective, max_iter)
    weight.copy_(moved @ to_z.T)
    return out


SOLVERS: dict[str, Callable[[torch.Tensor, torch.Tensor, Problem, int], tuple[int, bool]]] = {
    "lbfgs": lbfgs, "preconditioned": preconditioned}
