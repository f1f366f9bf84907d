"""experiments/tables.py on fixture results files with hand-computed cells."""
from __future__ import annotations

import json

import pytest

from data.io import UserError
from data.partition import run_tag
from experiments import tables


def write_result(root, method, seed, kind, accs, eps=None, tag=None, extra=None):
    alpha = 0.3 if kind == "dirichlet" else None
    res = {"method": method, "dataset": "organamnist", "seed": seed,
           "split": {"kind": kind, "alpha": alpha, "n_clients": len(accs)},
           "clients": [{"id": i, "acc": a, "bacc": a / 2} for i, a in enumerate(accs)], **(extra or {})}
    if eps is not None:
        res["privacy"] = {"epsilon_spent_max": eps}
    path = root / "organamnist" / method / (tag or run_tag(kind, alpha, len(accs))) / f"seed={seed}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(res))


def test_table_cells_are_client_means_over_seeds(tmp_path):
    write_result(tmp_path, "fedavg", 1, "iid", [0.6, 0.8])
    write_result(tmp_path, "fedavg", 2, "iid", [0.8, 1.0])
    write_result(tmp_path, "dpcvae", 1, "dirichlet", [0.5, 0.7], eps=0.98)
    out = tmp_path / "tables" / "t1"
    tables.main(tables.get_args_parser().parse_args(["--results", str(tmp_path), "--out", str(out)]))
    md = out.with_suffix(".md").read_text().splitlines()
    assert md[0].startswith("| Method | organamnist (IID) ACC (%) | organamnist (IID) BACC (%) | organamnist (α = 0.3)")
    # client means over seeds: 0.7 and 0.9 -> mean 80.00, std 10.00; bacc half of it
    assert md[2] == "| FedAvg | 80.00 ± 10.00 | 40.00 ± 5.00 | – | – | no DP |"
    assert md[3] == "| DP-CVAE | – | – | 60.00 ± 10.00 (1 seed) | 30.00 ± 5.00 (1 seed) | 0.980 |"
    rows = out.with_suffix(".csv").read_text().splitlines()
    fedavg_acc = [r for r in rows if r.startswith("fedavg,,organamnist,IID,acc")][0].split(",")
    assert fedavg_acc[5:11] == ["0.800000", "0.100000", "0.800000", "0.100000", "2", "1 2"]
    assert not out.with_name("t1_release.md").exists()  # no anonymizer run has fidelity results


def test_tagged_runs_are_their_own_rows_and_release_table(tmp_path):
    release = {"fidelity": {"tstr": {"bacc": 0.5}, "overall": {"precision": 0.2, "recall": 0.4, "density": 0.1,
                                                               "coverage": 0.3, "frechet": 10.0, "mmd2": 0.01}},
               "audit": {"dcr": {"auc": 0.5}, "density_ratio": {"auc": 0.52}}}
    later = json.loads(json.dumps(release))
    later["fidelity"]["tstr"]["bacc"], later["audit"]["dcr"]["auc"] = 0.7, 0.6
    later["audit"]["canary"] = {"dcr": {"auc": 0.98}}  # the audit's power (runs before it have none)
    later["audit"]["null"] = {"dcr": {"auc": 0.51}}  # its chance level (likewise)
    write_result(tmp_path, "dpcvae", 1, "dirichlet", [0.5, 0.7], eps=0.98, extra=release)
    write_result(tmp_path, "dpcvae", 2, "dirichlet", [0.5, 0.7], eps=0.99, extra=later)
    write_result(tmp_path, "dpcvae", 1, "dirichlet", [0.9, 0.9], eps=3.9, tag="eps4")
    out = tmp_path / "t1"
    tables.main(tables.get_args_parser().parse_args(["--results", str(tmp_path), "--out", str(out)]))
    md = out.with_suffix(".md").read_text().splitlines()
    assert md[2] == "| DP-CVAE | 60.00 ± 10.00 | 30.00 ± 5.00 | 0.990 |"
    assert md[3] == "| DP-CVAE [eps4] | 90.00 ± 0.00 (1 seed) | 45.00 ± 0.00 (1 seed) | 3.900 |"
    rel = out.with_name("t1_release.md").read_text().splitlines()
    assert len(rel) == 3  # the tagged run has no fidelity block
    assert rel[2].startswith("| DP-CVAE | organamnist | α = 0.3 | 2 | 60 ± 10 | 0.2 ± 0 | 0.4 ± 0 |")
    assert rel[2].endswith("| 0.55 ± 0.05 | 0.52 ± 0 | 0.98 ± 0 | 0.51 ± 0 |")


def test_no_results_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no results.json found"):
        tables.collect(tmp_path)


def test_experiment_scripts_use_only_flags_train_py_knows(capsys):
    import re
    import subprocess
    from conftest import ROOT
    from data import create_db
    from experiments import plots, tuning
    from federated.config import method_flags
    from federated.methods import METHODS
    import train
    with pytest.raises(SystemExit):  # the general flags, from train.py's own --help
        train.parse_args(["--help"])
    known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", capsys.readouterr().out))
    known |= {name for m in METHODS for fl in method_flags(m) for name in fl.names}
    parsers = [tables.get_args_parser(), tuning.get_args_parser(), create_db.get_args_parser(),
               *plots.get_args_parser()._subparsers._group_actions[0].choices.values()]
    known |= {s for p in parsers for a in p._actions for s in a.option_strings}
    scripts = sorted((ROOT / "experiments").glob("*/*.sh")) + sorted((ROOT / "experiments").glob("*.sh"))
    assert {s.parent.name for s in scripts} >= {"organamnist", "organsmnist", "camelyon17", "isic"}
    assert all((ROOT / "experiments" / d / "table1.sh").exists() for d in ("organamnist", "organsmnist", "camelyon17", "isic"))
    for script in scripts:
        text = script.read_text()
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        assert "set -euo pipefail" in text and "rm -rf" not in text
        flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
        assert flags <= known, (script, flags - known)


def test_plots_from_fixture_results(tmp_path):
    from experiments import plots
    proj = {"real": {"xy": [[0, 0], [1, 1], [2, 0]], "y": [0, 0, 1]}, "synthetic": {"xy": [[0, 1], [2, 2]], "y": [0, 1]}}
    for eps, tag, auc in ((1.0, None, 0.5), (4.0, "eps4", 0.55), (None, "nodp", 0.9)):
        extra = {"audit": {"dcr": {"auc": auc}, "density_ratio": {"auc": auc}}, "fidelity": {"projection": proj}}
        write_result(tmp_path, "dpcvae", 1, "dirichlet", [0.5, 0.7], tag=tag, extra=extra)
        res_path = next((tmp_path / "organamnist" / "dpcvae").glob(f"{tag or run_tag('dirichlet', 0.3, 2)}/seed=1/results.json"))
        res = json.loads(res_path.read_text())
        res["privacy"] = {"enabled": eps is not None, "target_epsilon": eps, "epsilon_spent_max": eps}
        res_path.write_text(json.dumps(res))
    write_result(tmp_path, "fedavg", 1, "iid", [0.6, 0.8])
    for kind_tag, bacc in ((None, 0.5), ("dirichlet_a0.3_c2_balanced", 0.9)):  # the yardstick: the better Local
        write_result(tmp_path, "local", 1, "dirichlet", [bacc, bacc], tag=kind_tag)
    # a preset's sweep: its epsilon = 1 folder and its tagged eps<x> folders draw one line
    for eps, tag in ((1.0, "dirichlet_a0.3_c2_balanced_dp-tuned"), (2.0, "balanced_dp-tuned_eps2")):
        write_result(tmp_path, "dpgauss", 1, "dirichlet", [0.8, 0.9], tag=tag,
                     extra={"privacy": {"enabled": True, "target_epsilon": eps}, "fidelity": {"tstr": {"bacc": 0.4}}})
    points = plots.sweep_points(plots.filtered(tables.collect(tmp_path), "organamnist", "dirichlet"))
    assert set(points) == {("dpcvae", ""), ("dpgauss", "balanced_dp-tuned")}
    assert set(points["dpcvae", ""]) == {1.0, 4.0, float("inf")} and set(points["dpgauss", "balanced_dp-tuned"]) == {1.0, 2.0}
    assert plots.sweep_line("eps0.5_balanced") == "balanced" and plots.sweep_line("nodp") == ""
    for argv in (["sweep", "--results", str(tmp_path), "--dataset", "organamnist", "--out", str(tmp_path / "s.png")],
                 ["clients", "--results", str(tmp_path), "--dataset", "organamnist", "--out", str(tmp_path / "c.png")],
                 ["projection", "--run", str(res_path.parent), "--out", str(tmp_path / "p.png")]):
        assert plots.main(plots.get_args_parser().parse_args(argv)) == 0
        assert (tmp_path / argv[-1].split("/")[-1]).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="no results; available"):
        plots.main(plots.get_args_parser().parse_args(["clients", "--results", str(tmp_path), "--dataset", "nope",
                                                      "--out", str(tmp_path / "x.png")]))


@pytest.mark.slow
def test_table1_script_runs_the_grid_end_to_end(tmp_path):
    """experiments/organamnist/table1.sh on a tiny database (2 rounds, 3 clients, 1 seed): every method x
    split runs, then the tables and figures are built from the results files."""
    import os
    import subprocess
    import sys
    from conftest import ROOT, write_db
    db = write_db(tmp_path / "db")
    env = {**os.environ, "PYTHON": sys.executable, "DB": str(db), "OUT": str(tmp_path / "res"), "SEEDS": "1"}
    fast = ["--rounds", "2", "--n-clients", "3", "--local-epochs", "1", "--gen-local-epochs", "1", "--min-samples", "5",
            "--downstream-epochs", "5", "--meta-steps", "5", "--threads", "1", "--no-progress"]
    proc = subprocess.run(["bash", str(ROOT / "experiments/organamnist/table1.sh"), *fast], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "res/tables/table1_organamnist.md").read_text().splitlines()
    assert len(md) == 2 + 18 and all(" – " not in line for line in md[2:])  # every row of table1_grid.sh, both splits
    assert (tmp_path / "res/tables/table1_organamnist_release.md").exists()
    figures = {p.name for p in (tmp_path / "res/figures").glob("*.png")}
    assert "organamnist_clients.png" in figures and len(figures) == 1 + 5 * 2  # dpcvae and fedhypevae twice


def test_tuning_ranks_settings_by_validation_metrics_only(tmp_path, capsys):
    from experiments import tuning
    for tag, val, test in (("tune_a", 0.6, 0.9), ("tune_b", 0.8, 0.1)):
        for seed in (1, 2):
            path = tmp_path / "organamnist" / "dpgauss" / tag / f"seed={seed}" / "results.json"
            path.parent.mkdir(parents=True)
            clients = [{"id": i, "bacc": test, "val_bacc": val + 0.01 * i, "val_acc": val} for i in range(2)]
            path.write_text(json.dumps({"seed": seed, "split": {"split_seed": 7}, "clients": clients,
                                        "privacy": {"epsilon_spent_max": 0.99}}))
    ranked = tuning.scores(tmp_path, "dpgauss", "val_bacc")
    assert list(ranked) == ["tune_b", "tune_a"]  # by validation BACC, whatever the test BACC says
    assert ranked["tune_b"]["score"] == pytest.approx(0.805) and ranked["tune_b"]["split_seeds"] == [7]
    old = tmp_path / "organamnist" / "dpgauss" / "tune_a" / "seed=1" / "results.json"
    old.write_text(json.dumps({"seed": 1, "split": {"split_seed": 7}, "clients": [{"id": 0, "bacc": 0.5}]}))
    with pytest.raises(UserError, match="no val_bacc per client"):
        tuning.scores(tmp_path, "dpgauss", "val_bacc")
