"""The one entry point: federated training + downstream evaluation of every method.

    python train.py --db assets/organamnist_vits14_224 --method fedavg --seeds 3407 12345 202502

Each seed writes results/<dataset>/<method>/<tag>/seed=<s>/{config,results}.json + metrics.jsonl.
"""
from __future__ import annotations

import os

import argparse
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.database import load_database
from data.io import HelpFormatter, UserError, atomic_write_json, package_versions, read_json, run_cli
from data.partition import PARTITIONERS, SplitConfig, run_tag
from federated.clients import RANDOMNESS, build_clients
from federated.loop import CHECKPOINT, RESULTS, RunInfo, run
from federated.methods import METHODS
from federated.methods.base import RunContext
from federated.training import OPTIMIZERS

ALGORITHM_ALIASES = {"normal": "fedavg", "fedprox": "fedprox"}          # the reference's --algorithm
ANONYMIZER_ALIASES = {"cvae_fedavg": "dpcvae", "cgan_fedavg": "dpcgan"}  # the reference's --anonymizer
# Flags that do not change a run's results (they may differ when a run is resumed).
NOT_RESULT_FLAGS = {"seeds", "out", "progress", "threads", "method", "algorithm", "anonymizer", "dataset_name"}


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Federated training and evaluation on an embedding database.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("Method")
    g.add_argument("--method", default=None, choices=sorted(METHODS), help="strategy to run (default fedavg)")
    g.add_argument("--algorithm", default=None, choices=sorted(ALGORITHM_ALIASES),
                   help="reference-code alias: normal = fedavg, fedprox = fedprox")
    g.add_argument("--anonymizer", default=None, choices=sorted(ANONYMIZER_ALIASES),
                   help="reference-code alias: cvae_fedavg = dpcvae, cgan_fedavg = dpcgan")

    g = p.add_argument_group("Data and clients")
    g.add_argument("--db", type=Path, default=None, help="embedding database folder (data/create_db.py); required")
    g.add_argument("--dataset-name", default=None, help="name in the results path (default: the database's)")
    g.add_argument("--n-clients", type=int, default=10, help="number of clients")
    g.add_argument("--split", dest="split_kind", default="dirichlet", choices=sorted(PARTITIONERS),
                   help="how samples are spread over clients")
    g.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration (smaller = more skew)")
    g.add_argument("--split-seed", type=int, default=202502, help="seed of the client split (fixed across runs)")
    g.add_argument("--min-samples", type=int, default=10, help="minimum samples per client")
    g.add_argument("--test-frac", type=float, default=0.2, help="per-client, per-label test fraction")
    g.add_argument("--val-frac", type=float, default=0.2, help="validation fraction of the remaining data")

    g = p.add_argument_group("Rounds (every federated method)")
    g.add_argument("--rounds", type=int, default=50, help="communication rounds")

    g = p.add_argument_group("Local training of the classifier (FedAvg, FedProx, FedLambda)")
    g.add_argument("--local-epochs", dest="local_epochs", type=int, default=5, help="local epochs per round")
    g.add_argument("--batch-size", dest="local_batch_size", type=int, default=128, help="local batch size")
    g.add_argument("--optimizer", dest="local_optimizer", default="sgd", choices=OPTIMIZERS, help="local optimiser")
    g.add_argument("--lr", dest="local_lr", type=float, default=1e-3, help="local learning rate (constant)")
    g.add_argument("--momentum", dest="local_momentum", type=float, default=0.5, help="SGD momentum")
    g.add_argument("--weight-decay", dest="local_weight_decay", type=float, default=5e-4, help="weight decay")
    g.add_argument("--mu", type=float, default=0.05, help="FedProx proximal weight")

    g = p.add_argument_group("FedLambda")
    g.add_argument("--fedlambda-local", dest="local_model", default="knn", choices=["knn", "linear"],
                   help="local model mixed with the global one: kNN (kNN-Per) or a linear classifier (published code)")
    g.add_argument("--lambda-grid", type=floats, default=tuple(i / 10 for i in range(11)),
                   help="comma-separated lambda values searched on validation data")
    g.add_argument("--k-grid", type=ints, default=(5, 10, 20, 50), help="comma-separated k values for kNN")
    g.add_argument("--knn-temperature", type=float, default=0.1, help="kNN vote weights exp(-distance / T)")
    g.add_argument("--lambda-selection", default="client", choices=["client", "global"],
                   help="one lambda per client, or one for all clients (published code)")

    g = p.add_argument_group("Downstream classifier (local, centralized, FedLambda-linear, anonymizers)")
    g.add_argument("--downstream-optimizer", default="adam", choices=OPTIMIZERS, help="optimiser")
    g.add_argument("--downstream-lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--downstream-momentum", type=float, default=0.0, help="SGD momentum")
    g.add_argument("--downstream-weight-decay", type=float, default=0.0, help="weight decay")
    g.add_argument("--downstream-batch-size", type=int, default=128, help="batch size (0 = full batch)")
    g.add_argument("--downstream-epochs", type=int, default=100, help="epochs")

    g = p.add_argument_group("Anonymizers: generative model (DP-CVAE, DP-CGAN)")
    g.add_argument("--gen-lr", type=float, default=None, help="generator optimiser (Adam) learning rate "
                   "(default: DP-CVAE 1e-3, DP-CGAN 2e-4)")
    g.add_argument("--gen-batch-size", type=int, default=256, help="expected (Poisson) batch size")
    g.add_argument("--gen-local-epochs", type=int, default=5, help="local epochs per round")
    g.add_argument("--cvae-hidden", dest="hidden", type=int, default=256, help="CVAE hidden width")
    g.add_argument("--latent", type=int, default=100, help="latent dimension")
    g.add_argument("--beta", type=float, default=0.1, help="CVAE KL weight")

    g = p.add_argument_group("FedHypeVAE")
    g.add_argument("--code-dim", type=int, default=16, help="client code dimension d_v")
    g.add_argument("--code-radius", type=float, default=5.0, help="bound r on |v_i| (projected after each step)")
    g.add_argument("--hyper-hidden", type=int, default=64, help="hypernetwork hidden width (h_theta, h_omega)")
    g.add_argument("--prior-hidden", type=int, default=64, help="prior network width (h_omega output, g_omega)")
    g.add_argument("--label-dim", type=int, default=16, help="label embedding e(y) dimension")
    g.add_argument("--hyper-lr", type=float, default=1e-3, help="learning rate of the hypernetwork (eta_Phi)")
    g.add_argument("--hyper-optimizer", default="sgd", choices=OPTIMIZERS,
                   help="each client's optimiser of its hypernetwork copy (the paper: SGD)")
    g.add_argument("--lambda-mmd", type=float, default=0.1, help="weight of the MMD alignment term")
    g.add_argument("--lambda-lip", type=float, default=1e-3, help="weight of R_Lip (squared spectral norms)")
    g.add_argument("--lambda-v", type=float, default=1e-3, help="weight of |v_i|^2")
    g.add_argument("--mmd-bandwidths", type=floats, default=(0.5, 1.0, 2.0, 4.0),
                   help="Gaussian kernel bandwidths s (k = exp(-|a-b|^2 / (2 s D)), comma-separated)")
    g.add_argument("--mmd-samples", type=int, default=4, help="decoded prior samples per record for the MMD")
    g.add_argument("--no-spectral-norm", dest="spectral_norm", action="store_false",
                   help="skip the server's spectral-norm projection of the hypernetwork layers")
    g.add_argument("--meta-codes", type=int, default=1, help="K meta-codes (K > 1: the mixture of Eq. 13)")
    g.add_argument("--meta-steps", type=int, default=300, help="Adam steps fitting the meta-code(s)")
    g.add_argument("--meta-lr", type=float, default=1e-2, help="learning rate of the meta-code fit")
    g.add_argument("--meta-beta", type=float, default=1.0, help="weight of the variance term of Eq. 11")
    g.add_argument("--meta-samples", type=int, default=64, help="decoded samples per class in the meta-code fit")
    g.add_argument("--stats-clip", type=float, default=50.0,
                   help="L2 clip R of embeddings in the DP class statistics (ViT-S/14 norms lie in 36-48)")
    g.add_argument("--stats-noise", type=float, default=20.0,
                   help="noise multiplier of the DP class statistics (accounted in the same budget)")

    g = p.add_argument_group("Privacy")
    g.add_argument("--no-dp", dest="privacy_enabled", action="store_false",
                   help="train the anonymizers without DP (ablation)")
    g.add_argument("--epsilon", dest="privacy_target_epsilon", type=float, default=1.0,
                   help="target epsilon for each client over the whole run")
    g.add_argument("--delta", dest="privacy_delta", type=float, default=1e-4, help="target delta")
    g.add_argument("--max-grad-norm", dest="privacy_max_grad_norm", type=float, default=1.5,
                   help="per-sample clipping bound C")
    g.add_argument("--accountant", dest="privacy_accountant", default="prv", choices=["prv", "rdp"],
                   help="Opacus accountant used to calibrate and report epsilon")
    g.add_argument("--count-noise", dest="privacy_count_noise", type=float, default=100.0,
                   help="std of the Gaussian noise on the client size released for aggregation weights")
    g.add_argument("--randomness", default=None, choices=RANDOMNESS,
                   help="DP noise, Poisson masks and latents of DP steps: 'seeded' from the run seed and client "
                        "id (reproducible; the server could rebuild them) or 'secret' from OS entropy "
                        "(default: seeded in simulation, secret on Flower)")

    g = p.add_argument_group("Synthesis")
    g.add_argument("--synthesis", dest="synthesis_policy", default="fill", choices=["fill", "reference", "uniform"],
                   help="fill: top up every class to the client's largest; reference: as many as each real "
                        "class (x factor, published code); uniform: --synthetic-per-class each")
    g.add_argument("--generated-factor", dest="synthesis_factor", type=float, default=1.0,
                   help="scales the fill target / the reference counts")
    g.add_argument("--synthetic-per-class", dest="synthesis_per_class", type=int, default=0,
                   help="samples per class for --synthesis uniform")
    g.add_argument("--z-var", dest="synthesis_z_var", type=float, default=1.0, help="latent variance when sampling")

    g = p.add_argument_group("Fidelity and membership audit (anonymizers)")
    g.add_argument("--no-release-eval", dest="evaluation_enabled", action="store_false",
                   help="skip the fidelity metrics, TSTR and membership audit of the synthetic data")
    g.add_argument("--eval-max-samples", dest="evaluation_max_samples", type=int, default=2000,
                   help="samples per side for the overall fidelity metrics and per attack set")
    g.add_argument("--eval-max-per-class", dest="evaluation_max_per_class", type=int, default=500,
                   help="samples per side and class for the per-class fidelity metrics")
    g.add_argument("--eval-nearest-k", dest="evaluation_nearest_k", type=int, default=5,
                   help="k of precision / recall / density / coverage")
    g.add_argument("--eval-projection-per-class", dest="evaluation_projection_per_class", type=int, default=50,
                   help="points per class and side kept for the 2-D projection picture")
    g.add_argument("--audit-density-dims", dest="evaluation_density_dims", type=int, default=16,
                   help="whitened PCA dimensions of the density-ratio (DOMIAS) attack's KDEs")

    g = p.add_argument_group("Run")
    g.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[3407],
                   help="one run per seed (the papers average 3407 12345 202502)")
    g.add_argument("--out", type=Path, default=Path("results"), help="results root")
    g.add_argument("--tag", default=None, help="run-folder tag (default: derived from the split)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: our small matrices gain little from more, and torch's "
                        "one-per-core threads spin and slow down 2.5x on a shared machine; benchmarks/threads.py; "
                        "TRAIN_THREADS_DEFAULT=off keeps torch's own choice)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def resolve_method(args: argparse.Namespace) -> str:
    named = {v for v in (args.method, ALGORITHM_ALIASES.get(args.algorithm),
                         ANONYMIZER_ALIASES.get(args.anonymizer)) if v}
    if len(named) > 1:
        raise UserError(f"--method/--algorithm/--anonymizer name different methods: {sorted(named)}")
    name = named.pop() if named else "fedavg"
    if name not in METHODS:
        raise UserError(f"--method {name!r} is not available; valid: {', '.join(sorted(METHODS))}")
    return name


def build_config(cls: type, args: argparse.Namespace, prefix: str = "", default=None):
    """A method's typed config from the flags whose dest equals (prefix +) each field name; a flag
    left at None keeps the method's own default (e.g. DP-CGAN's generator learning rate)."""
    hints = typing.get_type_hints(cls)
    default = default if default is not None else cls()
    values = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = build_config(hints[f.name], args, f"{prefix}{f.name}_", getattr(default, f.name))
        else:
            value = getattr(args, prefix + f.name)
            if value is not None:
                values[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(default, **values)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def check_flags(args: argparse.Namespace) -> None:
    positive = {"rounds": args.rounds, "local-epochs": args.local_epochs, "n-clients": args.n_clients,
                "downstream-epochs": args.downstream_epochs}
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
    if args.local_batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.local_batch_size}")
    if args.downstream_batch_size < 0:
        raise UserError(f"--downstream-batch-size must be >= 0 (0 = full batch), got {args.downstream_batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")


def changed_settings(old: dict, new: dict, defaults: dict) -> list[str]:
    """Settings that differ; a flag added after the old run was made counts only if set off its default."""
    missing = object()
    return sorted(k for k in set(old) | set(new)
                  if old.get(k, missing) != new.get(k) and not (k not in old and new.get(k) == defaults.get(k)))


def method_setup(args: argparse.Namespace) -> tuple[str, type, object]:
    """(name, class, typed config) of the method the flags choose (also the Flower app's)."""
    method_name = resolve_method(args)
    check_flags(args)
    method_cls = METHODS[method_name]
    return method_name, method_cls, build_config(method_cls.Config, args)


def split_info(split: dict) -> dict:
    """results.json's "split" block from a SplitConfig's fields."""
    return {"kind": split["kind"], "alpha": split["alpha"] if split["kind"] == "dirichlet" else None,
            "n_clients": split["n_clients"], "split_seed": split["split_seed"]}


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
    if "audit" in results:
        audit = results["audit"]
        power = f" (power: canary {audit['canary']['dcr']['auc']:.2f})" if "canary" in audit else ""
        parts.append(f"audit DCR AUC {audit['dcr']['auc']:.2f}{power}")
    return " | ".join(parts)


def main(args: argparse.Namespace) -> int:
    if args.db is None:
        raise UserError("--db is required: the embedding database folder (e.g. assets/organamnist_vits14_224)")
    method_name, method_cls, method_cfg = method_setup(args)
    if args.threads or os.environ.get("TRAIN_THREADS_DEFAULT", "on") != "off":
        torch.set_num_threads(args.threads or 1)
    if args.progress:
        print(f"threads: {torch.get_num_threads()} (--threads N to change)", file=sys.stderr)
    db = load_database(args.db)
    dataset = args.dataset_name or db.manifest.get("dataset") or db.path.name
    split = SplitConfig(kind=args.split_kind, n_clients=args.n_clients, alpha=args.alpha,
                        split_seed=args.split_seed, min_samples=args.min_samples,
                        test_frac=args.test_frac, val_frac=args.val_frac)
    tag = args.tag or run_tag(split.kind, split.alpha, split.n_clients)
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}
    settings = json.loads(json.dumps({k: v for k, v in flags.items() if k not in NOT_RESULT_FLAGS}))
    device = torch.device(args.device)
    defaults = {a.dest: a.default for a in get_args_parser()._actions}
    summaries = []
    for seed in tqdm(args.seeds, desc=f"{method_name} seeds", disable=not args.progress or len(args.seeds) < 2):
        run_dir = args.out / dataset / method_name / tag / f"seed={seed}"
        config = {"method": method_name, "seed": seed, "settings": settings, "flags": flags,
                  "method_config": dataclasses.asdict(method_cfg), "split": dataclasses.asdict(split),
                  "database": {"path": str(db.path), "dataset": db.manifest.get("dataset"),
                               "backbone": db.manifest.get("backbone"), "dim": db.dim, "n": len(db.labels)},
                  "git_commit": git_commit(), "packages": package_versions()}
        if (run_dir / "config.json").exists():
            old = read_json(run_dir / "config.json", what="run config")
            changed = changed_settings(old.get("settings", {}), settings, defaults)
            started = (run_dir / RESULTS).exists() or (run_dir / CHECKPOINT).exists()
            if (changed or old.get("method") != method_name) and started:
                raise UserError(f"{run_dir}: holds a run with other settings ({', '.join(changed or ['method'])}); "
                                "pass --tag NAME for a new run folder")
        if (run_dir / RESULTS).exists():
            print(f"{run_dir}: finished, skipped")
        else:
            # a split the data cannot give, or a setting the method refuses, fails here, before any write
            ctx = RunContext(clients=build_clients(db, split, seed, device), n_classes=len(db.classes), dim=db.dim,
                             seed=seed, rounds=args.rounds, device=device, randomness=args.randomness or "seeded")
            method = method_cls(ctx, method_cfg)
            atomic_write_json(run_dir / "config.json", config)  # a folder that never completed a round takes these
        info = RunInfo(method=method_name, dataset=dataset, seed=seed, split=split_info(dataclasses.asdict(split)))
        results = (read_json(run_dir / RESULTS, what="results") if (run_dir / RESULTS).exists()
                   else run(method, info, run_dir, progress=args.progress))
        summaries.append(results["summary"])
        print(f"{summary_line(method_name, seed, results)}  -> {run_dir}")
    if len(summaries) > 1:
        acc = np.array([s["acc_mean"] for s in summaries])
        bacc = np.array([s["bacc_mean"] for s in summaries])
        print(f"{method_name} over {len(summaries)} seeds: acc {100 * acc.mean():.2f} ± {100 * acc.std():.2f}  "
              f"bacc {100 * bacc.mean():.2f} ± {100 * bacc.std():.2f} (std across seeds)")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
