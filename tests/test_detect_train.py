"""Detection training on the core: a tiny Mask R-CNN run that prunes, is interrupted and resumes exactly;
2-process DDP; pretrained backbones with and without their ELA mask; the CLI's bad-input errors."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")

from elanet.cli import main  # noqa: E402
from elanet.detect.config import DETECT_PRESETS, resolve_detect_config  # noqa: E402
from elanet.detect.detectors import create_detector  # noqa: E402
from elanet.detect.task import load_backbone, train_detector  # noqa: E402
from elanet.models import create_model  # noqa: E402
from elanet.pruning import get_mask, set_mask  # noqa: E402
from elanet.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_detect_data import tiny_coco  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    tiny_coco(root, "train2017")
    tiny_coco(root, "val2017")
    return root


def tiny_cfg(data: Path, out: Path, **kw):
    """Mask R-CNN, ELA ResNet-50 from scratch at 64 px: 3 steps per epoch, KL in epoch 1, decided at its end."""
    over = dict(data_dir=str(data), preset="synthetic", model="resnet50_ela", out=str(out), epochs=2, batch_size=1, min_size=64, max_size=64,
                windows=[[1, 1]], warmup_iters=2, milestones=[], lr=0.01, rpn_post_nms_top_n_train=50,
                box_batch_size_per_image=16, predictions=1, plots=False, tensorboard=False, threads=1, workers=0,
                flip=True, fpn_channels=64, box_head_dim=256)  # flips too, so resume must replay them
    return resolve_detect_config(overrides={**over, **kw})


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_run(coco, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    return run, train_detector(tiny_cfg(coco, run), log=lambda s: None)


def test_run_folder_prunes_and_holds_every_file(full_run) -> None:
    run, summary = full_run
    assert not summary["interrupted"] and summary["active_blocks"] < summary["attention_blocks"] == 16
    for name in ("config.yaml", "metrics.csv", "pruning.json", "last.pt", "best.pt", "summary.json", "bbox.json", "segm.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "predictions").glob("*.png"))) == 1
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for k in ("train_loss", "loss_mask", "bbox_AP", "bbox_AP50", "bbox_APs", "segm_AP", "segm_AP75", "segm_APl"):
        assert k in rows[0]
    assert rows[0]["bbox_APl"] == "-1"  # no large objects in the tiny set: COCOeval's -1
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["mask"] == summary["mask"] and ckpt["task"] == "detect" and ckpt["category_ids"] == [3, 7]
    rounds = json.loads((run / "pruning.json").read_text())["rounds"]
    assert len(rounds) == 1 and rounds[0]["pruned"] and rounds[0]["epoch"] == 1
    for r in json.loads((run / "bbox.json").read_text()):
        assert r["category_id"] in (3, 7) and len(r["bbox"]) == 4


def test_interrupt_and_resume_is_exact(full_run, coco, tmp_path) -> None:
    run_full, summary_full = full_run
    run = tmp_path / "cut"

    def stop(epoch: int, step: int) -> None:  # a real SIGTERM in the middle of epoch 1, a measurement window
        if (epoch, step) == (1, 2):
            os.kill(os.getpid(), signal.SIGTERM)

    first = train_detector(tiny_cfg(coco, run), on_step=stop, log=lambda s: None)
    assert first["interrupted"] and (first["epoch"], first["step"]) == (1, 2)
    ckpt = load_checkpoint(run / "last.pt", prefer="last")
    assert (ckpt["epoch"], ckpt["step"]) == (0, 2) and ckpt["pruning"]["rounds"] == []
    assert main(["detect", "train", "--resume", str(run), "--threads", "1"]) == 0
    drop = lambda rows: [{k: v for k, v in r.items() if k != "epoch_s"} for r in rows]  # noqa: E731
    assert drop(read_metrics(run)) == drop(read_metrics(run_full))
    assert json.loads((run / "summary.json").read_text())["mask"] == summary_full["mask"]
    a, b = load_checkpoint(run / "last.pt")["model"], load_checkpoint(run_full / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_eval_and_predict_commands(full_run, coco, tmp_path, capsys) -> None:
    run, _ = full_run
    assert main(["detect", "eval", str(run / "last.pt"), "--json", "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    res = json.loads(capsys.readouterr().out)
    last = read_metrics(run)[-1]
    assert res["bbox_AP"] == pytest.approx(float(last["bbox_AP"]), abs=1e-3)
    assert res["segm_AP50"] == pytest.approx(float(last["segm_AP50"]), abs=1e-3)
    assert res["active_blocks"] < res["ela_blocks"] == 16
    assert (tmp_path / "ev" / "bbox.json").is_file() and (tmp_path / "ev" / "segm.json").is_file()
    img = coco / "val2017" / "1.png"
    assert main(["detect", "predict", str(run), str(img), "--out", str(tmp_path / "pred"), "--score-threshold", "0"]) == 0
    assert (tmp_path / "pred" / "1.png").is_file()


def test_ddp_two_processes_agree(coco, tmp_path) -> None:
    cfg = tiny_cfg(coco, tmp_path / "ddp", epochs=2, batch_size=1, predictions=0).to_dict()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           str(ROOT / "tests" / "ddp_detect_worker.py"), json.dumps(cfg), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["mask"] == r1["mask"] and not all(r0["mask"])  # both ranks pruned the same blocks
    for k in r0["weights"]:  # training continued after pruning and the replicas stayed identical
        assert r0["weights"][k] == pytest.approx(r1["weights"][k], rel=1e-5, abs=1e-5), k
    assert len(read_metrics(tmp_path / "ddp")) == 2


def test_pretrained_backbone_with_or_without_its_mask(tmp_path) -> None:
    cls = create_model("resnet50_ela", num_classes=10)
    mask = get_mask(cls)
    mask[2] = mask[5] = False
    set_mask(cls, mask)
    save_checkpoint(tmp_path / "cls.pt", {"model_name": "resnet50_ela", "num_classes": 10, "in_chans": 3, "model": cls.state_dict()})
    for keep in (True, False):
        det = create_detector("mask_rcnn", backbone="resnet50_ela", num_classes=3, pretrained=True)
        load_backbone(det, tmp_path / "cls.pt", backbone="resnet50_ela", keep_mask=keep, frozen_stages=1)
        body = det.backbone.body
        assert get_mask(body) == (mask if keep else [True] * 16)
        assert torch.equal(body.layer3[1].conv2.weight, cls.layer3[1].conv2.weight)
        assert not any(p.requires_grad for n, p in body.named_parameters() if n.startswith(("conv1", "bn1", "layer1")))
        assert body.layer2[1].conv1.weight.requires_grad
    det = create_detector("mask_rcnn", backbone="resnet50", num_classes=3, pretrained=True)
    with pytest.raises(ValueError, match="holds resnet50_ela but the backbone is resnet50"):
        load_backbone(det, tmp_path / "cls.pt", backbone="resnet50", keep_mask=False, frozen_stages=1)


def test_grey_classification_checkpoint_adapts_the_stem_and_other_shapes_fail_clearly(tmp_path) -> None:
    """A checkpoint trained on 1-channel images (the bundled digits) starts a 3-channel detector: the stem's
    weights are repeated over the colour channels and rescaled (timm's adapt_input_conv), so a grey image gives
    the same stem output; any other shape mismatch is a one-line ValueError, not a load_state_dict traceback."""
    cls = create_model("resnet18_ela", num_classes=10, in_chans=1)
    save_checkpoint(tmp_path / "grey.pt", {"model_name": "resnet18_ela", "num_classes": 10, "in_chans": 1, "model": cls.state_dict()})
    det = create_detector("faster_rcnn", backbone="resnet18_ela", num_classes=3, pretrained=True)
    load_backbone(det, tmp_path / "grey.pt", backbone="resnet18_ela", keep_mask=False, frozen_stages=1)
    grey = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(det.backbone.body.conv1(grey.expand(1, 3, 16, 16)), cls.conv1(grey))
    assert torch.equal(det.backbone.body.layer2[0].conv1.weight, cls.layer2[0].conv1.weight)
    state = cls.state_dict()
    state["layer2.0.conv1.weight"] = state["layer2.0.conv1.weight"][:, :32]
    save_checkpoint(tmp_path / "bad.pt", {"model_name": "resnet18_ela", "num_classes": 10, "in_chans": 1, "model": state})
    with pytest.raises(ValueError, match=r"shapes differ: layer2\.0\.conv1\.weight \(128, 32, 3, 3\) vs \(128, 64, 3, 3\)"):
        load_backbone(det, tmp_path / "bad.pt", backbone="resnet18_ela", keep_mask=False, frozen_stages=1)


def _fails(argv: list[str], capsys, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err


def test_bad_input_one_line_and_nothing_written(coco, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    _fails(["detect", "train", "--model", "resnet56_ela", "--out", str(out)], capsys, "CIFAR classification model")
    _fails(["detect", "train", "--data-dir", str(tmp_path / "none"), "--out", str(out)], capsys, "does not exist")
    box_only = tmp_path / "boxes"
    ann = tiny_coco(box_only)
    tiny_coco(box_only, "val2017")
    doc = json.loads(ann.read_text())
    for a in doc["annotations"]:
        a.pop("segmentation")
    ann.write_text(json.dumps(doc))
    _fails(["detect", "train", "--data-dir", str(box_only), "--out", str(out), "--min-size", "64", "--max-size", "64"],
           capsys, "no instance masks ('segmentation'): train a box-only detector (--detector faster_rcnn)")
    _fails(["detect", "train", "--keep-mask", "--out", str(out)], capsys, "pass --pretrained")
    _fails(["detect", "eval", str(tmp_path / "nothing.pt")], capsys, "does not exist")
    assert not out.exists()


def test_detect_bench_times_every_variant(tmp_path, monkeypatch, capsys) -> None:
    """`elanet bench --task detect` at tiny settings: every variant has its timed steps and the pruned masks."""
    monkeypatch.setenv("ELANET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert main(["bench", "--task", "detect", "--fractions", "0", "1", "--batch-size", "1", "--image-size", "64",
                 "--steps", "1", "--warmup", "0", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["plain", "MRLA-L", "ELA 0%", "ELA 100%"]
    assert all(len(r["step_times_s"]) == 1 and r["median_step_s"] > 0 and r["gmacs"] > 0 for r in rows.values())
    assert rows["ELA 0%"]["active_ela_blocks"] == 16 and rows["ELA 100%"]["pruned_fraction"] == 1.0
    assert rows["ELA 100%"]["active_ela_blocks"] == 4  # only the first block of each stage stays (SPEC §3)
    assert rows["plain"]["active_ela_blocks"] is None
    assert report["settings"]["heads"]["fpn_channels"] == DETECT_PRESETS["synthetic"]["fpn_channels"]
    assert report["settings"]["image_size"] == 64
    assert "elanet bench --task detect" in report["command"]
