"""elanet export: pruned attention removed, .pt2 / ONNX outputs equal the checkpoint's, eval of exported files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from elanet import count_params, create_model
from elanet.cli import main
from elanet.data import build_data
from elanet.attention import MRLABase
from elanet.profile import profile
from elanet.export import export_model, fold_attention_bn, inference_model, load_exported, strip_pruned
from elanet.pruning import get_mask, set_mask
from elanet.training import TrainConfig, train
from elanet.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

MASK = [True, False, True, True, True, False]  # ResNet-20 ELA: the second block of stages 1 and 3 pruned


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> Path:
    """A one-epoch digits run whose best.pt carries a mask with two pruned blocks."""
    run = tmp_path_factory.mktemp("runs") / "digits"
    cfg = TrainConfig(model="resnet20_ela", dataset="digits", out=str(run), epochs=1, warmup_epochs=0, lr=0.02, windows=[],
                      plots=False, tensorboard=False, threads=1, workers=0)
    cfg.validate()
    train(cfg, log=lambda s: None)
    ckpt = load_checkpoint(run)
    model = model_from_checkpoint(ckpt)
    set_mask(model, MASK)
    ckpt.update(model=model.state_dict(), mask=get_mask(model))
    save_checkpoint(run / "best.pt", ckpt)
    return run


def _checkpoint_model_and_input(run: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    """The checkpoint's model in eval mode and five of its test images."""
    ckpt = load_checkpoint(run)
    data = build_data("digits", batch_size=5, eval_batch_size=5, device=torch.device("cpu"), workers=0)
    return model_from_checkpoint(ckpt).eval(), next(iter(data.test))[0]


def test_strip_removes_exactly_the_pruned_attention_parameters():
    model = create_model("resnet20_ela").eval()
    set_mask(model, MASK)
    pruned = [b.attn for s in model.stages for b in s if b.attn is not None and not b.attn.active]
    stripped = strip_pruned(model)
    assert count_params(stripped) == count_params(model) - sum(count_params(m) for m in pruned)
    assert sum(b.attn is None for s in stripped.stages for b in s) == MASK.count(False)
    assert not any(".attn." in k for k in stripped.state_dict() if k.startswith(("layer1.1.", "layer3.1.")))
    assert count_params(model) == count_params(create_model("resnet20_ela"))  # the source model is unchanged
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), model(x), rtol=0, atol=0)


def test_export_pt2_matches_checkpoint_and_loads_without_elanet(pruned_run, tmp_path, capsys):
    out = tmp_path / "ela.pt2"
    assert main(["export", str(pruned_run), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "params" in line and "GMACs" in line and "2 pruned attention modules" in line
    model, x = _checkpoint_model_and_input(pruned_run)
    with torch.no_grad():
        expected = model(x)
    exported, meta = load_exported(out)
    torch.testing.assert_close(exported(x), expected, rtol=0, atol=1e-5)
    assert meta["params"] == count_params(inference_model(model)) < count_params(fold_attention_bn(strip_pruned(model))) < meta["params_before"] == count_params(model)
    # the lone active block of a stage also loses its query / key convs (a softmax over one layer is 1)
    assert meta["macs"] < meta["macs_before"] < meta["macs_unpruned"] and meta["mask"] == MASK

    # a fresh interpreter where `import elanet` fails: the program needs torch only
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys; sys.modules['elanet'] = None\n"
            "import torch\n"
            f"m = torch.export.load({str(out)!r}).module()\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            f"torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=1e-5)

    # elanet eval reads the exported file and agrees with the checkpoint
    assert main(["eval", str(out), "--json", "--device", "cpu"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert main(["eval", str(pruned_run), "--json", "--device", "cpu"]) == 0
    from_ckpt = json.loads(capsys.readouterr().out)
    assert from_export["top1"] == from_ckpt["top1"] and from_export["n"] == from_ckpt["n"]
    assert from_export["loss"] == pytest.approx(from_ckpt["loss"], abs=1e-5)


def test_export_onnx_matches_checkpoint_through_onnxruntime(pruned_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "ela.onnx"
    assert main(["export", str(pruned_run / "best.pt"), "--out", str(out)]) == 0
    model, x = _checkpoint_model_and_input(pruned_run)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (x, x[:1]):  # the batch dimension is dynamic
        got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(batch), rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["ela_blocks"] == len(MASK)


def test_exported_retrieval_stores_nothing_in_place(tmp_path):
    """Every stage keeps several active blocks; their values reach the aggregation as a concatenation,
    not as in-place stores into one buffer (which ONNX turns into scatters over the whole buffer,
    4x slower in onnxruntime), and the graphs still compute the model's outputs."""
    pytest.importorskip("onnxruntime")
    import onnx

    model = create_model("resnet20_ela", num_classes=4).eval()
    set_mask(model, MASK)
    with torch.no_grad():  # as export_model traces
        program = torch.export.export(inference_model(model), (torch.randn(2, 3, 16, 16),), strict=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("copy" in t or "scatter" in t or "index_put" in t for t in targets), sorted(targets)
    assert "aten.bmm.default" in targets  # the retrieval of eq. 5 is there (stages 1 and 3 keep two blocks)
    report = export_model(model, tmp_path / "ela.onnx", input_size=(3, 16, 16))
    ops = {n.op_type for n in onnx.load(str(report.path)).graph.node}
    assert not any("Scatter" in op for op in ops) and "MatMul" in ops, sorted(ops)
    assert report.max_abs_diff <= 1e-5
    session, _ = load_exported(report.path)
    assert session.metadata["macs"] == report.after.macs
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(session(x), model(x), rtol=0, atol=1e-5)


def test_export_keeps_attention_of_an_unpruned_model(tmp_path):
    model = create_model("resnet20_mrla_l", num_classes=4).eval()
    report = export_model(model, tmp_path / "l.pt2", input_size=(3, 16, 16))
    assert report.removed_modules == 0 and report.after.params == report.before.params == count_params(model)
    assert report.max_abs_diff <= 1e-5


def test_export_bad_input_fails_cleanly_and_writes_nothing(pruned_run, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["export", str(empty), "--out", str(tmp_path / "a.pt2")]) == 2
    assert "best.pt or last.pt" in capsys.readouterr().err
    assert main(["export", str(pruned_run), "--out", str(tmp_path / "missing" / "a.pt2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["export", str(pruned_run), "--out", str(blocker / "a.pt2")]) == 2
    assert main(["export", str(pruned_run), "--out", str(tmp_path / "a.tflite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("elanet export: error:") for e in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_run", "file"]


def test_fold_attention_bn_only_where_a_stage_keeps_one_block():
    model = create_model("resnet20_ela").eval()
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0), m.weight.data.normal_(), m.bias.data.normal_()
    set_mask(model, [True, True, True, False, True, False])  # stage 1 keeps two blocks, stages 2 and 3 one each
    folded = fold_attention_bn(strip_pruned(model))
    kept = [m for m in folded.modules() if isinstance(m, MRLABase)]
    assert [isinstance(m.bn, torch.nn.Identity) for m in kept] == [False, False, True, True]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_inference_model_swaps_in_the_inference_forms_with_the_same_outputs():
    model = create_model("resnet20_ela").eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0), m.weight.data.normal_(), m.bias.data.normal_()
    set_mask(model, [True, True, True, False, True, False])  # stage 1 keeps two blocks, stages 2 and 3 one each
    fast = inference_model(model)
    kinds = [type(b.attn).__name__ for s in fast.stages for b in s if b.attn is not None]
    assert kinds == ["InferenceMRLA", "InferenceMRLA", "LoneValue", "LoneValue"]
    assert [s.context is None for s in fast.stages] == [False, True, True]  # lone blocks need no stage memory
    assert {type(b.attn).__name__ for s in model.stages for b in s} == {"MRLABase"}  # the source model is unchanged
    for batch in (1, 3):  # batch 1 is what the inference forms are for
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    from elanet.kernels import epilogue_lib

    lib = epilogue_lib()
    if lib is None:
        return
    calls = {"elanet_epi_forward": 0, "elanet_dw_forward": 0}
    native = {name: getattr(lib, name) for name in calls}

    def counting(name):
        def call(*args):
            calls[name] += 1
            return native[name](*args)
        return call

    for name in calls:
        setattr(lib, name, counting(name))
    try:  # channels-last, no gradients: InferenceMRLA's value conv and its BN + ReLU + add are native, same outputs
        fast = fast.to(memory_format=torch.channels_last)
        x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
        # stage 1: two InferenceMRLA blocks (value conv + epilogue each); stages 2 and 3: one lone block each
        assert calls == {"elanet_epi_forward": 2, "elanet_dw_forward": 4}
    finally:
        for name, fn in native.items():
            setattr(lib, name, fn)


def test_lone_value_native_kernel_equals_its_aten_form_and_stays_out_of_exported_graphs():
    """LoneValue runs eagerly as one native pass (x + ReLU(conv(x) + b)) where it applies, the same
    function as the conv, ReLU and add that traced graphs keep; anything else falls back to those."""
    from elanet.export import LoneValue
    from elanet.kernels import epilogue_lib

    if epilogue_lib() is None:
        pytest.skip("native kernels unavailable here")
    torch.manual_seed(0)
    cl = torch.channels_last
    calls = []
    lib = epilogue_lib()
    native = lib.elanet_dw_forward

    def counting(*args):
        calls.append(1)
        return native(*args)

    lib.elanet_dw_forward = counting
    try:
        for c, h, w, batch in ((64, 32, 32, 1), (128, 16, 16, 3), (8, 1, 1, 2), (16, 5, 1, 2), (24, 1, 7, 1)):
            conv = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
            lone = LoneValue(conv)
            x = torch.randn(batch, c, h, w).contiguous(memory_format=cl)
            with torch.no_grad():
                want = x + torch.relu(F.conv2d(x, conv.weight, conv.bias, padding=1, groups=c))
                n = len(calls)
                got = lone(x, None, None)
                assert len(calls) == n + 1 and got.is_contiguous(memory_format=cl)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # new parameters (as load_state_dict writes them) are picked up
            conv.weight.mul_(-2.0)
            torch.testing.assert_close(lone(x, None, None), x + torch.relu(conv(x)), rtol=1e-5, atol=1e-5)
        n = len(calls)
        conv = torch.nn.Conv2d(12, 12, 3, padding=1, groups=12)  # 12 channels: not a multiple of the 8-wide vectors
        x12 = torch.randn(2, 12, 6, 6)
        with torch.no_grad():
            LoneValue(conv)(x12.contiguous(memory_format=cl), None, None)
            LoneValue(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8))(torch.randn(2, 8, 6, 6), None, None)  # NCHW
        out = LoneValue(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8))(torch.randn(2, 8, 6, 6).contiguous(memory_format=cl),
                                                                          None, None)  # with gradients
        assert out.requires_grad and len(calls) == n
        model = create_model("resnet20_ela", num_classes=4).eval()
        set_mask(model, [True, False, True, False, True, False])  # every prunable block pruned: three lone blocks
        fast = inference_model(model).to(memory_format=cl)
        with torch.no_grad():
            program = torch.export.export(fast, (torch.randn(2, 3, 16, 16).contiguous(memory_format=cl),), strict=False)
        assert len(calls) == n  # tracing took the ATen form
        assert profile(fast, (3, 16, 16)).macs == profile(inference_model(model), (3, 16, 16)).macs  # so does the MAC count
        assert len(calls) == n
        depthwise = [node for node in program.graph.nodes if node.op == "call_function" and str(node.target) == "aten.conv2d.default"
                     and node.args[1].meta["val"].shape[1] == 1]
        assert len(depthwise) == 3  # the three value convs, as ATen convolutions
    finally:
        lib.elanet_dw_forward = native
