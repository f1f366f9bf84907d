"""The embedding database: the one on-disk format between create_db.py and train.py.

    <db>/manifest.json   dataset, classes, backbone, weights sha256, transform, counts, speed, versions
    <db>/train.npz       embeddings (N, D) float16|float32, labels (N,) int64,
    <db>/val.npz         indices (N,) int64 (row in the source split), groups (N,) int64 if the
    <db>/test.npz        dataset has natural groups (e.g. Camelyon17 hospitals)

A split may be absent when the source has none. train.py pools the splits it finds.

A *client database* (data/partition.py --client-dbs, read by a Flower SuperNode) is the same format
holding one client's own train/val/test records; its manifest adds "client": {id, n_clients, split,
seed, source} so the node knows which client it is and the server can check all agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.io import UserError, atomic_save_npz, atomic_write_json, read_json

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


@dataclass
class Database:
    path: Path
    manifest: dict
    embeddings: np.ndarray   # (N, D) float32, all splits pooled in SPLITS order
    labels: np.ndarray       # (N,) int64
    groups: np.ndarray | None
    source_split: np.ndarray  # (N,) index into SPLITS

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def load_database(path: Path) -> Database:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--db {path}: no such directory (make one with data/create_db.py)")
    manifest = read_json(path / "manifest.json", what="database manifest",
                         fix=f"re-create the database: run data/create_db.py again with --database-root {path} "
                             "and the same --dataset and --backbone (it rewrites the manifest)")
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes:
        raise UserError(f"{path / 'manifest.json'}: has no 'classes' list")
    parts = {}
    for split in SPLITS:
        file = path / f"{split}.npz"
        if not file.exists():
            continue
        try:
            with np.load(file) as npz:
                missing = [k for k in ("embeddings", "labels") if k not in npz.files]
                if missing:
                    raise UserError(f"{file}: missing key(s) {missing}")
                parts[split] = {k: npz[k] for k in npz.files}
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{file}: not a readable npz ({type(err).__name__}); re-create the database") from None
    if not parts:
        raise UserError(f"--db {path}: holds none of {', '.join(s + '.npz' for s in SPLITS)}")
    dims = {split: p["embeddings"].shape for split, p in parts.items()}
    if any(len(s) != 2 for s in dims.values()) or len({s[1] for s in dims.values()}) != 1:
        raise UserError(f"--db {path}: embeddings must be (N, D) with one D for all splits, got {dims}")
    for split, p in parts.items():
        file = path / f"{split}.npz"
        if p["labels"].shape != (p["embeddings"].shape[0],):
            raise UserError(f"{file}: {p['labels'].shape[0]} labels for {p['embeddings'].shape[0]} embeddings")
        if not np.isfinite(p["embeddings"]).all():
            bad = int((~np.isfinite(p["embeddings"])).any(1).sum())
            raise UserError(f"{file}: {bad} embedding(s) contain NaN/Inf; re-create the database")
        labels = p["labels"]
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise UserError(f"{file}: labels must lie in 0..{len(classes) - 1} (the manifest's "
                            f"{len(classes)} classes), found {labels.min()}..{labels.max()}")
    has_groups = all("groups" in p for p in parts.values())
    order = [s for s in SPLITS if s in parts]
    return Database(
        path=path, manifest=manifest,
        embeddings=np.concatenate([parts[s]["embeddings"] for s in order]).astype(np.float32),
        labels=np.concatenate([parts[s]["labels"] for s in order]).astype(np.int64),
        groups=np.concatenate([parts[s]["groups"] for s in order]).astype(np.int64) if has_groups else None,
        source_split=np.concatenate([np.full(len(parts[s]["labels"]), SPLITS.index(s)) for s in order]),
    )


def write_synthetic_database(path: Path, *, n: int, dim: int, n_classes: int, seed: int = 0,
                             groups: int | None = None, spread: float = 1.0, dataset: str = "toy") -> Path:
    """A database of class-clustered Gaussian embeddings in this format (tests, benchmarks):
    half train, a quarter each val and test; class centres N(0, 3^2 I), noise N(0, spread^2 I)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(n_classes, dim))
    sizes = {"train": n // 2, "val": n // 4, "test": n - n // 2 - n // 4}
    for split, m in sizes.items():
        y = rng.integers(0, n_classes, size=m)
        x = centers[y] + spread * rng.normal(size=(m, dim))
        arrays = {"embeddings": x.astype(np.float32), "labels": y.astype(np.int64), "indices": np.arange(m)}
        if groups:
            arrays["groups"] = rng.integers(0, groups, size=m).astype(np.int64)
        atomic_save_npz(Path(path) / f"{split}.npz", **arrays)
    atomic_write_json(Path(path) / "manifest.json",
                      {"format_version": FORMAT_VERSION, "complete": True, "dataset": dataset,
                       "classes": [f"c{i}" for i in range(n_classes)], "embedding_dim": dim,
                       "source": "synthetic class clusters (data.database.write_synthetic_database)"})
    return Path(path)


def write_client_databases(db: Database, splits: list, out: Path, *, split_config: dict, seed: int) -> list[Path]:
    """One database per client (client_<id>/) holding that client's train/val/test records, in this format."""
    paths = []
    for client_id, client in enumerate(splits):
        path = Path(out) / f"client_{client_id}"
        for name in SPLITS:
            idx = getattr(client, name)
            arrays = {"embeddings": db.embeddings[idx], "labels": db.labels[idx], "indices": idx}
            if db.groups is not None:
                arrays["groups"] = db.groups[idx]
            atomic_save_npz(path / f"{name}.npz", **arrays)
        manifest = {**db.manifest, "client": {"id": client_id, "n_clients": len(splits), "split": split_config,
                                              "seed": seed, "source": str(db.path),
                                              "source_dataset": db.manifest.get("dataset")}}
        atomic_write_json(path / "manifest.json", manifest)  # last: a folder with a manifest is complete
        paths.append(path)
    return paths
