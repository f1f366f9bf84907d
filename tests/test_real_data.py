"""Claims of both papers, checked on the real OrganAMNIST embeddings committed under assets/."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT
import train

ASSET = ROOT / "assets" / "organamnist_vits14_224"
pytestmark = pytest.mark.slow  # whole runs on the real database


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    if not (ASSET / "manifest.json").exists():
        pytest.skip(f"{ASSET} is absent")
    out = tmp_path_factory.mktemp("real")
    summaries = {}
    for method in ("fedavg", "fedlambda", "centralized"):
        args = train.parse_args(["--db", str(ASSET), "--out", str(out), "--method", method,
                                                   "--no-progress", "--seeds", "3407"])
        assert train.main(args) == 0
        res = json.loads(next(out.glob(f"*/{method}/*/seed=3407/results.json")).read_text())
        summaries[method] = res["summary"]
    return summaries


def test_fedavg_under_dirichlet_is_below_centralized(baselines):
    assert baselines["fedavg"]["acc_mean"] < baselines["centralized"]["acc_mean"] - 0.05, baselines


def test_fedlambda_beats_fedavg_in_mean_accuracy(baselines):
    assert baselines["fedlambda"]["acc_mean"] > baselines["fedavg"]["acc_mean"] + 0.02, baselines
