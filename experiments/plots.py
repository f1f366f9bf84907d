"""Pictures from results.json files (never from logs).

    python experiments/plots.py sweep --results results --dataset organamnist --out results/figures/eps_sweep.png
    python experiments/plots.py clients --results results --dataset organamnist --out results/figures/clients.png
    python experiments/plots.py projection --run results/organamnist/dpcvae/iid_c10/seed=3407 --out proj.png

sweep: balanced accuracy, TSTR BACC and membership-attack AUC against the target epsilon, one line per
DP method and variant (every run folder of the dataset and split counts; a folder tag's eps<x> / nodp
part names the sweep point, no-DP runs sit at the right end), and the best Local row as the yardstick.
clients: per-client balanced accuracy (mean over seeds) as grouped bars, one group per method, one
panel per split. projection: real vs synthetic embeddings of each class in the run's 2-D PCA plane.
"""
from __future__ import annotations

import argparse
import json
import math
import re
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


EPS_PART = re.compile(r"^(eps[0-9.]+|nodp)$")  # the sweep's own tag part: eps2, nodp


def sweep_line(variant: str) -> str:
    """The sweep line of a run: its variant less the sweep's tag part ('balanced_dp-tuned_eps2' and the
    epsilon = 1 folder's 'balanced_dp-tuned' draw one line)."""
    return "_".join(p for p in variant.split("_") if p and not EPS_PART.match(p))


def sweep_points(groups: dict) -> dict:
    """{(method, line): {epsilon or inf (no DP): [results.json, ...]}} over every DP method's runs."""
    points: dict = defaultdict(lambda: defaultdict(list))
    for (_, _, method, tag), runs in groups.items():
        for res in runs:
            privacy = res.get("privacy")
            if privacy is None:
                continue
            eps = privacy["target_epsilon"] if privacy.get("enabled") else math.inf
            points[method, sweep_line(tag)][eps].append(res)
    return points


def mean_bacc(runs: list[dict]) -> float:
    return 100 * float(np.mean([np.mean([c["bacc"] for c in r["clients"]]) for r in runs]))


def plot_sweep(groups: dict, out: Path) -> None:
    """BACC, TSTR BACC and attack AUC against epsilon; the strongest row that shares nothing (the best
    Local variant) is the dashed yardstick of the BACC panel."""
    points = sweep_points(groups)
    if not points:
        raise UserError("no DP runs among these results (run experiments/<dataset>/eps_sweep.sh)")
    finite = sorted({e for p in points.values() for e in p if math.isfinite(e)})
    nodp_x = (finite[-1] * 2) if finite else 1.0

    def x_of(e):
        return e if math.isfinite(e) else nodp_x
    fig, (ax_u, ax_t, ax_a) = plt.subplots(1, 3, figsize=(16, 4.4))
    locals_ = {t: mean_bacc(rs) for (_, _, m, t), rs in groups.items() if m == "local"}
    if locals_:
        best = max(locals_, key=locals_.get)
        ax_u.axhline(locals_[best], color="black", ls="--", lw=1, label=f"{row_name('local', best)} (shares nothing)")
    for j, (method, line) in enumerate(sorted(points, key=lambda ml: (method_rank(ml[0]), ml[1]))):
        colour = plt.cm.tab10(j % 10)  # one colour per line in every panel
        label = row_name(method, line)
        eps = sorted(points[method, line])
        xs = [x_of(e) for e in eps]
        runs = [points[method, line][e] for e in eps]
        ax_u.plot(xs, [mean_bacc(rs) for rs in runs], "o-", color=colour, label=label)
        tstr = [np.mean([100 * r["fidelity"]["tstr"]["bacc"] for r in rs if "tstr" in r.get("fidelity", {})] or [np.nan])
                for rs in runs]
        if not np.isnan(tstr).all():  # a private model (DP-FedAvg) releases no data to test
            ax_t.plot(xs, tstr, "o-", color=colour, label=label)
        for attack, style in zip(ATTACKS, ("o-", "s--")):
            auc = [np.mean([r["audit"][attack]["auc"] for r in rs if "audit" in r] or [np.nan]) for rs in runs]
            if not np.isnan(auc).all():  # runs made before the audit existed have nothing to draw
                ax_a.plot(xs, auc, style, color=colour, label=f"{label}, {ATTACKS[attack]}")
    ticks = finite + [nodp_x]
    for ax in (ax_u, ax_t, ax_a):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{e:g}" for e in finite] + ["no DP"])
        ax.minorticks_off()
        ax.set_xlabel("target ε (δ = 1e-4)")
        ax.grid(alpha=0.3)
    ax_u.set_ylabel("balanced accuracy (%), mean over clients and seeds")
    ax_t.set_ylabel("TSTR BACC (%): trained on the release, tested on real data")
    ax_a.set_ylabel("membership attack ROC AUC")
    ax_a.axhline(0.5, color="grey", lw=0.8)
    low, high = ax_a.get_ylim()  # at least 0.4-0.6, so that noise around chance does not look like a trend
    ax_a.set_ylim(min(low, 0.4), max(high, 0.6))
    for ax, size in ((ax_u, 7), (ax_t, 7), (ax_a, 6)):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=size)
    fig.suptitle("Privacy–utility: downstream BACC, TSTR BACC and attack AUC against ε")
    fig.tight_layout()
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
    for name, text, split in (("sweep", "BACC, TSTR and attack AUC against epsilon", "dirichlet"),
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
