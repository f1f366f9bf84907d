"""Embedding-extraction speed: images/s and peak memory for a backbone, image size and batch size.

    python benchmarks/extract.py --backbone vit_small_patch14_dinov2.lvd142m \
        --weights ../shared/weights/vit_small_patch14_dinov2_imgfocus.safetensors --img-size 224 --amp bf16

Uses real OrganAMNIST slices when ../shared is present (else random 28x28 grayscale images: the
timing does not depend on the content).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.backbones import BackboneConfig, create_backbone, prepare_batch  # noqa: E402
from data.create_db import autocast, resolve_device  # noqa: E402
from data.io import run_cli  # noqa: E402

SHARED_NPZ = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "organamnist.npz"


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, transform = create_backbone(BackboneConfig(name=args.backbone, weights=args.weights,
                                                      random_init=args.weights is None, img_size=args.img_size))
    model.to(device)
    if SHARED_NPZ.exists():
        images = torch.from_numpy(np.load(SHARED_NPZ)["test_images"][: args.images]).unsqueeze(1)
        source = "OrganAMNIST test slices"
    else:
        images = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8)
        source = "random 28x28 images"
    batches = images.split(args.batch_size)
    with torch.inference_mode(), autocast(device, args.amp):
        model(prepare_batch(batches[0], transform).to(device))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        for batch in batches:
            model(prepare_batch(batch, transform).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"backbone {args.backbone}  img {transform['resize'][0]}px  batch {args.batch_size}  amp {args.amp}  "
          f"device {device}  threads {torch.get_num_threads()}  ({source})")
    print(f"images/s {len(images) / seconds:.1f}   peak RSS {rss_gb:.2f} GB"
          + (f"   peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GB" if device.type == "cuda" else ""))
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="vit_small_patch14_dinov2.lvd142m", help="timm model name")
    p.add_argument("--weights", type=Path, default=None, help="local checkpoint (default: random init)")
    p.add_argument("--img-size", type=int, default=224, help="input size")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--images", type=int, default=256, help="images to time")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast precision")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
