"""The config layer: command-line flags -> typed configs, for train.py and the Flower app alike.

Every flag is declared once, as a field of a typed config (data/flags.py): the split's in
data/partition.py:SplitConfig, the run's in RunConfig below, and each method's in its own `Config`
dataclass (federated/methods/<name>.py). The parser shows and accepts the general flags plus the
chosen method's, with that method's defaults:

    python train.py --help                    # the general flags and the methods (no torch import: fast)
    python train.py --method dpcvae --help    # + DP-CVAE's settings, with its defaults

A flag of another method is accepted with a warning that it is ignored (a grid script may pass one
flag set to every method). Adding a method, with its flags, is one file and one registry line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.flags import Flag, add_flags, config_from, flags_of, setting
from data.io import HelpFormatter, UserError
from data.partition import SplitConfig, run_tag
from federated.methods import METHODS

RANDOMNESS = ("seeded", "secret")
ALGORITHM_ALIASES = {"normal": "fedavg", "fedprox": "fedprox"}          # the reference's --algorithm
ANONYMIZER_ALIASES = {"cvae_fedavg": "dpcvae", "cgan_fedavg": "dpcgan"}  # the reference's --anonymizer
DEFAULT_METHOD = "fedavg"
# Flags that do not change a run's results (they may differ when a run is resumed).
NOT_RESULT_FLAGS = {"seeds", "out", "progress", "threads", "method", "algorithm", "anonymizer", "dataset_name"}


@dataclass(frozen=True)
class RunConfig:
    """What a run gives every method (federated.methods.base.RunContext)."""
    rounds: int = setting(50, "communication rounds (federated methods)", metavar="N", minimum=1)
    randomness: str | None = setting(
        None, "DP noise, Poisson masks and latents of DP steps: 'seeded' from the run seed and client id "
        "(reproducible; the server could rebuild them) or 'secret' from OS entropy (default: seeded in simulation, "
        "secret on Flower)", choices=RANDOMNESS)
    device: str = setting("cpu", "cpu, cuda, cuda:1, ...")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line (not the whole usage), or a UserError where the
    caller must not exit (the Flower apps over a bad run config)."""

    def __init__(self, *args, error_prefix: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.error_prefix = error_prefix

    def error(self, message: str):
        if self.error_prefix is not None:
            raise UserError(f"{self.error_prefix}: {message} (see python train.py --help)")
        self.exit(2, f"error: {message} (see python train.py --help)\n")


def base_parser(*, add_help: bool = True, error_prefix: str | None = None) -> Parser:
    """The flags every run has: which method, the data and its split, the run's settings."""
    p = Parser(description="Federated training and evaluation on an embedding database.", add_help=add_help,
               formatter_class=HelpFormatter, error_prefix=error_prefix,
               epilog="Each method's own settings: python train.py --method NAME --help")
    g = p.add_argument_group("Method")
    g.add_argument("--method", default=None, choices=sorted(METHODS), help=f"strategy to run (default {DEFAULT_METHOD})")
    g.add_argument("--algorithm", default=None, choices=sorted(ALGORITHM_ALIASES),
                   help="reference-code alias: normal = fedavg, fedprox = fedprox")
    g.add_argument("--anonymizer", default=None, choices=sorted(ANONYMIZER_ALIASES),
                   help="reference-code alias: cvae_fedavg = dpcvae, cgan_fedavg = dpcgan")
    g.add_argument("--preset", default=None, metavar="NAME",
                   help="a named set of the method's settings, chosen on a tuning split (flags given override it; "
                        "the run folder's tag names it); python train.py --method NAME --help lists them")
    g = p.add_argument_group("Data and clients")
    g.add_argument("--db", type=Path, default=None, help="embedding database folder (data/create_db.py); required")
    g.add_argument("--dataset-name", default=None, help="name in the results path (default: the database's)")
    groups = {"Data and clients": g}
    add_flags(p, flags_of(SplitConfig, title="Data and clients"), groups=groups)
    g = p.add_argument_group("Run")
    groups["Run"] = g
    add_flags(p, flags_of(RunConfig, title="Run"), groups=groups)
    g.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[3407], metavar="SEED",
                   help="one run per seed (the papers average 3407 12345 202502)")
    g.add_argument("--out", type=Path, default=Path("results"), help="results root")
    g.add_argument("--tag", default=None, help="run-folder tag (default: derived from the split)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default 1: our small matrices gain little from more, and torch's "
                        "one-per-core threads spin and slow down 2.5x on a shared machine; benchmarks/threads.py; "
                        "TRAIN_THREADS_DEFAULT=off keeps torch's own choice)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars or phase lines")
    return p


def method_title(name: str) -> str:
    return f"{name} ({METHODS[name].__name__})"


def method_flags(name: str) -> list[Flag]:
    """The flags of method `name`'s Config, in its groups (its own fields under the method's name)."""
    return flags_of(METHODS[name].Config, title=method_title(name))


def resolve_method(args: argparse.Namespace) -> str:
    named = {v for v in (args.method, ALGORITHM_ALIASES.get(args.algorithm),
                         ANONYMIZER_ALIASES.get(args.anonymizer)) if v}
    if len(named) > 1:
        raise UserError(f"--method/--algorithm/--anonymizer name different methods: {sorted(named)}")
    name = named.pop() if named else DEFAULT_METHOD
    if name not in METHODS:
        raise UserError(f"--method {name!r} is not available; valid: {', '.join(sorted(METHODS))}")
    return name


def presets_of(name: str) -> dict[str, dict[str, Any]]:
    """Method `name`'s named presets: {preset: {flag dest: value}} (its Config's PRESETS)."""
    return getattr(METHODS[name].Config, "PRESETS", {})


def preset_values(name: str, preset: str | None) -> dict[str, Any]:
    if preset is None:
        return {}
    presets = presets_of(name)
    if preset not in presets:
        valid = ", ".join(sorted(presets)) or "none"
        raise UserError(f"--preset {preset!r} is not a preset of {name}; valid: {valid}")
    return presets[preset]


def method_parser(name: str, *, error_prefix: str | None = None, others: bool = True, preset: str | None = None) -> Parser:
    """The general flags plus method `name`'s, with `preset`'s values as their defaults. others: also
    accept (hidden) the other methods' flags."""
    p = base_parser(error_prefix=error_prefix)
    own = method_flags(name)
    title = method_title(name)
    # a preset sets the method's settings and may set the run's plan (e.g. --rounds: fewer, larger DP steps)
    general = {a.dest: a.option_strings[0] for a in p._actions
               if a.option_strings and a.dest not in ("help", "method", "algorithm", "anonymizer", "preset")}
    presets, flag_of = presets_of(name), {**general, **{fl.dest: fl.names[0] for fl in own}}
    for key, values in presets.items():
        if set(values) - set(flag_of):
            raise TypeError(f"{name}'s preset {key!r} sets {sorted(set(values) - set(flag_of))}, not flags of {name}")

    def shown(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    if presets:
        p.epilog = (f"Presets of {name} (--preset NAME): " + "; ".join(
            f"{k}: " + " ".join(f"{flag_of[d]} {shown(v)}" for d, v in sorted(vals.items())) for k, vals in sorted(presets.items())))
    add_flags(p, own, groups={title: p.add_argument_group(title)})
    p.set_defaults(**preset_values(name, preset))
    if others:
        taken = {fl.dest for fl in own}
        for other in sorted(METHODS):
            for fl in method_flags(other):
                if fl.dest not in taken:
                    taken.add(fl.dest)
                    add_flags(p, [fl], hidden=True)
    return p


def parse_args(argv: list[str] | None = None, *, error_prefix: str | None = None) -> argparse.Namespace:
    """train.py's flags: the general ones pick the method, whose own flags are then read. A flag of
    another method is dropped with a warning. error_prefix: raise UserError(prefix: ...) on a mistake."""
    argv = sys.argv[1:] if argv is None else list(argv)
    general, _ = base_parser(add_help=False, error_prefix=error_prefix).parse_known_args(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    if wants_help and not (general.method or general.algorithm or general.anonymizer):
        base_parser(error_prefix=error_prefix).parse_args(["--help"])  # no method named: no method imported
    name = resolve_method(general)
    args = method_parser(name, error_prefix=error_prefix, others=not wants_help, preset=general.preset).parse_args(argv)
    own = {fl.dest for fl in method_flags(name)}
    general_dests = set(vars(general))
    ignored = sorted(k for k in vars(args) if k not in own and k not in general_dests)
    if ignored:
        owners = {fl.dest: fl.names[0] for other in METHODS for fl in method_flags(other)}
        print(f"warning: {', '.join(owners[k] for k in ignored)} ignored: not a setting of {name} "
              f"(python train.py --method {name} --help lists its settings)", file=sys.stderr)
        for k in ignored:
            delattr(args, k)
    return args


def method_setup(args: argparse.Namespace) -> tuple[str, type, Any]:
    """(name, class, typed config) of the method the flags choose."""
    name = resolve_method(args)
    cls = METHODS[name]
    return name, cls, config_from(cls.Config, vars(args))


def split_config(args: argparse.Namespace) -> SplitConfig:
    return config_from(SplitConfig, vars(args))


def run_config(args: argparse.Namespace) -> RunConfig:
    cfg = config_from(RunConfig, vars(args))
    if cfg.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    return cfg


def folder_tag(tag: str | None, split: dict, method_cfg: Any, preset: str | None = None) -> str:
    """The run folder's tag: --tag, or the split's (data.partition.run_tag) plus the downstream recipe
    when it is not the papers' (e.g. dirichlet_a0.3_c10_balanced, and _preconditioned for its other solver) and what the method's config names
    through tag_parts() (e.g. _mix), the --preset, and an epsilon other than the default (_eps2) or
    _nodp, so that variants never share a folder."""
    if tag:
        return tag
    parts = [run_tag(split["kind"], split["alpha"], split["n_clients"])]
    downstream = getattr(method_cfg, "downstream", None)
    recipe, solver = getattr(downstream, "recipe", "paper"), getattr(downstream, "solver", "lbfgs")
    parts += [recipe] if recipe != "paper" else []
    parts += [solver] if solver != "lbfgs" else []  # another solver, other results: another folder
    for part in [*(method_cfg.tag_parts() if hasattr(method_cfg, "tag_parts") else []), *([preset] if preset else [])]:
        if part not in parts:  # e.g. DP-FedAvg's mix, and a preset of the same name
            parts.append(part)
    privacy = getattr(method_cfg, "privacy", None)
    if privacy is not None and not privacy.enabled:
        parts.append("nodp")
    elif privacy is not None and privacy.target_epsilon != type(privacy).target_epsilon:  # an epsilon sweep's point
        parts.append(f"eps{privacy.target_epsilon:g}")
    return "_".join(parts)


def settings_of(args: argparse.Namespace) -> tuple[dict, dict]:
    """(flags, settings) of config.json: every flag as given, and those that change results."""
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}
    return flags, json.loads(json.dumps({k: v for k, v in flags.items() if k not in NOT_RESULT_FLAGS}))


def setting_defaults(name: str) -> dict:
    """Every dest's default for method `name`, as config.json records values (tuples as lists): the
    changed-settings check compares them with recorded settings."""
    return json.loads(json.dumps({k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(method_parser(name, others=False).parse_args([])).items()}))


def changed_settings(old: dict, new: dict, defaults: dict) -> list[str]:
    """Settings of this run that differ from a folder's recorded ones. A setting the old run did not
    record, or recorded as None (a flag left to the method's default), counts only if set off its
    default; settings recorded for other methods' flags are not this run's."""
    missing = object()
    return sorted(k for k, v in new.items()
                  if old.get(k, missing) != v and not (old.get(k) is None and v == defaults.get(k)))


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None
