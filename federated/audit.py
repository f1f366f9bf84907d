"""Membership-inference audit of released synthetic data: given the synthetic sample, can an attacker
tell the generator's training records (members) from held-out records of the same clients?

Two attacks, each a score per candidate record (higher = "member"):
- distance to closest record (DCR): minus the distance to the nearest synthetic record;
- density ratio (DOMIAS, van Breugel et al. 2023): log p_synthetic(x) - log p_reference(x), the
  densities being Gaussian KDEs in a whitened PCA space fitted on a reference sample of the same
  population that the generator never saw (Scott's bandwidth).
Reported: ROC AUC (0.5 = no better than guessing) and the TPR at 1 % FPR.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.neighbors import KernelDensity

from federated.fidelity import ReleaseEvalConfig, subsample


def dcr_scores(candidates: torch.Tensor, synthetic: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """-min_j |x - s_j| for each candidate x."""
    synthetic = synthetic.double()
    return -torch.cat([torch.cdist(c.double(), synthetic).min(1).values for c in candidates.split(chunk)]).numpy()


def density_ratio_scores(candidates: torch.Tensor, synthetic: torch.Tensor, reference: torch.Tensor,
                         dims: int) -> np.ndarray:
    pca = PCA(n_components=min(dims, reference.shape[1], len(reference) - 1), whiten=True, random_state=0)
    pca.fit(reference.double().numpy())
    proj = [pca.transform(t.double().numpy()) for t in (candidates, synthetic, reference)]
    cand, syn, ref = proj
    log_p_syn = KernelDensity(bandwidth="scott").fit(syn).score_samples(cand)
    log_p_ref = KernelDensity(bandwidth="scott").fit(ref).score_samples(cand)
    return log_p_syn - log_p_ref


def attack_metrics(member_scores: np.ndarray, non_member_scores: np.ndarray, fpr_at: float = 0.01) -> dict:
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    scores = np.r_[member_scores, non_member_scores]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"auc": float(roc_auc_score(labels, scores)),
            f"tpr_at_{fpr_at:g}_fpr": float(tpr[fpr <= fpr_at].max())}


def membership_audit(members: torch.Tensor, non_members: torch.Tensor, synthetic: torch.Tensor,
                     reference: torch.Tensor, cfg: ReleaseEvalConfig, gen: torch.Generator) -> dict:
    """Both attacks on balanced member / non-member sets (each subsampled to the smaller size)."""
    members, non_members = members.cpu().float(), non_members.cpu().float()
    synthetic, reference = synthetic.cpu().float(), reference.cpu().float()
    n = min(len(members), len(non_members), cfg.max_samples)
    members = members[subsample(len(members), n, gen)]
    non_members = non_members[subsample(len(non_members), n, gen)]
    synthetic = synthetic[subsample(len(synthetic), 4 * cfg.max_samples, gen)]
    candidates = torch.cat([members, non_members])
    out = {"n_members": n, "n_non_members": n, "n_synthetic": len(synthetic), "n_reference": len(reference)}
    for name, scores in (("dcr", dcr_scores(candidates, synthetic)),
                         ("density_ratio", density_ratio_scores(candidates, synthetic, reference, cfg.density_dims))):
        out[name] = attack_metrics(scores[:n], scores[n:])
    return out
