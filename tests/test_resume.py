"""Exact resume (issue 12, items 1-4): a run stopped inside a measurement window -- by SIGTERM, SIGUSR1 or
SIGTERM to torchrun -- and resumed writes the same metrics.csv (but seconds), pruning.json and weights as a
run that was never stopped, on the in-memory, ImageFolder and 2-process data-parallel paths, with DropPath."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elanet.cli import main
from elanet.training import TrainConfig, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]


def write_folder_tree(root: Path, n_train: int = 12, n_val: int = 4, classes: int = 3) -> Path:
    """A tiny ImageFolder tree (train/ and val/) whose classes differ in colour."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (20, 20, 3), dtype=np.uint8)
                img[..., c] += 120
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def config(out: Path, **kw) -> TrainConfig:
    base = dict(model="resnet20_ela", dataset="digits", out=str(out), epochs=2, batch_size=128, lr=0.05,
                warmup_epochs=1, milestones=[], drop_path=0.2, windows=[[1, 2]], plots=False,
                tensorboard=False, threads=1, workers=0)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.validate()
    return cfg


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "epoch_s"} for r in csv.DictReader(f)]


def assert_same_run(a: Path, b: Path) -> None:
    assert metrics(a) == metrics(b)
    assert json.loads((a / "pruning.json").read_text()) == json.loads((b / "pruning.json").read_text())
    wa, wb = (load_checkpoint(r / "last.pt")["model"] for r in (a, b))
    for k in wa:
        if torch.is_tensor(wa[k]):
            assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder_tree(tmp_path_factory.mktemp("folder"))


def _data(name: str, folder: Path) -> dict:
    if name == "folder":  # 36 training images, batches of 8: 4 steps per epoch
        return dict(dataset="folder", data_dir=str(folder), image_size=16, batch_size=8)
    return {}  # digits: 1437 training images, batches of 128: 11 steps per epoch


@pytest.mark.parametrize("name, sig", [("digits", signal.SIGTERM), ("folder", signal.SIGUSR1)])
def test_stop_signal_inside_a_window_then_resume_equals_uninterrupted(name, sig, folder, tmp_path):
    full = tmp_path / "full"
    train(config(full, **_data(name, folder)), log=lambda s: None)

    cut = tmp_path / "cut"

    def stop(epoch: int, step: int) -> None:  # the window is [1, 2]: its scores are summed across the stop
        if (epoch, step) == (2, 3):
            os.kill(os.getpid(), sig)

    first = train(config(cut, **_data(name, folder)), on_step=stop, log=lambda s: None)
    assert first["interrupted"] and first["signal"] == sig and (first["epoch"], first["step"]) == (2, 3)
    ckpt = load_checkpoint(cut / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3) and ckpt["ranks"][0]["window"]["sum"] is not None
    assert main(["train", "--resume", str(cut)]) == 0
    assert_same_run(full, cut)


def test_torchrun_sigterm_inside_a_window_then_resume_equals_uninterrupted(tmp_path):
    """2 gloo processes, DropPath 0.2: each rank's random stream and its partial sums (epoch loss and
    accuracy, window KL sums) are saved per rank and restored to that rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}

    def torchrun(out: Path, mode: str, port: int) -> subprocess.Popen:
        cfg = json.dumps(config(out, batch_size=64).to_dict())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(ROOT / "tests" / "ddp_resume_worker.py"), cfg, mode, str(tmp_path / f"{mode}.marker")]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    full = torchrun(tmp_path / "full", "full", 29531)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    assert "Grad strides do not match bucket view strides" not in out  # see test_loaders_yield_batches_with_canonical_strides

    cut = torchrun(tmp_path / "cut", "cut", 29532)
    marker = tmp_path / "cut.marker"
    deadline = time.time() + 300
    while not marker.exists() and cut.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), cut.communicate()[0][-3000:]
    cut.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both workers
    out, _ = cut.communicate(timeout=300)
    summary = json.loads((tmp_path / "cut.summary").read_text())
    assert summary["interrupted"] and (summary["epoch"], summary["step"]) == (2, 2), out[-3000:]
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert len(ckpt["ranks"]) == 2 and ckpt["ranks"][0]["rng"]["cpu"].ne(ckpt["ranks"][1]["rng"]["cpu"]).any()
    assert ckpt["ranks"][0]["sums"] != ckpt["ranks"][1]["sums"]  # the ranks' own partial sums

    resumed = torchrun(tmp_path / "cut", "resume", 29533)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert_same_run(tmp_path / "full", tmp_path / "cut")
