"""The one simulated round loop: rounds -> finish -> per-client test evaluation -> results files.

A run folder holds config.json, metrics.jsonl (one line per round), results.json (when finished)
and checkpoint.pt (while unfinished). A finished run is skipped; an unfinished one resumes after
its last completed round and ends with the same results as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data.io import UserError, atomic_torch_save, atomic_write_json, atomic_write_text
from federated.evaluation import client_metrics, summarize
from federated.methods.base import FederatedMethod, Method

RESULTS, METRICS, CHECKPOINT, LOCK = "results.json", "metrics.jsonl", "checkpoint.pt", "run.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(run_dir: Path):
    """One process per run folder: a second one (e.g. the same grid script started twice) is refused
    instead of both writing the same checkpoint; a lock left by a killed process is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and pid_alive(owner):
                raise UserError(f"{run_dir}: in use by process {owner} (another train.py on the same run); "
                                f"wait for it, or delete {lock} if that process is not ours") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:  # another process took the lock between our stale-lock removal and our retry
        raise UserError(f"{run_dir}: another process is taking {lock}; try again when it has finished")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def phase_lines(label: str):
    """RunContext.phase for a terminal: one line per phase of a run, ended with its time."""
    @contextmanager
    def phase(name: str):
        sys.stderr.write(f"{label}: {name} ...")
        sys.stderr.flush()
        tic = time.perf_counter()
        try:
            yield
        finally:
            sys.stderr.write(f" {time.perf_counter() - tic:.1f} s\n")
    return phase


@dataclass(frozen=True)
class RunInfo:
    """What results.json says about the run besides its numbers."""
    method: str
    dataset: str
    seed: int
    split: dict


def run(method: Method, info: RunInfo, run_dir: Path, *, progress: bool = True,
        stop_after: int | None = None) -> dict:
    """Runs (or resumes) `method` in run_dir and returns results.json's content.
    stop_after: return after that many completed rounds, as a kill would (tests)."""
    run_dir = Path(run_dir)
    if (run_dir / RESULTS).exists():
        return json.loads((run_dir / RESULTS).read_text())
    with run_lock(run_dir):
        return run_locked(method, info, run_dir, progress=progress, stop_after=stop_after)


def run_locked(method: Method, info: RunInfo, run_dir: Path, *, progress: bool, stop_after: int | None) -> dict:
    if (run_dir / RESULTS).exists():  # finished by the previous lock holder
        return json.loads((run_dir / RESULTS).read_text())
    rounds = method.ctx.rounds if method.federated else 0
    start, history, wall = 0, [], 0.0
    label = f"{info.method} seed={info.seed}"
    if progress:
        method.ctx.phase = phase_lines(label)
    if (run_dir / CHECKPOINT).exists():
        ckpt = torch.load(run_dir / CHECKPOINT, weights_only=False)
        method.load_state_dict(ckpt["method"])
        start, history, wall = ckpt["round"] + 1, ckpt["history"], ckpt["wall_s"]
        method.ctx.uplink.bytes_sent = ckpt["uplink_bytes"]
        print(f"{run_dir}: resuming from round {start} of {rounds}", file=sys.stderr)
    if not history:
        atomic_write_text(run_dir / METRICS, "")
    tic = time.perf_counter()
    method.prepare()
    bar = tqdm(range(start, rounds), initial=start, total=rounds, desc=f"{label} rounds",
               disable=not progress, leave=False)
    shown: dict[str, str] = {}
    for rnd in bar:
        metrics = {"round": rnd, **method.run_round(rnd)}
        history.append(metrics)
        shown.update({k.removeprefix("local_"): f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)})
        bar.set_postfix(shown)
        atomic_torch_save(run_dir / CHECKPOINT, {"round": rnd, "method": method.state_dict(), "history": history,
                                                 "uplink_bytes": method.ctx.uplink.bytes_sent,
                                                 "wall_s": wall + time.perf_counter() - tic})
        atomic_write_text(run_dir / METRICS, "".join(json.dumps(m, sort_keys=True) + "\n" for m in history))
        if stop_after is not None and rnd + 1 - start >= stop_after:
            raise InterruptedError(f"stopped after round {rnd}")
    method.finish()
    clients = client_results(method)
    publish_final(method, clients)
    results = results_record(info, rounds=rounds, clients=clients,
                             uplink_bytes=method.ctx.uplink.bytes_sent, report=method.report(),
                             wall_s=wall + time.perf_counter() - tic)
    results["randomness"] = method.ctx.randomness
    atomic_write_json(run_dir / RESULTS, results)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return results


def client_results(method: Method) -> list[dict]:
    """Each client's test metrics of its final model (after finish()), with its exact split sizes:
    the clients' own records (what a client publishes of it is its final_message)."""
    out = []
    for c in method.ctx.clients:
        with torch.no_grad():
            pred = method.predict(c, c.x_test).argmax(1)
        out.append({"id": c.id, "n_train": c.n_train, "n_val": len(c.y_val), "n_test": len(c.y_test),
                    **client_metrics(c.y_test, pred)})
    return out


def publish_final(method: Method, clients: list[dict]) -> None:
    """The simulated clients' last messages: their test metrics and epsilon, through the channel."""
    if isinstance(method, FederatedMethod):
        for i, record in enumerate(clients):
            method.ctx.uplink.send(method, i, "final", method.final_message(i, record))


def results_record(info: RunInfo, *, rounds: int, clients: list[dict], uplink_bytes: int, report: dict,
                   wall_s: float) -> dict:
    """results.json's content (the simulated loop and the Flower server write the same contract)."""
    return {
        "method": info.method, "dataset": info.dataset, "seed": info.seed, "split": info.split,
        "rounds": rounds, "clients": clients, "summary": summarize(clients),
        "communication": {"uplink_bytes_total": uplink_bytes,
                          "uplink_bytes_per_client_round": uplink_bytes / rounds / len(clients) if rounds else 0},
        **report,
        "timing": {"wall_s": round(wall_s, 3)},
    }
