"""Build the papers' Table 1 layout from results.json files (never from logs).

    python experiments/tables.py --results results --out results/tables/table1

Rows: methods (a run folder with a non-default --tag, e.g. an epsilon-sweep point, is its own row
"Method [tag]"); column groups: dataset x split (IID, Dirichlet alpha). Each cell is mean ± std over
clients of the per-client metric averaged over seeds (the papers' convention); the CSV also holds the
mean and std across seeds of the per-seed client means, the seeds used and the largest epsilon spent.

A second table (<out>_release.{md,csv}) summarises the anonymizers' synthetic data: train-on-synthetic
test-on-real balanced accuracy, precision / recall / density / coverage, Frechet distance, MMD^2 and
the membership attacks' AUC (mean ± std over seeds).
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
from data.partition import run_tag  # noqa: E402

METHOD_ORDER = ["fedavg", "fedprox", "fedlambda", "dpfedavg", "dpcgan", "dpcvae", "fedhypevae", "dpgauss", "local",
                "centralized"]
METHOD_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedlambda": "FedLambda", "dpfedavg": "DP-FedAvg",
                "dpcgan": "DP-CGAN", "dpcvae": "DP-CVAE", "fedhypevae": "FedHypeVAE", "dpgauss": "DP-Gauss",
                "local": "Local", "centralized": "Centralized"}


def split_label(split: dict) -> str:
    if split.get("kind") == "dirichlet":
        return f"α = {split['alpha']:g}"
    return {"iid": "IID", "natural": "natural"}.get(split.get("kind"), str(split.get("kind")))


def variant(res: dict, tag: str) -> str:
    """'' for a run in its split's default folder; the suffix of a default tag with a variant
    (dirichlet_a0.3_c10_balanced: 'balanced'); else the folder's tag."""
    split = res["split"]
    default = run_tag(split.get("kind"), split.get("alpha"), split.get("n_clients"))
    return "" if tag == default else tag.removeprefix(default + "_")


def row_name(method: str, tag: str) -> str:
    return METHOD_NAMES.get(method, method) + (f" [{tag}]" if tag else "")


def collect(results_root: Path) -> dict:
    """{(dataset, split label, method, variant): [results.json, ...]} over every finished run."""
    groups: dict = defaultdict(list)
    files = sorted(Path(results_root).rglob("results.json"))
    if not files:
        raise UserError(f"--results {results_root}: no results.json found (run train.py first)")
    for path in files:
        try:
            res = json.loads(path.read_text())
            key = (res["dataset"], split_label(res["split"]), res["method"], variant(res, path.parent.parent.name))
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


def method_rank(method: str) -> tuple[int, str]:
    """Table order: the papers' rows first, any other method after them by name."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def columns_and_rows(groups: dict) -> tuple[list, list]:
    """(dataset, split) columns and (method, tag) rows of the groups, in table order."""
    columns = sorted({(d, s) for d, s, _, _ in groups}, key=lambda ds: (ds[0], ds[1] != "IID", ds[1]))
    rows = sorted({(m, t) for _, _, m, t in groups}, key=lambda mt: (method_rank(mt[0]), mt[1]))
    return columns, rows


def build_table(groups: dict) -> tuple[str, str]:
    columns, methods = columns_and_rows(groups)
    most_seeds = max(map(len, groups.values()))  # a cell with fewer seeds says so
    header = ["Method"] + [f"{d} ({s}) {m}" for d, s in columns for m in ("ACC (%)", "BACC (%)")] + ["ε spent (max)"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "tag", "dataset", "split", "metric", "mean", "std_clients", "seed_mean", "seed_std",
                     "n_seeds", "seeds", "epsilon_spent_max"])
    for m, tag in methods:
        row, eps_all = [row_name(m, tag)], []
        for d, s in columns:
            runs = groups.get((d, s, m, tag))
            if not runs:
                row += ["–", "–"]
                continue
            eps = [r["privacy"]["epsilon_spent_max"] for r in runs
                   if r.get("privacy") and r["privacy"].get("epsilon_spent_max") is not None]
            eps_all += eps
            fewer = "" if len(runs) == most_seeds else f" ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            for metric in ("acc", "bacc"):
                c = cell(runs, metric)
                row.append(f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f}{fewer}")
                writer.writerow([m, tag, d, s, metric, f"{c['mean']:.6f}", f"{c['std']:.6f}", f"{c['seed_mean']:.6f}",
                                 f"{c['seed_std']:.6f}", len(runs), " ".join(str(r["seed"]) for r in runs),
                                 f"{max(eps):.4f}" if eps else ""])
        row.append(f"{max(eps_all):.3f}" if eps_all else "no DP")
        md.append("| " + " | ".join(row) + " |")
    return "\n".join(md) + "\n", out.getvalue()


RELEASE_METRICS = [  # (header, path into results.json, scale)
    ("TSTR BACC (%)", ("fidelity", "tstr", "bacc"), 100), ("precision", ("fidelity", "overall", "precision"), 1),
    ("recall", ("fidelity", "overall", "recall"), 1), ("density", ("fidelity", "overall", "density"), 1),
    ("coverage", ("fidelity", "overall", "coverage"), 1), ("Fréchet", ("fidelity", "overall", "frechet"), 1),
    ("MMD²", ("fidelity", "overall", "mmd2"), 1), ("DCR AUC", ("audit", "dcr", "auc"), 1),
    ("density-ratio AUC", ("audit", "density_ratio", "auc"), 1),
    # the audit's power: the same DCR attack on a leaking canary release (docs/privacy.md); "–" for older runs
    ("canary DCR AUC", ("audit", "canary", "dcr", "auc"), 1),
    # the same DCR attack's chance level: unseen reference records against the held-out ones ("–" for older runs)
    ("null DCR AUC", ("audit", "null", "dcr", "auc"), 1)]


def dig(res: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(res, dict) or key not in res:
            return None
        res = res[key]
    return res


def build_release_table(groups: dict) -> tuple[str, str]:
    """Fidelity and audit of the synthetic data, one row per anonymizer run group (mean ± std over seeds)."""
    header = ["Method", "dataset", "split", "seeds"] + [h for h, _, _ in RELEASE_METRICS]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "tag", "dataset", "split", "metric", "mean", "std_seeds", "n_seeds"])
    columns, methods = columns_and_rows(groups)
    for m, tag in methods:
        for d, s in columns:
            runs = [r for r in groups.get((d, s, m, tag), []) if "fidelity" in r]
            if not runs:
                continue
            row = [row_name(m, tag), d, s, str(len(runs))]
            for name, path, scale in RELEASE_METRICS:
                values = np.array([v for v in (dig(r, path) for r in runs) if v is not None], dtype=float)
                if not len(values):
                    row.append("–")
                    continue
                row.append(f"{scale * values.mean():.3g} ± {scale * values.std():.2g}")
                writer.writerow([m, tag, d, s, ".".join(path), f"{values.mean():.6g}", f"{values.std():.6g}", len(values)])
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
    release_md, release_csv = build_release_table(groups)
    if release_md.count("\n") > 2:  # any anonymizer run with fidelity results
        release = args.out.with_name(args.out.name + "_release")
        atomic_write_text(release.with_suffix(".md"), release_md)
        atomic_write_text(release.with_suffix(".csv"), release_csv)
        print("\n" + release_md, end="")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
