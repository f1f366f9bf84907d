"""Pictures from results.json files (never from logs).

    python experiments/plots.py sweep --results results --dataset organamnist --out results/figures/eps_sweep.png
    python experiments/plots.py clients --results results --dataset organamnist --out results/figures/clients.png
    python experiments/plots.py projection --run results/organamnist/dpcvae/iid_c10/seed=3407 --out proj.png

sweep: balanced accuracy and membership-attack AUC against the target epsilon, one line per
anonymizer (every run folder of the dataset and split counts; no-DP runs sit at the right end).
clients: per-client balanced accuracy (mean over seeds) as grouped bars, one group per method, one
panel per split. projection: real vs synthetic embeddings of each class in the run's 2-D PCA plane.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data.io import UserError, run_cli  # noqa: E402
from experiments.tables import METHOD_NAMES, collect, columns_and_rows, method_rank, row_name, split_label  # noqa: E402

ATTACKS = {"dcr": "DCR", "density_ratio": "density ratio"}


def save(fig, out: Path) -> None:
    """Atomic PNG write (a half-written figure is never left behind)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    print(f"wrote {out}")


def split_matches(label: str, wanted: str | None) -> bool:
    """--split takes a table label ('IID', 'α = 0.3') or a partitioner name (iid, dirichlet, natural)."""
    if wanted is None:
        return True
    return label == wanted or {"iid": label == "IID", "dirichlet": label.startswith("α"),
                               "natural": label == "natural"}.get(wanted.lower(), False)


def filtered(groups: dict, dataset: str, split: str | None) -> dict:
    out = {k: v for k, v in groups.items() if k[0] == dataset and split_matches(k[1], split)}
    if not out:
        have = sorted({f"{d} ({s})" for d, s, _, _ in groups})
        raise UserError(f"--dataset {dataset} --split {split}: no results; available: {', '.join(have)}")
    return out


def sweep_points(groups: dict) -> dict:
    """{method: {epsilon or inf (no DP): [results.json, ...]}} over anonymizer runs."""
    points: dict = defaultdict(lambda: defaultdict(list))
    for (_, _, method, _), runs in groups.items():
        for res in runs:
            privacy = res.get("privacy")
            if privacy is None:
                continue
            eps = privacy["target_epsilon"] if privacy.get("enabled") else math.inf
            points[method][eps].append(res)
    return points


def plot_sweep(groups: dict, out: Path) -> None:
    points = sweep_points(groups)
    if not points:
        raise UserError("no anonymizer runs among these results (run experiments/<dataset>/eps_sweep.sh)")
    finite = sorted({e for p in points.values() for e in p if math.isfinite(e)})
    nodp_x = (finite[-1] * 2) if finite else 1.0

    def x_of(e):
        return e if math.isfinite(e) else nodp_x
    fig, (ax_u, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for j, method in enumerate(sorted(points, key=method_rank)):
        colour = plt.cm.tab10(j % 10)  # one colour per method in both panels
        eps = sorted(points[method])
        xs = [x_of(e) for e in eps]
        bacc = [100 * np.mean([np.mean([c["bacc"] for c in r["clients"]]) for r in points[method][e]]) for e in eps]
        ax_u.plot(xs, bacc, "o-", color=colour, label=METHOD_NAMES.get(method, method))
        for attack, style in zip(ATTACKS, ("o-", "s--")):
            auc = [np.mean([r["audit"][attack]["auc"] for r in points[method][e] if "audit" in r] or [np.nan]) for e in eps]
            if not np.isnan(auc).all():  # runs made before the audit existed have nothing to draw
                ax_a.plot(xs, auc, style, color=colour, label=f"{METHOD_NAMES.get(method, method)}, {ATTACKS[attack]}")
    ticks = finite + [nodp_x]
    for ax in (ax_u, ax_a):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{e:g}" for e in finite] + ["no DP"])
        ax.minorticks_off()
        ax.set_xlabel("target ε (δ = 1e-4)")
        ax.grid(alpha=0.3)
    ax_u.set_ylabel("balanced accuracy (%), mean over clients and seeds")
    ax_a.set_ylabel("membership attack ROC AUC")
    ax_a.axhline(0.5, color="grey", lw=0.8)
    low, high = ax_a.get_ylim()  # at least 0.4-0.6, so that noise around chance does not look like a trend
    ax_a.set_ylim(min(low, 0.4), max(high, 0.6))
    ax_u.legend(fontsize=8)
    ax_a.legend(fontsize=7)
    fig.suptitle("Privacy–utility: downstream BACC and attack AUC against ε")
    save(fig, out)


def plot_clients(groups: dict, out: Path) -> None:
    splits = sorted({s for _, s, _, _ in groups}, key=lambda s: (s != "IID", s))
    _, rows = columns_and_rows(groups)
    colours = {row: plt.cm.tab10(j % 10) for j, row in enumerate(rows)}  # one colour per method in every panel
    width = 0.8 / max(len(rows), 1)
    fig, axes = plt.subplots(len(splits), 1, figsize=(12, 3.6 * len(splits)), squeeze=False)
    for ax, split in zip(axes[:, 0], splits):
        for j, (method, tag) in enumerate(rows):
            runs = [r for (_, s, m, t), rs in groups.items() if (s, m, t) == (split, method, tag) for r in rs]
            if not runs:
                continue
            per_client = defaultdict(list)
            for res in runs:
                for c in res["clients"]:
                    per_client[c["id"]].append(100 * c["bacc"])
            ids = sorted(per_client)
            ax.bar(np.array(ids) + (j - (len(rows) - 1) / 2) * width, [np.mean(per_client[i]) for i in ids],
                   width, label=row_name(method, tag), color=colours[method, tag])
        ax.set_title(split)
        ax.set_xlabel("client")
        ax.set_ylabel("BACC (%), mean over seeds")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    save(fig, out)


def plot_projection(run_dir: Path, out: Path) -> None:
    path = run_dir / "results.json"
    if not path.exists():
        raise UserError(f"--run {run_dir}: no results.json (an unfinished run?)")
    res = json.loads(path.read_text())
    proj = res.get("fidelity", {}).get("projection")
    if proj is None:
        raise UserError(f"{path}: no fidelity.projection (not an anonymizer run, or run with --no-release-eval)")
    real, syn = (({"xy": np.array(p["xy"]).reshape(-1, 2), "y": np.array(p["y"])}) for p in (proj["real"], proj["synthetic"]))
    classes = sorted(set(real["y"].tolist()) | set(syn["y"].tolist()))
    cols = min(4, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, c in zip(axes.flat, classes):
        for side, colour, name in ((real, "tab:blue", "real held-out"), (syn, "tab:orange", "synthetic")):
            pts = side["xy"][side["y"] == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, c=colour, label=name)
        ax.set_title(f"class {c}", fontsize=9)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{METHOD_NAMES.get(res['method'], res['method'])}, {split_label(res['split'])}, seed {res['seed']}: "
                 "PCA of real held-out (axes) vs synthetic")
    fig.tight_layout()
    save(fig, out)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Figures from results.json files.")
    sub = p.add_subparsers(dest="figure", required=True)
    for name, text, split in (("sweep", "BACC and attack AUC against epsilon", "dirichlet"),
                              ("clients", "per-client BACC bars", None)):
        s = sub.add_parser(name, help=text)
        s.add_argument("--results", type=Path, default=Path("results"), help="results root to scan")
        s.add_argument("--dataset", required=True, help="dataset name in the results path")
        s.add_argument("--split", default=split,
                       help="only this split: iid, dirichlet, natural or a table label such as 'α = 0.3' (default: %(default)s)")
        s.add_argument("--out", type=Path, required=True, help="PNG path")
    s = sub.add_parser("projection", help="2-D projection of real vs synthetic embeddings per class")
    s.add_argument("--run", type=Path, required=True, help="a finished anonymizer run folder")
    s.add_argument("--out", type=Path, required=True, help="PNG path")
    return p


def main(args: argparse.Namespace) -> int:
    if args.figure == "projection":
        plot_projection(args.run, args.out)
        return 0
    groups = filtered(collect(args.results), args.dataset, args.split)
    (plot_sweep if args.figure == "sweep" else plot_clients)(groups, args.out)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
