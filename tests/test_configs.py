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


def test_cosine_schedule_by_hand():
    """schedule: cosine -- after a 2-epoch linear warm-up, lr (1 + cos(pi t)) / 2 with t the done fraction of
    the remaining 8 epochs; the step schedule is unchanged; an unknown name is refused."""
    import math

    cfg = resolve_config(overrides={"schedule": "cosine", "epochs": 10, "warmup_epochs": 2, "lr": 0.1, "windows": [[1, 2]]})
    assert cfg.lr_at(1, 0.5) == pytest.approx(0.025)  # warm-up: 0.1 * 0.5 / 2
    assert cfg.lr_at(3) == pytest.approx(0.1)
    assert cfg.lr_at(5) == pytest.approx(0.05 * (1 + math.cos(math.pi * 2 / 8)))
    assert cfg.lr_at(7) == pytest.approx(0.05) and cfg.lr_at(10, 1.0) == pytest.approx(0.0)
    step = resolve_config(overrides={"epochs": 10, "warmup_epochs": 0, "lr": 0.1, "milestones": [5], "windows": [[1, 2]]})
    assert (step.lr_at(5), step.lr_at(6)) == (pytest.approx(0.1), pytest.approx(0.01))
    with pytest.raises(ValueError, match="schedule must be step or cosine"):
        resolve_config(overrides={"schedule": "linear"})
