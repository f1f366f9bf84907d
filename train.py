"""The one entry point: federated training + downstream evaluation of every method.

    python train.py --db assets/organamnist_vits14_224 --method fedavg --seeds 3407 12345 202502
    python train.py --help                     # the general flags; --method NAME --help adds NAME's settings

Each seed writes results/<dataset>/<method>/<tag>/seed=<s>/{config,results}.json + metrics.jsonl.
Flags -> typed configs: federated/config.py; the run folder: federated/runfolder.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

from data.io import UserError, package_versions, run_cli
from federated.config import (changed_settings, folder_tag, git_commit, method_setup, parse_args, run_config,
                              setting_defaults, settings_of, split_config)
from federated.runfolder import RunFolder


def summary_line(method_name: str, seed: int, results: dict) -> str:
    """The terminal's last word on a run: accuracy, epsilon against its target, TSTR, audit and its power."""
    s = results["summary"]
    parts = [f"{method_name} seed={seed}: acc {100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f}  "
             f"bacc {100 * s['bacc_mean']:.2f} ± {100 * s['bacc_std']:.2f}"]
    privacy = results.get("privacy")
    if privacy and privacy["enabled"]:
        other = next((k for k in privacy if k.startswith("epsilon_spent_max_")), None)
        beside = f"; {other.rsplit('_', 1)[1].upper()} {privacy[other]:.3f}" if other and privacy[other] is not None else ""
        parts.append(f"ε spent {privacy['epsilon_spent_max']:.4f} of {privacy['target_epsilon']:g} "
                     f"(max over clients, {privacy['accountant'].upper()}{beside})")
    elif privacy:
        parts.append("no DP")
    if "fidelity" in results:
        parts.append(f"TSTR bacc {100 * results['fidelity']['tstr']['bacc']:.1f}")
    quality = (results.get("dpgauss") or {}).get("release_quality") or {}
    if quality.get("signal_to_noise") is not None:  # what DP-Gauss's release is worth, on the user's own data
        snr, records = statistics.median(quality["signal_to_noise"]), statistics.median(quality["effective_records"])
        parts.append(f"release: {records:.0f} effective records a class, signal-to-noise {snr:.2g} (medians"
                     + ("; under 1: mostly noise)" if snr < 1 else ")"))
    if "audit" in results:
        audit = results["audit"]
        power = f" (power: canary {audit['canary']['dcr']['auc']:.2f})" if "canary" in audit else ""
        parts.append(f"audit DCR AUC {audit['dcr']['auc']:.2f}{power}")
    return " | ".join(parts)


def main(args: argparse.Namespace) -> int:
    if args.db is None:
        raise UserError("--db is required: the embedding database folder (e.g. assets/organamnist_vits14_224)")
    method_name, method_cls, method_cfg = method_setup(args)
    split, run_cfg = split_config(args), run_config(args)
    import numpy as np
    import torch
    from tqdm import tqdm

    from data.database import load_database
    from data.partition import split_info
    from federated.clients import build_clients
    from federated.loop import RunInfo, run
    from federated.methods.base import RunContext
    if args.threads or os.environ.get("TRAIN_THREADS_DEFAULT", "on") != "off":
        torch.set_num_threads(args.threads or 1)
    if args.progress:
        print(f"threads: {torch.get_num_threads()} (--threads N to change)", file=sys.stderr)
    db = load_database(args.db)
    dataset = args.dataset_name or db.manifest.get("dataset") or db.path.name
    tag = folder_tag(args.tag, dataclasses.asdict(split), method_cfg, args.preset)
    flags, settings = settings_of(args)
    defaults = setting_defaults(method_name)
    device = torch.device(run_cfg.device)
    summaries = []
    for seed in tqdm(args.seeds, desc=f"{method_name} seeds", disable=not args.progress or len(args.seeds) < 2):
        folder = RunFolder(args.out / dataset / method_name / tag / f"seed={seed}")
        folder.refuse_other_settings(method_name, lambda old: changed_settings(old, settings, defaults))
        if folder.finished:
            print(f"{folder}: finished, skipped")
            results = folder.results()
        else:
            # a split the data cannot give, or a setting the method refuses, fails here, before any write
            ctx = RunContext(clients=build_clients(db, split, seed, device), n_classes=len(db.classes), dim=db.dim,
                             seed=seed, rounds=run_cfg.rounds, device=device, randomness=run_cfg.randomness or "seeded")
            method = method_cls(ctx, method_cfg)
            if not folder.started:  # a folder that never completed a round takes these settings
                folder.write_config({
                    "method": method_name, "seed": seed, "settings": settings, "flags": flags,
                    "method_config": dataclasses.asdict(method_cfg), "split": dataclasses.asdict(split),
                    "database": {"path": str(db.path), "dataset": db.manifest.get("dataset"),
                                 "backbone": db.manifest.get("backbone"), "dim": db.dim, "n": len(db.labels)},
                    "git_commit": git_commit(), "packages": package_versions()})
            info = RunInfo(method=method_name, dataset=dataset, seed=seed, split=split_info(dataclasses.asdict(split)))
            results = run(method, info, folder, progress=args.progress)
        summaries.append(results["summary"])
        print(f"{summary_line(method_name, seed, results)}  -> {folder}")
    if len(summaries) > 1:
        acc = np.array([s["acc_mean"] for s in summaries])
        bacc = np.array([s["bacc_mean"] for s in summaries])
        print(f"{method_name} over {len(summaries)} seeds: acc {100 * acc.mean():.2f} ± {100 * acc.std():.2f}  "
              f"bacc {100 * bacc.mean():.2f} ± {100 * bacc.std():.2f} (std across seeds)")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
