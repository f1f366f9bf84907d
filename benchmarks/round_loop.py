"""Speed of every method's whole run (rounds, downstream training, evaluation) against a FLOP lower bound.

    python benchmarks/round_loop.py                    # OrganSMNIST-sized workload, every method, 50 rounds
    python benchmarks/round_loop.py --rounds 5         # shorter (per-round figures extrapolate)
    python benchmarks/round_loop.py --real             # the embedded OrganAMNIST database instead
    python benchmarks/round_loop.py --scaling --methods fedavg dpcvae --rounds 2
    python benchmarks/round_loop.py --real --rounds 1 --grid-rounds 50 --json r1.json   # + Table 1 grid bound
    python benchmarks/round_loop.py --from-json r1.json --grid-rounds 50                # the same, no re-run
    python benchmarks/round_loop.py --real --methods dpcvae fedhypevae --preset dp-tuned   # a named preset's runs

Default workload: the papers' settings on 25,211 samples of 768-d embeddings (ViT-B size) in 11
Gaussian class clusters (timing does not depend on the content), 10 clients, Dirichlet alpha = 0.3,
5 local epochs per round, epsilon = 1: each method's default config, as train.py uses it, or with --preset
the named preset's (and its number of rounds unless --rounds is given), as `train.py --preset` sets it.

Each method runs in its own process (so peak RSS is its own), with a fresh results folder. Printed
per method: wall-clock seconds, peak RSS, records processed per second, the FLOP lower bound and the
ratio wall / bound; then the parts, each against its own bound: the noise calibration (accountant work, no
FLOP bound: its target is seconds), the rounds (per-round wall / per-round bound) and the final phase. The
libraries' one-off imports (Opacus's accountants ~1.5-2.5 s, then scikit-learn's PCA and metrics ~0.7 s, which
the final phase would otherwise pay) are timed apart, as the process's torch import is not timed at all.
Last, the floor of each part (benchmarks/floor.py): the same round's and final phase's matrix products and Gaussian
draws replayed alone at their own shapes on this machine, so wall / floor is what the element-wise, dispatch and
memory work around them costs, and floor / bound what the shapes cost against a large matmul.
The bound is the method's matrix-multiply FLOPs (torch's FlopCounterMode over one
round and over the final phase -- downstream training, synthesis, fidelity and audit --, so
rounds x round FLOPs + final FLOPs) divided by the FLOP/s this machine reaches on a large float32
matmul, measured in the same process with the same threads, before and after the run (the larger
kept). Element-wise work is not counted, so the bound is optimistic: a ratio near 1 is unreachable
for small models.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from data.database import load_database, write_synthetic_database  # noqa: E402
from data.flags import config_from  # noqa: E402
from data.io import UserError, run_cli  # noqa: E402
from data.partition import SplitConfig  # noqa: E402
from federated.clients import build_clients  # noqa: E402
from federated.config import method_parser, preset_values  # noqa: E402
from federated.loop import RunInfo, run  # noqa: E402
from federated.methods import METHODS  # noqa: E402
from federated.methods.base import RunContext  # noqa: E402
from federated.runfolder import RunFolder  # noqa: E402
from floor import KernelLog  # noqa: E402

REAL_DB = ROOT / "assets" / "organamnist_vits14_224"
SEED = 3407


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tic)
    return 2 * n ** 3 / best


def new_method(name: str, db, split: SplitConfig, rounds: int, batch_clients: bool = False, preset: str | None = None):
    clients = build_clients(db, split, SEED, torch.device("cpu"))
    ctx = RunContext(clients=clients, n_classes=len(db.classes), dim=db.dim, seed=SEED, rounds=rounds,
                     device=torch.device("cpu"))
    cls = METHODS[name]
    # the method's flags at their defaults, or at the preset's: the config train.py builds from them
    cfg = config_from(cls.Config, vars(method_parser(name, others=False, preset=preset).parse_args([])))
    if batch_clients:  # --gen-batch-clients
        cfg = dataclasses.replace(cfg, gen=dataclasses.replace(cfg.gen, batch_clients=True))
    return cls(ctx, cfg)


def epochs_per_round(cfg) -> int:
    for path in (("gen", "local_epochs"), ("sgd", "local_epochs"), ("local", "epochs")):
        obj = cfg
        for key in path:
            obj = getattr(obj, key, None)
        if obj is not None:
            return int(obj)
    return 0


def measure(name: str, db_path: Path, n_clients: int, rounds: int, threads: int, batch_clients: bool = False,
            preset: str | None = None) -> dict:
    """One method, in this process: a timed run, then FLOPs of one round and of the final phase (of the
    clients one after another even when the timed run stacks them: padding is not useful work)."""
    torch.set_num_threads(threads)
    tic = time.perf_counter()
    # a process's one-off imports, like torch's (opacus pulls in torch.distributed and scipy; the audit and
    # TSTR scikit-learn): reported on their own, not inside the first calibration or final phase
    for module in ("opacus.accountants", "sklearn.decomposition", "sklearn.metrics"):
        importlib.import_module(module)
    import_s = time.perf_counter() - tic
    peak = matmul_flops_per_s()
    db = load_database(db_path)
    split = SplitConfig(kind="dirichlet", n_clients=n_clients, alpha=0.3)
    method = new_method(name, db, split, rounds, batch_clients, preset)
    n_train = sum(c.n_train for c in method.ctx.clients)
    marks: dict[str, float] = {}
    finish = method.finish

    def timed_finish() -> None:  # the final phase starts here (downstream, synthesis, fidelity, audit, report)
        marks["final"] = time.perf_counter()
        finish()
    method.finish = timed_finish
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        if hasattr(method, "noise_multipliers"):  # calibrated on first use and kept: time it on its own
            method.noise_multipliers
        calibration = time.perf_counter() - tic
        results = run(method, RunInfo(name, "bench", SEED, {}), RunFolder(Path(tmp)), progress=False)
        wall = time.perf_counter() - tic
    final, rounds_s = wall - (marks["final"] - tic), marks["final"] - tic - calibration
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    counted = new_method(name, db, split, rounds, preset=preset)
    round_flops, round_floor = 0, 0.0
    if counted.federated:
        with FlopCounterMode(display=False) as fc, KernelLog() as kernels:
            counted.run_round(0)
        round_flops, round_floor = fc.get_total_flops(), kernels.replay_seconds()
    with FlopCounterMode(display=False) as fc, KernelLog() as kernels:
        counted.finish()
    final_flops, final_floor = fc.get_total_flops(), kernels.replay_seconds()
    # measured again after the run, the larger kept: a neighbour's burst during one measurement would
    # otherwise lower the bound and flatter the ratio
    peak = max(peak, matmul_flops_per_s())
    n_rounds = rounds if counted.federated else 0
    flops = n_rounds * round_flops + final_flops
    floor = n_rounds * round_floor + final_floor
    records = n_rounds * epochs_per_round(method.cfg) * n_train
    label = name + (f" [{preset}]" if preset else "") + (" (batched clients)" if batch_clients else "")
    return {"method": label, "wall_s": wall, "peak_rss_gb": rss_gb, "records_per_s": records / wall if records else None,
            "flops": flops, "round_flops": round_flops, "matmul_flops_per_s": peak, "bound_s": flops / peak,
            "ratio": wall / (flops / peak), "floor_s": floor, "floor_ratio": wall / floor if floor else None,
            "n_train": n_train, "n_clients": n_clients, "rounds": rounds,
            "dim": db.dim, "threads": threads, "bacc_mean": results["summary"]["bacc_mean"],
            # the parts: calibration (accountant work, no FLOP bound), the rounds and the final phase
            "library_imports_s": import_s, "calibration_s": calibration, "rounds_s": rounds_s, "final_s": final,
            "round_ratio": rounds_s / n_rounds / (round_flops / peak) if n_rounds and round_flops else None,
            "final_bound_s": final_flops / peak, "final_ratio": final / (final_flops / peak) if final_flops else None,
            # the products and Gaussian draws alone, replayed at their shapes (floor.py): wall / floor is what
            # the work around them costs
            "round_floor_s": round_floor if n_rounds else None, "final_floor_s": final_floor}


def run_child(name: str, db_path: Path, n_clients: int, rounds: int, threads: int, batch_clients: bool = False,
              preset: str | None = None) -> dict:
    """measure() in a fresh process, so that each method's peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", name, "--db", str(db_path), "--clients", str(n_clients),
           "--rounds", str(rounds), "--threads", str(threads), *(["--batch-clients"] if batch_clients else []),
           *(["--preset", preset] if preset else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"benchmark of {name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def figure(value: float | None, fmt: str = ".1f") -> str:
    return format(value, fmt) if value is not None else "–"


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print("| method | clients | train records | rounds | wall (s) | s/round | peak RSS (GB) | records/s | "
          "GFLOP | bound (s) | wall / bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_round = f"{r['wall_s'] / r['rounds']:.2f}" if r["round_flops"] else "–"
        rps = f"{r['records_per_s']:,.0f}" if r["records_per_s"] else "–"
        print(f"| {r['method']} | {r['n_clients']} | {r['n_train']:,} | {r['rounds']} | {r['wall_s']:.1f} | {per_round} | "
              f"{r['peak_rss_gb']:.2f} | {rps} | {r['flops'] / 1e9:,.1f} | {r['bound_s']:.1f} | {r['ratio']:.1f} |")
    parts = [r for r in rows if "final_s" in r]  # rows of --json files written before the parts existed lack them
    if parts:
        print("\n| method | library imports (s) | calibration (s) | rounds (s) | s/round | round wall / bound | final phase (s) | final bound (s) "
              "| final wall / bound |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in parts:
            per_round = f"{r['rounds_s'] / r['rounds']:.2f}" if r["round_flops"] else "–"
            # rows measured before scikit-learn's import was timed apart name Opacus's alone
            imported = next((f"{r[k]:.2f}" for k in ("library_imports_s", "accountant_import_s") if k in r), "–")
            print(f"| {r['method']} | {imported} | {r['calibration_s']:.2f} | {r['rounds_s']:.1f} | {per_round} | {figure(r['round_ratio'])} "
                  f"| {r['final_s']:.1f} | {r['final_bound_s']:.2f} | {figure(r['final_ratio'])} |")
    floors = [r for r in rows if "floor_s" in r]  # rows measured before floor.py lack them
    if floors:
        print("\n| method | round floor (s) | round wall / floor | final floor (s) | final wall / floor | wall / floor |")
        print("|---|---|---|---|---|---|")
        for r in floors:
            per_round = r["rounds_s"] / r["rounds"] / r["round_floor_s"] if r["round_floor_s"] else None
            final = r["final_s"] / r["final_floor_s"] if r["final_floor_s"] else None
            print(f"| {r['method']} | {figure(r['round_floor_s'], '.2f')} | {figure(per_round)} | {r['final_floor_s']:.2f} "
                  f"| {figure(final)} | {figure(r['floor_ratio'])} |")
        print("(floor: the run's matrix products and Gaussian draws alone, replayed at their own shapes: benchmarks/floor.py)")
    if rows:
        print(f"(float32 matmul peak in the same processes: {rows[0]['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
              f"with {rows[0]['threads']} thread(s); dim {rows[0]['dim']})")


def grid_bound(rows: list[dict], rounds: int, runs_per_method: int = 6) -> str:
    """FLOP lower bound of a Table 1 grid (each method x 2 splits x 3 seeds) at `rounds` rounds, extrapolated
    from measured runs (round FLOPs x rounds + final-phase FLOPs), at this machine's peak with all cores.
    The peak is the larger of a fresh all-core matmul and the best single-thread one x cores, so the
    bound errs low."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    peak = max(matmul_flops_per_s(), cores * max(r["matmul_flops_per_s"] / r["threads"] for r in rows))
    lines, total = [], 0.0
    for r in rows:
        final = r["flops"] - r["rounds"] * r["round_flops"]
        flops = (rounds * r["round_flops"] if r["round_flops"] else 0) + final
        total += runs_per_method * flops
        lines.append(f"  {r['method']}: {flops / 1e12:.2f} TFLOP per run -> {flops / peak:.0f} s")
    return "\n".join([f"Table 1 grid bound ({len(rows)} methods x {runs_per_method} runs, {rounds} rounds; "
                      f"peak {peak / 1e9:.0f} GFLOP/s on {cores} cores):", *lines,
                      f"  grid: {total / 1e12:.1f} TFLOP -> at least {total / peak / 60:.1f} min"])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Whole-run speed of every method against a FLOP lower bound.")
    p.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS), help="methods to time")
    p.add_argument("--rounds", type=int, default=None,
                   help="communication rounds (default: the --preset's, else 50 as the papers)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="run every method with this named preset of its settings, as train.py --preset (e.g. "
                        "dp-tuned for dpcvae, fedhypevae, dpgauss; balanced for local, centralized)")
    p.add_argument("--clients", type=int, default=10, help="number of clients")
    p.add_argument("--samples", type=int, default=25_211, help="records of the synthetic workload (OrganSMNIST: 25,211)")
    p.add_argument("--dim", type=int, default=768, help="embedding dimension of the synthetic workload (ViT-B: 768)")
    p.add_argument("--classes", type=int, default=11, help="classes of the synthetic workload")
    p.add_argument("--real", action="store_true", help=f"use the embedded OrganAMNIST database ({REAL_DB.name})")
    p.add_argument("--scaling", action="store_true",
                   help="scaling run: clients 10 -> 100 and samples x1 -> x4 on the synthetic workload")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write every row to this JSON file")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="print the table (and --grid-rounds bound) from earlier --json files instead of running")
    p.add_argument("--grid-rounds", type=int, default=None,
                   help="also print the FLOP lower bound of the Table 1 grid (x 2 splits x 3 seeds) at this many rounds")
    p.add_argument("--batch-clients", action="store_true",
                   help="time the methods with a stacked round (dpcgan, dpcvae, fedhypevae) with --gen-batch-clients")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--db", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def main(args: argparse.Namespace) -> int:
    # a method without the preset: one line, before anything runs
    presets = {name: preset_values(name, args.preset) for name in ([args.child] if args.child else args.methods)}
    rounds = {name: args.rounds or values.get("rounds", 50) for name, values in presets.items()}
    rounds_label = "/".join(map(str, sorted(set(rounds.values()))))
    if args.rounds is not None and args.rounds < 1 or args.clients < 1:
        raise UserError("--rounds and --clients must be >= 1")
    if args.child:
        print(json.dumps(measure(args.child, args.db, args.clients, rounds[args.child], args.threads, args.batch_clients,
                                 args.preset)))
        return 0
    if args.from_json:
        rows = []
        for path in args.from_json:
            if not path.is_file():
                raise UserError(f"--from-json: {path} does not exist (write it with --json)")
            rows += json.loads(path.read_text())
        print_table(rows, f"From {', '.join(map(str, args.from_json))}")
        if args.grid_rounds:
            print(grid_bound(rows, args.grid_rounds))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def synthetic(factor: int) -> Path:
            path = Path(tmp) / f"x{factor}"
            if not path.exists():
                write_synthetic_database(path, n=args.samples * factor, dim=args.dim, n_classes=args.classes,
                                         seed=0, spread=3.0, dataset="bench")
            return path
        if args.scaling:
            for clients, factor in ((10, 1), (30, 1), (100, 1), (10, 2), (10, 4)):
                for name in args.methods:
                    rows.append({**run_child(name, synthetic(factor), clients, rounds[name], args.threads,
                                             preset=args.preset),
                                 "samples_factor": factor})
                    print(f"  {name}: clients {clients}, samples x{factor}: {rows[-1]['wall_s']:.1f} s", flush=True)
            title = f"Scaling ({args.samples:,} x factor records of {args.dim}-d, {rounds_label} rounds)"
        else:
            if args.real and not REAL_DB.exists():
                raise UserError(f"--real: {REAL_DB} is missing (a clone of this repository has it)")
            db = REAL_DB if args.real else synthetic(1)
            for name in args.methods:
                rows.append(run_child(name, db, args.clients, rounds[name], args.threads,
                                      args.batch_clients and getattr(METHODS[name], "STACKED", False), args.preset))
                print(f"  {name}: {rows[-1]['wall_s']:.1f} s", flush=True)
            title = ("Embedded OrganAMNIST database" if args.real else
                     f"Synthetic workload: {args.samples:,} records, {args.dim}-d, {args.classes} classes") + \
                f", {args.clients} clients, alpha 0.3, {rounds_label} rounds"
    print_table(rows, title)
    if args.grid_rounds:
        print(grid_bound(rows, args.grid_rounds))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
