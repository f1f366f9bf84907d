"""benchmarks/round_loop.py's arithmetic: the Table 1 grid's FLOP lower bound from measured rows."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import round_loop  # noqa: E402
from data.io import UserError  # noqa: E402


def row(method: str, *, rounds: int, round_flops: float, final_flops: float, peak: float) -> dict:
    return {"method": method, "rounds": rounds, "round_flops": round_flops, "flops": rounds * round_flops + final_flops,
            "matmul_flops_per_s": peak, "threads": 1, "wall_s": 1.0, "n_clients": 10, "n_train": 100,
            "peak_rss_gb": 1.0, "records_per_s": None, "bound_s": 1.0, "ratio": 1.0, "dim": 8}


def test_grid_bound_extrapolates_rounds_and_uses_the_best_peak_over_all_cores(monkeypatch):
    monkeypatch.setattr(round_loop.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(round_loop, "matmul_flops_per_s", lambda: 1e9)  # slower than 2 x the rows' 1e11
    rows = [row("gen", rounds=1, round_flops=1e12, final_flops=0.5e12, peak=1e11),
            row("local", rounds=1, round_flops=0, final_flops=2e12, peak=0.5e11)]
    text = round_loop.grid_bound(rows, 50)
    # gen: 50 x 1 + 0.5 = 50.5 TFLOP per run; local: 2 TFLOP; 6 runs each -> 315 TFLOP at 2e11 FLOP/s
    assert "gen: 50.50 TFLOP per run -> 252 s" in text
    assert "local: 2.00 TFLOP per run -> 10 s" in text
    assert "grid: 315.0 TFLOP -> at least 26.2 min" in text
    assert "peak 200 GFLOP/s on 2 cores" in text


def test_from_json_reprints_rows_and_refuses_a_missing_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(round_loop, "matmul_flops_per_s", lambda: 1e9)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([row("gen", rounds=2, round_flops=1e12, final_flops=0, peak=1e11)]))
    assert round_loop.main(round_loop.get_args_parser().parse_args(["--from-json", str(path), "--grid-rounds", "4"])) == 0
    out = capsys.readouterr().out
    assert "| gen | 10 | 100 | 2 |" in out and "gen: 4.00 TFLOP per run" in out
    with pytest.raises(UserError, match="--from-json: .*missing.json does not exist"):
        round_loop.main(round_loop.get_args_parser().parse_args(["--from-json", str(tmp_path / "missing.json")]))


@pytest.mark.slow
def test_a_measured_run_splits_into_calibration_rounds_and_final_phase(tiny_db):
    """The parts add up to the whole run, each with its own bound (a 1-round DP-CVAE on a tiny database)."""
    r = round_loop.measure("dpcvae", tiny_db, n_clients=3, rounds=1, threads=1)
    assert r["calibration_s"] > 0 and r["rounds_s"] > 0 and r["final_s"] > 0
    assert r["calibration_s"] + r["rounds_s"] + r["final_s"] == pytest.approx(r["wall_s"])
    assert r["round_ratio"] > 0 and r["final_ratio"] > 0 and r["final_bound_s"] * r["matmul_flops_per_s"] > 0
    assert 0 < r["round_floor_s"] < r["rounds_s"] and 0 < r["final_floor_s"] < r["final_s"] and r["floor_ratio"] > 1
    nothing = round_loop.measure("local", tiny_db, n_clients=3, rounds=1, threads=1)  # no rounds, no calibration
    assert nothing["calibration_s"] < 0.01 and nothing["round_ratio"] is None and nothing["final_ratio"] > 0


@pytest.mark.slow
def test_the_trainer_benchmark_times_the_captured_final_phase_workload(tiny_db):
    """benchmarks/trainer.py takes the final phase's trainer inputs from a real 1-round DP-CVAE run and
    reports the trainer against its FLOP bound and a per-step cost."""
    import trainer
    work = trainer.capture(tiny_db, n_clients=3)
    assert len(work["models"]) == 4  # three clients and the TSTR classifier
    assert work["kwargs"]["with_losses"] is False and len(work["kwargs"]["appended"]) == 4
    slim = trainer.narrowed(work, 2)
    assert all(x.shape[1] == 2 for x, _ in slim["datasets"]) and trainer.sizes_of(slim) == trainer.sizes_of(work)
    r = trainer.measure(tiny_db, n_clients=3, repeats=1, narrow=2, threads=1)
    assert r["steps"] == trainer.steps_of(work) > 0 and r["records"] == sum(trainer.sizes_of(work))
    assert r["flops"] > 0 and r["ratio"] == pytest.approx(r["wall_s"] / r["bound_s"]) and r["us_per_step"] > 0


def test_a_preset_times_the_presets_config_and_a_method_without_it_is_refused(tiny_db):
    from data.database import load_database
    from data.partition import SplitConfig
    split = SplitConfig(kind="dirichlet", n_clients=3, alpha=0.3)
    tuned = round_loop.new_method("local", load_database(tiny_db), split, 1, preset="balanced")
    assert tuned.cfg.downstream.recipe == "balanced"
    assert round_loop.new_method("local", load_database(tiny_db), split, 1).cfg.downstream.recipe == "paper"
    with pytest.raises(UserError, match="--preset 'balanced' is not a preset of fedavg; valid: none"):
        round_loop.main(round_loop.get_args_parser().parse_args(["--methods", "local", "fedavg", "--preset", "balanced"]))


def test_the_floor_counts_each_product_and_draw_by_layout_and_replays_them():
    from floor import KernelLog, build, spec
    a, b = torch.randn(6, 4), torch.randn(5, 4)
    gen = torch.Generator().manual_seed(0)
    with KernelLog() as log:
        for _ in range(3):
            a @ b.T                                    # the same product three times: one entry, count 3
        torch.addmm(torch.zeros(5), b, a.T[:, :5], beta=0.5)  # a transposed slice, a scalar
        torch.randn(7, 3, generator=gen)
        a + 1                                          # element-wise: not a kernel of the floor
    assert sorted(log.calls.values()) == [1, 1, 3] and len(log.calls) == 3
    ops = {str(func) for func, _, _ in log.calls}
    assert ops == {"aten.mm.default", "aten.addmm.default", "aten.randn.generator"}
    assert sum(log.calls.values()) == 5 and 0 < log.replay_seconds() < 1
    # the stand-ins keep each argument's layout: transposed, sliced and expanded views alike
    for t in (a.T, a.T[:, :5], torch.randn(4).expand(3, 4), torch.zeros(0, 2)):
        twin = build(spec(t), gen)
        assert twin.shape == t.shape and twin.stride() == t.stride() and twin.dtype == t.dtype
