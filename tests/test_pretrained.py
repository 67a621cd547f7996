"""load_pretrained: torchvision / timm weights by name, attention-only missing keys, SPEC §7 start, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import elanet
from elanet.cli import main
from elanet.models.pretrained import load_state_dict_checked, upgrade_state_dict

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_plain_model_gives_identical_logits():
    src = torchvision.models.resnet50()
    ours = elanet.create_model("resnet50")
    report = elanet.load_pretrained(ours, src)
    assert report.missing == [] and not report.classifier_reset and report.loaded == len(src.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_logits(ours, x), _logits(src, x), rtol=0, atol=1e-5)


def test_mrla_l_starts_exactly_and_ela_close_to_the_source():
    x = torch.randn(2, 3, 64, 64)
    tv = torchvision.models.resnet50()
    light = elanet.create_model("resnet50_mrla_l")
    report = elanet.load_pretrained(light, tv)
    assert report.missing and all(".attn." in k for k in report.missing) and report.initialised == {"MRLALight": 16}
    torch.testing.assert_close(_logits(light, x), _logits(tv, x), rtol=0, atol=1e-5)  # gamma = 0: exactly the source

    deep = timm.create_model("resnet50c")
    ela = elanet.create_model("resnet50_ela")
    report = elanet.load_pretrained(ela, deep)
    assert report.initialised == {"MRLABase": 16}
    assert all(m.bn.weight.eq(1e-2).all() and m.bn.bias.eq(0).all() for m in ela.modules() if isinstance(m, elanet.MRLABase))
    ref, got = _logits(deep, x), _logits(ela, x)
    assert (got - ref).norm() / ref.norm() < 0.05  # small gamma: close to the pretrained net, not equal
    assert not torch.equal(got, ref)


def test_ela_attention_learns_after_one_step():
    ela = elanet.create_model("resnet50_ela", num_classes=4)
    report = elanet.load_pretrained(ela, timm.create_model("resnet50c"))
    assert report.classifier_reset and "fc.weight" in report.missing
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    F.cross_entropy(ela.train()(x), y).backward()
    attn = [m for m in ela.modules() if isinstance(m, elanet.MRLABase)]
    for m in attn:
        assert m.bn.weight.grad.abs().sum() > 0 and m.conv_v.weight.grad.abs().sum() > 0
    later = [m for m in attn if not m.first_in_stage]  # a softmax over >1 layers: the query learns too
    assert later and all(m.conv_q.weight.grad.abs().sum() > 0 for m in later)


def _pretrained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Random BN statistics and affines, so that a gate left at 0.5 or a skipped rescale shows in the output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, lo, hi in ((m.running_mean, -0.1, 0.1), (m.running_var, 0.5, 1.5), (m.weight, 0.5, 1.5), (m.bias, -0.1, 0.1)):
                    t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=g))
    return model.eval()


_BASELINES = [  # (model, source, image side, modules started)
    ("resnet18_se", lambda: torchvision.models.resnet18(), 64, {"SE": 8}),
    ("resnet18_eca", lambda: torchvision.models.resnet18(), 64, {"ECA": 8}),
    ("resnet50_cbam", lambda: timm.create_model("resnet50"), 64, {"CBAM": 16}),
    ("resnet50_gc", lambda: torchvision.models.resnet50(), 64, {"GC": 16}),
    ("resnet50_rla", lambda: torchvision.models.resnet50(), 64, {"RLAStep": 16}),
    ("resnet50_dla_l", lambda: torchvision.models.resnet50(), 64, {"DLALight": 16}),
    ("resnet20_bam", lambda: elanet.create_model("resnet20"), 32, {"BAM": 6}),
    ("resnet20_dia", lambda: elanet.create_model("resnet20"), 32, {"DIAGate": 6, "DIACell": 3}),
]


@pytest.mark.parametrize("name,source,side,started", _BASELINES, ids=[b[0] for b in _BASELINES])
def test_baselines_start_as_the_source_and_their_attention_learns(name, source, side, started):
    torch.manual_seed(0)
    src, model = _pretrained_like(source()), elanet.create_model(name)
    report = elanet.load_pretrained(model, src)
    assert report.initialised == started and not report.classifier_reset
    x = torch.randn(4, 3, side, side)
    ref = _logits(src, x)
    assert (_logits(model, x) - ref).abs().max() <= 1e-5 * ref.abs().max()  # exact up to float rounding
    if name.endswith("_rla"):  # the pretrained weights fill the leading input channels, the state's start at 0
        assert report.widened == [k for k in model.state_dict() if k.endswith("conv1.weight") and k.startswith("layer")] + ["fc.weight"]
        torch.testing.assert_close(model.fc.weight[:, :2048], src.fc.weight, rtol=0, atol=0)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.arange(4) % model.num_classes
    for step in range(2):  # at the start some gradients are 0 by design (behind a zeroed layer); after a step none is
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        opt.step() if step == 0 else None
    attn = {k: p for k, p in model.named_parameters() if (".attn." in k or ".context." in k or k.startswith("final."))
            and not k.endswith("attn.conv_attn.bias")}  # GC's softmax pooling is shift-invariant: that bias never learns
    assert attn and all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.values()), \
        [k for k, p in attn.items() if p.grad is None or p.grad.abs().sum() == 0]
    for key in report.widened[1:]:  # RLA's extra inputs learn too (the first block's state is always 0: RLA-Net's h_0)
        assert model.get_parameter(key).grad[:, -32:].abs().sum() > 0


def test_sources_file_and_elanet_checkpoint_formats(tmp_path):
    src = elanet.create_model("resnet20", num_classes=7)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ddp.pth")
    x = torch.randn(2, 3, 32, 32)
    for source in (tmp_path / "w.pt", str(tmp_path / "ddp.pth"), src.state_dict()):
        ours = elanet.create_model("resnet20_mrla_b", num_classes=7)
        elanet.load_pretrained(ours, source)
        assert torch.equal(ours.conv1.weight, src.conv1.weight) and torch.equal(ours.fc.bias, src.fc.bias)
        assert (_logits(ours, x) - _logits(src, x)).abs().max() < 0.05 * _logits(src, x).abs().max()


def test_mismatched_weights_are_refused_with_the_keys():
    with pytest.raises(ValueError, match=r"do not fit resnet50: not in the model: layer3\.6\..*different number of blocks"):
        elanet.load_pretrained(elanet.create_model("resnet50"), torchvision.models.resnet101())
    with pytest.raises(ValueError, match=r"conv1\.weight.*7x7-stem weights.*timm:resnet50c"):
        elanet.load_pretrained(elanet.create_model("resnet50_ela"), torchvision.models.resnet50())
    with pytest.raises(ValueError, match=r"shapes differ: conv1\.weight \(16, 1, 3, 3\) vs \(16, 3, 3, 3\)"):
        elanet.load_pretrained(elanet.create_model("resnet20"), elanet.create_model("resnet20", in_chans=1))
    if not _cached("resnet50"):  # nothing is downloaded: a name not in the cache says where it looked
        with pytest.raises(FileNotFoundError, match="not in the local cache"):
            elanet.load_pretrained(elanet.create_model("resnet50"), "torchvision:resnet50")
    with pytest.raises(ValueError, match="timm has no pretrained weights"):
        elanet.load_pretrained(elanet.create_model("resnet50"), "timm:no_such_net")


def _cached(name: str) -> bool:
    from elanet.models.pretrained import _torchvision_cached

    try:
        _torchvision_cached(name)
        return True
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("name,old", [
    ("resnet20", {"conv1": "stem.0", "bn1": "stem.1"}),
    ("resnet50_ela", {"conv1.0": "stem.0", "conv1.1": "stem.1", "conv1.3": "stem.3", "conv1.4": "stem.4",
                      "conv1.6": "stem.6", "bn1": "stem.7"}),
])
def test_old_stem_checkpoints_load(name, old):
    model = elanet.create_model(name)
    sd = {}
    for k, v in model.state_dict().items():
        prefix = max((p for p in old if k.startswith(p + ".")), key=len, default=None)
        sd[old[prefix] + k[len(prefix):] if prefix else k] = v
    assert any(k.startswith("stem.") for k in sd)
    fresh = elanet.create_model(name)
    load_state_dict_checked(fresh, sd)
    assert upgrade_state_dict(sd, fresh).keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()) if torch.is_tensor(a))
    with pytest.raises(ValueError, match=r"does not fit resnet110: missing from the checkpoint: layer1\.6\."):
        load_state_dict_checked(elanet.create_model("resnet110"), elanet.create_model("resnet56").state_dict())


def test_train_pretrained_flag(tmp_path, capsys):
    src = elanet.create_model("resnet20", num_classes=10, in_chans=1)
    torch.save(src.state_dict(), tmp_path / "backbone.pt")
    common = ["train", "--model", "resnet20_ela", "--dataset", "digits", "--epochs", "1", "--warmup-epochs", "0",
              "--lr", "0.02", "--windows", "none", "--milestones", "1", "--threads", "1", "--workers", "0",
              "--no-plots", "--no-tensorboard"]
    assert main(common + ["--out", str(tmp_path / "ok"), "--pretrained", str(tmp_path / "backbone.pt")]) == 0
    assert "loaded" in capsys.readouterr().out
    assert main(common + ["--out", str(tmp_path / "bad"), "--pretrained", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pt not found" in err[0]
    assert not (tmp_path / "bad").exists()
