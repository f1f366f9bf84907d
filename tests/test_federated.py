"""train.py, the round loop and the baselines on tiny fixtures."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from conftest import ROOT, write_db
from data.io import UserError
from federated.config import changed_settings
from federated.evaluation import client_metrics
from federated.methods import METHODS
from federated.methods.anonymizer import Anonymizer
from federated.methods.base import weighted_average
import train

FAST = ["--rounds", "2", "--lr", "0.05", "--n-clients", "3", "--local-epochs", "1", "--downstream-epochs", "20", "--downstream-batch-size", "32",
        "--no-progress", "--min-samples", "5"]


def run_train(db, out, *extra, seeds=("1",)):
    args = train.parse_args(["--db", str(db), "--out", str(out), *FAST, "--seeds", *seeds, *extra])
    assert train.main(args) == 0
    return out


def results_of(out, method, seed=1):
    return json.loads(next(out.glob(f"*/{method}/*/seed={seed}/results.json")).read_text())


def metrics_of(out, method, seed=1):
    return next(out.glob(f"*/{method}/*/seed={seed}/metrics.jsonl")).read_text()


def strip_timing(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "timing"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_and_writes_the_results_contract(tiny_db, tmp_path, method):
    out = run_train(tiny_db, tmp_path / "res", "--method", method)
    run_dir = next(out.glob(f"toy/{method}/*/seed=1"))
    res = json.loads((run_dir / "results.json").read_text())
    for key in ("method", "dataset", "seed", "split", "clients", "summary", "timing"):
        assert key in res
    assert res["split"]["kind"] == "dirichlet" and res["split"]["n_clients"] == 3
    assert {"id", "n_train", "n_test", "acc", "bacc", "f1_macro"} <= set(res["clients"][0])
    assert {"acc_mean", "acc_std", "bacc_mean", "bacc_std", "f1_macro_mean"} <= set(res["summary"])
    assert res["summary"]["acc_mean"] > 0.5  # well-separated clusters
    config = json.loads((run_dir / "config.json").read_text())
    assert config["flags"]["rounds"] == 2 and "torch" in config["packages"] and "git_commit" in config
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == (2 if METHODS[method].federated else 0)
    assert not (run_dir / "checkpoint.pt").exists()
    if issubclass(METHODS[method], Anonymizer):  # fidelity of the synthetic data and the membership audit
        fid, audit = res["fidelity"], res["audit"]
        assert {"precision", "recall", "density", "coverage", "mmd2", "frechet"} <= set(fid["overall"])
        assert 0 <= fid["tstr"]["bacc"] <= 1 and fid["per_class"] and fid["projection"]["synthetic"]["xy"]
        assert {"dcr", "density_ratio"} <= set(audit) and 0 <= audit["dcr"]["auc"] <= 1


def test_weighted_average_reference_numbers():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    avg = weighted_average(states, torch.tensor([0.25, 0.75]))
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))


def test_fedavg_round_is_the_sample_weighted_average_of_local_models(tiny_db):
    from data.database import load_database
    from data.partition import SplitConfig
    from federated.clients import build_clients
    from federated.methods.base import RunContext
    from federated.methods.fedavg import FedAvg, FedAvgConfig
    db = load_database(tiny_db)
    clients = build_clients(db, SplitConfig(n_clients=3, min_samples=5), 0, torch.device("cpu"))
    method = FedAvg(RunContext(clients, 4, db.dim, 0, 1, torch.device("cpu")), FedAvgConfig())
    sent = []
    method.ctx.uplink.observers.append(lambda cid, kind, payload: sent.append(payload) if kind == "update" else None)
    method.run_round(0)
    n = torch.tensor([c.n_train for c in clients], dtype=torch.float64)
    expected = sum((n[i] / n.sum()).item() * sent[i]["weight"] for i in range(3))
    assert torch.allclose(method.model.weight, expected, atol=1e-6)
    assert not torch.allclose(sent[0]["weight"], sent[1]["weight"])


def test_fedprox_with_mu_zero_equals_fedavg(tiny_db, tmp_path):
    run_train(tiny_db, tmp_path / "a", "--method", "fedavg")
    run_train(tiny_db, tmp_path / "b", "--method", "fedprox", "--mu", "0")
    a, b = results_of(tmp_path / "a", "fedavg"), results_of(tmp_path / "b", "fedprox")
    assert a["clients"] == b["clients"]
    assert metrics_of(tmp_path / "a", "fedavg") == metrics_of(tmp_path / "b", "fedprox")
    run_train(tiny_db, tmp_path / "c", "--method", "fedprox", "--mu", "1.0")
    assert metrics_of(tmp_path / "c", "fedprox") != metrics_of(tmp_path / "a", "fedavg")


def test_fedlambda_with_lambda_zero_equals_the_global_model(tiny_db, tmp_path):
    db = write_db(tmp_path / "hard", spread=4.0)  # overlapping classes: predictions differ across methods
    run_train(db, tmp_path / "a", "--method", "fedavg")
    run_train(db, tmp_path / "b", "--method", "fedlambda", "--lambda-grid", "0")
    a, b = results_of(tmp_path / "a", "fedavg"), results_of(tmp_path / "b", "fedlambda")
    assert a["clients"] == b["clients"]
    assert all(c["lambda"] == 0 for c in b["fedlambda"]["clients"])
    run_train(db, tmp_path / "c", "--method", "fedlambda", "--lambda-grid", "1", "--k-grid", "1")
    assert results_of(tmp_path / "c", "fedlambda")["clients"] != a["clients"]


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 5, 200), rng.integers(0, 6, 200)
    m = client_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    recalls = [np.mean(y_pred[y_true == c] == c) for c in range(5)]
    assert m["bacc"] == pytest.approx(np.mean(recalls))
    # balanced accuracy counts only the classes present in the client's test labels
    assert client_metrics([0, 0, 1], [0, 2, 1])["bacc"] == pytest.approx((0.5 + 1.0) / 2)


def test_same_seed_gives_byte_identical_results(tmp_path):
    tiny_db = write_db(tmp_path / "hard", spread=4.0)
    for out in ("a", "b"):
        run_train(tiny_db, tmp_path / out, "--method", "fedlambda", seeds=("5",))
    a, b = results_of(tmp_path / "a", "fedlambda", 5), results_of(tmp_path / "b", "fedlambda", 5)
    assert json.dumps(strip_timing(a)) == json.dumps(strip_timing(b))
    run_train(tiny_db, tmp_path / "c", "--method", "fedlambda", seeds=("6",))
    assert results_of(tmp_path / "c", "fedlambda", 6)["clients"] != a["clients"]


def test_kill_and_resume_equals_uninterrupted(tiny_db, tmp_path):
    from federated import loop
    argv = ["--method", "fedprox", "--rounds", "4"]
    run_train(tiny_db, tmp_path / "full", *argv)
    original = loop.run

    def killed(*a, **k):
        return original(*a, **k, stop_after=2)
    loop.run = killed
    try:
        with pytest.raises(InterruptedError):
            run_train(tiny_db, tmp_path / "resumed", *argv)
    finally:
        loop.run = original
    run_dir = next((tmp_path / "resumed").glob("toy/fedprox/*/seed=1"))
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "results.json").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    run_train(tiny_db, tmp_path / "resumed", *argv)
    a, b = results_of(tmp_path / "full", "fedprox"), results_of(tmp_path / "resumed", "fedprox")
    assert json.dumps(strip_timing(a)) == json.dumps(strip_timing(b))
    full_metrics = next((tmp_path / "full").glob("toy/fedprox/*/seed=1/metrics.jsonl")).read_text()
    assert (run_dir / "metrics.jsonl").read_text() == full_metrics


def test_finished_run_is_skipped_and_changed_settings_refused(tiny_db, tmp_path, capsys):
    run_train(tiny_db, tmp_path / "r", "--method", "fedavg")
    run_train(tiny_db, tmp_path / "r", "--method", "fedavg")
    assert "finished, skipped" in capsys.readouterr().out
    with pytest.raises(UserError, match="other settings .*local_lr"):
        run_train(tiny_db, tmp_path / "r", "--method", "fedavg", "--lr", "0.5")


def test_flags_added_later_at_their_default_do_not_block_old_runs():
    assert changed_settings({"a": 1}, {"a": 1, "b": 2}, {"b": 2}) == []
    assert changed_settings({"a": 1}, {"a": 1, "b": 3}, {"b": 2}) == ["b"]
    assert changed_settings({"a": 1, "b": 2}, {"a": 2, "b": 2}, {"b": 2}) == ["a"]


def test_a_list_flag_added_later_at_its_default_does_not_block_a_finished_run(tiny_db, tmp_path, capsys):
    """config.json records tuples as lists: the defaults are compared in that form (a Table 1 run made before
    --downstream-synthetic-weights existed must be reused by a later sweep at its default)."""
    import json
    run_train(tiny_db, tmp_path / "r", "--method", "local")
    config = next((tmp_path / "r").rglob("config.json"))
    recorded = json.loads(config.read_text())
    recorded["settings"] = {k: v for k, v in recorded["settings"].items() if k != "downstream_c_grid"}
    config.write_text(json.dumps(recorded))
    run_train(tiny_db, tmp_path / "r", "--method", "local")
    assert "finished, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["local", "centralized"])
def test_the_balanced_yardsticks_report_each_pick_and_whether_its_fit_converged(tiny_db, tmp_path, method):
    run_train(tiny_db, tmp_path / "r", "--method", method, "--preset", "balanced", "--downstream-max-iter", "3")
    results = results_of(tmp_path / "r", method)
    choices = results["downstream_choice"]
    assert sorted(choices) == (sorted(str(c["id"]) for c in results["clients"]) if method == "local" else ["pooled"])
    for pick in choices.values():  # three iterations are not enough for these fits
        assert pick["C"] > 0 and 1 <= pick["lbfgs_iterations"] <= 3 and pick["reached_max_iter"] is True
    run_train(tiny_db, tmp_path / "paper", "--method", method)
    assert "downstream_choice" not in results_of(tmp_path / "paper", method)


def test_reference_aliases(tiny_db, tmp_path):
    run_train(tiny_db, tmp_path / "r", "--algorithm", "normal")
    run_train(tiny_db, tmp_path / "r", "--algorithm", "fedprox")
    assert results_of(tmp_path / "r", "fedavg") and results_of(tmp_path / "r", "fedprox")
    with pytest.raises(UserError, match="name different methods"):
        run_train(tiny_db, tmp_path / "r", "--algorithm", "normal", "--method", "fedprox")


def bad_db(tmp_path, case):
    db = write_db(tmp_path / case)
    if case == "nan":
        with np.load(db / "train.npz") as npz:
            arrays = dict(npz)
        arrays["embeddings"][3, 1] = np.nan
        np.savez(db / "train.npz", **arrays)
    if case == "labels":
        with np.load(db / "test.npz") as npz:
            arrays = dict(npz)
        arrays["labels"][0] = 9
        np.savez(db / "test.npz", **arrays)
    if case == "dims":
        with np.load(db / "val.npz") as npz:
            arrays = dict(npz)
        arrays["embeddings"] = arrays["embeddings"][:, :5]
        np.savez(db / "val.npz", **arrays)
    if case == "missing":
        db = tmp_path / "nowhere"
    return db


@pytest.mark.parametrize("case,extra,message", [
    ("missing", [], "no such directory"),
    ("nan", [], "contain NaN/Inf"),
    ("labels", [], "labels must lie in 0..3"),
    ("dims", [], "one D for all splits"),
    ("ok", ["--n-clients", "5000"], "exceeds the 600 samples"),
    ("ok", ["--alpha", "0"], "--alpha must be > 0"),
    ("ok", ["--split", "natural"], "needs a database with groups"),
    ("ok", ["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
])
@pytest.mark.slow
def test_bad_input_is_one_clear_line(tmp_path, case, extra, message):
    db = bad_db(tmp_path, case)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--db", str(db), "--out", str(tmp_path / "o"),
                           "--no-progress", *extra], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert message in proc.stderr


@pytest.mark.slow
def test_unknown_method_lists_the_valid_ones(tiny_db):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--db", str(tiny_db), "--method", "fedsgd"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'fedsgd'" in proc.stderr
    assert all(name in proc.stderr for name in METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_flag_defaults_are_the_method_config_defaults(method):
    """train.py's defaults and each method's Config() agree (benchmarks and library users rely on it)."""
    from federated.config import method_setup
    args = train.parse_args(["--db", "x", "--method", method])
    assert method_setup(args)[2] == METHODS[method].Config()


def test_a_run_folder_is_used_by_one_process_at_a_time(tiny_db, tmp_path):
    from federated.runfolder import LOCK
    run_dir = tmp_path / "r" / "toy" / "fedavg" / "dirichlet_a0.3_c3" / "seed=1"
    run_dir.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / LOCK).write_text(str(sleeper.pid))
        with pytest.raises(UserError, match=f"in use by process {sleeper.pid}"):
            run_train(tiny_db, tmp_path / "r", "--method", "fedavg")
    finally:
        sleeper.kill()
        sleeper.wait()
    run_train(tiny_db, tmp_path / "r", "--method", "fedavg")  # the lock's process is gone: taken over
    assert (run_dir / "results.json").exists() and not (run_dir / LOCK).exists()


@pytest.mark.parametrize("optimizer,mu", [("adam", 0.0), ("sgd", 0.0), ("sgd", 0.5)])
def test_batched_classifiers_equal_training_each_alone(optimizer, mu):
    """train_classifiers (one batched step for all clients, the FedAvg/FedProx local training and every
    downstream classifier) against train_epochs per client, the straightforward reference."""
    from federated.training import OptimConfig, new_classifier, train_classifiers, train_epochs
    cfg = OptimConfig(optimizer=optimizer, lr=0.05, momentum=0.5, weight_decay=1e-3, batch_size=16, epochs=4)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (70, 13, 40)]
    anchor = new_classifier(8, 3, torch.Generator().manual_seed(1), torch.device("cpu"))
    target = {k: v.detach().clone() for k, v in anchor.state_dict().items()}

    def stacked(params):
        return 0.5 * mu * sum((p - target[k]).pow(2).flatten(1).sum(1) for k, p in params.items())

    def single(model):
        return 0.5 * mu * sum((p - target[k]).pow(2).sum() for k, p in model.named_parameters())
    batched = [new_classifier(8, 3, torch.Generator().manual_seed(10 + k), torch.device("cpu")) for k in range(3)]
    losses = train_classifiers(batched, data, cfg, [torch.Generator().manual_seed(20 + k) for k in range(3)],
                               penalty=stacked if mu else None)
    for k, (x, y) in enumerate(data):
        alone = new_classifier(8, 3, torch.Generator().manual_seed(10 + k), x.device)
        loss = train_epochs(alone, x, y, cfg, torch.Generator().manual_seed(20 + k), penalty=single if mu else None)
        torch.testing.assert_close(batched[k].weight, alone.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched[k].bias, alone.bias, rtol=1e-5, atol=1e-6)
        assert losses[k] == pytest.approx(loss, rel=1e-5)
    # without the losses (downstream fits discard them) the same models, to the last bit
    quiet = [new_classifier(8, 3, torch.Generator().manual_seed(10 + k), torch.device("cpu")) for k in range(3)]
    assert train_classifiers(quiet, data, cfg, [torch.Generator().manual_seed(20 + k) for k in range(3)],
                             penalty=stacked if mu else None, with_losses=False) is None
    for q, b in zip(quiet, batched):
        assert torch.equal(q.weight, b.weight) and torch.equal(q.bias, b.bias)


def test_a_lock_that_cannot_be_taken_refuses_the_run(tmp_path, monkeypatch):
    """If another process keeps winning the lock file, the run is refused, never run unlocked."""
    from federated import runfolder

    def always_taken(*args, **kwargs):
        raise FileExistsError
    monkeypatch.setattr(runfolder.os, "open", always_taken)
    with pytest.raises(UserError, match="another process is taking"):
        with runfolder.RunFolder(tmp_path / "run").lock():
            pytest.fail("ran without the lock")


@pytest.mark.slow
def test_an_invalid_epsilon_leaves_no_folder_and_the_corrected_run_then_succeeds(tiny_db, tmp_path):
    for bad in (["--epsilon", "0"], ["--alpha", "-1"], ["--n-clients", "0"], ["--delta", "2"]):
        with pytest.raises((UserError, SystemExit)):  # a config's check, or the flag's own (argparse)
            run_train(tiny_db, tmp_path / "r", "--method", "dpcvae", *bad)
        assert not (tmp_path / "r").exists(), bad
    # a folder whose run never completed a round (here: a crash in round 0) takes the corrected settings
    run_dir = tmp_path / "r" / "toy" / "dpcvae" / "dirichlet_a0.3_c3" / "seed=1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"method": "dpcvae", "settings": {"privacy_target_epsilon": 5.0}}))
    run_train(tiny_db, tmp_path / "r", "--method", "dpcvae", "--gen-local-epochs", "1", "--latent", "4", "--cvae-hidden", "8")
    assert (run_dir / "results.json").exists()


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        train.parse_args([*argv, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("method", [None, *sorted(METHODS)])
def test_help_reads_right(method, capsys):
    text = help_text(capsys, *(["--method", method] if method else []))
    assert "(default: True)" not in text and "(default: None)" not in text and "PRIVACY_" not in text
    assert not re.search(r"\(default[^)]*\)[^\n]*\(default", text), "a flag shows two defaults"
    flat = " ".join(text.split())  # argparse wraps lines
    run_group = text[text.index("\nRun:"):].split("\n\n")[0]
    assert "--rounds N" in run_group and "--seeds SEED" in run_group
    if method is None:  # the general flags and where to find each method's
        assert all(name in flat for name in METHODS) and "--method NAME --help" in flat
        return
    from federated.config import method_flags
    for fl in method_flags(method):  # every setting of the method is shown, in its group
        group = text[text.index(f"\n{fl.title}:"):].split("\n\n")[0]
        assert fl.names[0] in group, (fl.names[0], fl.title)
    if method == "dpcvae":
        assert "--epsilon EPS" in flat and "(default: 0.001)" in flat  # the generator's lr: DP-CVAE's own default
        no_dp = re.search(r"--no-dp\s+(.*?)\n  --", text, flags=re.S).group(1)
        assert "default" not in no_dp and "without DP" in no_dp
    if method == "dpcgan":
        assert "--gen-lr LR Adam learning rate of the DP steps (default: 0.0002)" in flat
    if method == "fedlambda":
        assert "(default: 0,0.1,0.2" in flat and "(default: (" not in flat  # lists print as values


def test_a_flag_of_another_method_is_ignored_with_a_warning_and_a_misspelt_one_refused(capsys):
    args = train.parse_args(["--method", "fedavg", "--epsilon", "2", "--lr", "0.1"])
    assert args.local_lr == 0.1 and not hasattr(args, "privacy_target_epsilon")
    assert "--epsilon ignored: not a setting of fedavg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "fedavg", "--epsilonn", "2"])
    assert "unrecognized arguments: --epsilonn" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "dpcvae", "--gen-batch-size", "0"])
    assert "argument --gen-batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_the_summary_line_carries_accuracy_epsilon_tstr_and_the_audit_with_its_power():
    results = {"summary": {"acc_mean": 0.9, "acc_std": 0.01, "bacc_mean": 0.7, "bacc_std": 0.02},
               "privacy": {"enabled": True, "epsilon_spent_max": 0.99951, "target_epsilon": 1.0, "accountant": "prv",
                           "epsilon_spent_max_rdp": 1.1234},
               "fidelity": {"tstr": {"bacc": 0.125}}, "audit": {"dcr": {"auc": 0.501}, "canary": {"dcr": {"auc": 0.997}}}}
    line = train.summary_line("dpcvae", 3407, results)
    assert line == ("dpcvae seed=3407: acc 90.00 ± 1.00  bacc 70.00 ± 2.00 | ε spent 0.9995 of 1 (max over clients, "
                    "PRV; RDP 1.123) | TSTR bacc 12.5 | audit DCR AUC 0.50 (power: canary 1.00)")
    results["dpgauss"] = {"release_quality": {"effective_records": [4.0, 5.0, 30.0], "signal_to_noise": [0.5, 0.8, 3.0]}}
    assert train.summary_line("dpgauss", 1, results).split(" | ")[-2] == \
        "release: 5 effective records a class, signal-to-noise 0.8 (medians; under 1: mostly noise)"
    results["dpgauss"]["release_quality"]["signal_to_noise"] = None  # without DP: nothing to say
    assert "release" not in train.summary_line("dpgauss", 1, results)


PRESETS = [(m, p) for m in sorted(METHODS) for p in sorted(getattr(METHODS[m].Config, "PRESETS", {}))]


@pytest.mark.parametrize("method,preset", PRESETS)
def test_a_preset_sets_its_settings_flags_override_it_and_the_folder_names_it(method, preset):
    from federated.config import folder_tag, method_setup, presets_of
    values = presets_of(method)[preset]
    args = train.parse_args(["--db", "x", "--method", method, "--preset", preset])
    assert all(getattr(args, dest) == v for dest, v in values.items())
    cfg = method_setup(args)[2]
    assert cfg != METHODS[method].Config()
    dest = sorted(values)[0]
    flag = next(a for a in train.parse_args.__globals__["method_parser"](method)._actions if a.dest == dest).option_strings[0]
    default = getattr(train.parse_args(["--db", "x", "--method", method]), dest)
    given = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
    overridden = train.parse_args(["--db", "x", "--method", method, "--preset", preset, flag, given])
    assert getattr(overridden, dest) == default  # an explicit flag beats the preset
    tag = folder_tag(None, {"kind": "dirichlet", "alpha": 0.3, "n_clients": 10}, cfg, preset)
    assert tag.startswith("dirichlet_a0.3_c10_") and tag.endswith(preset) and tag.count(preset) == 1


def test_an_unknown_preset_is_one_line_listing_the_valid_ones():
    with pytest.raises(UserError, match=r"--preset 'nope' is not a preset of dpfedavg; valid: .*mix"):
        train.parse_args(["--db", "x", "--method", "dpfedavg", "--preset", "nope"])
    with pytest.raises(UserError, match="not a preset of fedavg; valid: none"):
        train.parse_args(["--db", "x", "--method", "fedavg", "--preset", "mix"])


def test_an_epsilon_sweep_point_gets_its_own_folder():
    from federated.config import folder_tag, method_setup
    split = {"kind": "dirichlet", "alpha": 0.3, "n_clients": 10}

    def tag(*flags):
        args = train.parse_args(["--db", "x", "--method", "dpgauss", *flags])
        return folder_tag(args.tag, split, method_setup(args)[2], args.preset)
    assert tag() == "dirichlet_a0.3_c10"  # the default epsilon keeps Table 1's folder
    assert tag("--epsilon", "2") == "dirichlet_a0.3_c10_eps2"
    assert tag("--epsilon", "0.5", "--preset", "dp-tuned") == "dirichlet_a0.3_c10_balanced_dp-tuned_eps0.5"
    assert tag("--no-dp") == "dirichlet_a0.3_c10_nodp"
    assert tag("--epsilon", "2", "--tag", "mine") == "mine"
