"""requirements.txt (pip) and environment.yaml (conda) pin the same packages, and the README's two
commands are the ones CI runs."""
from __future__ import annotations

import re

from conftest import ROOT


def pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\s*-?\s*([A-Za-z0-9_.\[\]-]+)==([^\s#]+)", text, flags=re.M))


def test_requirements_and_environment_agree():
    req = pins((ROOT / "requirements.txt").read_text())
    env = pins((ROOT / "environment.yaml").read_text())
    assert req == env and {"torch", "torchvision", "opacus", "timm", "medmnist", "wilds", "flwr[simulation]"} <= set(req)
    assert req["torch"] == "2.14.1" and req["torchvision"] == "0.29.1"


def test_ci_runs_the_readme_commands():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/pip install -r requirements.txt" in readme and ".venv/bin/pip install -r requirements.txt" in ci
    assert ".venv/bin/python -m pytest -q" in readme and ".venv/bin/python -m pytest -q" in ci
