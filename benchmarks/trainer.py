"""Speed of the stacked downstream trainer (federated.training.train_classifiers) against its FLOP bound,
and the fixed cost of one of its steps.

    python benchmarks/trainer.py                          # a 1-round DP-CVAE run's downstream classifiers
    python benchmarks/trainer.py --repeats 5 --json trainer.json

The workload is exactly what fit_classifiers receives in a 1-round DP-CVAE run on the embedded OrganAMNIST
database (10 clients, Dirichlet alpha 0.3, the papers' recipe: each client's records plus its synthetic ones,
and the TSTR classifier on the release): the run is started and stopped when the final phase calls the
trainer. Then, best of --repeats in this process:
- the trainer at full width: wall and CPU seconds against its matmul FLOPs (FlopCounterMode over one epoch,
  times the epochs: every epoch has the same steps) at this machine's float32 matmul rate, measured before
  and after as in round_loop.py;
- the same steps with the records cut to --narrow columns, where the matmuls and the gathers are negligible:
  CPU microseconds a step are then the step's fixed cost (dispatch and small kernels).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from data.database import load_database  # noqa: E402
from data.io import UserError, run_cli  # noqa: E402
from data.partition import SplitConfig  # noqa: E402
from federated import training  # noqa: E402
from federated.loop import RunInfo, run  # noqa: E402
from federated.runfolder import RunFolder  # noqa: E402
from round_loop import REAL_DB, SEED, matmul_flops_per_s, new_method  # noqa: E402


class _Captured(Exception):
    """Stops the run once the trainer's inputs are taken."""


def capture(db_path: Path, n_clients: int) -> dict:
    """The inputs of the final phase's train_classifiers call in a 1-round DP-CVAE run."""
    db = load_database(db_path)
    method = new_method("dpcvae", db, SplitConfig(kind="dirichlet", n_clients=n_clients, alpha=0.3), rounds=1)
    taken: dict = {}

    def take(models, datasets, cfg, gens, **kwargs):
        taken.update(models=copy.deepcopy(models), datasets=datasets, cfg=cfg, kwargs=kwargs,
                     gen_states=[g.get_state() for g in gens])
        raise _Captured
    trainer, training.train_classifiers = training.train_classifiers, take
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run(method, RunInfo("dpcvae", "bench", SEED, {}), RunFolder(Path(tmp)), progress=False)
    except _Captured:
        pass
    finally:
        training.train_classifiers = trainer
    if not taken:
        raise UserError(f"{db_path}: the 1-round DP-CVAE run trained no downstream classifier")
    return taken


def narrowed(work: dict, columns: int) -> dict:
    """The same steps on records cut to their first `columns` columns (fresh models of that width)."""
    def cut(data):
        return None if data is None else (data[0][:, :columns].contiguous(), data[1])
    n_classes = work["models"][0].weight.shape[0]
    models = [training.new_classifier(columns, n_classes, torch.Generator().manual_seed(k), torch.device("cpu"))
              for k in range(len(work["models"]))]
    kwargs = dict(work["kwargs"])
    if kwargs.get("appended") is not None:
        kwargs["appended"] = [cut(a) for a in kwargs["appended"]]
    return {**work, "models": models, "datasets": [cut(d) for d in work["datasets"]], "kwargs": kwargs}


def train(work: dict, cfg: training.OptimConfig | None = None) -> tuple[float, float]:
    """(wall s, CPU s) of one train_classifiers call on fresh copies of the captured models and generators."""
    models = copy.deepcopy(work["models"])
    gens = []
    for state in work["gen_states"]:
        gens.append(torch.Generator())
        gens[-1].set_state(state)
    wall, cpu = time.perf_counter(), time.process_time()
    training.train_classifiers(models, work["datasets"], cfg or work["cfg"], gens, **work["kwargs"])
    return time.perf_counter() - wall, time.process_time() - cpu


def sizes_of(work: dict) -> list[int]:
    """Each model's training records (its own and the appended ones)."""
    appended = work["kwargs"].get("appended") or [None] * len(work["datasets"])
    return [len(y) + (0 if extra is None else len(extra[1])) for (_, y), extra in zip(work["datasets"], appended)]


def steps_of(work: dict) -> int:
    """Steps of the stacked loop: the longest model's batches per epoch, every epoch."""
    cfg, sizes = work["cfg"], sizes_of(work)
    batch = cfg.batch_size or max(sizes)
    return cfg.epochs * max(-(-n // batch) for n in sizes)


def measure(db_path: Path, n_clients: int, repeats: int, narrow: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    work = capture(db_path, n_clients)
    peak = matmul_flops_per_s()
    one_epoch = dataclasses.replace(work["cfg"], epochs=1)
    with FlopCounterMode(display=False) as fc:
        train(work, one_epoch)
    flops = fc.get_total_flops() * work["cfg"].epochs
    wall, cpu = min(train(work) for _ in range(repeats))
    slim = narrowed(work, narrow)
    narrow_cpu = min(train(slim)[1] for _ in range(repeats))
    peak = max(peak, matmul_flops_per_s())
    steps = steps_of(work)
    return {"workload": "dpcvae 1-round final phase", "models": len(work["models"]), "records": sum(sizes_of(work)),
            "dim": work["datasets"][0][0].shape[1], "epochs": work["cfg"].epochs, "steps": steps, "threads": threads,
            "wall_s": wall, "cpu_s": cpu, "flops": flops, "matmul_flops_per_s": peak, "bound_s": flops / peak,
            "ratio": wall / (flops / peak), "narrow_dim": narrow, "narrow_cpu_s": narrow_cpu,
            "us_per_step": narrow_cpu / steps * 1e6}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The stacked downstream trainer against its FLOP bound, and its per-step cost.")
    p.add_argument("--db", type=Path, default=REAL_DB, help="embedding database (default: the embedded OrganAMNIST one)")
    p.add_argument("--clients", type=int, default=10, help="number of clients of the DP-CVAE run")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each kind, the best kept")
    p.add_argument("--narrow", type=int, default=8, help="record columns of the per-step-cost run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the row to this JSON file")
    return p


def main(args: argparse.Namespace) -> int:
    if not args.db.exists():
        raise UserError(f"--db: {args.db} does not exist (data/create_db.py writes one)")
    if args.repeats < 1 or args.narrow < 1 or args.clients < 1:
        raise UserError("--repeats, --narrow and --clients must be >= 1")
    r = measure(args.db, args.clients, args.repeats, args.narrow, args.threads)
    print(f"| models | records | dim | steps | wall (s) | CPU (s) | GFLOP | bound (s) | wall / bound | "
          f"us a step at {r['narrow_dim']}-d |\n|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {r['models']} | {r['records']:,} | {r['dim']} | {r['steps']:,} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
          f"{r['flops'] / 1e9:,.1f} | {r['bound_s']:.2f} | {r['ratio']:.2f} | {r['us_per_step']:.0f} |\n"
          f"(float32 matmul peak: {r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s with {r['threads']} thread(s); best of {args.repeats})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r], indent=1))
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
