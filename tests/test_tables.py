"""experiments/tables.py on fixture results files with hand-computed cells."""
from __future__ import annotations

import json

import pytest

from data.io import UserError
from experiments import tables


def write_result(root, method, seed, kind, accs, eps=None):
    res = {"method": method, "dataset": "organamnist", "seed": seed,
           "split": {"kind": kind, "alpha": 0.3 if kind == "dirichlet" else None, "n_clients": len(accs)},
           "clients": [{"id": i, "acc": a, "bacc": a / 2} for i, a in enumerate(accs)]}
    if eps is not None:
        res["privacy"] = {"epsilon_spent_max": eps}
    path = root / "organamnist" / method / kind / f"seed={seed}" / "results.json"
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
    assert md[3] == "| DP-CVAE | – | – | 60.00 ± 10.00 | 30.00 ± 5.00 | 0.980 |"
    rows = out.with_suffix(".csv").read_text().splitlines()
    fedavg_acc = [r for r in rows if r.startswith("fedavg,organamnist,IID,acc")][0].split(",")
    assert fedavg_acc[4:10] == ["0.800000", "0.100000", "0.800000", "0.100000", "2", "1 2"]


def test_no_results_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no results.json found"):
        tables.collect(tmp_path)


def test_experiment_scripts_use_only_flags_train_py_knows():
    import re
    import subprocess
    from conftest import ROOT
    import train
    known = {s for a in train.get_args_parser()._actions for s in a.option_strings}
    scripts = sorted((ROOT / "experiments").glob("*/*.sh"))
    assert {s.parent.name for s in scripts} >= {"organamnist", "organsmnist", "camelyon17", "isic"}
    for script in scripts:
        text = script.read_text()
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        assert "set -euo pipefail" in text and "rm -rf" not in text
        flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
        assert flags <= known, (script, flags - known)
