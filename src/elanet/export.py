"""Export a (pruned) model for deployment: the attention of pruned blocks removed, as .pt2 or ONNX.

A pruned ELA block does no attention work (paper eq. 16), but during training it keeps its
parameters so that the mask can be checkpointed and resumed. :func:`strip_pruned` makes that
removal physical: the attention module of every pruned block is deleted, so its parameters are
gone from the model; :func:`fold_attention_bn` folds the attention BN of a stage's only remaining
block into its value convolution; :func:`specialise_attention` swaps every remaining attention module
for an inference form with fewer small ops (what dominates at batch 1). :func:`inference_model` does
all three. :func:`export_model` then traces that model in eval mode with
``torch.export`` (batch size dynamic, image size fixed) and writes

- ``.pt2``: a ``torch.export`` program, loadable with ``torch.export.load`` alone (no elanet);
- ``.onnx``: the same graph as ONNX (needs the ``onnx`` extra: onnx, onnxscript, onnxruntime).

The file is written atomically, next to its destination then renamed, after its outputs were
checked against the model's eval-mode outputs. :func:`load_exported` reads either format back as a
module with the metadata saved beside the graph (model name, classes, normalisation, ...).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .attention import LayerMemory, MRLABase
from .attention.epilogue import _geometry
from .kernels import epilogue_lib
from .profile import Profile, profile

__all__ = ["FORMATS", "ExportReport", "strip_pruned", "fold_attention_bn", "specialise_attention", "inference_model",
           "InferenceMRLA", "LoneValue", "export_model", "load_exported", "ExportedModel",
           "share_onnxruntime_threads"]

FORMATS = (".pt2", ".onnx")
META_KEY = "elanet.json"  # the metadata entry: an extra file of the .pt2 archive, a metadata_props key in ONNX
EXPORT_FORMAT = "elanet-export-v1"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_model` wrote: sizes before / after removing pruned attention, and the check.

    ``before`` profiles the model as given: its parameters include the pruned attention, its MACs
    do not (a pruned block already skips that work); ``unpruned_macs`` is the cost with every block
    active, i.e. what pruning saved.
    """

    path: Path
    before: Profile
    after: Profile
    unpruned_macs: int
    removed_modules: int
    max_abs_diff: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        b, a = self.before, self.after
        return (f"params {b.mparams:.4f}M -> {a.mparams:.4f}M ({b.params - a.params:,d} removed with "
                f"{self.removed_modules} pruned attention modules) | GMACs {b.gmacs:.4f} -> {a.gmacs:.4f} "
                f"(unpruned {self.unpruned_macs / 1e9:.4f}) | max |exported - model| {self.max_abs_diff:.2e} | wrote {self.path}")


def strip_pruned(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode without the attention module of any pruned block.

    A pruned block already returns its plain residual output (paper eq. 16); here its ``attn``
    attribute becomes ``None``, so its parameters leave the model. The input model is unchanged.
    """
    stripped = copy.deepcopy(model).eval()
    for block in stripped.modules():
        attn = getattr(block, "attn", None)
        if isinstance(attn, MRLABase) and not attn.active:
            block.attn = None
    return stripped


@torch.no_grad()
def fold_attention_bn(model: nn.Module) -> nn.Module:
    """Fold the eval-mode attention BN of every stage's *only* active MRLA-B / ELA block into its value conv.

    Such a block retrieves from itself alone: its attention is a softmax over one layer, exactly 1,
    so its branch is ``ReLU(BN(conv_v(x)))`` and the per-channel affine BN folds into the depthwise
    kernel and a bias (one full-size pass less). Where a stage keeps several active blocks, a value
    is also read by later blocks under their own BN, so nothing is folded there. In place; for
    inference only (the running statistics are frozen in).
    """
    from .models.resnet import Stage

    for stage in model.modules():
        if not isinstance(stage, Stage):
            continue
        active = [m for m in stage.modules() if isinstance(m, MRLABase) and m.active]
        if len(active) != 1 or not isinstance(active[0].bn, nn.BatchNorm2d) or not active[0].bn.track_running_stats:
            continue
        m = active[0]
        bn, conv = m.bn, m.conv_v
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                          groups=conv.groups, bias=True).to(conv.weight.device, conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        m.conv_v, m.bn = fused, nn.Identity()
    return model


def _eager_cpu_channels_last(x: Tensor) -> bool:
    """Whether an inference form may run ``x`` through the native kernels: eager, no gradients, float32
    channels-last on the CPU; traced graphs and dispatch modes (e.g. the MAC counter of
    :func:`elanet.profile.profile`) take the ATen operators."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not is_in_torch_dispatch_mode())


class _TapMajor:
    """A depthwise 3x3 conv's weight tap-major ``[9, C]`` (and its bias) for the native kernels, or
    ``None`` where they do not apply; made again whenever the parameters change (storage or version)."""

    __slots__ = ("key", "packed")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.packed: tuple[Tensor, Tensor | None] | None = None

    def __call__(self, conv: nn.Conv2d, channels: int) -> tuple[Tensor, Tensor | None] | None:
        w, bias = conv.weight, conv.bias
        key = (channels, w.data_ptr(), w._version, None if bias is None else (bias.data_ptr(), bias._version))
        if self.key != key:
            ok = (type(conv) is nn.Conv2d and w.dtype == torch.float32 and w.device.type == "cpu" and channels % 8 == 0
                  and (bias is None or bias.dtype == torch.float32) and conv.groups == channels == w.shape[0]
                  and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
                  and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and epilogue_lib() is not None)
            self.key = key
            self.packed = (w.detach().reshape(channels, 9).t().contiguous(),
                           None if bias is None else bias.detach().contiguous()) if ok else None
        return self.packed


def _native_depthwise(x: Tensor, conv: nn.Conv2d, taps: _TapMajor, *, lone: bool) -> Tensor | None:
    """``conv(x)``, or with ``lone`` ``x + ReLU(conv(x))``, in one pass of the native depthwise kernel;
    ``None`` where it does not apply. The caller has checked :func:`_eager_cpu_channels_last`."""
    if conv._forward_hooks or conv._forward_pre_hooks:  # the kernel would bypass them
        return None
    packed = taps(conv, x.shape[1])
    if packed is None:
        return None
    b, c, h, w = x.shape
    out = torch.empty_like(x, memory_format=torch.channels_last)
    if epilogue_lib().elanet_dw_forward(x.data_ptr(), b, h, w, c, packed[0].data_ptr(),
                                        None if packed[1] is None else packed[1].data_ptr(), int(lone), out.data_ptr(), None):
        raise MemoryError("the native depthwise kernel could not allocate its zero row")
    return out


class InferenceMRLA(MRLABase):
    """An active MRLA-B / ELA block in eval mode with fewer small ops (eq. 5, same function).

    The query and key convs are one conv with two output channels, the query's weights carrying the
    ``1 / sqrt(d)`` scale; the descriptor is one ``mean``; the stage's first block (a softmax over
    one layer, exactly 1) skips the query. Run eagerly on float32 channels-last CPU tensors without
    gradients, the value convolution is the native depthwise kernel (``kernels/depthwise.c``) and the
    BN, ReLU and residual add after the retrieval are one pass of the native epilogue
    (``kernels/epilogue.c``). Built by :func:`specialise_attention`; inference only (no DropPath, no
    recorder, no gradients to its convs).
    """

    def __init__(self, m: MRLABase) -> None:
        super().__init__(m.channels, head_dim=m.head_dim, prunable=m.prunable)
        del self.conv_q, self.conv_k
        self.conv_qk = nn.Conv1d(1, 2, m.kernel_size, padding=m.kernel_size // 2, bias=False).to(m.conv_q.weight)
        with torch.no_grad():
            self.conv_qk.weight.copy_(torch.cat((m.conv_q.weight * m.scale, m.conv_k.weight)))
        self.conv_v, self.bn = m.conv_v, m.bn
        self.block_index, self.stage_index, self.first_in_stage = m.block_index, m.stage_index, m.first_in_stage
        self._affine: tuple[tuple, tuple[Tensor, Tensor] | None] | None = None  # (key, eval BN scale / shift or None)
        self._taps = _TapMajor()
        self.eval()

    def forward(self, x: Tensor, identity: Tensor | None, memory: LayerMemory) -> Tensor:
        b = x.shape[0]
        qk = self.conv_qk(x.mean((2, 3)).unsqueeze(1)).view(b, 2, self.heads, self.head_dim)
        memory.keys.append(qk[:, 1])
        if len(memory.keys) == 1:  # the stage's first value: its weight is exactly 1
            attn = x.new_ones((b, self.heads, 1))
        else:
            keys = torch.stack(memory.keys, dim=2)  # [B, heads, n, d]
            attn = torch.matmul(qk[:, 0].unsqueeze(2), keys.transpose(-1, -2)).squeeze(2).softmax(dim=-1)
        native = _eager_cpu_channels_last(x)
        value = _native_depthwise(x, self.conv_v, self._taps, lone=False) if native else None  # one oneDNN call less
        out = memory.retrieve(attn, self.conv_v(x) if value is None else value)
        if native and out.is_contiguous(memory_format=torch.channels_last):
            affine = self._bn_affine()
            if affine is not None:  # BN, ReLU and the add in one pass of the native epilogue
                res = torch.empty_like(x, memory_format=torch.channels_last)
                epilogue_lib().elanet_epi_forward(out.data_ptr(), *_geometry(out), x.data_ptr(), affine[0].data_ptr(),
                                                  affine[1].data_ptr(), None, 1, res.data_ptr())
                return res
        return x + F.relu(self.bn(out), inplace=True)

    def _bn_affine(self) -> tuple[Tensor, Tensor] | None:
        """The eval BN as float32 ``(scale, shift)`` for the native epilogue, or ``None`` where it does not
        apply; made again whenever the BN's parameters or statistics change."""
        bn = self.bn
        if type(bn) is not nn.BatchNorm2d or bn.training or not bn.affine or bn.running_var is None:
            return None
        tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._affine is None or self._affine[0] != key:
            ok = all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and epilogue_lib() is not None
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            self._affine = key, ((scale.contiguous(), (bn.bias.detach() - bn.running_mean * scale).contiguous()) if ok else None)
        return self._affine[1]


class LoneValue(nn.Module):
    """A stage's only active MRLA-B / ELA block in eval mode: ``x + ReLU(conv_v'(x))`` (eq. 5 with n = 1).

    A softmax over one layer is exactly 1, so the block's output is its own value: the query, key,
    softmax and the stage memory drop out, and ``conv_v'`` carries the folded BN
    (:func:`fold_attention_bn`). Built by :func:`specialise_attention`.

    Run eagerly on float32 channels-last CPU tensors without gradients, the whole block is one pass
    of the native kernel (``kernels/depthwise.c``, ``elanet_dw_forward`` with ``lone``): at batch 1
    a oneDNN call costs more than 100 µs inside a model whatever its size, which made the three such
    blocks of a fully pruned ResNet-56 cost 6-8 % of the plain forward. Traced graphs (``torch.export``,
    ONNX, ``torch.compile``) and dispatch modes (the MAC counter of :func:`elanet.profile.profile`) keep the
    convolution, ReLU and add as ATen operators.
    """

    position = "output"  # attaches where MRLA-B did (attention/context.py)
    takes_state = True

    def __init__(self, conv_v: nn.Conv2d) -> None:
        super().__init__()
        self.conv_v = conv_v
        self._taps = _TapMajor()

    def forward(self, x: Tensor, identity: Tensor | None, memory: Any) -> Tensor:
        out = _native_depthwise(x, self.conv_v, self._taps, lone=True) if _eager_cpu_channels_last(x) else None
        return x + F.relu(self.conv_v(x), inplace=True) if out is None else out


def specialise_attention(model: nn.Module) -> nn.Module:
    """Swap each active MRLA-B / ELA module of an eval model for its inference form, in place.

    A block whose BN :func:`fold_attention_bn` folded becomes a :class:`LoneValue`; every other
    active block an :class:`InferenceMRLA`; a stage left without retrievals drops its memory context.
    Outputs are unchanged up to float rounding; for inference only. Run it after :func:`strip_pruned` and :func:`fold_attention_bn`.
    """
    from .attention.layer import StageMemory
    from .models.resnet import Stage

    for block in list(model.modules()):
        m = getattr(block, "attn", None)
        if not isinstance(m, MRLABase) or isinstance(m, InferenceMRLA) or not m.active:
            continue
        block.attn = LoneValue(m.conv_v) if isinstance(m.bn, nn.Identity) else InferenceMRLA(m)
    for stage in model.modules():  # a stage left without retrievals needs no memory (StageMemory has no parameters)
        if isinstance(stage, Stage) and isinstance(stage.context, StageMemory) and \
                not any(isinstance(b.attn, MRLABase) for b in stage if getattr(b, "attn", None) is not None):
            stage.context = None
    return model


def inference_model(model: nn.Module) -> nn.Module:
    """The model ``elanet export`` writes: a copy in eval mode with pruned attention removed, the lone
    blocks' BN folded and the attention in its inference form (:func:`strip_pruned`,
    :func:`fold_attention_bn`, :func:`specialise_attention`). The input model is unchanged."""
    return specialise_attention(fold_attention_bn(strip_pruned(model)))


def _removed(model: nn.Module) -> int:
    return sum(isinstance(m, MRLABase) and not m.active for m in model.modules())


def _check_out(path: Path) -> None:
    if path.suffix not in FORMATS:
        raise ValueError(f"cannot tell the format of {path}: end --out with {' or '.join(FORMATS)}")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"output folder {parent} does not exist: create it or choose another --out")
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a file name ending in {path.suffix}")
    try:  # a real write test (access() says yes to root everywhere)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise ValueError(f"cannot write into {parent} ({e.strerror}): choose another --out") from None
    os.close(fd)
    os.unlink(probe)


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: Sequence[int],
    metadata: dict[str, Any] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-5,
) -> ExportReport:
    """Strip pruned attention from ``model``, fold its attention BN, trace it with ``torch.export``, write ``path``.

    The batch dimension stays dynamic; channels and image size are fixed to ``input_size``.
    Before the file is put in place its outputs are compared with ``model``'s eval-mode outputs on
    a random batch (the .onnx file through onnxruntime); a difference above
    ``atol + rtol * max|output|`` is an error.

    Args:
        model: any elanet model (its ELA mask decides what is removed); left unchanged.
        path: destination ending in ``.pt2`` or ``.onnx``; its folder must exist and be writable.
        input_size: ``(C, H, W)`` of one input image.
        metadata: JSON-serialisable facts stored with the graph (e.g. classes, mean / std).
        atol, rtol: accepted difference between exported and eager outputs (absolute, and relative
            to the largest output magnitude).

    Raises:
        ValueError: unknown suffix, missing or unwritable folder, or outputs that do not match.
        ImportError: ``.onnx`` without the ``onnx`` extra installed.
    """
    path = Path(path)
    _check_out(path)
    if path.suffix == ".onnx":
        _onnx_modules()  # fail before the (slow) trace when the extra is missing
    size = tuple(int(s) for s in input_size)
    before = profile(model, size)
    removed = _removed(model)
    stripped = inference_model(model)
    after = profile(stripped, size)
    unpruned = copy.deepcopy(model)
    for m in unpruned.modules():
        if isinstance(m, MRLABase):
            m.active = True
    unpruned_macs = profile(unpruned, size).macs
    del unpruned
    meta = {"format": EXPORT_FORMAT, "input_size": list(size), "params_before": before.params, "params": after.params,
            "macs_unpruned": unpruned_macs, "macs_before": before.macs, "macs": after.macs, **(metadata or {})}

    param = next(model.parameters(), None)
    x = torch.randn(2, *size, device=param.device if param is not None else "cpu")
    batch = torch.export.Dim("batch", min=1, max=65536)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x)
            program = torch.export.export(stripped, (x,), dynamic_shapes=({0: batch},), strict=False)
    finally:
        model.train(was_training)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if path.suffix == ".pt2":
            torch.export.save(program, tmp, extra_files={META_KEY: json.dumps(meta)})
        else:
            _save_onnx(program, x, tmp, meta)
        got = load_exported(tmp)[0](x)
        diff = (got.to(expected.device) - expected).abs().max().item()
        limit = atol + rtol * expected.abs().max().item()
        if not diff <= limit:
            raise ValueError(f"exported outputs differ from the model's by {diff:.3g} (> {limit:.3g}); nothing was written")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportReport(path, before, after, unpruned_macs, removed, diff, meta)


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - the exporter needs it
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx extra ({e.name} is missing): pip install 'elanet[onnx]'") from None
    return onnx, onnxruntime


def _save_onnx(program: torch.export.ExportedProgram, x: Tensor, path: Path, meta: dict[str, Any]) -> None:
    onnx, _ = _onnx_modules()
    batch = torch.export.Dim("batch", min=1, max=65536)
    onnx_program = torch.onnx.export(program, (x,), dynamo=True, dynamic_shapes=({0: batch},), input_names=["images"],
                                     output_names=["logits"], verbose=False)
    proto = onnx_program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.save(proto, str(path))


_shared_pool: list[int] = []  # the size of onnxruntime's process-wide thread pool, once made


def share_onnxruntime_threads(threads: int) -> None:
    """Run every onnxruntime session of this process on one shared pool of ``threads`` threads.

    Several sessions with threads of their own, run one after another, leave their idle threads
    spinning against the next session's on a small machine (``elanet bench --runtime onnxruntime``
    times ten of them interleaved). Process-wide and for good: onnxruntime then refuses any session
    with threads of its own, so every later session must set ``use_per_session_threads = False``
    (:func:`load_exported` does). The first call sets the size; later calls change nothing.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if not _shared_pool:
        _onnx_modules()
        from onnxruntime.capi import _pybind_state  # the only handle on the global pool in the Python API

        _pybind_state.set_global_thread_pool_sizes(threads, 1)
        _shared_pool.append(threads)


def _session_options(ort, threads: int | None):
    options = ort.SessionOptions()
    if _shared_pool:
        options.use_per_session_threads = False
    elif threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return options


class ExportedModel(nn.Module):
    """An exported graph as a module: ``model(images) -> logits`` (eval mode only).

    ``train()`` / ``eval()`` only set the flag: the graph is traced in eval mode and stays so.
    """

    def __init__(self, run, metadata: dict[str, Any], graph: nn.Module | None = None) -> None:
        super().__init__()
        self.graph = graph
        self._run = run
        self.metadata = metadata
        self.training = False

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x)


def load_exported(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", threads: int | None = None
) -> tuple[ExportedModel, dict[str, Any]]:
    """Load a ``.pt2`` or ``.onnx`` file written by :func:`export_model`: the module and its metadata.

    ONNX runs through onnxruntime on the CPU; inputs on another device are copied over and back.
    The session has ``threads`` intra-op threads of its own (onnxruntime's default, one per core,
    when ``None``), or runs on the shared pool once :func:`share_onnxruntime_threads` made one.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a file written by ``elanet export``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist: write it with `elanet export`")
    if path.suffix == ".pt2":
        extra = {META_KEY: ""}
        try:
            program = torch.export.load(path, extra_files=extra)
        except Exception as e:  # noqa: BLE001 - any unreadable archive is the same user error
            raise ValueError(f"{path} is not a readable torch.export program ({type(e).__name__}): export it again") from None
        meta = json.loads(extra[META_KEY]) if extra[META_KEY] else {}
        graph = program.module().to(device)
        return ExportedModel(graph, meta, graph), meta
    if path.suffix == ".onnx":
        onnx, ort = _onnx_modules()
        try:
            proto = onnx.load(str(path), load_external_data=False)
            options = _session_options(ort, threads)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path} is not a readable ONNX model ({type(e).__name__}): export it again") from None
        meta = next((json.loads(p.value) for p in proto.metadata_props if p.key == META_KEY), {})
        name = session.get_inputs()[0].name

        def run(x: Tensor) -> Tensor:
            out = session.run(None, {name: x.detach().cpu().float().numpy()})[0]
            return torch.from_numpy(out).to(x.device)

        return ExportedModel(run, meta), meta
    raise ValueError(f"cannot load {path}: exported models end in {' or '.join(FORMATS)}")
