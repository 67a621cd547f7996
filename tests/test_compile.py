"""torch.compile: compiled training steps match eager ones for every variant, before and after pruning.

The step test compiles with the ``aot_eager`` backend: the same graph capture (dynamo) and compiled
autograd (AOTAutograd) as the default inductor backend, without the minutes of C++ code generation
on a shared 2-core CPU. ``elanet bench --compile`` exercises inductor (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from elanet import create_model
from elanet.attention import MRLABase
from elanet.cli import main
from elanet.pruning import get_mask, set_mask


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["resnet20_ela"])  # the variant with the stage memory and a mask; others compile plainly
def test_compiled_step_matches_eager_before_and_after_pruning(name):
    torch._dynamo.reset()
    eager = create_model(name, num_classes=5)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    masks = [None] + ([[True, False, True, True, True, False]] if name.endswith("_ela") else [])
    for mask in masks:
        if mask is not None:  # a pruning round: the guards on the blocks' `active` flags trigger a recompile
            set_mask(eager, mask)
            set_mask(model, mask)
        for m in (eager, model):
            m.zero_grad(set_to_none=True)
        loss_c = F.cross_entropy(compiled(x), y)
        loss_c.backward()
        loss_e = F.cross_entropy(eager(x), y)
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        gc, ge = _grads(model), _grads(eager)
        assert [k for k, g in gc.items() if g is None] == [k for k, g in ge.items() if g is None]
        for k, g in ge.items():
            if g is not None:
                torch.testing.assert_close(gc[k], g, rtol=1e-4, atol=1e-6, msg=f"{name}: gradient of {k}")
        if mask is not None:  # pruned blocks get no gradient, active attention does
            pruned = [m for m in model.modules() if isinstance(m, MRLABase) and not m.active]
            assert pruned and all(p.grad is None for m in pruned for p in m.parameters())
        if name.endswith(("_mrla_b", "_ela")):  # the value path always learns; queries wherever a block has >1 layer
            grads = {n: p.grad for n, p in model.named_parameters() if ".attn." in n and p.grad is not None}
            assert all(g.abs().sum() > 0 for n, g in grads.items() if "conv_v" in n)
            assert any(g.abs().sum() > 0 for n, g in grads.items() if "conv_q" in n)


def test_train_compile_flag_prunes_and_finishes(tmp_path, monkeypatch):
    """`elanet train --compile` end to end through a pruning round (graph capture only here: backend 'eager')."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    run = tmp_path / "run"
    argv = ["train", "--model", "resnet20_ela", "--dataset", "digits", "--out", str(run), "--epochs", "2",
            "--warmup-epochs", "0", "--lr", "0.02", "--windows", "1-1", "--fixed-count", "1", "--strategy", "fixed",
            "--milestones", "2", "--threads", "1", "--workers", "0", "--no-plots", "--no-tensorboard", "--compile"]
    assert main(argv) == 0
    from elanet.training.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["compile"] is True and ckpt["epoch"] == 2
    assert get_mask(model_from_checkpoint(ckpt)).count(False) == 1
