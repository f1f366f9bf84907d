"""One object owns a run folder: results/<dataset>/<method>/<tag>/seed=<s>/.

    config.json     the settings the run was made with (written before the first round)
    metrics.jsonl   one line per completed round
    checkpoint.pt   while unfinished (simulation): the state after the last completed round
    results.json    when finished: the run is then skipped
    run.lock        while a process works in it

The simulated loop (federated/loop.py), train.py and the Flower server all go through RunFolder, so
skipping, resuming, locking and the changed-settings refusal behave alike everywhere.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from data.io import UserError, atomic_torch_save, atomic_write_json, atomic_write_text, read_json

RESULTS, METRICS, CHECKPOINT, LOCK, CONFIG = "results.json", "metrics.jsonl", "checkpoint.pt", "run.lock", "config.json"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # --- state ---------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return (self.path / RESULTS).exists()

    @property
    def started(self) -> bool:
        """It holds a finished run or one that completed a round (a checkpoint or a metrics line)."""
        return self.finished or (self.path / CHECKPOINT).exists() or bool(self.metrics_lines())

    def results(self) -> dict:
        return read_json(self.path / RESULTS, what="results")

    def metrics_lines(self) -> list[str]:
        path = self.path / METRICS
        return path.read_text().splitlines() if path.exists() else []

    # --- settings --------------------------------------------------------------------------------
    def refuse_other_settings(self, method: str, changed: Callable[[dict], list[str]]) -> None:
        """A folder whose run has started keeps its settings: `changed(old_settings)` lists those this
        run would change; a folder that never completed a round takes the new ones."""
        if not (self.path / CONFIG).exists() or not self.started:
            return
        old = read_json(self.path / CONFIG, what="run config")
        diff = changed(old.get("settings", {}))
        if diff or old.get("method") != method:
            raise UserError(f"{self.path}: holds a run with other settings ({', '.join(diff or ['method'])}); "
                            "pass --tag NAME for a new run folder")

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.path / CONFIG, config)

    # --- progress --------------------------------------------------------------------------------
    def write_metrics(self, history: list[dict]) -> None:
        """The whole per-round record, rewritten atomically (a kill leaves the old or the new file)."""
        atomic_write_text(self.path / METRICS, "".join(json.dumps(m, sort_keys=True) + "\n" for m in history))

    def load_checkpoint(self) -> dict | None:
        if not (self.path / CHECKPOINT).exists():
            return None
        import torch
        return torch.load(self.path / CHECKPOINT, weights_only=False)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(self.path / CHECKPOINT, state)

    def finish(self, results: dict) -> None:
        atomic_write_json(self.path / RESULTS, results)
        (self.path / CHECKPOINT).unlink(missing_ok=True)

    # --- one process at a time -------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """One process per run folder: a second one (e.g. the same grid script started twice) is refused
        instead of both writing the same checkpoint; a lock left by a killed process is taken over."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and pid_alive(owner):
                    raise UserError(f"{self.path}: in use by process {owner} (another train.py on the same run); "
                                    f"wait for it, or delete {lock} if that process is not ours") from None
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            break
        else:  # another process took the lock between our stale-lock removal and our retry
            raise UserError(f"{self.path}: another process is taking {lock}; try again when it has finished")
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
