"""scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no download) as an image folder for
data/create_db.py --dataset imagefolder: images/<i>.png, labels.csv (image, label, split: a stratified 60/20/20
split drawn with --seed) and manifest.json. Not medical: a dataset nobody tuned anything on, to check that the
presets transfer to another domain, another number of classes and much smaller clients."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from data.io import HelpFormatter, atomic_write_json, run_cli  # noqa: E402


def main(args: argparse.Namespace) -> int:
    digits = load_digits()
    images = np.round(digits.images / 16 * 255).astype(np.uint8)  # 0..16 grey levels -> 8-bit
    index = np.arange(len(images))
    train, rest = train_test_split(index, test_size=0.4, stratify=digits.target, random_state=args.seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=args.seed)
    split = np.empty(len(images), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image, mode="L").save(args.out / "images" / f"{i}.png")
    rows = ["image,label,split"] + [f"{i},{digits.target[i]},{split[i]}" for i in index]
    (args.out / "labels.csv").write_text("\n".join(rows) + "\n")
    atomic_write_json(args.out / "manifest.json", {
        "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, test set)",
        "images": len(images), "classes": 10, "size": "8x8 grey, values 0-16 scaled to 0-255",
        "split": {s: int((split == s).sum()) for s in ("train", "val", "test")}, "seed": args.seed,
        "format": "images/<i>.png; labels.csv with columns image, label, split"})
    print(f"wrote {len(images)} images to {args.out}")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (the --dataset-root of create_db.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified train/val/test split")
    return p


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
