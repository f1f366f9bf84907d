"""Frozen timm backbones and the batched transform that feeds them."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data.io import UserError

DEFAULT_BACKBONE = "vit_base_patch14_dinov2.lvd142m"


@dataclass(frozen=True)
class BackboneConfig:
    name: str = DEFAULT_BACKBONE
    weights: Path | None = None     # local checkpoint; None downloads (online) unless random_init
    random_init: bool = False       # tests only: no weights at all
    img_size: int | None = None     # None: the backbone's pretraining size


def create_backbone(cfg: BackboneConfig) -> tuple[torch.nn.Module, dict]:
    """Returns (model in eval mode, transform description). The model maps a normalised
    (B, 3, S, S) batch to its pooled pre-logits features (B, D)."""
    import timm
    base = cfg.name.split(".")[0]
    if base not in timm.list_models() and not timm.list_models(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        raise UserError(f"--backbone {cfg.name!r} is not a timm model"
                        + (f"; close matches: {', '.join(close)}" if close else
                           "; see timm.list_models() for the valid names"))
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise UserError(f"--weights {cfg.weights}: file not found")
    kwargs: dict = {"num_classes": 0}
    if cfg.weights is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(cfg.weights)))
    else:
        kwargs["pretrained"] = not cfg.random_init
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    try:
        try:
            # fork_rng: a random-init backbone is the same in every run and the global RNG is untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = timm.create_model(cfg.name, **kwargs)
        except TypeError as err:  # CNNs take any input size and have no img_size argument
            if "img_size" not in str(err):
                raise
            kwargs.pop("img_size")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = timm.create_model(cfg.name, **kwargs)
    except UserError:
        raise
    except RuntimeError as err:
        if cfg.weights is not None and ("state_dict" in str(err) or "size mismatch" in str(err)):
            first = str(err).strip().splitlines()
            raise UserError(f"--weights {cfg.weights} does not fit --backbone {cfg.name} "
                            f"({first[1].strip() if len(first) > 1 else first[0]})") from None
        raise UserError(f"--backbone {cfg.name}: {err}") from None
    except Exception as err:
        if cfg.weights is None and not cfg.random_init:
            raise UserError(f"--backbone {cfg.name}: could not download pretrained weights "
                            f"({type(err).__name__}); offline, pass --weights PATH") from None
        raise UserError(f"--weights {cfg.weights}: could not be loaded ({err})") from None
    if cfg.weights is not None:
        check_weights_fit(model, Path(cfg.weights), cfg.name)
    model.eval().requires_grad_(False)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg.img_size or data_cfg["input_size"][-1]
    transform = {
        "resize": [size, size],  # a full-image resize: no centre crop, medical images keep their borders
        "interpolation": data_cfg.get("interpolation", "bicubic"),
        "mean": list(map(float, data_cfg["mean"])),
        "std": list(map(float, data_cfg["std"])),
        "grayscale_to_rgb": True,
    }
    return model, transform


HEAD_PREFIXES = ("head.", "classifier.", "fc.", "head_drop.")
RESAMPLED = ("pos_embed",)  # timm resamples position embeddings to img_size itself


def check_weights_fit(model: torch.nn.Module, path: Path, name: str) -> None:
    """timm loads pretrained files non-strictly (a warning only): refuse a file that does not fit."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(HEAD_PREFIXES)]
    wrong = [k for k in own if k in state and k not in RESAMPLED and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("shape differs", wrong)) if keys)
        raise UserError(f"--weights {path} does not fit --backbone {name} ({detail})")


def prepare_batch(images: torch.Tensor, transform: dict) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float (B, 3, S, S) following `transform`."""
    x = images.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    size = tuple(transform["resize"])
    if tuple(x.shape[-2:]) != size:
        mode = "bicubic" if transform["interpolation"] == "bicubic" else "bilinear"
        x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).clamp_(0, 1)
    mean = torch.tensor(transform["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(transform["std"]).view(1, 3, 1, 1)
    return (x - mean) / std
