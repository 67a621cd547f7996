"""elanet.viz and `elanet viz`: attention heatmaps, pruning charts, Score-CAM, speed plots."""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import elanet
from elanet.cli import main
from elanet.training.checkpoint import save_checkpoint
from elanet.viz import DPI, draw_attention, draw_pruning, draw_speed, mean_attention, read_bench, score_cam
from elanet.viz.attention import attention_figsize
from elanet.viz.inputs import Normalisation, load_image
from elanet.viz.pruning import mask_history, pruning_figsize, stage_starts
from elanet.viz.scorecam import default_blocks, scorecam_figsize
from elanet.viz.speed import speed_figsize


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def expected_px(size_in: tuple[float, float]) -> tuple[int, int]:
    return int(size_in[0] * DPI), int(size_in[1] * DPI)  # Agg renders floor(inches * dpi) pixels


def assert_picture(path: Path, size_in: tuple[float, float]) -> None:
    """A PNG of exactly the layout's size, not blank."""
    assert path.is_file() and path.stat().st_size > 5000
    assert png_size(path) == expected_px(size_in)
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels[..., :3].std() > 0.05  # something is drawn


# ---------------------------------------------------------------- Score-CAM against a hand computation


class Tiny(nn.Module):
    """1 input channel -> layer with channels A1 = x, A2 = 5 - x, A3 = 1 (constant) -> logits = means of A1, A2."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv2d(1, 3, 1)
        self.head = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([1.0, -1.0, 0.0]).view(3, 1, 1, 1))
            self.layer.bias.copy_(torch.tensor([0.0, 5.0, 1.0]))
            self.head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    def forward(self, x):
        return self.head(self.layer(x).mean((2, 3)))


X = torch.tensor([[1.0, 2.0], [3.0, 5.0]])


@pytest.mark.parametrize("target", [None, 0, 1])
def test_score_cam_matches_hand_computation(target):
    # Masks (min-max of each channel): H1 = (X - 1) / 4 = [[0, .25], [.5, 1]], H2 = (5 - X) / 4 = [[1, .75], [.5, 0]];
    # H3 is constant (no location) and gets weight 0.
    # X*H1 = [[0, .5], [1.5, 5]] (mean 1.75); X*H2 = [[1, 1.5], [1.5, 0]] (mean 1.0).
    # Class 0 logit = mean(masked), class 1 logit = 5 - mean(masked). Clean logits: 2.75 / 2.25 -> class 0.
    scores = {0: [1.75, 1.0], 1: [3.25, 4.0]}[target or 0]
    w = np.exp(scores) / np.exp(scores).sum()
    x = X.numpy()
    expected = np.maximum(w[0] * x + w[1] * (5 - x), 0)  # ReLU(sum_k w_k A^k), same resolution: no upsampling

    model = Tiny().train()
    res = score_cam(model, X.view(1, 1, 2, 2), model.layer, target=target)
    assert res.target == (target or 0)
    np.testing.assert_allclose(res.scores[:2].numpy(), scores, rtol=1e-6)
    assert math.isnan(res.scores[2])
    np.testing.assert_allclose(res.weights.numpy(), [w[0], w[1], 0.0], rtol=1e-6)
    np.testing.assert_allclose(res.cam.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(res.normalised().numpy(), expected / expected.max(), rtol=1e-6)
    logits = np.array([x.mean(), 5 - x.mean()])
    assert res.probability == pytest.approx(float(np.exp(logits[res.target]) / np.exp(logits).sum()))
    assert model.training and not model.layer._forward_hooks  # mode restored, hook removed


def test_score_cam_upsamples_to_the_input():
    model = Tiny()
    model.layer.stride = (2, 2)  # 4x4 input -> 2x2 activations, bilinearly upsampled back to 4x4
    x = torch.arange(16.0).view(1, 1, 4, 4)
    res = score_cam(model.eval(), x, model.layer, target=0)
    assert res.cam.shape == (4, 4)
    a1 = x[:, :, ::2, ::2]  # channel 1 of the layer = the strided input
    up = torch.nn.functional.interpolate(a1, size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    w = res.weights
    np.testing.assert_allclose(res.cam.numpy(), (w[0] * up + w[1] * (5 - up)).clamp_min(0).numpy(), rtol=1e-5)


# ---------------------------------------------------------------- attention heatmap


def _pruned_ela(name="resnet56_ela"):
    model = elanet.create_model(name, num_classes=10, in_chans=1)
    mask = elanet.get_mask(model)
    for b in (2, 3, 7, 16):
        mask[b] = False
    elanet.set_mask(model, mask)
    return model


def test_mean_attention_places_pruned_layers_at_true_indices():
    model = _pruned_ela().train()
    running = model.layer1[0].bn1.running_mean.clone()
    images = torch.randn(6, 1, 8, 8)
    stages = mean_attention(model, images)
    assert model.training and torch.equal(running, model.layer1[0].bn1.running_mean)  # ran in eval, mode restored

    model.eval()
    with torch.no_grad(), elanet.record_attention(model) as rec:
        model(images)
    means = {b: w.mean((0, 1)) for b, w in zip(rec.blocks, rec.weights)}
    mask = elanet.get_mask(model)
    assert [st.blocks for st in stages] == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]
    for st in stages:
        assert st.active == [mask[b] for b in st.blocks] and st.images == 6
        assert st.heads == getattr(model, f"layer{st.stage + 1}")[0].attn.heads
        for t, b in enumerate(st.blocks):
            row = st.weights[t]
            if not mask[b]:
                assert np.isnan(row).all()
                continue
            cols = [j for j in range(t + 1) if st.active[j]]
            np.testing.assert_allclose(row[cols], means[b].numpy(), rtol=1e-6)
            assert row[cols].sum() == pytest.approx(1.0, abs=1e-5)
            assert np.isnan(np.delete(row, cols)).all()


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_draw_attention_writes_picture_of_layout_size(tmp_path, fmt):
    model = _pruned_ela().eval()
    path = draw_attention(model, torch.randn(4, 1, 8, 8), tmp_path / "run", fmt=fmt)
    assert path == tmp_path / "run" / f"attention.{fmt}" and not model.training
    w, h = attention_figsize([6, 6, 6])
    if fmt == "png":
        assert_picture(path, (w, h))
    else:
        text = path.read_text()
        assert f'width="{w * 72:g}pt"' in text and f'height="{h * 72:g}pt"' in text and "pruned" in text


def test_draw_attention_needs_layer_attention(tmp_path):
    with pytest.raises(ValueError, match="no MRLA-B / ELA blocks"):
        draw_attention(elanet.create_model("resnet20_mrla_l", in_chans=1), torch.randn(2, 1, 8, 8), tmp_path)


# ---------------------------------------------------------------- pruning chart


def _rounds(model, epochs=2):
    sched = elanet.PruningSchedule([(e, e) for e in range(1, epochs + 1)], tau=0.3)
    for e in range(1, epochs + 1):
        with torch.no_grad(), elanet.record_attention(model) as rec:
            model(torch.randn(4, 1, 8, 8))
        sched.accumulate(rec)
        sched.decide(model, epoch=e)
    return sched.rounds


def test_pruning_rounds_history_and_stages():
    model = elanet.create_model("resnet56_ela", in_chans=1).eval()
    mask = elanet.get_mask(model)
    mask[4] = False  # a block pruned before the first round: stage starts must still be found
    elanet.set_mask(model, mask)
    rounds = _rounds(model)
    history = mask_history(rounds)
    assert history[0] == mask and history[1:] == [r["mask"] for r in rounds]
    for before, r in zip(history, rounds):
        assert [b for b in range(len(before)) if before[b] and not r["mask"][b]] == sorted(r["pruned"])
    assert stage_starts(rounds) == [m.block_index for m in elanet.pruning.ela_blocks(model) if m.first_in_stage]


def test_draw_pruning_writes_picture_of_layout_size(tmp_path):
    rounds = _rounds(elanet.create_model("resnet56_ela", in_chans=1).eval())
    rounds.append({**rounds[-1], "round": 3, "epoch": 3, "pairs": [], "scores": [], "mapped": [], "pruned": [],
                   "note": "no scores were accumulated in this window: nothing pruned"})
    path = draw_pruning(rounds, tmp_path)
    assert path == tmp_path / "pruning.png"
    assert_picture(path, pruning_figsize(rounds))
    with pytest.raises(ValueError, match="lacks"):
        draw_pruning([{"round": 1}], tmp_path)
    with pytest.raises(ValueError, match="no pruning rounds"):
        draw_pruning([], tmp_path)
    with pytest.raises(ValueError, match="format"):
        draw_pruning(rounds, tmp_path, fmt="jpg")


# ---------------------------------------------------------------- speed


def _bench_records():
    base = {"": ("ResNet", 1.0), "_mrla_l": ("MRLA-L", 1.6), "_mrla_b": ("MRLA-B", 2.0), "_ela": ("ELA", 1.4)}
    return [{"model": f"resnet{d}{v}", "depth": d, "variant": lab, "median_step_s": k * d / 1e3}
            for d in (20, 56, 110) for v, (lab, k) in base.items()]


def test_read_bench_and_draw_speed(tmp_path):
    recs = _bench_records()
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.json").write_text(json.dumps({"device": "cpu", "records": recs}))
    assert read_bench(tmp_path / "a.json") == read_bench(tmp_path / "b.json") == recs
    bad = [dict(r) for r in recs]
    del bad[3]["median_step_s"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="record 3 lacks median_step_s"):
        read_bench(tmp_path / "bad.json")
    cuda = [{**r, "device": "cuda"} for r in recs]
    path = draw_speed(recs + cuda, tmp_path)
    assert_picture(path, speed_figsize(2))


# ---------------------------------------------------------------- inputs


def test_load_image_crops_resizes_and_normalises(tmp_path):
    from PIL import Image

    img = np.zeros((16, 24, 3), np.uint8)
    img[:, 4:20] = 255  # the centre 16x16 square is white, the side strips black and cropped away
    Image.fromarray(img).save(tmp_path / "x.png")
    x = load_image(tmp_path / "x.png", Normalisation(1, 8, [0.25], [0.5]))
    assert x.shape == (1, 1, 8, 8)
    torch.testing.assert_close(x, torch.full_like(x, (1 - 0.25) / 0.5))


# ---------------------------------------------------------------- the CLI


@pytest.fixture()
def run_dir(tmp_path):
    model = elanet.create_model("resnet20_ela", num_classes=10, in_chans=1).eval()
    rounds = _rounds(model)
    run = tmp_path / "run"
    run.mkdir()
    (run / "pruning.json").write_text(json.dumps({"model": "resnet20_ela", "rounds": rounds}))
    save_checkpoint(run / "last.pt", {
        "model_name": "resnet20_ela", "num_classes": 10, "in_chans": 1, "model": model.state_dict(),
        "config": {"dataset": "digits", "data_dir": None}, "mean": [0.3], "std": [0.4], "image_size": 8,
        "classes": [str(i) for i in range(10)],
    })
    return run


def test_cli_attention_and_pruning_write_into_the_run(run_dir, capsys):
    assert main(["viz", "attention", str(run_dir), "--images", "8"]) == 0
    assert_picture(run_dir / "attention.png", attention_figsize([2, 2, 2]))
    assert main(["viz", "pruning", str(run_dir), "--format", "svg"]) == 0
    assert "<svg" in (run_dir / "pruning.svg").read_text()
    assert main(["viz", "pruning", str(run_dir / "pruning.json"), "--out", str(run_dir / "p")]) == 0
    rounds = json.loads((run_dir / "pruning.json").read_text())["rounds"]
    assert_picture(run_dir / "p" / "pruning.png", pruning_figsize(rounds))
    assert "wrote" in capsys.readouterr().out


def test_cli_scorecam(run_dir, tmp_path):
    out = tmp_path / "cam"
    assert main(["viz", "scorecam", str(run_dir / "last.pt"), "--blocks", "3", "4", "5", "--out", str(out)]) == 0
    assert_picture(out / "scorecam.png", scorecam_figsize(4))
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((30, 30)) * 255).astype(np.uint8)).save(tmp_path / "d.png")
    assert main(["viz", "scorecam", str(run_dir), "--image", str(tmp_path / "d.png"), "--target", "3", "--blocks", "1"]) == 0
    assert_picture(run_dir / "scorecam.png", scorecam_figsize(2))
    assert main(["viz", "scorecam", str(run_dir), "--blocks", "6"]) == 2


def test_default_scorecam_blocks():
    assert default_blocks(elanet.create_model("resnet56_ela", in_chans=1)) == list(range(12, 18))  # last stage
    assert default_blocks(elanet.create_model("resnet110_mrla_l", in_chans=1)) == [24, 26, 28, 31, 33, 35]


def test_cli_speed_and_errors(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps({"records": _bench_records()}))
    assert main(["viz", "speed", str(tmp_path / "bench.json")]) == 0
    assert_picture(tmp_path / "speed.png", speed_figsize(1))
    capsys.readouterr()
    (tmp_path / "bad.json").write_text(json.dumps([{"model": "resnet20", "depth": 20}]))
    assert main(["viz", "speed", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(r"lacks variant, median_step_s", err)
    assert main(["viz", "pruning", str(tmp_path)]) == 2
    assert "pruning.json does not exist" in capsys.readouterr().err
    assert main(["viz", "scorecam", str(tmp_path / "none.pt")]) == 2
