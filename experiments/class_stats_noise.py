"""How much signal FedHypeVAE's DP class statistics keep: per class, the error of the released
mean and diagonal variance (the targets of the meta-code fit, Eq. 11) against what they estimate.

    python experiments/class_stats_noise.py --db assets/organamnist_vits14_224 --stats-noise 20 5 1

The clients' training sets are the run's (same split flags); the sums, the Gaussian noise and the
moment estimates are FedHypeVAE's own functions, repeated over --draws noise draws. Signal: how far
a class mean lies from the mean over all classes (what the meta-code must reproduce); error: the
distance of the DP mean from the exact one. Variances are per dimension, averaged over dimensions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from data.database import load_database  # noqa: E402
from data.io import UserError, run_cli  # noqa: E402
from data.flags import add_flags, config_from, flags_of  # noqa: E402
from data.partition import SplitConfig  # noqa: E402
from federated.clients import build_clients  # noqa: E402
from federated.methods.fedhypevae import class_moments, class_stat_sums, class_stats_noise  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", type=Path, required=True, help="embedding database (data/create_db.py)")
    p.add_argument("--seed", type=int, default=3407, help="run seed (picks the validation split) and noise seed")
    p.add_argument("--stats-clip", type=float, default=50.0, help="L2 clip R of the embeddings")
    p.add_argument("--stats-noise", type=float, nargs="+", default=[20.0], help="noise multiplier(s) to compare")
    p.add_argument("--draws", type=int, default=20, help="noise draws averaged per figure")
    add_flags(p, flags_of(SplitConfig, title="Split (as train.py's)"))
    return p


def noise_report(clients, n_classes: int, clip: float, noise_multiplier: float, draws: int,
                 gen: torch.Generator) -> list[dict]:
    """Per class: n, signal |mu_c - mu|, mean error |mu_hat_c - mu_c|, exact and DP per-dim variance."""
    sums = [class_stat_sums(c.x_train.float(), c.y_train, n_classes, clip) for c in clients]
    exact = torch.stack(sums).sum(0)
    exact_mean, exact_var = class_moments(exact, clip)
    counts = exact[:, -1]
    overall = (counts[:, None] * exact_mean).sum(0) / counts.sum()
    err, dp_var = torch.zeros(n_classes), torch.zeros(n_classes)
    for _ in range(draws):
        noisy = sum(s + class_stats_noise(s.shape, noise_multiplier, gen) for s in sums)
        mean, var = class_moments(noisy, clip)
        err += (mean - exact_mean).norm(dim=1) / draws
        dp_var += var.mean(1) / draws
    return [{"class": k, "n": int(counts[k]), "signal": float((exact_mean[k] - overall).norm()),
             "mean_error": float(err[k]), "var": float(exact_var[k].mean()), "dp_var": float(dp_var[k])}
            for k in range(n_classes) if counts[k] > 0]


def main(args: argparse.Namespace) -> int:
    if args.draws < 1 or args.stats_clip <= 0 or min(args.stats_noise) < 0:
        raise UserError("--draws must be >= 1, --stats-clip > 0 and --stats-noise >= 0")
    db = load_database(args.db)
    split = config_from(SplitConfig, vars(args))
    clients = build_clients(db, split, args.seed, torch.device("cpu"))
    gen = torch.Generator().manual_seed(args.seed)
    for sigma in args.stats_noise:
        rows = noise_report(clients, len(db.classes), args.stats_clip, sigma, args.draws, gen)
        print(f"\n--stats-noise {sigma:g} ({args.n_clients} clients, R = {args.stats_clip:g}, {args.draws} draws)\n")
        print("| class | n | signal \\|μ_c − μ\\| | error \\|μ̂_c − μ_c\\| | error / signal | var per dim | DP var per dim |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['class']} | {r['n']} | {r['signal']:.1f} | {r['mean_error']:.1f} | "
                  f"{r['mean_error'] / max(r['signal'], 1e-12):.1f} | {r['var']:.2f} | {r['dp_var']:.1f} |")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
