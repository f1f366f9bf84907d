"""Rank the settings of a tuning grid by a validation metric (never a test metric) from results.json files.

    python experiments/tuning.py --results results/tuning --method dpgauss              # val_bacc, best first
    python experiments/tuning.py --results results/tuning --method dpgauss --json best.json

A setting is a run folder tag (e.g. tune_s0.25_d8_k1.5) under <results>/<dataset>/<method>/. The score
is the mean over clients and seeds of the clients' validation metric (their own validation splits,
which no method used for training; results.json's clients[].val_bacc). The grids that call this run
on a tuning split (another --split-seed than Table 1's), so neither the split nor the test data of the
tables take part in the choice.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from data.io import HelpFormatter, UserError, atomic_write_json, run_cli  # noqa: E402

METRICS = ("val_bacc", "val_acc")


def scores(results: Path, method: str, metric: str) -> dict[str, dict]:
    """{tag: {"score", "seeds", "split_seeds", "epsilon"}} of every finished run of `method`."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(Path(results).glob(f"*/{method}/*/seed=*/results.json")):
        res = json.loads(path.read_text())
        if any(metric not in c for c in res["clients"]):
            raise UserError(f"{path}: no {metric} per client (a run of an older train.py); re-run it")
        runs[path.parent.parent.name].append(res)
    if not runs:
        raise UserError(f"--results {results}: no finished {method} run found")
    out = {}
    for tag, group in runs.items():
        values = [c[metric] for res in group for c in res["clients"]]
        spent = [res.get("privacy", {}).get("epsilon_spent_max") for res in group]
        out[tag] = {"score": float(np.nanmean(values)), "seeds": sorted(r["seed"] for r in group),
                    "split_seeds": sorted({r["split"]["split_seed"] for r in group}),
                    "epsilon_spent_max": max((e for e in spent if e is not None), default=None)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["score"]))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--results", type=Path, required=True, help="results root of the tuning grid")
    p.add_argument("--method", required=True, help="method whose run folders (tags) are compared")
    p.add_argument("--metric", default="val_bacc", choices=METRICS, help="validation metric to rank by")
    p.add_argument("--json", type=Path, default=None, help="also write the ranking here")
    return p


def main(args: argparse.Namespace) -> int:
    ranked = scores(args.results, args.method, args.metric)
    for tag, s in ranked.items():
        print(f"{s['score']:.4f}  {tag}  (seeds {s['seeds']}, split seeds {s['split_seeds']}, "
              f"ε spent ≤ {s['epsilon_spent_max']})")
    if args.json:
        atomic_write_json(args.json, {"metric": args.metric, "ranking": ranked})
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
