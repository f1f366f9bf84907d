"""FedHypeVAE's DP class statistics: the exact moments without noise, the expected error with it,
and the script that reports their signal-to-noise on a database."""
from __future__ import annotations

import math

import pytest
import torch

from data.io import UserError
from experiments import class_stats_noise
from federated.clients import ClientData
from federated.methods.fedhypevae import class_moments, class_stat_sums


def client(i: int, x: torch.Tensor, y: torch.Tensor) -> ClientData:
    empty_x, empty_y = x[:0], y[:0]
    return ClientData(i, x, y, empty_x, empty_y, empty_x, empty_y)


def test_noise_free_moments_are_the_class_mean_and_population_variance_of_unclipped_data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=gen), torch.arange(40) % 3
    mean, var = class_moments(class_stat_sums(x, y, 3, clip=100.0), clip=100.0)
    for k in range(3):
        torch.testing.assert_close(mean[k], x[y == k].mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var[k], x[y == k].var(0, unbiased=False), rtol=1e-4, atol=1e-5)


def test_records_beyond_the_clip_are_scaled_onto_it():
    x, y = torch.tensor([[30.0, 40.0], [3.0, 4.0]]), torch.tensor([0, 1])
    mean, _ = class_moments(class_stat_sums(x, y, 2, clip=10.0), clip=10.0)
    torch.testing.assert_close(mean, torch.tensor([[6.0, 8.0], [3.0, 4.0]]))


def test_the_mean_error_matches_the_gaussian_mechanism_and_vanishes_without_noise():
    gen = torch.Generator().manual_seed(1)
    d, n, clip, sigma = 64, 500, 10.0, 1.0
    clients = [client(i, torch.randn(2 * n, d, generator=gen), torch.arange(2 * n) % 2) for i in range(2)]
    rows = class_stats_noise.noise_report(clients, 2, clip, sigma, draws=200, gen=gen)
    per_coordinate = clip * sigma * math.sqrt(3) * math.sqrt(2) / (2 * n)   # 2 clients' noise, n per client per class
    expected = per_coordinate * math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    for r in rows:
        assert r["n"] == 2 * n
        assert abs(r["mean_error"] / expected - 1) < 0.05
    noise_dominated = class_stats_noise.noise_report(clients, 2, clip, 100.0, draws=5, gen=gen)
    assert all(r["dp_var"] > 3 * r["var"] for r in noise_dominated)   # clamped at 0, noise inflates them
    exact = class_stats_noise.noise_report(clients, 2, clip, 0.0, draws=1, gen=gen)
    assert all(r["mean_error"] == 0 and abs(r["dp_var"] - r["var"]) < 1e-6 for r in exact)


def test_the_script_runs_on_a_database_and_rejects_bad_flags(tiny_db, capsys):
    parser = class_stats_noise.get_args_parser()
    assert class_stats_noise.main(parser.parse_args(["--db", str(tiny_db), "--stats-noise", "1", "0",
                                                     "--split", "iid", "--n-clients", "2", "--draws", "2"])) == 0
    out = capsys.readouterr().out
    assert out.count("--stats-noise") == 2 and "| class | n |" in out
    with pytest.raises(UserError, match="--draws"):
        class_stats_noise.main(parser.parse_args(["--db", str(tiny_db), "--draws", "0"]))
