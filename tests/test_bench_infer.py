"""elanet bench --mode infer: variants, exported (stripped) ELA sizes, the target arithmetic, the JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from elanet.bench import infer_targets
from elanet.cli import main


def _row(variant: str, t: float, f: float | None = None, batch: int = 1) -> dict:
    return {"depth": 56, "batch_size": batch, "variant": variant, "pruned_fraction": f, "median_s": t}


def test_infer_target_is_the_issue_formula():
    # plain 100 ms, MRLA-B 160 ms (overhead 60); at f = 0.5 the limit is 0.5 * 60 + 5 = 35 ms of overhead
    rows = infer_targets([_row("plain", 0.100), _row("MRLA-B", 0.160), _row("ELA 50% exported", 0.134, 0.5),
                          _row("ELA 100% exported", 0.106, 1.0)])
    assert [r["limit_s"] for r in rows] == pytest.approx([0.035, 0.005])
    assert [r["overhead_s"] for r in rows] == pytest.approx([0.034, 0.006])
    assert [r["met"] for r in rows] == [True, False]


def test_infer_target_takes_each_variant_at_its_faster_layout():
    rows = [_row("plain", 0.100) | {"memory_format": "contiguous", "best_layout": False},
            _row("plain", 0.080) | {"memory_format": "channels_last", "best_layout": True},
            _row("MRLA-B", 0.150) | {"memory_format": "contiguous", "best_layout": True},
            _row("MRLA-B", 0.160) | {"memory_format": "channels_last", "best_layout": False},
            _row("ELA 100% exported", 0.083) | {"pruned_fraction": 1.0, "memory_format": "channels_last", "best_layout": True},
            _row("ELA 100% exported", 0.101) | {"pruned_fraction": 1.0, "memory_format": "contiguous", "best_layout": False}]
    (t,) = infer_targets(rows)  # 83 - 80 = 3 ms over plain's faster layout; limit 5 % of 80 = 4 ms
    assert t["memory_format"] == "channels_last" and t["overhead_s"] == pytest.approx(0.003)
    assert t["limit_s"] == pytest.approx(0.004) and t["met"]


def test_bench_infer_command(tmp_path, capsys):
    out = tmp_path / "infer.json"
    argv = ["bench", "--mode", "infer", "--depths", "20", "--batch-sizes", "1", "3", "--steps", "1", "--warmup", "0",
            "--threads", "1", "--image-size", "16", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "elanet-bench-infer/1" and report["command"].startswith("elanet bench --mode infer")
    res = report["results"]
    labels = ["plain", "MRLA-B", "ELA 0% exported", "ELA 50% exported", "ELA 100% exported"]
    per_batch = [v for v in labels for _ in ("contiguous", "channels_last")]
    assert [r["variant"] for r in res] == per_batch * 2 and [r["batch_size"] for r in res] == [1] * 10 + [3] * 10
    assert [r["memory_format"] for r in res[:2]] == ["contiguous", "channels_last"]
    for b in (1, 3):  # exactly one faster layout per variant and batch size
        assert sum(r["best_layout"] for r in res if r["batch_size"] == b) == 5
    params = {r["variant"]: r["mparams"] for r in res[:10]}
    # pruning removes attention parameters from the exported model; unpruned ELA is MRLA-B's size
    assert params["plain"] < params["ELA 100% exported"] < params["ELA 50% exported"] < params["ELA 0% exported"] == params["MRLA-B"]
    assert len(report["targets"]) == 6 and all(isinstance(t["met"], bool) for t in report["targets"])
    assert main(["bench", "--mode", "infer", "--run", str(tmp_path), "--out", str(out)]) == 2
    assert "belong to --mode train" in capsys.readouterr().err


def test_bench_infer_onnxruntime_times_every_variant_as_an_onnx_file(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "infer.json"
    argv = ["bench", "--mode", "infer", "--runtime", "onnxruntime", "--depths", "20", "--batch-sizes", "1", "2",
            "--steps", "1", "--warmup", "0", "--threads", "1", "--image-size", "16", "--out", str(out), "--quiet"]
    # its own process: the benchmark puts every onnxruntime session of its process on one shared pool
    done = subprocess.run([sys.executable, "-m", "elanet", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "every variant exported to ONNX and run by onnxruntime" in done.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["runtime"] == "onnxruntime" and "--runtime onnxruntime" in report["command"]
    assert "onnxruntime" in report["versions"]
    res = report["results"]  # one layout per variant: the graph does not depend on it
    assert len(res) == 10 and all(r["best_layout"] and r["memory_format"] == "contiguous" for r in res)
    params = {r["variant"]: r["mparams"] for r in res[:5]}
    assert params["plain"] < params["ELA 100% exported"] < params["ELA 50% exported"] < params["ELA 0% exported"]
    assert len(report["targets"]) == 6 and all(t["overhead_s"] == t["overhead_s"] for t in report["targets"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infer.json"]  # the exported files were temporary


def test_bench_infer_onnxruntime_refuses_compile_and_cuda():
    from elanet.bench import make_infer_variants, run_infer_benchmark

    with pytest.raises(ValueError, match="--device cpu, without --compile"):
        run_infer_benchmark(make_infer_variants([20])[:1], runtime="onnxruntime", compile=True)
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        run_infer_benchmark(make_infer_variants([20])[:1], runtime="tensorrt")
