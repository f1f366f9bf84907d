"""The one simulated round loop: rounds -> finish -> per-client test evaluation -> results files.

A run folder holds config.json, metrics.jsonl (one line per round), results.json (when finished)
and checkpoint.pt (while unfinished). A finished run is skipped; an unfinished one resumes after
its last completed round and ends with the same results as an uninterrupted run.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from federated.evaluation import client_metrics, summarize
from federated.methods.base import FederatedMethod, Method
from federated.runfolder import RunFolder


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


def run(method: Method, info: RunInfo, folder: RunFolder, *, progress: bool = True,
        stop_after: int | None = None) -> dict:
    """Runs (or resumes) `method` in its run folder and returns results.json's content.
    stop_after: return after that many completed rounds, as a kill would (tests)."""
    if folder.finished:
        return folder.results()
    with folder.lock():
        if folder.finished:  # finished by the previous lock holder
            return folder.results()
        return run_locked(method, info, folder, progress=progress, stop_after=stop_after)


def run_locked(method: Method, info: RunInfo, folder: RunFolder, *, progress: bool, stop_after: int | None) -> dict:
    rounds = method.ctx.rounds if method.federated else 0
    start, history, wall = 0, [], 0.0
    label = f"{info.method} seed={info.seed}"
    if progress:
        method.ctx.phase = phase_lines(label)
    ckpt = folder.load_checkpoint()
    if ckpt is not None:
        method.load_state_dict(ckpt["method"])
        start, history, wall = ckpt["round"] + 1, ckpt["history"], ckpt["wall_s"]
        method.ctx.uplink.bytes_sent = ckpt["uplink_bytes"]
        print(f"{folder}: resuming from round {start} of {rounds}", file=sys.stderr)
    folder.write_metrics(history)
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
        folder.save_checkpoint({"round": rnd, "method": method.state_dict(), "history": history,
                                "uplink_bytes": method.ctx.uplink.bytes_sent, "wall_s": wall + time.perf_counter() - tic})
        folder.write_metrics(history)
        if stop_after is not None and rnd + 1 - start >= stop_after:
            raise InterruptedError(f"stopped after round {rnd}")
    method.finish()
    clients = client_results(method)
    publish_final(method, clients)
    results = results_record(info, rounds=rounds, clients=clients,
                             uplink_bytes=method.ctx.uplink.bytes_sent, report=method.report(),
                             wall_s=wall + time.perf_counter() - tic)
    results["randomness"] = method.ctx.randomness
    folder.finish(results)
    return results


def client_results(method: Method) -> list[dict]:
    """Each client's test metrics of its final model (after finish()), its validation accuracy and
    balanced accuracy (what tuning grids rank by: experiments/tuning.py; FedLambda and the balanced
    recipe choose on these splits, so theirs are optimistic) and its exact split sizes: the clients' own
    records (what a client publishes of it is its final_message)."""
    out = []
    for c in method.ctx.clients:
        with torch.no_grad():
            pred, val = method.predict(c, c.x_test).argmax(1), method.predict(c, c.x_val).argmax(1)
        on_val = client_metrics(c.y_val, val)
        out.append({"id": c.id, "n_train": c.n_train, "n_val": len(c.y_val), "n_test": len(c.y_test),
                    **client_metrics(c.y_test, pred), "val_acc": on_val["acc"], "val_bacc": on_val["bacc"]})
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
