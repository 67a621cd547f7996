"""Model registry, parameter counts against the paper, profile, and the timm / torchvision surface."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models._utils import IntermediateLayerGetter

import elanet
from elanet.attention import MRLABase, MRLALight
from elanet.models import Bottleneck

CIFAR = ("resnet20", "resnet56", "resnet110")
IMAGENET = ("resnet50", "resnet101")
VARIANTS = ("", "_mrla_l", "_mrla_b", "_ela")

# ECA kernel k = t or t + 1 (odd), t = int(|(log2 C + 1) / 2|), worked out by hand for every width used.
ECA_K = {64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}


def test_list_models_is_every_backbone_with_its_variants():
    names = elanet.list_models()
    want = [b + v for b in CIFAR + IMAGENET for v in VARIANTS]
    want += [b + v for b in CIFAR for v in ("_se", "_eca", "_cbam", "_bam", "_dia", "_dla_l")]
    want += [b + v for b in IMAGENET for v in ("_se", "_eca", "_cbam", "_gc", "_rla", "_dla_l")]
    want += [b + v for b in ("resnet18", "resnet34") for v in ("", "_mrla_l", "_mrla_b", "_ela", "_se", "_eca")]
    assert sorted(names) == sorted(want)
    assert len(set(names)) == len(names) == 20 + 18 + 12 + 12


@pytest.mark.parametrize("name", ["resnet56_elaa", "resnet_56_ela", "resnet5O"])
def test_unknown_name_raises_with_close_matches(name):
    with pytest.raises(ValueError, match="did you mean") as err:
        elanet.create_model(name)
    close = str(err.value).split("did you mean", 1)[1]
    assert any(n in close for n in elanet.list_models())
    with pytest.raises(ValueError, match="unknown model"):
        elanet.model_info(name)


def test_unknown_name_without_close_match_still_raises():
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        elanet.create_model("vgg16")


@pytest.mark.parametrize("backbone", CIFAR)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cifar_variants_have_the_right_attention(backbone, variant):
    model = elanet.create_model(backbone + variant)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 3 * (int(backbone[6:]) - 2) // 9
    attn = [b.attn for b in blocks]
    if variant == "":
        assert all(a is None for a in attn)
    elif variant == "_mrla_l":
        assert all(isinstance(a, MRLALight) and a.head_dim == 32 for a in attn)
    else:
        assert all(isinstance(a, MRLABase) and a.head_dim == 32 for a in attn)
        assert all(a.prunable == (variant == "_ela") for a in attn)
    assert model.fc.out_features == 10
    assert elanet.model_info(backbone + variant)["family"] == "cifar"


# Table 1 (M parameters, CIFAR-10 / CIFAR-100); ELA counts are MRLA-B's (pruning removes work, not params).
TABLE1 = {
    "resnet20": (0.22, 0.24), "resnet56": (0.59, 0.61), "resnet110": (1.15, 1.17),
    "resnet20_ela": (0.23, 0.25), "resnet56_ela": (0.62, 0.64), "resnet110_ela": (1.21, 1.23),
    "resnet20_mrla_b": (0.23, 0.25), "resnet56_mrla_b": (0.62, 0.64), "resnet110_mrla_b": (1.21, 1.23),
}


@pytest.mark.parametrize("name", list(TABLE1))
def test_cifar_parameter_counts_match_table1(name):
    got = tuple(round(elanet.count_params(elanet.create_model(name, num_classes=c)) / 1e6, 2) for c in (10, 100))
    assert got == TABLE1[name]


def _summary(name: str) -> dict:
    model = elanet.create_model(name)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    return {
        "params": elanet.count_params(model),
        "stem_convs": sum(isinstance(m, nn.Conv2d) for m in model.conv1.modules()),
        "fc": model.fc.out_features,
        "attn": [(b.conv3.out_channels, b.attn) for b in blocks],
    }


@pytest.fixture(scope="module")
def imagenet_models() -> dict[str, dict]:
    """Build each ImageNet model once (about a second each on CPU) and keep only what the tests read."""
    return {b + v: _summary(b + v) for b in IMAGENET for v in ("", "_mrla_l", "_ela")}


# Table 2 (M parameters, rounded to one decimal).
TABLE2 = {
    "resnet50": 25.6, "resnet50_ela": 25.7, "resnet50_mrla_l": 25.7,
    "resnet101": 44.5, "resnet101_ela": 44.9, "resnet101_mrla_l": 44.9,
}


@pytest.mark.parametrize("name", list(TABLE2))
def test_imagenet_parameter_counts_match_table2(imagenet_models, name):
    info = imagenet_models[name]
    assert round(info["params"] / 1e6, 1) == TABLE2[name]
    assert info["fc"] == 1000
    # MRLA-B / ELA use the deep stem (three 3x3 convs), everything else the 7x7 stem.
    assert info["stem_convs"] == (3 if name.endswith("_ela") else 1)
    for c, attn in info["attn"]:
        if attn is not None:
            assert attn.head_dim == (16 if name.endswith("_ela") else 32) and attn.heads * attn.head_dim == c


def _expected_extra(attn_blocks: list[tuple[int, nn.Module]], per_channel: int) -> int:
    total = 0
    for c, attn in attn_blocks:
        k = ECA_K[c]
        assert attn.conv_q.kernel_size == attn.conv_k.kernel_size == (k,)
        total += per_channel * c + 2 * k
    return total


# Deep stem minus 7x7 stem: (3*32*9 + 32*32*9 + 32*64*9 + BN 2*(32+32+64)) - (3*64*49 + BN 2*64).
DEEP_STEM_EXTRA = (3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + 2 * (32 + 32 + 64)) - (3 * 64 * 49 + 2 * 64)


@pytest.mark.parametrize("backbone", CIFAR)
def test_cifar_extra_parameters_follow_spec_formulas(backbone):
    plain = elanet.count_params(elanet.create_model(backbone))
    for variant, per_channel in (("_mrla_b", 11), ("_ela", 11), ("_mrla_l", 12)):
        info = _summary(backbone + variant)
        assert info["params"] - plain == _expected_extra(info["attn"], per_channel)


@pytest.mark.parametrize("backbone", IMAGENET)
def test_imagenet_extra_parameters_follow_spec_formulas(imagenet_models, backbone):
    plain = imagenet_models[backbone]["params"]
    ela, light = imagenet_models[backbone + "_ela"], imagenet_models[backbone + "_mrla_l"]
    assert ela["params"] - plain == _expected_extra(ela["attn"], 11) + DEEP_STEM_EXTRA
    assert light["params"] - plain == _expected_extra(light["attn"], 12)


def test_profile_resnet50_is_4_1_gmacs():
    prof = elanet.profile(elanet.create_model("resnet50"), (3, 224, 224))
    assert round(prof.gmacs, 1) == 4.1
    assert prof.params == elanet.count_params(elanet.create_model("resnet50"))
    assert prof.input_size == (3, 224, 224)


def test_profile_restores_training_mode_and_rejects_bad_sizes():
    model = elanet.create_model("resnet20").train()
    prof = elanet.profile(model, (3, 8, 8))
    assert model.training and prof.macs > 0
    for bad in [(3, 32), (0, 32, 32), (1, 3, 32, 32)]:
        with pytest.raises(ValueError, match="input_size"):
            elanet.profile(model, bad)


@pytest.fixture
def small_ela() -> nn.Module:
    return elanet.create_model("resnet20_ela", num_classes=7).eval()


def test_forward_features_and_head(small_ela):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = small_ela.forward_features(x)
        assert feats.shape == (2, small_ela.num_features, 8, 8) and small_ela.num_features == 256
        pooled = small_ela.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, feats.mean((2, 3)))
        logits = small_ela.forward_head(feats)
        torch.testing.assert_close(logits, small_ela.fc(pooled))
        torch.testing.assert_close(small_ela(x), logits)


def test_reset_classifier(small_ela):
    x = torch.randn(2, 3, 32, 32)
    small_ela.reset_classifier(5)
    assert small_ela.get_classifier().out_features == 5 and small_ela.num_classes == 5
    with torch.no_grad():
        assert small_ela(x).shape == (2, 5)
        small_ela.reset_classifier(0)
        torch.testing.assert_close(small_ela(x), small_ela.forward_head(small_ela.forward_features(x), pre_logits=True))


def test_forward_intermediates_match_feature_info(small_ela):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = small_ela.forward_intermediates(x)
        final = small_ela.forward_features(x)
    info = small_ela.feature_info
    assert [f["module"] for f in info] == ["layer1", "layer2", "layer3"]
    assert len(feats) == len(info)
    for f, i in zip(feats, info):
        assert f.shape == (2, i["num_chs"], 32 // i["reduction"], 32 // i["reduction"])
    torch.testing.assert_close(feats[-1], final)


def test_stages_plug_into_torchvision_fpn(small_ela):
    x = torch.randn(2, 3, 32, 32)
    names = [f["module"] for f in small_ela.feature_info]
    getter = IntermediateLayerGetter(small_ela, return_layers={n: n for n in names})
    with torch.no_grad():
        got = getter(x)
        want = small_ela.forward_intermediates(x)
    for n, w in zip(names, want):
        torch.testing.assert_close(got[n], w)  # the stage's attention memory works without the model's forward

    fpn = BackboneWithFPN(
        small_ela,
        return_layers={n: str(i) for i, n in enumerate(names)},
        in_channels_list=[f["num_chs"] for f in small_ela.feature_info],
        out_channels=16,
    ).eval()
    with torch.no_grad():
        out = fpn(x)
    assert list(out) == ["0", "1", "2", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [(2, 16, 32, 32), (2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4)]


def _plain_deep_stem_resnet50() -> nn.Module:
    from elanet.models import ResNet

    return ResNet((3, 4, 6, 3), planes=(64, 128, 256, 512), strides=(1, 2, 2, 2), stem="deep", num_classes=1000)


def test_stems_are_named_as_torchvision_and_timm_name_them():
    """torchvision resnet50 loads by name into the plain model, timm resnet50c into the deep-stem one: same logits."""
    import timm
    import torchvision

    x = torch.randn(2, 3, 64, 64)
    for ours, theirs in (
        (elanet.create_model("resnet50"), torchvision.models.resnet50()),
        (_plain_deep_stem_resnet50(), timm.create_model("resnet50c", pretrained=False)),
    ):
        ours.load_state_dict(theirs.state_dict(), strict=True)
        ours.eval(), theirs.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,source", [("resnet50_mrla_l", "tv50"), ("resnet50_ela", "timm50c"), ("resnet101_ela", "timm101c")])
def test_pretrained_keys_leave_only_attention_missing(name, source):
    import timm
    import torchvision

    theirs = {"tv50": lambda: torchvision.models.resnet50(), "timm50c": lambda: timm.create_model("resnet50c"),
              "timm101c": lambda: timm.create_model("resnet101c")}[source]().state_dict()
    result = elanet.create_model(name).load_state_dict(theirs, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".attn." in k for k in result.missing_keys)
