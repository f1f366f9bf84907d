"""Client splits: pooled samples -> clients -> per-client train/val/test.

Partitioners (registry PARTITIONERS): `dirichlet` (each class spread over the clients by
Dirichlet(alpha) weights), `iid` (uniform shuffle), `natural` (one client per group, e.g. the
Camelyon17 hospitals). Inside a client, a per-label split: test fixed by the split seed (as the
reference protocol), validation drawn from train with the run seed.

    python data/partition.py --db assets/organamnist_vits14_224 --split dirichlet --alpha 0.3 --out split.json
    # one database per client, for Flower SuperNodes (indices: rows of the pooled source database)
    python data/partition.py --db assets/organamnist_vits14_224 --seed 3407 --client-dbs clients/
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from data.flags import add_flags, config_from, flags_of, setting  # noqa: E402
from data.io import HelpFormatter, UserError, atomic_write_json, run_cli  # noqa: E402

MAX_DIRICHLET_TRIES = 1000


def dirichlet_partition(labels: np.ndarray, groups: np.ndarray | None, cfg: SplitConfig,
                        rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(cfg.n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            weights = rng.dirichlet(np.full(cfg.n_clients, cfg.alpha))
            cuts = (np.cumsum(weights)[:-1] * len(idx)).astype(int)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].append(piece)
        clients = [np.sort(np.concatenate(p)) for p in parts]
        if min(map(len, clients)) >= cfg.min_samples:
            return clients
    raise UserError(f"--alpha {cfg.alpha} with --n-clients {cfg.n_clients}: no Dirichlet draw in "
                    f"{MAX_DIRICHLET_TRIES} gave every client >= --min-samples {cfg.min_samples} "
                    f"samples ({len(labels)} in all); use fewer clients, a larger alpha or a smaller minimum")


def iid_partition(labels: np.ndarray, groups: np.ndarray | None, cfg: SplitConfig,
                  rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), cfg.n_clients)]


def natural_partition(labels: np.ndarray, groups: np.ndarray | None, cfg: SplitConfig,
                      rng: np.random.Generator) -> list[np.ndarray]:
    if groups is None:
        raise UserError("--split natural needs a database with groups (e.g. camelyon17 hospitals); "
                        "use --split dirichlet or iid")
    present = np.unique(groups)
    if len(present) != cfg.n_clients:
        raise UserError(f"--split natural: the database has {len(present)} groups, so pass "
                        f"--n-clients {len(present)} (got {cfg.n_clients})")
    return [np.flatnonzero(groups == g) for g in present]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "dirichlet": dirichlet_partition,
    "iid": iid_partition,
    "natural": natural_partition,
}


@dataclass(frozen=True)
class SplitConfig:
    """How the pooled samples become clients: the one declaration of the split flags (train.py, the
    Flower app and this script all read them from here)."""
    kind: str = setting("dirichlet", "how samples are spread over clients", flag="--split",
                        dest="split_kind", choices=sorted(PARTITIONERS))
    n_clients: int = setting(10, "number of clients", metavar="N", minimum=1)
    alpha: float = setting(0.3, "Dirichlet concentration (smaller = more skew)", metavar="A")
    split_seed: int = setting(202502, "seed of the client split (fixed across runs)", metavar="SEED")
    min_samples: int = setting(10, "minimum samples per client", metavar="N")
    test_frac: float = setting(0.2, "per-client, per-label test fraction", metavar="F")
    val_frac: float = setting(0.2, "validation fraction of what remains after the test split", metavar="F")

    def __post_init__(self) -> None:  # checked when the flags are read, before anything is written
        if self.kind not in PARTITIONERS:
            raise UserError(f"--split {self.kind!r} is unknown; valid: {', '.join(sorted(PARTITIONERS))}")
        if self.n_clients < 1:
            raise UserError(f"--n-clients must be >= 1, got {self.n_clients}")
        if self.kind == "dirichlet" and not self.alpha > 0:
            raise UserError(f"--alpha must be > 0 for a Dirichlet split, got {self.alpha}")
        if not (0 <= self.test_frac < 1 and 0 <= self.val_frac < 1):
            raise UserError(f"--test-frac and --val-frac must lie in [0, 1), got {self.test_frac}, {self.val_frac}")


def run_tag(kind: str, alpha: float | None, n_clients: int) -> str:
    """The default run-folder tag of a split (results/<dataset>/<method>/<tag>/seed=<s>/)."""
    return f"dirichlet_a{alpha:g}_c{n_clients}" if kind == "dirichlet" else f"{kind}_c{n_clients}"


def split_info(split: dict) -> dict:
    """results.json's "split" block from a SplitConfig's fields (asdict, or a client database's manifest)."""
    return {"kind": split["kind"], "alpha": split["alpha"] if split["kind"] == "dirichlet" else None,
            "n_clients": split["n_clients"], "split_seed": split["split_seed"]}


def partition(labels: np.ndarray, groups: np.ndarray | None, cfg: SplitConfig) -> list[np.ndarray]:
    """Sample indices of each client: every sample in exactly one client; deterministic for a seed."""
    if cfg.n_clients * max(cfg.min_samples, 1) > len(labels):
        raise UserError(f"--n-clients {cfg.n_clients} x --min-samples {max(cfg.min_samples, 1)} "
                        f"exceeds the {len(labels)} samples in the database; use fewer clients")
    rng = np.random.default_rng(cfg.split_seed)
    clients = PARTITIONERS[cfg.kind](labels, groups, cfg, rng)
    for i, c in enumerate(clients):
        if len(c) < max(cfg.min_samples, 1):
            raise UserError(f"--split {cfg.kind}: client {i} would hold {len(c)} samples (< --min-samples "
                            f"{max(cfg.min_samples, 1)}); use fewer clients or a smaller minimum")
    return clients


def stratified_holdout(indices: np.ndarray, labels: np.ndarray, frac: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per label, round(frac * n) samples go to the holdout, always leaving one to keep."""
    keep, hold = [], []
    for c in np.unique(labels[indices]):
        idx = rng.permutation(indices[labels[indices] == c])
        n_hold = min(int(np.floor(frac * len(idx) + 0.5)), len(idx) - 1)
        hold.append(idx[:n_hold])
        keep.append(idx[n_hold:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(hold))


@dataclass
class ClientSplit:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_clients(labels: np.ndarray, groups: np.ndarray | None, cfg: SplitConfig,
                  seed: int) -> list[ClientSplit]:
    out = []
    for client, idx in enumerate(partition(labels, groups, cfg)):
        test_rng = np.random.default_rng([cfg.split_seed, client, 1])
        val_rng = np.random.default_rng([seed, client, 2])
        rest, test = stratified_holdout(idx, labels, cfg.test_frac, test_rng)
        train, val = stratified_holdout(rest, labels, cfg.val_frac, val_rng)
        out.append(ClientSplit(train, val, test))
    return out


def split_manifest(splits: list[ClientSplit], labels: np.ndarray, n_classes: int,
                   cfg: SplitConfig, seed: int) -> dict:
    def counts(idx: np.ndarray) -> list[int]:
        return np.bincount(labels[idx], minlength=n_classes).tolist()
    return {
        "config": asdict(cfg), "seed": seed,
        "clients": [{"id": i, "n_train": len(s.train), "n_val": len(s.val), "n_test": len(s.test),
                     "train_class_counts": counts(s.train), "val_class_counts": counts(s.val),
                     "test_class_counts": counts(s.test)} for i, s in enumerate(splits)],
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a client split manifest for an embedding database.",
                                formatter_class=HelpFormatter)
    p.add_argument("--db", type=Path, required=True, help="embedding database folder")
    p.add_argument("--seed", type=int, default=3407, metavar="SEED", help="run seed (chooses the validation split)")
    p.add_argument("--out", type=Path, default=None, help="split manifest JSON to write")
    p.add_argument("--client-dbs", type=Path, default=None,
                   help="folder to write one database per client into (client_<id>/, for Flower SuperNodes)")
    add_flags(p, flags_of(SplitConfig, title="Split"))
    return p


def main(args: argparse.Namespace) -> int:
    from data.database import load_database, write_client_databases
    if args.out is None and args.client_dbs is None:
        raise UserError("nothing to write: pass --out split.json and/or --client-dbs DIR")
    db = load_database(args.db)
    cfg = config_from(SplitConfig, vars(args))
    splits = split_clients(db.labels, db.groups, cfg, args.seed)
    if args.out is not None:
        atomic_write_json(args.out, split_manifest(splits, db.labels, len(db.classes), cfg, args.seed))
        print(f"wrote {args.out}: {len(splits)} clients, train sizes {[len(s.train) for s in splits]}")
    if args.client_dbs is not None:
        paths = write_client_databases(db, splits, args.client_dbs, split_config=asdict(cfg), seed=args.seed)
        print(f"wrote {len(paths)} client databases under {args.client_dbs} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
