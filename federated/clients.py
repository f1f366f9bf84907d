"""Per-client tensors, seeded generators and minibatching shared by every method."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from data.database import SPLITS, Database
from data.io import UserError
from data.partition import SplitConfig, split_clients


@dataclass
class ClientData:
    id: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_train(self) -> int:
        return len(self.y_train)


def build_clients(db: Database, split: SplitConfig, seed: int, device: torch.device) -> list[ClientData]:
    x = torch.from_numpy(db.embeddings)
    y = torch.from_numpy(db.labels)

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(idx)
        return x[t].to(device), y[t].to(device)

    return [ClientData(i, *take(s.train), *take(s.val), *take(s.test))
            for i, s in enumerate(split_clients(db.labels, db.groups, split, seed))]


def client_info(db: Database) -> dict:
    """The manifest's "client" block of a client database: id, n_clients, split, seed, source."""
    info = db.manifest.get("client")
    if not isinstance(info, dict) or not {"id", "n_clients", "split", "seed"} <= set(info):
        raise UserError(f"{db.path}: not a client database (its manifest has no complete 'client' block); "
                        "write one with data/partition.py --client-dbs")
    return info


def client_from_database(db: Database, device: torch.device) -> ClientData:
    """The one client a client database (data/partition.py --client-dbs) holds, under its own id."""
    info = client_info(db)
    x, y = torch.from_numpy(db.embeddings), torch.from_numpy(db.labels)
    parts = []
    for k in range(len(SPLITS)):
        rows = torch.from_numpy(np.nonzero(db.source_split == k)[0])
        parts += [x[rows].to(device), y[rows].to(device)]
    return ClientData(int(info["id"]), *parts)


def make_generator(seed: int, *keys: int) -> torch.Generator:
    """An independent CPU generator for one purpose (keys: e.g. client id, a purpose tag)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def secret_generator() -> torch.Generator:
    """A generator seeded from OS entropy: nothing the server knows (run seed, client id) can rebuild it.
    Its state lives only in the client's own state (checkpoint or Flower context)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of shuffled minibatch indices (the last batch may be smaller)."""
    perm = torch.randperm(n, generator=gen)
    yield from perm.split(batch_size)


def poisson_batch(n: int, sample_rate: float, gen: torch.Generator) -> torch.Tensor:
    """Poisson sampling: each record independently with probability sample_rate (may be empty)."""
    return torch.nonzero(torch.rand(n, generator=gen) < sample_rate).squeeze(1)
