"""elanet train / eval: run folder, presets and overrides, resume after Ctrl-C, DDP, bad input."""
from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elanet.cli import main
from elanet.training import TrainConfig, lr_at, resolve_config, train
from elanet.training.checkpoint import load_checkpoint, model_from_checkpoint
from elanet.pruning import get_mask

ROOT = Path(__file__).resolve().parents[1]


def write_cifar10(root: Path, n_train: int = 96, n_test: int = 40, seed: int = 0) -> Path:
    """A tiny dataset in torchvision's on-disk CIFAR-10 format, with a learnable signal (class = colour)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def make(n):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 3, 32, 32), dtype=np.uint8)
        x += (y * 19).astype(np.uint8)[:, None, None, None]
        return x.reshape(n, -1), [int(v) for v in y]

    for i in range(1, 6):
        x, y = make(n_train // 5)
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x, b"labels": y}, f)
    x, y = make(n_test)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": x, b"labels": y}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return root


def tiny_cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="resnet20_ela", dataset="cifar10", data_dir=str(data_dir), out=str(out), epochs=4, batch_size=16,
                lr=0.05, milestones=[3], windows=[[1, 1], [2, 3]], plots=False, tensorboard=False, threads=1, workers=0)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.validate()
    return cfg


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def full_run(cifar, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("runs") / "full"
    summary = train(tiny_cfg(cifar, run), log=lambda s: None)
    return run, summary


def test_lr_schedule_warmup_and_milestones():
    cfg = TrainConfig(lr=0.1, warmup_epochs=2, milestones=[3, 5], epochs=6, windows=[])
    assert lr_at(cfg, 1, 0.0) == 0.0 and lr_at(cfg, 1, 0.5) == pytest.approx(0.025) and lr_at(cfg, 2, 0.5) == pytest.approx(0.075)
    assert [lr_at(cfg, e) for e in (3, 4, 5, 6)] == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_presets_yaml_and_flags_in_order(tmp_path):
    cifar = resolve_config(overrides={"dataset": "cifar100"})
    assert (cifar.epochs, cifar.batch_size, cifar.milestones, cifar.drop_path) == (180, 128, [100, 150], 0.2)
    assert cifar.windows == [[1, 3], [45, 48], [91, 93]] and (cifar.alpha, cifar.beta, cifar.tau) == (5.0, 1.0, 0.3)
    imnet = resolve_config(preset="imagenet")
    assert (imnet.epochs, imnet.warmup_epochs, imnet.windows, imnet.tau) == (100, 3, [[1, 3], [51, 53]], 0.25)
    f = tmp_path / "c.yaml"
    f.write_text("preset: cifar\nepochs: 120\nlr: 0.05\nwindows: [[1, 2], [40, 41]]\nmilestones: [60, 90]\n")
    cfg = resolve_config(config_file=str(f), overrides={"lr": 0.2})
    assert (cfg.epochs, cfg.lr, cfg.windows, cfg.batch_size) == (120, 0.2, [[1, 2], [40, 41]], 128)


def test_run_folder_contents(full_run):
    run, summary = full_run
    assert {"config.yaml", "metrics.csv", "pruning.json", "last.pt", "best.pt", "summary.json"} <= {p.name for p in run.iterdir()}
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5", "epoch_s", "active_blocks"]
    for r in rows:
        assert 0 <= float(r["test_top1"]) <= float(r["test_top5"]) <= 100 and float(r["epoch_s"]) > 0
    rounds = json.loads((run / "pruning.json").read_text())["rounds"]
    assert [r["epoch"] for r in rounds] == [1, 3]
    # resnet20: 3 pairs; the lowest candidate maps to 0 < tau, so round 1 prunes exactly the block of the lowest score
    first = rounds[0]
    assert len(first["pairs"]) == 3 and len(first["pruned"]) >= 1
    lowest = first["pairs"][int(np.argmin(first["scores"]))][1]
    assert lowest in first["pruned"] and first["mask"][lowest] is False
    assert all(not m for m, m0 in zip(rounds[1]["mask"], first["mask"]) if not m0)  # cumulative
    assert int(rows[0]["active_blocks"]) == 6 - len(first["pruned"])  # metrics row is written after the round
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["mask"] == rounds[-1]["mask"] == summary["mask"]
    model = model_from_checkpoint(ckpt)
    assert get_mask(model) == summary["mask"]
    assert json.loads((run / "summary.json").read_text())["best_top1"] == pytest.approx(max(float(r["test_top1"]) for r in rows), abs=1e-3)
    assert (run / "config.yaml").read_text().count("resnet20_ela") == 1


def test_eval_restores_pruned_structure(full_run, cifar, capsys):
    run, summary = full_run
    assert main(["eval", str(run / "last.pt"), "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    last = read_metrics(run)[-1]
    assert res["top1"] == pytest.approx(float(last["test_top1"]), abs=1e-3)
    assert res["active"] == sum(summary["mask"]) < res["ela_blocks"] == 6


def test_interrupt_and_resume_matches_uninterrupted_run(full_run, cifar, tmp_path):
    run_full, summary_full = full_run
    run = tmp_path / "cut"
    cfg = tiny_cfg(cifar, run)

    def ctrl_c(epoch: int, step: int) -> None:  # a real SIGINT in the middle of epoch 2 (a measurement window)
        if (epoch, step) == (2, 3):
            os.kill(os.getpid(), signal.SIGINT)

    first = train(cfg, on_step=ctrl_c, log=lambda s: None)
    assert first["interrupted"] and (first["epoch"], first["step"]) == (2, 3)
    ckpt = load_checkpoint(run / "last.pt", prefer="last")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3) and ckpt["pruning"]["sum"] is not None  # partial window kept
    assert main(["train", "--resume", str(run), "--threads", "1"]) == 0
    a, b = read_metrics(run_full), read_metrics(run)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "epoch_s"} for r in rows]  # noqa: E731
    assert drop(a) == drop(b)
    assert json.loads((run / "summary.json").read_text())["mask"] == summary_full["mask"]
    assert json.loads((run / "pruning.json").read_text())["rounds"] == json.loads((run_full / "pruning.json").read_text())["rounds"]


def test_ddp_two_processes_agree(cifar, tmp_path):
    cfg = tiny_cfg(cifar, tmp_path / "ddp", epochs=3, windows=[[1, 1], [2, 2]], milestones=[]).to_dict()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(ROOT / "tests" / "ddp_worker.py"), json.dumps(cfg), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["mask"] == r1["mask"] and not all(r0["mask"])  # both ranks pruned the same blocks
    assert r0["weights"].keys() == r1["weights"].keys()
    for k in r0["weights"]:  # training continued after pruning and the replicas stayed identical
        assert r0["weights"][k] == pytest.approx(r1["weights"][k], rel=1e-6, abs=1e-6), k
    rows = read_metrics(tmp_path / "ddp")
    assert len(rows) == 3


def _fails(argv: list[str], capsys, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err


def test_bad_input_one_line_exit_2_and_nothing_written(cifar, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1, 2\nlr: 0.1\n")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 100)
    out = ["--out", str(tmp_path / "new")]
    _fails(["train", "--model", "resnet57_ela", *out], capsys, "did you mean")
    _fails(["train", "--dataset", "mnist", *out], capsys, "unknown dataset")
    _fails(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), *out], capsys, "nowhere")
    _fails(["train", "--dataset", "imagenet", "--data-dir", str(cifar), *out], capsys, "train")
    _fails(["train", "--config", str(bad_yaml), *out], capsys, "not valid YAML")
    _fails(["train", "--lr", "-0.1", *out], capsys, "lr must be > 0")
    _fails(["train", "--epochs", "5", "--windows", "1-2,6-7", *out], capsys, "beyond the last epoch")
    _fails(["train", "--tau", "1.5", *out], capsys, "tau")
    _fails(["train", "--gamma", "0", *out], capsys, "gamma")
    _fails(["train", "--out", str(existing)], capsys, "already exists")
    _fails(["eval", str(corrupt)], capsys, "corrupt")
    _fails(["train", "--resume", str(existing)], capsys, "not a run folder")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and (existing / "keep.txt").read_text() == "precious"
    with pytest.raises(SystemExit) as e:  # argparse choices also exit 2 with one line of error
        main(["train", "--preset", "mnist"])
    assert e.value.code == 2


def test_default_digits_job(tmp_path):
    """The README's main job, as a user types it: ELA on the bundled digits, >= 95 % and a pruning round that prunes."""
    exe = Path(sys.executable).with_name("elanet")
    proc = subprocess.run([str(exe), "train", "--out", str(tmp_path / "digits")], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "digits" / "summary.json").read_text())
    rounds = json.loads((tmp_path / "digits" / "pruning.json").read_text())["rounds"]
    assert summary["best_top1"] >= 95.0
    assert any(r["pruned"] for r in rounds) and summary["active_blocks"] < summary["attention_blocks"]
    assert "pruning round 1" in proc.stdout and "done: best top-1" in proc.stdout
    assert (tmp_path / "digits" / "pruning.png").stat().st_size > 0 and (tmp_path / "digits" / "attention.png").stat().st_size > 0


def test_tensorboard_events_where_installed(cifar, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "tb"
    train(tiny_cfg(cifar, run, epochs=1, windows=[[1, 1]], tensorboard=True), log=lambda s: None)
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_bf16_autocast_and_channels_last_train(cifar, tmp_path):
    """The GPU flags also run on CPU: bf16 autocast and channels-last give a finite, pruned run."""
    summary = train(tiny_cfg(cifar, tmp_path / "amp", epochs=1, windows=[[1, 1]], amp="bf16", memory_format="channels_last"), log=lambda s: None)
    rows = read_metrics(tmp_path / "amp")
    assert np.isfinite(float(rows[0]["train_loss"])) and not all(summary["mask"])
