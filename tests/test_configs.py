"""configs/: one YAML per row of Tables 1-2 that elanet builds, each resolved by the real config resolver."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import elanet
from elanet.cli import main
from elanet.training import resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name in ("cifar10", "cifar100", "imagenet"))


def test_one_config_per_buildable_row():
    names = {(p.parent.name, p.stem) for p in CONFIGS}
    rows1 = ["", "_se", "_eca", "_dia", "_cbam", "_bam", "_mrla_l", "_dla_l", "_ela"]
    want = {(d, f"resnet{n}{v}") for d in ("cifar10", "cifar100") for n in (20, 56, 110) for v in rows1}
    want |= {("imagenet", f"resnet50{v}") for v in ["", "_se", "_cbam", "_gc", "_eca", "_rla", "_mrla_l", "_mrla_b", "_dla_l", "_ela"]}
    want |= {("imagenet", f"resnet101{v}") for v in ["", "_se", "_cbam", "_eca", "_rla", "_mrla_l", "_dla_l", "_ela"]}
    assert names == want


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_resolves_and_builds_its_model(path):
    cfg = resolve_config(config_file=str(path), overrides={"data_dir": "/nonexistent"})
    assert cfg.model == path.stem and cfg.dataset == path.parent.name
    info = elanet.model_info(cfg.model)
    assert info["family"] == ("imagenet" if cfg.dataset == "imagenet" else "cifar")
    assert (cfg.epochs, cfg.lr) == ((180, 0.1) if info["family"] == "cifar" else (100, 0.1))
    assert bool(cfg.windows) == cfg.model.endswith("_ela")  # only ELA prunes
    with torch.device("meta"):
        model = elanet.create_model(cfg.model, num_classes=100 if cfg.dataset == "cifar100" else None, drop_path=cfg.drop_path)
    assert model.fc.out_features == {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[cfg.dataset]


def test_a_config_runs_with_elanet_train(tmp_path):
    """``elanet train --config configs/cifar10/resnet20_dia.yaml --data-dir ...``, shortened by flags."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import write_cifar10

    data = write_cifar10(tmp_path / "data")
    run = tmp_path / "run"
    argv = ["train", "--config", str(ROOT / "configs/cifar10/resnet20_dia.yaml"), "--data-dir", str(data), "--out", str(run),
            "--epochs", "1", "--batch-size", "16", "--threads", "1", "--no-plots", "--no-tensorboard"]
    assert main(argv) == 0
    assert (run / "last.pt").is_file()
    assert main(["eval", str(run / "last.pt"), "--json", "--device", "cpu"]) == 0
