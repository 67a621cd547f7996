"""Issue 12: every input a user can get wrong gives one line that names the fix and loses no data; the run
folder has one writer; checkpoints are checksummed and never leave best.pt stale; library arguments are checked."""
from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import elanet
from elanet.cli import main
from elanet.data import build_data
from elanet.pruning import PruningSchedule, adjacent_kl, ebqm
from elanet.training import TrainConfig, load_checkpoint, resolve_config, save_checkpoint, train
from elanet.training import core, trainer
from elanet.training.run_dir import RunFolder

from test_resume import write_folder_tree
from test_train import write_cifar10


def cfg_for(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="resnet20_ela", dataset="cifar10", data_dir=str(data), out=str(out), epochs=2, batch_size=32,
                lr=0.05, warmup_epochs=0, milestones=[], windows=[[1, 1]], plots=False, tensorboard=False, threads=1,
                workers=0)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.validate()
    return cfg


def rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def fails(argv: list[str], capsys, *needles: str) -> str:
    """The command exits with status 2 and one line of error that holds every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def finished(cifar, tmp_path_factory) -> Path:
    """A finished 2-epoch run (96 images, 3 steps per epoch)."""
    run = tmp_path_factory.mktemp("runs") / "done"
    train(cfg_for(cifar, run), log=lambda s: None)
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


# ------------------------------------------------------------------ item 6: typed config
@pytest.mark.parametrize("line, needle", [
    ("epochs: 3.5", "epochs must be a whole number"),
    ('epochs: "three"', "epochs must be a whole number"),
    ("milestones: 5", "milestones must be a list of whole numbers"),
    ("windows: [1, 2]", "windows must be a list of [start, end] epoch pairs"),
    ("device: 5", "device must be a text value"),
    ("model: 123", "model must be a text value"),
    ('plots: "no"', "plots must be true or false"),
    ("lr: fast", "lr must be a number"),
])
def test_yaml_values_of_the_wrong_type_are_refused_before_anything_is_written(line, needle, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(line + "\n")
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        resolve_config(config_file=str(f))
    fails(["train", "--config", str(f), "--out", str(tmp_path / "run")], capsys, needle)
    assert not (tmp_path / "run").exists()


def test_yaml_numbers_where_floats_are_meant_are_accepted(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1\nweight_decay: 1e-4\nplots: false\n")  # YAML reads 1e-4 as text
    cfg = resolve_config(config_file=str(f))
    assert (cfg.lr, cfg.weight_decay, cfg.plots) == (1.0, 1e-4, False) and isinstance(cfg.lr, float)


# ------------------------------------------------------------------ item 7: one writer per run folder
def test_a_run_folder_in_use_is_refused_with_the_owners_pid(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    before = (run / "metrics.csv").read_text()
    holder = RunFolder.reopen(run)  # as a live training process holds it
    try:
        fails(["train", "--resume", str(run), "--epochs", "3"], capsys, "in use by pid", str(os.getpid()))
    finally:
        holder.release()
    assert (run / "metrics.csv").read_text() == before
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0  # released: resumable again
    assert [r["epoch"] for r in rows(run)] == ["1", "2", "3"]


# ------------------------------------------------------------------ run folder and --out
def test_bad_out_paths_are_one_line_errors(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    fails(["train", "--out", str(a_file)], capsys, "is a file")
    fails(["train", "--out", str(a_file / "run")], capsys, "is a file")
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    fails(["train", "--out", str(locked / "run")], capsys, "not writable")


def test_bench_checks_out_and_image_size_before_running(tmp_path, capsys, monkeypatch):
    from elanet.cli import bench_cmd

    def never(*a, **k):
        raise AssertionError("the benchmark ran before its arguments were checked")

    monkeypatch.setattr(bench_cmd, "run_benchmark", never)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    fails(["bench", "--depths", "20", "--out", str(a_file / "b.json")], capsys, "is a file")
    fails(["bench", "--depths", "20", "--out", str(tmp_path)], capsys, "is a folder")
    fails(["bench", "--depths", "20", "--image-size", "0", "--out", str(tmp_path / "b.json")], capsys, "--image-size must be >= 8")


@pytest.mark.parametrize("device", ["cudax", "foo", "cuda:x"])
def test_bad_device_strings(device, finished, tmp_path, capsys):
    fails(["train", "--device", device, "--out", str(tmp_path / "r")], capsys, "device")
    fails(["eval", str(finished), "--device", device], capsys, "device")
    fails(["viz", "attention", str(finished), "--device", device, "--out", str(tmp_path)], capsys, "device")
    assert not (tmp_path / "r").exists()


def test_amp_fp16_on_cpu_is_refused(tmp_path, capsys):
    fails(["train", "--amp", "fp16", "--device", "cpu", "--out", str(tmp_path / "r")], capsys, "fp16 needs a CUDA GPU")
    if not torch.cuda.is_available():  # 'auto' resolves to the CPU here
        fails(["train", "--amp", "fp16", "--out", str(tmp_path / "r")], capsys, "fp16 needs a CUDA GPU")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ resume edge cases
def test_resume_with_more_epochs_updates_config_yaml(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert "epochs: 3\n" in (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run)]) == 0  # nothing to do: the saved config says 3
    assert [r["epoch"] for r in rows(run)] == ["1", "2", "3"]


def test_unknown_key_in_a_runs_config_is_a_one_line_error(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "colour: blue\n")
    fails(["train", "--resume", str(run)], capsys, "unknown setting(s) colour", "config.yaml")


def test_a_run_that_died_before_its_first_checkpoint_resumes_from_epoch_1(cifar, tmp_path, capsys):
    run = tmp_path / "early"

    def crash(epoch: int, step: int) -> None:
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train(cfg_for(cifar, run), on_step=crash, log=lambda s: None)
    assert (run / "config.yaml").is_file() and not (run / "last.pt").exists()
    fails(["train", "--out", str(run)], capsys, f"--resume {run}")
    assert main(["train", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in rows(run)] == ["1", "2"] and (run / "last.pt").is_file()


def test_stale_tmp_files_of_a_killed_writer_are_removed_on_resume(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    stale = [run / ".last.pt.k3j2_x.tmp", run / ".metrics.csv.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert not any(p.exists() for p in stale) and not list(run.glob(".*.tmp"))


def test_best_pt_is_never_stale_after_a_crash_between_checkpoint_writes(cifar, tmp_path, monkeypatch, capsys):
    """Best improves every epoch here; the process dies right after the first checkpoint write of epoch 2."""
    real_eval, real_save = trainer.Classification.evaluate, core.save_checkpoint
    calls = []

    def improving(self, model):
        res = real_eval(self, model)
        return {**res, "top1": 10.0 * (len(calls) // 2 + 1)}  # 10 % in epoch 1, 20 % in epoch 2

    def save_then_die(path, state):
        calls.append(Path(path).name)
        real_save(path, state)
        if len(calls) == 3:  # epoch 1 wrote two files; this is the first of epoch 2
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(trainer.Classification, "evaluate", improving)
    monkeypatch.setattr(core, "save_checkpoint", save_then_die)
    run = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(cifar, run), log=lambda s: None)
    best_row = max(rows(run), key=lambda r: float(r["test_top1"]))
    assert best_row["epoch"] == "2"
    assert load_checkpoint(run)["epoch"] == 2  # eval RUN evaluates best.pt: the model of the best row


# ------------------------------------------------------------------ checkpoints: checksum, corruption, full disk
def _entry_offset(path: Path, part: str) -> tuple[int, int]:
    """File offset and size of the largest zip entry whose name contains ``part``."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if part in i.filename), key=lambda i: i.file_size)
    raw = path.read_bytes()
    h = info.header_offset
    name_len, extra_len = int.from_bytes(raw[h + 26:h + 28], "little"), int.from_bytes(raw[h + 28:h + 30], "little")
    return h + 30 + name_len + extra_len, info.file_size


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["tensor", "pickle-value", "pickle-opcodes"])
def test_corrupt_checkpoints_are_named_in_one_line_by_train_eval_and_viz(where, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    ckpt = run / "last.pt"
    if where == "tensor":  # a bit flip in the middle of the largest tensor: torch loads it silently
        offset, size = _entry_offset(ckpt, "/data/")
        _flip(ckpt, offset + size // 2)
    elif where == "pickle-value":  # a value inside the pickle: "resnet20_ela" -> "resnet20_elq"
        offset, size = _entry_offset(ckpt, "data.pkl")
        _flip(ckpt, ckpt.read_bytes().index(b"resnet20_ela", offset) + 11)
    else:  # garbage over the pickle's opcodes
        offset, size = _entry_offset(ckpt, "data.pkl")
        raw = bytearray(ckpt.read_bytes())
        raw[offset + size // 3: offset + size // 3 + 8] = b"\xff" * 8
        ckpt.write_bytes(bytes(raw))
    shutil.copy(ckpt, run / "best.pt")
    fails(["eval", str(ckpt), "--device", "cpu"], capsys, str(ckpt), "corrupt")
    fails(["eval", str(run), "--device", "cpu"], capsys, "corrupt")
    fails(["viz", "attention", str(run), "--out", str(tmp_path)], capsys, "corrupt")
    fails(["train", "--resume", str(run), "--epochs", "3"], capsys, "corrupt")


def test_checksum_covers_every_tensor_value(tmp_path):
    state = {"model_name": "resnet20_ela", "model": {"w": torch.arange(6.0)}, "epoch": 1}
    save_checkpoint(tmp_path / "a.pt", state)
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    raw["model"]["w"][3] = 3.5  # what a flipped bit does
    torch.save(raw, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="checksum"):
        load_checkpoint(tmp_path / "b.pt")
    assert load_checkpoint(tmp_path / "a.pt")["model"]["w"].tolist() == [0, 1, 2, 3, 4, 5]


class _FullDisk:
    """A file that accepts ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_says_so_and_keeps_the_previous_checkpoint(finished, tmp_path, monkeypatch, capsys):
    from elanet.training import checkpoint

    run = copy_run(finished, tmp_path)
    before = (run / "last.pt").read_bytes()
    real = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode), 4096))
    with pytest.raises(OSError, match="no space left on device") as e:
        save_checkpoint(run / "last.pt", {"model_name": "x", "model": {"w": torch.zeros(10000)}})
    assert e.value.errno == errno.ENOSPC
    assert (run / "last.pt").read_bytes() == before and not list(run.glob(".*.tmp"))
    # epoch 3 writes best.pt first when it improves, then last.pt: the error names the file it could not write
    fails(["train", "--resume", str(run), "--epochs", "3"], capsys, "no space left on device", ".pt: free space there and resume the run")
    monkeypatch.undo()
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


# ------------------------------------------------------------------ divergence
def test_divergence_in_the_first_epoch_says_no_checkpoint_exists(cifar, tmp_path):
    with pytest.raises(ValueError, match="diverged in epoch 1.*no checkpoint was written"):
        train(cfg_for(cifar, tmp_path / "lr", lr=1e6, momentum=0.0, windows=[]), log=lambda s: None)


def test_a_nan_test_loss_stops_the_run(cifar, tmp_path, monkeypatch):
    real = trainer.Classification.evaluate
    epochs = []

    def nan_in_epoch_2(self, model):
        res = real(self, model)
        epochs.append(1)
        return {**res, "loss": math.nan} if len(epochs) == 2 else res

    monkeypatch.setattr(trainer.Classification, "evaluate", nan_in_epoch_2)
    run = tmp_path / "nan"
    with pytest.raises(ValueError, match=f"diverged in epoch 2 \\(test loss nan\\).*{run / 'last.pt'} holds epoch 1"):
        train(cfg_for(cifar, run, epochs=3), log=lambda s: None)
    assert [r["epoch"] for r in rows(run)] == ["1"] and load_checkpoint(run / "last.pt")["epoch"] == 1


# ------------------------------------------------------------------ folder datasets: bad files
def test_unreadable_images_are_skipped_named_once_and_counted(tmp_path, capfd):
    root = write_folder_tree(tmp_path / "data")
    png = root / "train" / "c0" / "0.png"
    png.write_bytes(png.read_bytes()[:60])  # truncated
    (root / "train" / "c1" / "notes.png").write_text("not an image")
    (root / "val" / "c2" / "0.png").write_bytes(b"")
    cfg = cfg_for(root, tmp_path / "run", dataset="folder", data_dir=str(root), image_size=16, batch_size=8, epochs=2)
    summary = train(cfg, log=lambda s: None)
    err = capfd.readouterr().err
    assert summary["skipped_images"] == 3 and json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_images"] == 3
    for p in (png, root / "train" / "c1" / "notes.png", root / "val" / "c2" / "0.png"):
        assert err.count(f"skipping unreadable image {p}") == 1, err  # once, though read every epoch
    assert [r["epoch"] for r in rows(tmp_path / "run")] == ["1", "2"]


def test_loaders_yield_batches_with_canonical_strides():
    """One-channel digits batches used to carry strides that also read as channels-last: convolutions then
    made depthwise weight gradients [256, 1, 3, 3] with strides (9, 1, 3, 1), and DDP warned "Grad strides
    do not match bucket view strides" on every rank and copied them every step."""
    data = build_data("digits", batch_size=16)
    x, _ = next(iter(data.train))
    assert x.stride() == (64, 64, 8, 1)
    model = elanet.create_model("resnet20_ela", num_classes=10, in_chans=1)
    torch.nn.functional.cross_entropy(model(x), _).backward()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), name


# ------------------------------------------------------------------ viz / eval messages
def test_viz_pruning_of_an_inconsistent_file(finished, tmp_path, capsys):
    rounds = json.loads((finished / "pruning.json").read_text())["rounds"]
    bad_index = json.loads(json.dumps(rounds))
    bad_index[0]["pruned"] = [99]
    short_mask = json.loads(json.dumps(rounds)) * 2
    short_mask[1]["mask"] = short_mask[1]["mask"][:3]
    for name, data in (("index", bad_index), ("mask", short_mask)):
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps({"model": "resnet20_ela", "rounds": data}))
        fails(["viz", "pruning", str(f)], capsys, "pruning round")


def test_eval_on_the_wrong_dataset_names_evals_own_flags(tmp_path, cifar, capsys):
    root = write_folder_tree(tmp_path / "data")
    run = tmp_path / "folder-run"
    train(cfg_for(root, run, dataset="folder", data_dir=str(root), image_size=16, batch_size=8, epochs=1), log=lambda s: None)
    err = fails(["eval", str(run), "--dataset", "cifar10", "--data-dir", str(cifar)], capsys, "trained on", "folder")
    assert "image_size" not in err and "--image-size" not in err
    fails(["eval", str(run), "--dataset", "cifar10"], capsys, "--data-dir")


# ------------------------------------------------------------------ library argument checks
@pytest.mark.parametrize("head_dim", [-4, 0, 2.5])
def test_create_model_refuses_bad_head_dim(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        elanet.create_model("resnet20_ela", head_dim=head_dim)


def test_adjacent_kl_refuses_what_is_not_a_distribution():
    p, q = torch.softmax(torch.randn(2, 3, 2), -1), torch.softmax(torch.randn(2, 3, 3), -1)
    assert adjacent_kl(p, q).shape == (2, 3)
    with pytest.raises(ValueError, match="eps"):
        adjacent_kl(p, q, eps=2.0)
    with pytest.raises(ValueError, match="not a probability distribution"):
        adjacent_kl(p * 3, q)
    with pytest.raises(ValueError, match="not a probability distribution"):
        adjacent_kl(p, q - 0.5)
    with pytest.raises(ValueError, match="empty support"):
        adjacent_kl(p[..., :0], q)


def test_ebqm_and_schedule_refuse_infinite_shapes_and_fractional_windows():
    with pytest.raises(ValueError, match="finite"):
        ebqm([0.1, 0.2, 0.3], alpha=math.inf, beta=1.0)
    with pytest.raises(ValueError, match="finite"):
        PruningSchedule([(1, 2)], beta=math.inf)
    with pytest.raises(ValueError, match="whole epochs"):
        PruningSchedule([(1.5, 2)])
    assert PruningSchedule([(np.int64(1), 2)]).windows == [(1, 2)]


# ------------------------------------------------------------------ the CLI's stop signals
def test_sigterm_to_elanet_train_saves_and_exits_143(cifar, tmp_path):
    """A real process, a real SIGTERM: the run stops after the step, saves, and exits with 128 + 15."""
    import subprocess
    import sys

    run = tmp_path / "term"
    code = ("import os, signal, sys\n"
            "from elanet.cli import main\n"
            "from elanet.training.config import RunConfig\n"
            "real = RunConfig.lr_at\n"
            "def lr_at(cfg, epoch, frac=0.0, **kw):\n"
            "    if epoch == 2 and frac > 0: os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(cfg, epoch, frac, **kw)\n"
            "RunConfig.lr_at = lr_at\n"
            "sys.exit(main(sys.argv[1:]))\n")
    args = ["train", "--dataset", "cifar10", "--data-dir", str(cifar), "--out", str(run), "--epochs", "3",
            "--batch-size", "32", "--windows", "1-2", "--milestones", "", "--no-plots", "--no-tensorboard", "--threads", "1"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "SIGTERM: stopping after this step" in proc.stderr
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)


# ------------------------------------------------------------------ a mid-epoch resume does not re-read skipped batches
@pytest.mark.parametrize("name", ["cifar10", "folder"])
def test_iter_from_equals_the_tail_of_the_epoch_without_reading_the_skipped_batches(name, cifar, tmp_path):
    if name == "folder":
        root = write_folder_tree(tmp_path / "data")
        data = build_data("folder", data_dir=str(root), batch_size=8, image_size=16, workers=0, seed=3)
        reads = []
        base = data.train.dataset.base
        real = base.loader
        base.loader = lambda path: reads.append(path) or real(path)
    else:
        data = build_data("cifar10", data_dir=str(cifar), batch_size=16, seed=3)  # crop + flip augmentation
    data.train.set_epoch(2)
    whole = list(data.train)
    if name == "folder":
        reads.clear()
    tail = list(data.train.iter_from(2))
    assert len(tail) == len(whole) - 2 >= 1
    for (x, y), (x2, y2) in zip(whole[2:], tail):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    if name == "folder":
        assert len(reads) == 8 * len(tail)  # only the batches it yields
        assert len(list(data.train)) == len(whole)  # the next epoch starts from its first batch again


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_with_dataloader_workers_saves(sig, tmp_path):
    """A terminal's Ctrl-C and SLURM's scancel signal every process of the job, DataLoader workers too.
    The workers leave the signal to the trainer, which stops after the step and saves (exit 128 + sig)."""
    import subprocess
    import sys

    root = write_folder_tree(tmp_path / "data")
    run = tmp_path / "run"
    code = ("import os, signal, sys\n"
            "from elanet.cli import main\n"
            "from elanet.training.config import RunConfig\n"
            "real, sent = RunConfig.lr_at, []\n"
            "def lr_at(cfg, epoch, frac=0.0, **kw):\n"
            "    if epoch == 2 and frac > 0 and not sent:\n"
            f"        sent.append(1); __import__('subprocess').run(['kill', '-s', '{sig.name}', '--', f'-{{os.getpgrp()}}'])  # sent by another process\n"
            "    return real(cfg, epoch, frac, **kw)\n"
            "RunConfig.lr_at = lr_at\n"
            "sys.exit(main(sys.argv[1:]))\n")
    args = ["train", "--dataset", "folder", "--data-dir", str(root), "--image-size", "16", "--out", str(run),
            "--epochs", "3", "--batch-size", "8", "--windows", "1-2", "--milestones", "", "--workers", "1",
            "--no-plots", "--no-tensorboard", "--threads", "1"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    assert proc.returncode == 128 + sig, proc.stderr[-3000:]
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
