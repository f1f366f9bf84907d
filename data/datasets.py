"""Image datasets, each read from its real on-disk format, behind one registry.

A dataset yields splits; a split is a torch Dataset of uint8 CxHxW tensors plus its `labels`
(int64) and optional `groups` (int64, e.g. the Camelyon17 hospital). Resizing and normalisation
happen later, batched, in create_db.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from data.io import UserError


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    root: Path
    size: int = 28                 # MedMNIST image size (28, 64, 128, 224)
    download: bool = False
    csv: str | None = None         # image-folder datasets: the label table
    image_col: str = "image"
    label_col: str = "label"       # a comma-separated list means one-hot columns
    group_col: str | None = None
    split_col: str | None = None


@dataclass
class ImageSplit:
    images: torch.utils.data.Dataset  # item i -> uint8 tensor (C, H, W)
    labels: np.ndarray
    groups: np.ndarray | None = None


@dataclass
class ImageSource:
    classes: list[str]
    splits: dict[str, ImageSplit]
    group_names: list[str] | None = None


class ArrayImages(torch.utils.data.Dataset):
    """In-memory uint8 images, (N, H, W) or (N, H, W, C)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = torch.from_numpy(np.ascontiguousarray(self.array[i]))
        return img.unsqueeze(0) if img.ndim == 2 else img.permute(2, 0, 1)


class FileImages(torch.utils.data.Dataset):
    """Image files, decoded and resized to `size` in the loader workers (their sizes may differ)."""

    def __init__(self, paths: list[Path], size: int | None = None):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB")
            if self.size is not None and im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------------------- MedMNIST

def _medmnist_flags() -> list[str]:
    import medmnist
    return sorted(flag for flag in medmnist.INFO if not flag.endswith("3d"))


def medmnist_filename(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def load_medmnist(cfg: DatasetConfig) -> ImageSource:
    import medmnist
    if cfg.size not in (28, 64, 128, 224):
        raise UserError(f"--size {cfg.size}: MedMNIST comes in sizes 28, 64, 128, 224")
    info = medmnist.INFO[cfg.name]
    path = Path(cfg.root) / medmnist_filename(cfg.name, cfg.size)
    if not path.exists() and not cfg.download:
        raise UserError(
            f"{path}: not found. Put the official file there (from {info['url'].split('?')[0].rsplit('/', 1)[0]}"
            f"/{path.name}, MD5 in medmnist.INFO) or pass --download")
    if not path.exists():
        os.makedirs(cfg.root, exist_ok=True)
    if path.exists():
        _check_npz(path, [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")])
    dataset_class = getattr(medmnist, info["python_class"])
    splits = {}
    for split in ("train", "val", "test"):
        try:
            ds = dataset_class(split=split, root=str(cfg.root), download=cfg.download, size=cfg.size)
        except Exception as err:  # the official loader's download / checksum errors
            raise UserError(f"{path}: could not load {cfg.name} {split} with medmnist ({err})") from None
        labels = np.asarray(ds.labels)
        if info["task"] == "multi-label, binary-class":
            raise UserError(f"--dataset {cfg.name}: multi-label datasets are not supported "
                            "(the downstream task is single-label classification)")
        splits[split] = ImageSplit(ArrayImages(ds.imgs), labels.reshape(-1).astype(np.int64))
    classes = [info["label"][str(k)] for k in range(len(info["label"]))]
    return ImageSource(classes=classes, splits=splits)


def _check_npz(path: Path, keys: list[str]) -> None:
    try:
        with np.load(path) as npz:
            missing = [k for k in keys if k not in npz.files]
    except Exception as err:
        raise UserError(f"{path}: not a readable npz ({type(err).__name__}); download it again") from None
    if missing:
        raise UserError(f"{path}: missing keys {missing}; expected the official MedMNIST layout "
                        f"{keys}")


# ------------------------------------------------------------------------------------- Camelyon17

def load_camelyon17(cfg: DatasetConfig) -> ImageSource:
    """Camelyon17-WILDS patches; each patch's hospital is its group (the natural client split)."""
    data_dir = Path(cfg.root) / "camelyon17_v1.0"
    if not (data_dir / "metadata.csv").exists() and not cfg.download:
        raise UserError(f"{data_dir / 'metadata.csv'}: not found. Download Camelyon17-WILDS into "
                        f"--dataset-root (wilds puts it in camelyon17_v1.0/) or pass --download")
    from wilds import get_dataset
    try:
        wilds_ds = get_dataset(dataset="camelyon17", root_dir=str(cfg.root), download=cfg.download)
    except Exception as err:
        raise UserError(f"{data_dir}: wilds could not read Camelyon17 ({err})") from None
    fields = list(wilds_ds.metadata_fields)
    hospital = wilds_ds.metadata_array[:, fields.index("hospital")].numpy().astype(np.int64)
    labels = wilds_ds.y_array.numpy().astype(np.int64)
    paths = [Path(wilds_ds.data_dir) / p for p in wilds_ds._input_array]
    # WILDS' own splits (train hospitals 0,3,4 / val 1 / test 2, id_val inside train hospitals);
    # train.py pools them and splits by hospital, as the reference protocol does.
    mapping = {"train": ("train",), "val": ("val", "id_val"), "test": ("test",)}
    split_ids = np.asarray(wilds_ds.split_array)
    splits = {}
    for split, wilds_names in mapping.items():
        idx = np.flatnonzero(np.isin(split_ids, [wilds_ds.split_dict[n] for n in wilds_names
                                                 if n in wilds_ds.split_dict]))
        if len(idx):
            splits[split] = ImageSplit(FileImages([paths[i] for i in idx]), labels[idx], hospital[idx])
    return ImageSource(classes=["normal", "tumor"], splits=splits,
                       group_names=[f"hospital_{h}" for h in range(5)])


# --------------------------------------------------------------------------- image folder + CSV

def load_imagefolder(cfg: DatasetConfig) -> ImageSource:
    """Images in a folder plus a CSV: image id, label (a name, an index or one-hot columns),
    optional group/site and split columns (ISIC 2025 / MILK10k style)."""
    import pandas as pd
    root = Path(cfg.root)
    csv = root / (cfg.csv or "labels.csv")
    if not csv.exists():
        raise UserError(f"{csv}: label table not found (set --csv to the CSV inside --dataset-root)")
    try:
        table = pd.read_csv(csv)
    except Exception as err:
        raise UserError(f"{csv}: not a readable CSV ({err})") from None
    label_cols = [c.strip() for c in cfg.label_col.split(",")]
    needed = [cfg.image_col, *label_cols] + [c for c in (cfg.group_col, cfg.split_col) if c]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise UserError(f"{csv}: missing column(s) {missing}; it has {list(table.columns)} "
                        "(see --image-col/--label-col/--group-col/--split-col)")
    if len(label_cols) > 1:  # one-hot diagnosis columns, as in MILK10k's ground truth
        onehot = table[label_cols].to_numpy(dtype=float)
        if not np.all(onehot.sum(1) == 1):
            raise UserError(f"{csv}: one-hot columns {label_cols} must have exactly one 1 per row")
        classes, labels = label_cols, onehot.argmax(1)
    else:
        classes = sorted(map(str, table[label_cols[0]].unique()))
        labels = table[label_cols[0]].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    paths = [_find_image(root, str(name), csv) for name in table[cfg.image_col]]
    group_names = groups = None
    if cfg.group_col:
        group_names = sorted(map(str, table[cfg.group_col].unique()))
        groups = table[cfg.group_col].astype(str).map(
            {g: i for i, g in enumerate(group_names)}).to_numpy(np.int64)
    split_of = table[cfg.split_col].astype(str).to_numpy() if cfg.split_col else np.full(len(table), "train")
    unknown = sorted(set(split_of) - {"train", "val", "test"})
    if unknown:
        raise UserError(f"{csv}: column {cfg.split_col!r} has values {unknown}; use train/val/test")
    splits = {}
    for split in ("train", "val", "test"):
        idx = np.flatnonzero(split_of == split)
        if len(idx):
            splits[split] = ImageSplit(FileImages([paths[i] for i in idx]),
                                       labels[idx].astype(np.int64),
                                       None if groups is None else groups[idx])
    return ImageSource(classes=classes, splits=splits, group_names=group_names)


def _find_image(root: Path, name: str, csv: Path) -> Path:
    for candidate in (root / name, *(root / f"{name}{ext}" for ext in (".jpg", ".png", ".jpeg")),
                      *(root / "images" / f"{name}{ext}" for ext in ("", ".jpg", ".png", ".jpeg"))):
        if candidate.is_file():
            return candidate
    raise UserError(f"{csv}: image {name!r} not found under {root} (tried the name, .jpg/.png/.jpeg, "
                    "and images/)")


def registry() -> dict[str, Callable[[DatasetConfig], ImageSource]]:
    loaders: dict[str, Callable[[DatasetConfig], ImageSource]] = {f: load_medmnist for f in _medmnist_flags()}
    loaders["camelyon17"] = load_camelyon17
    loaders["imagefolder"] = load_imagefolder
    loaders["isic2025"] = load_imagefolder
    return loaders


def load_dataset(cfg: DatasetConfig) -> ImageSource:
    loaders = registry()
    if cfg.name not in loaders:
        raise UserError(f"--dataset {cfg.name!r} is unknown; valid: {', '.join(sorted(loaders))}")
    return loaders[cfg.name](cfg)
