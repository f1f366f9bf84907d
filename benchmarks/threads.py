"""How command 1 (DP-CVAE on the embedded database) degrades on a shared machine, per thread setting.

Each candidate runs train.py in a fresh process, once on the idle machine and once beside one competing
CPU-bound process (a pure-Python busy loop, as another user's job would be), and reports wall time,
CPU time (user + sys of the run) and the slowdown busy / idle. The results are the same in every case
(tested elsewhere: --threads does not change the results file); only the time differs.

    python benchmarks/threads.py --rounds 2 --json benchmarks/measured/threads.json

Candidates: torch's default (one thread per core, OpenMP threads spin while they wait), --threads 1,
OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of spinning), and train.py's default, which is
the one this benchmark found to lose least when the machine is shared (--threads 1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.io import HelpFormatter, atomic_write_json, run_cli  # noqa: E402

# name -> (extra train.py flags, environment overrides); TRAIN_THREADS_DEFAULT=off: train.py applies no default of its own
CANDIDATES = {
    "torch default": ([], {"OMP_WAIT_POLICY": "", "TRAIN_THREADS_DEFAULT": "off"}),
    "--threads 1": (["--threads", "1"], {"OMP_WAIT_POLICY": ""}),
    "OMP_WAIT_POLICY=PASSIVE": ([], {"OMP_WAIT_POLICY": "PASSIVE", "TRAIN_THREADS_DEFAULT": "off"}),
    "train.py default": ([], {"OMP_WAIT_POLICY": ""}),
}


def run_once(flags: list[str], env: dict[str, str], rounds: int, busy: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "train.py"), "--db", str(ROOT / "assets" / "organamnist_vits14_224"),
               "--method", "dpcvae", "--rounds", str(rounds), "--out", out, *flags]
        full_env = {**os.environ, **env}
        for key in [k for k, v in env.items() if v == ""]:
            full_env.pop(key)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            before = os.times()
            tic = time.perf_counter()
            done = subprocess.run(cmd, env=full_env, capture_output=True, text=True)
            wall = time.perf_counter() - tic
            after = os.times()
        finally:
            if hog:
                hog.kill()
                hog.wait()
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        threads = next((line.split("threads:")[1].split()[0] for line in done.stderr.splitlines() if line.startswith("threads:")), "?")
        return {"wall_s": round(wall, 2), "cpu_s": round(after.children_user + after.children_system
                                                         - before.children_user - before.children_system, 2),
                "threads": threads}


def main(args: argparse.Namespace) -> int:
    rows = []
    for name in args.candidates:
        flags, env = CANDIDATES[name]
        idle = run_once(flags, env, args.rounds, busy=False)
        busy = run_once(flags, env, args.rounds, busy=True)
        rows.append({"candidate": name, "idle": idle, "busy": busy, "slowdown": round(busy["wall_s"] / idle["wall_s"], 2)})
        print(f"{name:26s} idle {idle['wall_s']:7.1f} s (cpu {idle['cpu_s']:7.1f} s)   beside a busy process "
              f"{busy['wall_s']:7.1f} s (cpu {busy['cpu_s']:7.1f} s)   x{rows[-1]['slowdown']:.2f}", flush=True)
    if args.json:
        if args.json.exists():  # keep rows measured earlier for the other candidates
            earlier = json.loads(args.json.read_text())["rows"]
            rows = [r for r in earlier if r["candidate"] not in args.candidates] + rows
        atomic_write_json(args.json, {"command": f"train.py --db assets/organamnist_vits14_224 --method dpcvae "
                                                 f"--rounds {args.rounds}", "cores": os.cpu_count(), "rows": rows})
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="rounds of command 1 per measurement (50 = command 1 itself)")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES), metavar="NAME",
                   help=f"thread settings to measure, of: {'; '.join(CANDIDATES)}")
    p.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    return p


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
