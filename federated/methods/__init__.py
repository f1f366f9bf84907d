"""The method registry: adding a method = one file + one line here.

A line names the class by "module:Class" and the module is imported when the method is first used,
so `train.py --help` lists the methods without importing torch.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping


class Registry(Mapping):
    """name -> class, each imported on first use. `register` adds one (a class or "module:Class")."""

    def __init__(self, entries: dict[str, str | type]) -> None:
        self._entries = dict(entries)

    def register(self, name: str, target: str | type) -> None:
        self._entries[name] = target

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> type:
        target = self._entries[name]  # KeyError for an unknown name, as a Mapping should
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = self._entries[name] = getattr(importlib.import_module(module), attr)
        return target

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


METHODS = Registry({
    "fedavg": "federated.methods.fedavg:FedAvg",
    "fedprox": "federated.methods.fedprox:FedProx",
    "fedlambda": "federated.methods.fedlambda:FedLambda",
    "local": "federated.methods.local:Local",
    "centralized": "federated.methods.local:Centralized",
    "dpcvae": "federated.methods.dpcvae:DPCVAE",
    "dpcgan": "federated.methods.dpcgan:DPCGAN",
    "fedhypevae": "federated.methods.fedhypevae:FedHypeVAE",
    "dpgauss": "federated.methods.dpgauss:DPGauss",
    "dpfedavg": "federated.methods.dpfedavg:DPFedAvg",
})
