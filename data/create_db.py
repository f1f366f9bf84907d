"""Images -> embedding database (see data/database.py for the format).

    python data/create_db.py --dataset organamnist --dataset-root ../shared/data \
        --database-root databases/organamnist_vits14_224 \
        --backbone vit_small_patch14_dinov2.lvd142m \
        --weights ../shared/weights/vit_small_patch14_dinov2_imgfocus.safetensors --img-size 224

Re-runnable: embeddings are written in chunks; an interrupted run continues where it stopped and a
finished database is left as it is.
"""
from __future__ import annotations

import argparse
import json
import contextlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.backbones import DEFAULT_BACKBONE, BackboneConfig, create_backbone, prepare_batch  # noqa: E402
from data.database import FORMAT_VERSION  # noqa: E402
from data.datasets import DatasetConfig, load_dataset, registry  # noqa: E402
from data.io import (HelpFormatter, UserError, atomic_save_npz, atomic_write_json, package_versions,  # noqa: E402
                     read_json, run_cli, sha256_file)


@dataclass(frozen=True)
class ExtractConfig:
    batch_size: int = 64
    workers: int = 0
    threads: int | None = None
    device: str = "auto"
    amp: str = "auto"            # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    dtype: str = "float32"       # stored embedding dtype
    limit: int | None = None     # at most this many images per split (a stratified, seeded subset)
    subset_seed: int = 0
    chunk_size: int = 1024


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most n indices with class proportions kept (largest remainder), sorted."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: n - take.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
              for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, amp: str):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def create_database(*, dataset: DatasetConfig, backbone: BackboneConfig, extract: ExtractConfig,
                    out: Path, progress: bool = True) -> dict:
    """Builds (or finishes, or leaves alone) the database in `out`; returns its manifest."""
    out = Path(out)
    if (out / "manifest.json").exists():
        try:
            manifest = json.loads((out / "manifest.json").read_text())
        except json.JSONDecodeError:
            manifest = {}  # corrupt: built again below, and the manifest rewritten
        if manifest.get("complete"):
            return manifest
    source = load_dataset(dataset)
    settings = {
        "dataset": dataset.name, "size": dataset.size, "backbone": backbone.name,
        "weights": str(backbone.weights) if backbone.weights else None,
        "weights_sha256": sha256_file(backbone.weights) if backbone.weights else None,
        "random_init": backbone.random_init, "img_size": backbone.img_size,
        "limit": extract.limit, "subset_seed": extract.subset_seed, "dtype": extract.dtype,
        "chunk_size": extract.chunk_size,
    }
    chunks = out / ".chunks"
    state_file = chunks / "settings.json"
    if state_file.exists() and read_json(state_file, what="extraction state") != settings:
        raise UserError(f"--database-root {out}: holds a partial database made with other settings "
                        f"({state_file}); use another --database-root or delete that one")
    atomic_write_json(state_file, settings)

    if extract.threads:
        torch.set_num_threads(extract.threads)
    device = resolve_device(extract.device)
    model, transform = create_backbone(backbone)
    model.to(device)
    for s in source.splits.values():
        if hasattr(s.images, "size"):  # files of any size are resized to the input size when decoded
            s.images.size = transform["resize"][0]
    subsets = {split: (stratified_subset(s.labels, extract.limit, extract.subset_seed)
                       if extract.limit else np.arange(len(s.labels)))
               for split, s in source.splits.items()}
    todo = {split: [start for start in range(0, len(idx), extract.chunk_size)
                    if not (chunks / split / f"{start:09d}.npy").exists()]
            for split, idx in subsets.items()}
    total = sum(len(idx) for idx in subsets.values())
    remaining = sum(min(extract.chunk_size, len(subsets[s]) - start) for s, starts in todo.items() for start in starts)
    bar = tqdm(total=total, initial=total - remaining, unit="img", desc=f"embed {dataset.name}",
               disable=not progress)
    computed, seconds = 0, 0.0
    for split, starts in todo.items():
        for start in starts:
            idx = subsets[split][start:start + extract.chunk_size]
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(source.splits[split].images, idx.tolist()),
                batch_size=extract.batch_size, num_workers=extract.workers, shuffle=False)
            feats = []
            tic = time.perf_counter()
            with torch.inference_mode(), autocast(device, extract.amp):
                for images in loader:
                    x = prepare_batch(images, transform).to(device, non_blocking=True)
                    feats.append(model(x).float().cpu())
                    bar.update(len(images))
            seconds += time.perf_counter() - tic
            computed += len(idx)
            (chunks / split).mkdir(parents=True, exist_ok=True)
            np.save(_tmp := chunks / split / f".{start:09d}.tmp.npy", torch.cat(feats).numpy())
            _tmp.replace(chunks / split / f"{start:09d}.npy")
    bar.close()

    n_classes = len(source.classes)
    split_stats = {}
    for split, idx in subsets.items():
        emb = np.concatenate([np.load(chunks / split / f"{start:09d}.npy")
                              for start in range(0, len(idx), extract.chunk_size)])
        if not np.isfinite(emb).all():
            raise UserError(f"{out}: the backbone produced NaN/Inf embeddings for {split}; "
                            "try --amp off")
        s = source.splits[split]
        arrays = {"embeddings": emb.astype(extract.dtype), "labels": s.labels[idx], "indices": idx}
        if s.groups is not None:
            arrays["groups"] = s.groups[idx]
        atomic_save_npz(out / f"{split}.npz", **arrays)
        split_stats[split] = {
            "n": int(len(idx)),
            "class_counts": np.bincount(s.labels[idx], minlength=n_classes).tolist(),
            **({"group_counts": np.bincount(s.groups[idx]).tolist()} if s.groups is not None else {}),
        }
    manifest = {
        "format_version": FORMAT_VERSION, "complete": True,
        "dataset": dataset.name, "dataset_root": str(dataset.root), "medmnist_size": dataset.size,
        "classes": source.classes, "group_names": source.group_names,
        "backbone": backbone.name, "weights": settings["weights"],
        "weights_sha256": settings["weights_sha256"], "random_init": backbone.random_init,
        "img_size": transform["resize"][0], "transform": transform,
        "embedding_dim": int(emb.shape[1]), "dtype": extract.dtype,
        "subset": {"limit_per_split": extract.limit, "seed": extract.subset_seed,
                   "kind": "stratified by label" if extract.limit else "all"},
        "splits": split_stats,
        "extraction": {"device": str(device), "amp": extract.amp, "batch_size": extract.batch_size,
                       "threads": torch.get_num_threads(), "images_computed_this_run": computed,
                       "images_per_s": round(computed / seconds, 2) if seconds else None},
        "packages": package_versions(),
    }
    atomic_write_json(out / "manifest.json", manifest)
    shutil.rmtree(chunks)
    return manifest


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    g = parser.add_argument_group("Dataset")
    g.add_argument("--dataset", required=True,
                   help=f"one of: {', '.join(sorted(registry()))}")
    g.add_argument("--dataset-root", "--dataset_root", type=Path, required=True,
                   help="folder with the dataset in its official on-disk format")
    g.add_argument("--size", type=int, default=28, help="MedMNIST image size: 28, 64, 128 or 224")
    g.add_argument("--download", action="store_true", help="download the dataset if missing (needs internet)")
    g.add_argument("--csv", default=None, help="image-folder datasets: label CSV inside --dataset-root")
    g.add_argument("--image-col", default="image", help="image-folder datasets: image id/path column")
    g.add_argument("--label-col", default="label",
                   help="image-folder datasets: label column, or comma-separated one-hot columns")
    g.add_argument("--group-col", default=None, help="image-folder datasets: site/group column")
    g.add_argument("--split-col", default=None, help="image-folder datasets: train/val/test column")
    g = parser.add_argument_group("Backbone")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help="any timm model name")
    g.add_argument("--weights", type=Path, default=None,
                   help="local checkpoint (.safetensors/.pth) loaded through timm's pretrained_cfg_overlay")
    g.add_argument("--random-init", action="store_true", help="no pretrained weights (tests only)")
    g.add_argument("--img-size", type=int, default=None,
                   help="input size; default the backbone's pretraining size")
    g = parser.add_argument_group("Extraction")
    g.add_argument("--database-root", "--database_root", type=Path, required=True, help="output folder")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass of the backbone")
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast precision; auto = bf16 on CUDA, off on CPU")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored dtype")
    g.add_argument("--limit", type=int, default=None,
                   help="at most N images per split: a stratified subset chosen with --subset-seed")
    g.add_argument("--subset-seed", type=int, default=0, help="seed of the --limit subset")
    g.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk")
    return parser


def main(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "chunk_size", "limit", "img_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    manifest = create_database(
        dataset=DatasetConfig(name=args.dataset, root=args.dataset_root, size=args.size,
                              download=args.download, csv=args.csv, image_col=args.image_col,
                              label_col=args.label_col, group_col=args.group_col,
                              split_col=args.split_col),
        backbone=BackboneConfig(name=args.backbone, weights=args.weights,
                                random_init=args.random_init, img_size=args.img_size),
        extract=ExtractConfig(batch_size=args.batch_size, workers=args.workers, threads=args.threads,
                              device=args.device, amp=args.amp, dtype=args.dtype, limit=args.limit,
                              subset_seed=args.subset_seed, chunk_size=args.chunk_size),
        out=args.database_root)
    counts = {s: v["n"] for s, v in manifest["splits"].items()}
    print(f"database {args.database_root}: {manifest['embedding_dim']}-d, {counts}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
