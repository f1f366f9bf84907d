"""Tiny fixtures: embedding databases of Gaussian class clusters, MedMNIST-format npz files,
and a random-init timm backbone. Everything runs on CPU in seconds."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
torch.set_num_threads(2)

from data.database import write_synthetic_database  # noqa: E402


def write_db(path: Path, *, n: int = 600, dim: int = 16, n_classes: int = 4, seed: int = 0,
             groups: int | None = None, spread: float = 1.0) -> Path:
    """A database in the on-disk format of data/database.py: class-clustered embeddings."""
    return write_synthetic_database(path, n=n, dim=dim, n_classes=n_classes, seed=seed, groups=groups, spread=spread)


@pytest.fixture
def tiny_db(tmp_path: Path) -> Path:
    return write_db(tmp_path / "db")


def write_medmnist_npz(path: Path, *, n: dict | None = None, size: int = 28, channels: int = 1,
                       n_classes: int = 11, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = n or {"train": 12, "val": 6, "test": 6}
    shape = (size, size) if channels == 1 else (size, size, channels)
    arrays = {}
    for split, m in n.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(m, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(m) % n_classes).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared beside the project)")
    return path
