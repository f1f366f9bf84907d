"""The config layer (federated/config.py, data/flags.py): one declaration per flag, a new method is one
file and one registry line, --help without torch, and no package module importing train.py."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import ROOT
from data.flags import setting
from federated.config import method_flags
from federated.methods import METHODS
from federated.methods.fedavg import FedAvg, FedAvgConfig
from tests.test_federated import results_of, run_train, strip_timing


def test_no_package_module_imports_train_py():
    for folder in ("federated", "data", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                assert "train" not in names, f"{path} imports train.py"


def test_help_without_a_method_imports_no_torch():
    code = ("import sys, train\ntry:\n    train.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'federated.methods.base' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.split()[-2:] == ["False", "False"], proc.stdout


def test_a_flag_that_two_methods_share_is_declared_alike():
    seen = {}
    for name in METHODS:
        for fl in method_flags(name):
            if fl.dest in seen:
                other, first = seen[fl.dest]
                assert fl.same_declaration(first), f"--{fl.dest}: {name} and {other} declare it differently"
            else:
                seen[fl.dest] = (name, fl)
    names = [n for _, fl in seen.values() for n in fl.names]
    assert len(names) == len(set(names)), "two settings share a flag name"
    assert {"downstream_lr", "privacy_target_epsilon", "local_lr", "latent"} <= set(seen)


def test_the_split_flags_are_one_declaration_for_train_and_partition():
    from data.partition import SplitConfig, get_args_parser as partition_args
    import train
    mine = vars(partition_args().parse_args(["--db", "x"]))
    theirs = vars(train.parse_args(["--db", "x"]))
    split_dests = ("split_kind", "n_clients", "alpha", "split_seed", "min_samples", "test_frac", "val_frac")
    assert {k: mine[k] for k in split_dests} == {k: theirs[k] for k in split_dests}
    cfg = SplitConfig()
    assert (mine["split_kind"], mine["alpha"]) == (cfg.kind, cfg.alpha)


# --- a method written as a user would: this class plus one registry line, nothing else -------------
@dataclass(frozen=True)
class ServerLrConfig(FedAvgConfig):
    server_lr: float = setting(0.5, "server learning rate: the shared model moves this far towards the average",
                               metavar="ETA")


class FedAvgServerLr(FedAvg):
    name = "fedavg_serverlr"
    Config = ServerLrConfig

    def aggregate(self, payloads, weights):
        average, shared = super().aggregate(payloads, weights), self.shared_state()
        return {k: shared[k] + self.cfg.server_lr * (average[k] - shared[k]) for k in average}


@pytest.fixture
def registered():
    METHODS.register("fedavg_serverlr", FedAvgServerLr)
    yield "fedavg_serverlr"
    METHODS.unregister("fedavg_serverlr")


def test_a_new_method_is_one_file_and_one_registry_line(registered, tiny_db, tmp_path, capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(["--method", registered, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--server-lr ETA server learning rate: the shared model moves this far towards the average (default: 0.5)" in text

    argv = ["--method", registered, "--rounds", "2", "--server-lr", "0.25"]
    run_train(tiny_db, tmp_path / "full", *argv)
    full = results_of(tmp_path / "full", registered)
    config = json.loads(next((tmp_path / "full").rglob("config.json")).read_text())
    assert config["method_config"]["server_lr"] == 0.25 and config["settings"]["server_lr"] == 0.25

    from federated import loop
    original = loop.run
    loop.run = lambda *a, **k: original(*a, **k, stop_after=1)
    try:
        with pytest.raises(InterruptedError):
            run_train(tiny_db, tmp_path / "resumed", *argv)
    finally:
        loop.run = original
    run_train(tiny_db, tmp_path / "resumed", *argv)
    assert "resuming from round 1 of 2" in capsys.readouterr().err
    assert json.dumps(strip_timing(results_of(tmp_path / "resumed", registered))) == json.dumps(strip_timing(full))
    plain = run_train(tiny_db, tmp_path / "plain", "--method", "fedavg", "--rounds", "2")
    assert full["clients"] != results_of(plain, "fedavg")["clients"]  # its hook ran


def test_config_from_builds_nested_configs_and_keeps_what_is_absent():
    from data.flags import config_from
    from federated.methods.dpcgan import DPCGANConfig
    cfg = config_from(DPCGANConfig, {"privacy_target_epsilon": 2.0, "gen_batch_size": 64, "lambda_grid": [0.5]})
    assert cfg.privacy.target_epsilon == 2.0 and cfg.gen.batch_size == 64
    assert cfg.gen.lr == 2e-4 and cfg.privacy.delta == DPCGANConfig().privacy.delta  # DP-CGAN's own defaults kept
