"""The benchmark: masks, run-folder masks, memory accounting, and one tiny run of ``elanet bench``."""
from __future__ import annotations

import json

import pytest
import torch

import elanet
from elanet.bench import make_variants, peak_memory, run_mask, spread_mask
from elanet.cli import main
from elanet.pruning import ela_blocks


# 33 prunable blocks; k = round(f * 33) of them at positions int((j + 0.5) * 33 / k), by hand
@pytest.mark.parametrize("fraction, count, first", [(0.0, 0, []), (0.25, 8, [2, 6, 10, 14]), (0.5, 17, [0, 2, 4, 6]), (1.0, 33, [0, 1, 2, 3])])
def test_spread_mask_prunes_evenly_and_never_a_stage_first_block(fraction, count, first):
    model = elanet.create_model("resnet110_ela")  # 3 stages x 12 blocks
    mask = spread_mask(model, fraction)
    firsts = [b.first_in_stage for b in ela_blocks(model)]
    candidates = [i for i, f in enumerate(firsts) if not f]
    assert len(candidates) == 33 and all(on for on, f in zip(mask, firsts) if f)
    off = [candidates.index(i) for i, on in enumerate(mask) if not on]  # positions among the prunable blocks
    assert len(off) == count and off[:4] == first
    gaps = [b - a for a, b in zip(off, off[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spread
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        spread_mask(model, 1.5)


def test_run_mask_reads_the_last_round(tmp_path):
    model = elanet.create_model("resnet20_ela")
    rounds = [{"round": 1, "mask": [True, False, True, True, True, True]}, {"round": 2, "mask": [True, False, True, False, True, True]}]
    (tmp_path / "pruning.json").write_text(json.dumps({"model": "resnet20_ela", "rounds": rounds}))
    assert run_mask(tmp_path) == ("resnet20_ela", rounds[1]["mask"])
    run = [v for v in make_variants([56], run_dir=tmp_path) if v.label == "ELA run"]
    assert [(v.model, v.depth, v.mask, v.pruned_fraction) for v in run] == [("resnet20_ela", 20, rounds[1]["mask"], pytest.approx(2 / 3))]  # 2 of the prunable 1, 3, 5
    elanet.set_mask(model, run[0].mask)

    (tmp_path / "pruning.json").write_text(json.dumps({"model": "resnet20_ela", "rounds": []}))
    assert run_mask(tmp_path) == ("resnet20_ela", None)
    (tmp_path / "pruning.json").write_text(json.dumps({"model": "resnet20_mrla_b", "rounds": []}))
    with pytest.raises(ValueError, match="not an ELA model"):
        make_variants([20], run_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="pruning.json"):
        run_mask(tmp_path / "missing")


def test_variants_per_depth():
    variants = make_variants([20, 56], fractions=(0.0, 1.0))
    labels = ["plain", "MRLA-L", "MRLA-B", "ELA 0%", "ELA 100%", "ELA 0% +KL", "DIA"]
    assert [v.label for v in variants] == labels * 2
    assert [v.depth for v in variants] == [20] * 7 + [56] * 7
    assert [v.pruned_fraction for v in variants[:7]] == [None, None, None, 0.0, 1.0, 0.0, None]
    assert [v.measure_kl for v in variants[:7]] == [False] * 5 + [True, False]
    with pytest.raises(ValueError, match="no ResNet-57"):
        make_variants([57])
    # DIA has no ImageNet model: the default leaves it out there
    assert [v.label for v in make_variants([50], fractions=(0.5,), measure_kl=False)] == ["plain", "MRLA-L", "MRLA-B", "ELA 50%"]


def test_any_registered_variant_and_torchvision():
    variants = make_variants([56], variants=["se", "dla_l", "bam", "plain"])
    assert [(v.model, v.label) for v in variants] == [
        ("resnet56_se", "SE"), ("resnet56_dla_l", "DLA-L"), ("resnet56_bam", "BAM"), ("resnet56", "plain")]
    assert [v.model for v in make_variants([50], variants=["plain", "torchvision", "rla"])] == [
        "resnet50", "torchvision:resnet50", "resnet50_rla"]
    with pytest.raises(ValueError, match="unknown variant.*use any of plain, mrla_l"):
        make_variants([56], variants=["sk"])
    with pytest.raises(ValueError, match="RLA has no model on resnet56"):
        make_variants([56], variants=["rla"])
    with pytest.raises(ValueError, match="torchvision has no CIFAR"):
        make_variants([56], variants=["torchvision"])


def test_peak_memory_counts_what_a_step_allocates():
    keep = []

    def step():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # +2 MB = 6 MB
        del a  # 2 MB
        keep.append(torch.empty(2_000_000))  # +8 MB = 10 MB at the peak
        del b

    assert peak_memory(step, torch.device("cpu")) == 10_000_000
    keep.clear()  # freed outside the measurement: must not shift the next one
    assert peak_memory(step, torch.device("cpu")) == 10_000_000


def test_elanet_bench_tiny_run_writes_well_formed_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--depths", "20", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--image-size", "16",
            "--threads", "1", "--fractions", "0", "0.5", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["schema"] == "elanet-bench/2" and report["command"].startswith("elanet bench --depths 20")
    assert report["settings"]["batch_size"] == 2 and report["settings"]["threads"] == 1
    assert report["settings"]["memory_formats"] == ["contiguous", "channels_last"]  # both layouts by default
    assert set(report["versions"]) >= {"python", "torch", "elanet"}
    labels = ["plain", "MRLA-L", "MRLA-B", "ELA 0%", "ELA 50%", "ELA 100%", "ELA 0% +KL", "DIA"]
    assert [(r["variant"], r["memory_format"]) for r in report["results"]] == [(v, f) for v in labels for f in ("contiguous", "channels_last")]
    for nchw, nhwc in zip(report["results"][::2], report["results"][1::2]):
        assert nchw["best_layout"] + nhwc["best_layout"] == 1  # exactly one faster layout per variant
        assert nchw["gmacs"] == nhwc["gmacs"] and "NHWC" in table
    res = report["results"][::2]
    for r in res:
        assert r["model"].startswith("resnet20") and r["depth"] == 20
        times = r["step_times_s"]
        assert len(times) == 2 and r["median_step_s"] == pytest.approx(sum(times) / 2) and r["min_step_s"] == min(times)
        assert r["peak_memory_bytes"] > 0 and r["gmacs"] > 0
        assert r["variant"] in table
    by = {r["variant"]: r for r in res}
    assert by["ELA 0%"]["pruned_fraction"] == 0.0 and by["ELA 100%"]["pruned_fraction"] == 1.0 and by["plain"]["pruned_fraction"] is None
    # pruning removes attention MACs and activation memory; MRLA-B and unpruned ELA are the same network
    assert by["plain"]["gmacs"] < by["ELA 100%"]["gmacs"] < by["ELA 50%"]["gmacs"] < by["ELA 0%"]["gmacs"] == by["MRLA-B"]["gmacs"]
    assert by["ELA 100%"]["peak_memory_bytes"] < by["ELA 0%"]["peak_memory_bytes"]
    assert torch.get_num_threads() == 1  # the command restores the thread count


def test_elanet_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--depths", "20", "--steps", "0", "--threads", "1", "--out", str(tmp_path / "b.json")]) == 2
    assert "steps >= 1" in capsys.readouterr().err


def test_memory_format_default_and_override():
    from elanet.training import default_memory_format, resolve_memory_format

    assert default_memory_format("cpu") == torch.channels_last == resolve_memory_format("auto", "cpu")
    assert resolve_memory_format("contiguous", "cpu") == torch.contiguous_format
    with pytest.raises(ValueError, match="channels_last, contiguous"):
        resolve_memory_format("nhwc", "cpu")
    from elanet.training import TrainConfig, run_memory_format

    assert run_memory_format(TrainConfig(), "cpu") == torch.channels_last  # auto
    assert run_memory_format(TrainConfig(memory_format="contiguous"), "cpu") == torch.contiguous_format
    assert run_memory_format(TrainConfig(channels_last=True), "cpu") == torch.channels_last  # an older run's config
    with pytest.raises(ValueError, match="memory_format must be one of"):
        TrainConfig(memory_format="nhwc").validate()
    with pytest.raises(ValueError, match="contradicts"):
        TrainConfig(memory_format="contiguous", channels_last=True).validate()


def test_gpu_script_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu.sh runs its two benchmarks end to end, shrunk onto the CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ELANET_GPU_DRY_RUN": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), str(tmp_path)], env=env, check=True, capture_output=True)
    for name, depth in (("resnet110_cifar.json", 20), ("resnet50_224.json", 50)):
        report = json.loads((tmp_path / name).read_text())
        got = {(r["variant"], r["memory_format"]) for r in report["results"]}
        want = {"plain", "MRLA-L", "MRLA-B", "ELA 0%", "ELA 50%", "ELA 100%"} | ({"DIA"} if f"resnet{depth}_dia" in elanet.list_models() else set())
        assert got == {(v, f) for v in want for f in ("contiguous", "channels_last")}
        assert "--fractions 0 0.5 1" in report["command"] and "--no-kl" in report["command"]


STAND_IN = '''
import torch
import elanet


class _Model(torch.nn.Module):
    def __init__(self, name, depth, num_classes, cuda_state):
        super().__init__()
        self.net, self.cuda_state = elanet.create_model(f"resnet{{depth}}{{name}}", num_classes=num_classes), cuda_state

    def forward(self, x):
        if self.cuda_state:  # as the DLA repository's DIA creates its LSTM state
            x = x + torch.zeros(1).cuda()
        return self.net(x)


def {fn}(depth, num_classes, block_name, drop_path=0.0):
    assert block_name == "Bottleneck"
    return _Model("{suffix}", depth, num_classes, {cuda})
'''


def test_vs_authors_script_times_a_stand_in_checkout(tmp_path):
    """benchmarks/vs_authors.py runs end to end on a checkout laid out like the DLA repository's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    models = tmp_path / "dla" / "image_classification" / "cifar" / "models" / "cifar"
    models.mkdir(parents=True)
    for file, suffix, cuda in (("dia_resnet", "_dia", True), ("mrla_base", "_mrla_b", False), ("mrla_light", "_mrla_l", False)):
        (models / f"{file}.py").write_text(STAND_IN.format(fn=file, suffix=suffix, cuda=cuda))
    out = tmp_path / "vs.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(root / "benchmarks" / "vs_authors.py"), "--dla-repo", str(tmp_path / "dla"), "--depth", "20",
           "--batch-size", "2", "--rounds", "2", "--warmup", "0", "--threads", "1", "--out", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    cases = {(r["who"], r["variant"], r["layout"]): r for r in report["results"]}
    assert len(cases) == 16 and all(len(r["times"]) == 2 for r in cases.values())
    for v in ("DIA", "MRLA-B", "MRLA-L"):  # the stand-ins are elanet's own models: equal counts
        assert cases[("authors", v, "NHWC")]["params"] == cases[("elanet", v, "NCHW")]["params"]
    assert len(report["ratios"]) == 8 and "| elanet ELA 50% (" in run.stdout
    bad = subprocess.run(cmd[:3] + [str(tmp_path)], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "pass --dla-repo the root" in bad.stderr


def test_retrieval_floor_script_counts_the_active_blocks():
    """benchmarks/retrieval_floor.py profiles a small ELA model and counts one active block per stage at 100 % pruned."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "retrieval_floor.py"), "--model", "resnet20_ela",
                          "--pruned", "1", "--batch-size", "4", "--threads", "1", "--steps", "1"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [line.split(":")[1].split(",")[0].strip() for line in run.stdout.splitlines() if line.startswith("stage ")] == \
        ["1 active blocks"] * 3
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    assert "all four" in rows and all(f"`{op}`" in run.stdout for op in ("_ValuePool", "_RetrieveNative"))


def test_lone_value_cost_script_times_every_part():
    """benchmarks/lone_value_cost.py finds the three lone blocks of a fully pruned ResNet-20 ELA and times every part."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "lone_value_cost.py"), "--depth", "20", "--rounds", "2",
                          "--reps", "2", "--threads", "1"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "3 lone blocks" in run.stdout
    rows = [line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:4] == ["plain", "as exported", "ATen ops"] and rows[-3:] == ["tiny conv", "add + relu", "nothing"]
    assert "| plain | " in run.stdout and "+0.000 [+0.000, +0.000]" in run.stdout  # plain against itself
