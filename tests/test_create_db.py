"""create_db: every dataset format, resume, bad input, and the real backbone on real data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT, shared_file, write_medmnist_npz
from data.backbones import BackboneConfig
from data.create_db import ExtractConfig, create_database, stratified_subset
from data.database import load_database
from data.datasets import DatasetConfig
from data.io import UserError

TINY = BackboneConfig(name="test_vit", random_init=True, img_size=32)


def build(tmp_path, dataset: DatasetConfig, out="db", backbone=TINY, **extract):
    return create_database(dataset=dataset, backbone=backbone, extract=ExtractConfig(batch_size=4, **extract),
                           out=tmp_path / out, progress=False)


def test_medmnist_database_format(tmp_path):
    write_medmnist_npz(tmp_path / "organamnist.npz")
    manifest = build(tmp_path, DatasetConfig(name="organamnist", root=tmp_path))
    db = load_database(tmp_path / "db")
    assert manifest["splits"]["train"]["n"] == 12 and manifest["embedding_dim"] == db.dim
    assert manifest["classes"][0] == "bladder" and len(manifest["classes"]) == 11
    assert manifest["img_size"] == 32 and manifest["transform"]["resize"] == [32, 32]
    assert sum(manifest["splits"]["val"]["class_counts"]) == 6
    assert {"torch", "timm"} <= set(manifest["packages"])
    assert db.embeddings.shape == (24, db.dim) and db.labels.tolist()[:12] == [i % 11 for i in range(12)]
    with np.load(tmp_path / "db" / "train.npz") as npz:
        assert npz["indices"].tolist() == list(range(12))
    assert not (tmp_path / "db" / ".chunks").exists()


def test_rgb_medmnist_at_size_64(tmp_path):
    write_medmnist_npz(tmp_path / "bloodmnist_64.npz", size=64, channels=3, n_classes=8)
    manifest = build(tmp_path, DatasetConfig(name="bloodmnist", root=tmp_path, size=64))
    assert manifest["medmnist_size"] == 64 and len(manifest["classes"]) == 8


def test_embeddings_equal_direct_model_call(tmp_path):
    """The stored embedding is the backbone's pooled feature of the resized, normalised image."""
    import timm
    from data.backbones import create_backbone, prepare_batch
    write_medmnist_npz(tmp_path / "organamnist.npz")
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file
    save_file(timm.create_model("test_vit", num_classes=0, img_size=32).state_dict(), str(weights))
    cfg = BackboneConfig(name="test_vit", weights=weights, img_size=32)
    build(tmp_path, DatasetConfig(name="organamnist", root=tmp_path), backbone=cfg)
    model, transform = create_backbone(cfg)
    images = torch.from_numpy(np.load(tmp_path / "organamnist.npz")["test_images"]).unsqueeze(1)
    with torch.no_grad():
        expected = model(prepare_batch(images, transform)).numpy()
    with np.load(tmp_path / "db" / "test.npz") as npz:
        np.testing.assert_allclose(npz["embeddings"], expected, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "db" / "manifest.json").read_text())["weights_sha256"]


def test_resume_after_interruption_gives_same_database(tmp_path, monkeypatch):
    write_medmnist_npz(tmp_path / "organamnist.npz", n={"train": 20, "val": 6, "test": 6})
    ds = DatasetConfig(name="organamnist", root=tmp_path)
    build(tmp_path, ds, out="full", chunk_size=4)
    import data.create_db as create_db
    calls = {"n": 0}
    original = create_db.prepare_batch

    def flaky(images, transform):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(images, transform)
    monkeypatch.setattr(create_db, "prepare_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, ds, out="resumed", chunk_size=4)
    done = sorted(p.name for p in (tmp_path / "resumed" / ".chunks" / "train").glob("*.npy"))
    assert done == ["000000000.npy", "000000004.npy", "000000008.npy"]
    monkeypatch.setattr(create_db, "prepare_batch", original)
    calls["n"] = 0
    build(tmp_path, ds, out="resumed", chunk_size=4)
    for split in ("train", "val", "test"):
        a, b = np.load(tmp_path / "full" / f"{split}.npz"), np.load(tmp_path / "resumed" / f"{split}.npz")
        np.testing.assert_array_equal(a["embeddings"], b["embeddings"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_limit_takes_a_stratified_subset():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    idx = stratified_subset(labels, 40, seed=0)
    assert len(idx) == 40 and len(set(idx)) == 40
    assert np.bincount(labels[idx]).tolist() == [20, 10, 6, 4]
    assert np.array_equal(idx, stratified_subset(labels, 40, seed=0))


def write_camelyon(root: Path) -> None:
    """Camelyon17-WILDS in its real layout: RELEASE file, metadata.csv, patches/patient_*_node_*/."""
    data = root / "camelyon17_v1.0"
    rows = []
    rng = np.random.default_rng(0)
    for i, center in enumerate([0, 0, 1, 2, 3, 3, 4, 4]):
        patient, node, x, y = f"{center * 10:03d}", center % 2, 100 + i, 200 + i
        folder = data / "patches" / f"patient_{patient}_node_{node}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
            folder / f"patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png")
        rows.append({"patient": patient, "node": node, "x_coord": x, "y_coord": y, "tumor": i % 2,
                     "slide": center * 10 + node, "center": center, "split": i % 2})
    pd.DataFrame(rows).to_csv(data / "metadata.csv")
    (data / "RELEASE_v1.0.txt").write_text("v1.0")


def test_camelyon17_keeps_hospitals_as_groups(tmp_path):
    write_camelyon(tmp_path / "cam")
    manifest = build(tmp_path, DatasetConfig(name="camelyon17", root=tmp_path / "cam"))
    db = load_database(tmp_path / "db")
    assert sorted(db.groups.tolist()) == [0, 0, 1, 2, 3, 3, 4, 4]
    assert manifest["splits"]["test"]["group_counts"] == [0, 0, 1]  # hospital 2 is WILDS' test
    assert manifest["classes"] == ["normal", "tumor"]


def write_imagefolder(root: Path, onehot: bool = False) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(9):
        size = 40 + 4 * i  # sizes differ, as in real dermoscopy folders
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"ISIC_{i:07d}.jpg")
        label = ["MEL", "NV", "BCC"][i % 3]
        row = {"isic_id": f"ISIC_{i:07d}", "site": f"site{i % 2}", "split": ["train", "train", "test"][i % 3]}
        row.update({c: float(c == label) for c in ("MEL", "NV", "BCC")} if onehot else {"diagnosis": label})
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)


@pytest.mark.parametrize("onehot", [False, True])
def test_imagefolder_csv(tmp_path, onehot):
    write_imagefolder(tmp_path / "isic", onehot)
    cfg = DatasetConfig(name="isic2025", root=tmp_path / "isic", image_col="isic_id",
                        label_col="MEL,NV,BCC" if onehot else "diagnosis", group_col="site", split_col="split")
    manifest = build(tmp_path, cfg)
    db = load_database(tmp_path / "db")
    assert manifest["splits"]["train"]["n"] == 6 and manifest["splits"]["test"]["n"] == 3
    assert manifest["group_names"] == ["site0", "site1"] and db.groups is not None
    assert manifest["classes"] == (["MEL", "NV", "BCC"] if onehot else ["BCC", "MEL", "NV"])


@pytest.mark.parametrize("case,expected", [
    ("missing", "not found. Put the official file there"),
    ("corrupt", "not a readable npz"),
    ("keys", "missing keys"),
    ("dataset", "is unknown; valid:"),
    ("backbone", "is not a timm model"),
    ("weights", "does not fit --backbone"),
])
def test_bad_input_gives_clear_error(tmp_path, case, expected):
    path = tmp_path / "organamnist.npz"
    dataset, backbone = DatasetConfig(name="organamnist", root=tmp_path), TINY
    if case == "corrupt":
        path.write_bytes(b"not a zip file")
    elif case == "keys":
        np.savez(path, images=np.zeros((2, 28, 28), np.uint8))
    elif case != "missing":
        write_medmnist_npz(path)
    if case == "dataset":
        dataset = DatasetConfig(name="organxmnist", root=tmp_path)
    if case == "backbone":
        backbone = BackboneConfig(name="vit_smal_patch14_dinov2", random_init=True)
    if case == "weights":
        import timm
        from safetensors.torch import save_file
        save_file(timm.create_model("test_vit2", num_classes=0).state_dict(), str(tmp_path / "w.safetensors"))
        backbone = BackboneConfig(name="test_vit", weights=tmp_path / "w.safetensors", img_size=32)
    with pytest.raises(UserError, match=expected):
        build(tmp_path, dataset, backbone=backbone)


@pytest.mark.slow
def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "create_db.py"), "--dataset", "organamnist",
                           "--dataset-root", str(tmp_path), "--database-root", str(tmp_path / "db")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "organamnist.npz: not found" in proc.stderr


@pytest.mark.slow
def test_real_organamnist_with_real_vit_s14(tmp_path):
    """Real CT slices through the real DINOv2-initialised ViT-S/14: a linear probe is far above chance."""
    npz = shared_file("data/organamnist.npz")
    weights = shared_file("weights/vit_small_patch14_dinov2_imgfocus.safetensors")
    manifest = create_database(
        dataset=DatasetConfig(name="organamnist", root=npz.parent),
        backbone=BackboneConfig(name="vit_small_patch14_dinov2.lvd142m", weights=weights, img_size=224),
        extract=ExtractConfig(batch_size=32, limit=110, amp="bf16", chunk_size=64), out=tmp_path / "db",
        progress=False)
    assert manifest["embedding_dim"] == 384 and manifest["splits"]["train"]["n"] == 110
    from sklearn.linear_model import LogisticRegression
    train, test = np.load(tmp_path / "db" / "train.npz"), np.load(tmp_path / "db" / "test.npz")
    probe = LogisticRegression(max_iter=2000).fit(train["embeddings"], train["labels"])
    accuracy = probe.score(test["embeddings"], test["labels"])
    assert accuracy > 0.5, accuracy  # chance is ~0.09 over 11 organs


def test_a_corrupt_manifest_says_how_to_recreate_and_that_advice_works(tmp_path):
    write_medmnist_npz(tmp_path / "organamnist.npz")
    dataset = DatasetConfig(name="organamnist", root=tmp_path)
    build(tmp_path, dataset)
    good = load_database(tmp_path / "db").embeddings
    (tmp_path / "db" / "manifest.json").write_text('{"classes": [')  # a half-written file
    with pytest.raises(UserError, match=r"not valid JSON .*run data/create_db.py again with --database-root"):
        load_database(tmp_path / "db")
    build(tmp_path, dataset)  # the advice: the same create_db command again
    np.testing.assert_array_equal(load_database(tmp_path / "db").embeddings, good)


def test_the_digits_image_folder_is_read_by_the_imagefolder_loader(tmp_path):
    """experiments/digits/prepare.py writes scikit-learn's bundled digits in the image-folder format."""
    from data.datasets import load_imagefolder
    from experiments.digits import prepare
    assert prepare.main(prepare.get_args_parser().parse_args(["--out", str(tmp_path)])) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["split"] == {"train": 1078, "val": 359, "test": 360}
    source = load_imagefolder(DatasetConfig(name="imagefolder", root=tmp_path, split_col="split"))
    assert source.classes == [str(d) for d in range(10)] and len(source.splits["test"].labels) == 360
    assert np.bincount(source.splits["train"].labels).min() >= 100  # stratified: every digit in every split
