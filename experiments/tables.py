"""Build the papers' Table 1 layout from results.json files (never from logs).

    python experiments/tables.py --results results --out results/tables/table1

Rows: methods; column groups: dataset x split (IID, Dirichlet alpha). Each cell is mean ± std over
clients of the per-client metric averaged over seeds (the papers' convention); the CSV also holds the
mean and std across seeds of the per-seed client means, the seeds used and the largest epsilon spent.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from data.io import UserError, atomic_write_text, run_cli  # noqa: E402

METHOD_ORDER = ["fedavg", "fedprox", "fedlambda", "dpcgan", "dpcvae", "fedhypevae", "local", "centralized"]
METHOD_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedlambda": "FedLambda", "dpcgan": "DP-CGAN",
                "dpcvae": "DP-CVAE", "fedhypevae": "FedHypeVAE", "local": "Local", "centralized": "Centralized"}


def split_label(split: dict) -> str:
    if split.get("kind") == "dirichlet":
        return f"α = {split['alpha']:g}"
    return {"iid": "IID", "natural": "natural"}.get(split.get("kind"), str(split.get("kind")))


def collect(results_root: Path) -> dict:
    """{(dataset, split label, method): [results.json, ...]} over every finished run."""
    groups: dict = defaultdict(list)
    files = sorted(Path(results_root).rglob("results.json"))
    if not files:
        raise UserError(f"--results {results_root}: no results.json found (run train.py first)")
    for path in files:
        try:
            res = json.loads(path.read_text())
            key = (res["dataset"], split_label(res["split"]), res["method"])
        except (json.JSONDecodeError, KeyError) as err:
            raise UserError(f"{path}: not a results file of train.py ({err})") from None
        groups[key].append(res)
    return groups


def cell(runs: list[dict], metric: str) -> dict:
    """Per-client values averaged over seeds, then mean/std across clients; plus across-seed stats."""
    per_client = defaultdict(list)
    for res in runs:
        for c in res["clients"]:
            per_client[c["id"]].append(c[metric])
    client_means = np.array([np.mean(v) for _, v in sorted(per_client.items())])
    seed_means = np.array([np.mean([c[metric] for c in res["clients"]]) for res in runs])
    return {"mean": float(client_means.mean()), "std": float(client_means.std()),
            "seed_mean": float(seed_means.mean()), "seed_std": float(seed_means.std())}


def build_table(groups: dict) -> tuple[str, str]:
    columns = sorted({(d, s) for d, s, _ in groups}, key=lambda ds: (ds[0], ds[1] != "IID", ds[1]))
    methods = sorted({m for _, _, m in groups}, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))
    header = ["Method"] + [f"{d} ({s}) {m}" for d, s in columns for m in ("ACC (%)", "BACC (%)")] + ["ε spent (max)"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "dataset", "split", "metric", "mean", "std_clients", "seed_mean", "seed_std",
                     "n_seeds", "seeds", "epsilon_spent_max"])
    for m in methods:
        row, eps_all = [METHOD_NAMES.get(m, m)], []
        for d, s in columns:
            runs = groups.get((d, s, m))
            if not runs:
                row += ["–", "–"]
                continue
            eps = [r["privacy"]["epsilon_spent_max"] for r in runs
                   if r.get("privacy") and r["privacy"].get("epsilon_spent_max") is not None]
            eps_all += eps
            for metric in ("acc", "bacc"):
                c = cell(runs, metric)
                row.append(f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f}")
                writer.writerow([m, d, s, metric, f"{c['mean']:.6f}", f"{c['std']:.6f}", f"{c['seed_mean']:.6f}",
                                 f"{c['seed_std']:.6f}", len(runs), " ".join(str(r["seed"]) for r in runs),
                                 f"{max(eps):.4f}" if eps else ""])
        row.append(f"{max(eps_all):.3f}" if eps_all else "no DP")
        md.append("| " + " | ".join(row) + " |")
    return "\n".join(md) + "\n", out.getvalue()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Table 1 (Markdown + CSV) from results.json files.")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root to scan")
    p.add_argument("--dataset", action="append", default=None, help="only these datasets (repeatable)")
    p.add_argument("--out", type=Path, default=Path("results/tables/table1"), help="output path without suffix")
    return p


def main(args: argparse.Namespace) -> int:
    groups = collect(args.results)
    if args.dataset:
        groups = {k: v for k, v in groups.items() if k[0] in args.dataset}
        if not groups:
            raise UserError(f"--dataset {args.dataset}: no results for it under {args.results}")
    markdown, table_csv = build_table(groups)
    atomic_write_text(args.out.with_suffix(".md"), markdown)
    atomic_write_text(args.out.with_suffix(".csv"), table_csv)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
