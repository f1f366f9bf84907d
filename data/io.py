"""Small I/O helpers shared by the data scripts and the federated loop.

Everything that ends up on disk goes through an atomic write (temp file + rename), so a run that is
killed at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np


class UserError(Exception):
    """A mistake in the user's input: reported as one line, without a traceback."""


def run_cli(main: Callable[[], int]) -> None:
    """Run a script's main(); user errors become one line on stderr and exit code 2."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept on disk; run the same command again to resume",
              file=sys.stderr)
        code = 130
    sys.exit(code)


class HelpFormatter(argparse.HelpFormatter):
    """--help that reads right: one "(default: X)" per flag, only where there is a default to show
    (not for on/off switches, not when the help text already names it), lists printed as
    comma-separated values, and metavars named after the flag (--epsilon EPSILON), not its dest."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, argparse.SUPPRESS) or "default" in text or action.nargs == 0
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) if action.nargs is None \
                else " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        longest = max(action.option_strings, key=len)
        return longest.lstrip("-").upper().replace("-", "_")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results and databases are shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file handle stops numpy from appending ".npz" to the temp name
            np.savez(fh, **arrays)
    _atomic(path, write)


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_json(path: Path, *, what: str, fix: str = "delete it and re-run the same command") -> Any:
    """A JSON file; a missing or corrupt one is a one-line UserError ending with advice that works."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: {what} is not valid JSON ({err}); {fix}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


PACKAGES = ("torch", "torchvision", "timm", "opacus", "numpy", "scikit-learn", "medmnist", "wilds",
            "pandas")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
