"""Which part of DP-Gauss's release does the DP noise hurt? TSTR of its model with noise on every part, on
the class rows (means, counts, log-norms) only, on the second moment only, and on nothing.

    python experiments/dpgauss_noise_probe.py --run results/organamnist/dpgauss/<tag>/seed=3407 --split-seed 7

It rebuilds a finished DP-Gauss run's clients, settings and noise multipliers (its config.json and
results.json), draws fresh noise (--noise-seed) on the parts named above and reports the balanced accuracy,
on the clients' pooled *validation* splits, of the balanced-recipe classifier trained on the model's samples
alone. --split-seed points it at a tuning split, so that a choice it informs never sees Table 1's data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from data.io import HelpFormatter, UserError, atomic_write_json, read_json, run_cli  # noqa: E402

PARTS = {"none": (False, False), "all": (True, True), "rows": (True, False), "second": (False, True)}


def probe(run: Path, split_seed: int | None, noise_seed: int) -> dict:
    from data.database import load_database
    from data.partition import SplitConfig
    from federated import dpstats
    from federated.clients import build_clients
    from federated.evaluation import client_metrics
    from federated.training import ClassifierConfig, fit_balanced, predict_proba
    config = read_json(run / "config.json", what="run config", fix="point --run at a finished DP-Gauss run folder")
    results = read_json(run / "results.json", what="run results", fix="point --run at a finished DP-Gauss run folder")
    if config.get("method") != "dpgauss" or not results.get("dpgauss", {}).get("stats_noise_multiplier"):
        raise UserError(f"--run {run}: not a DP-Gauss run with DP (its results.json has no noise multipliers)")
    cfg, noise = config["method_config"], results["dpgauss"]
    split = {**config["split"], **({} if split_seed is None else {"split_seed": split_seed})}
    db = load_database(Path(config["database"]["path"]))
    clients = build_clients(db, SplitConfig(**split),
                            config["seed"], torch.device("cpu"))
    k, d, log_range = int(db.labels.max()) + 1, db.embeddings.shape[1], cfg["log_norm_range"]
    weights = dpstats.PartWeights(cfg.get("count_weight", 1.0), cfg.get("norm_weight", 1.0),
                                  cfg.get("moment_weight", 1.0))  # runs before these flags used the defaults
    gen = torch.Generator().manual_seed(noise_seed)

    def noisy(sums: torch.Tensor, std: float) -> torch.Tensor:
        return sums + std * torch.randn(sums.shape, generator=gen, dtype=torch.float64)
    rows = k * (d + 2)
    x_val, y_val = torch.cat([c.x_val for c in clients]), torch.cat([c.y_val for c in clients])
    y_syn = torch.cat([c.y_train for c in clients])
    out = {"run": str(run), "split": split, "noise_seed": noise_seed, "tstr_val_bacc": {}}
    for mode, (on_rows, on_second) in PARTS.items():
        centre_std = 0.0 if mode == "none" else noise["centre_noise_multiplier"] * dpstats.CENTRE_SENSITIVITY
        centre = dpstats.centre_of(sum(noisy(dpstats.centre_sums(c.x_train, log_range), centre_std) for c in clients),
                                   log_range, cfg["clip_spread"])
        std = noise["stats_noise_multiplier"] * weights.sensitivity
        pooled = 0
        for c in clients:
            sums = dpstats.class_sums(c.x_train, c.y_train, centre, k, log_range, weights)
            pooled = pooled + torch.cat([noisy(sums[:rows], std if on_rows else 0.0),
                                         noisy(sums[rows:], std if on_second else 0.0)])
        model = dpstats.class_gaussians(pooled, k, d, cfg["covariance"], cfg["pca_dims"], log_range, centre, weights)
        x_syn = dpstats.embeddings(model.sample(y_syn, gen), y_syn, centre, model)
        clf = fit_balanced(x_syn, y_syn, x_val, y_val, k, ClassifierConfig(recipe="balanced"))
        out["tstr_val_bacc"][mode] = client_metrics(y_val, predict_proba(clf, x_val).argmax(1))["bacc"]
        print(f"noise on {mode:>6}: TSTR BACC on validation {100 * out['tstr_val_bacc'][mode]:.1f} %", flush=True)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished DP-Gauss run folder (config.json, results.json)")
    p.add_argument("--split-seed", type=int, default=None, help="client split to probe (default: the run's)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the fresh noise and samples")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p


def main(args: argparse.Namespace) -> int:
    out = probe(args.run, args.split_seed, args.noise_seed)
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
