"""elanet study: grid expansion and validation, mask stability, a resumable tiny study, the matched fixed count."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import elanet
from elanet.cli import main
from elanet.pruning import PruningSchedule, get_mask
from elanet.study import jaccard, load_study, mask_stability
from elanet.study.results import TIMING_COLUMNS
from elanet.study.runner import check_out_dir

ROOT = Path(__file__).resolve().parents[1]
# 2 cells x 2 epochs of the smallest ELA model on the bundled digits, a few large batches per epoch
TINY = """
name: tiny
seeds: [3]
axes:
  method:
    ebqm: {strategy: quantile}
    fixed: {strategy: fixed, fixed_count: {match: ebqm}}
settings: {model: resnet20_ela, epochs: 2, batch_size: 256, warmup_epochs: 1, milestones: [1], windows: [[1, 1]],
           tensorboard: false}
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# --- mask stability against hand-computed values -------------------------------------------------------

def test_jaccard_and_mask_stability_by_hand():
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3) and jaccard(set(), set()) == 1.0 and jaccard({1}, set()) == 0.0
    # pruned sets {1, 2}, {2, 3}, {2}: pairs 1/3, 1/2, 1/2 -> mean 4/9; block 2 pruned by all three seeds
    masks = [[True, False, False, True], [True, True, False, False], [True, True, False, True]]
    mean, freq = mask_stability(masks)
    assert mean == pytest.approx(4 / 9)
    assert freq.tolist() == pytest.approx([0, 1 / 3, 1, 1 / 3])
    one, freq1 = mask_stability(masks[:1])
    assert math.isnan(one) and freq1.tolist() == [0, 1, 1, 0]


# --- the grid and its validation -----------------------------------------------------------------------

def test_bundled_studies_expand_to_the_papers_grids():
    t6 = load_study(ROOT / "studies/table6-distributions.yaml")
    assert len(t6.cells) == 25 and {c.config.mapping for c in t6.cells} == {"normal", "gamma", "beta", "softmax", "sigmoid"}
    assert all(c.config.model == "resnet20_ela" and c.config.dataset == "digits" for c in t6.cells)
    assert [c.seed for c in t6.cells[:5]] == [0] * 5  # seed-major: partial results cover every setting
    paper = load_study(ROOT / "studies/table6-distributions.yaml", flags={"dataset": "cifar100", "data_dir": "/data"}, preset="cifar")
    assert len(paper.cells) == 50 and paper.axes == ["model", "mapping"]
    c = paper.cells[0].config
    assert (c.model, c.epochs, c.batch_size, c.milestones, c.drop_path) == ("resnet56_ela", 180, 128, [100, 150], 0.2)
    assert (c.windows, c.alpha, c.beta, c.tau, c.data_dir) == ([[1, 3], [45, 48], [91, 93]], 5.0, 1.0, 0.3, "/data")
    assert {c.config.model for c in paper.cells} == {"resnet56_ela", "resnet110_ela"}
    t4 = load_study(ROOT / "studies/table4-strategies.yaml", flags={"dataset": "cifar100"})
    fixed = [c for c in t4.cells if c.labels["method"] == "fixed"]
    assert len(fixed) == 10 and all(c.match == c.name.replace("method=fixed", "method=ebqm") for c in fixed)
    seeds = load_study(ROOT / "studies/seeds.yaml")
    assert [c.config.model for c in seeds.cells[:3]] == ["resnet20", "resnet20_mrla_b", "resnet20_ela"]
    assert len(load_study(ROOT / "studies/table5-quantile-mappings.yaml").cells) == 15


@pytest.mark.parametrize("text, message", [
    ("axes: {colour: [red]}", "unknown axis 'colour'"),
    ("axes: {mapping: []}", "axis 'mapping' has no values (empty grid)"),
    ("seeds: []\naxes: {mapping: [beta]}", "'seeds' is empty (empty grid)"),
    ("axes: {mapping: [beta, cubic]}", "cell mapping=cubic,seed=0: unknown mapping 'cubic'"),
    ("axes: {tau: [0.3, 1.5]}", "cell tau=1.5,seed=0: tau (the pruning threshold on mapped values) must be in [0, 1]"),
    ("axes: {model: [resnet20_ela, resnet21_ela]}", "unknown model 'resnet21_ela'"),
    ("axes: {epochs: [30, 30.5]}", "cell epochs=30.5,seed=0: epochs must be a whole number"),
    ("axes: {epochs: [3]}", "cell epochs=3,seed=0: pruning window ending at epoch 11 is beyond the last epoch (3)"),
    ("axes: {m: {a: {colour: red}}}", "unknown setting 'colour' in 'axes.m.a'"),
    ("axis: {mapping: [beta]}", "unknown key 'axis'"),
    ("axes: {seed: [1, 2]}", "unknown axis 'seed'"),
    ("axes: {m: {a: {strategy: fixed, fixed_count: {match: b}}, c: {}}}", "fixed_count must be an integer or {match: LABEL}"),
    ("datasets: {cifar100: {axes: {model: [resnet56_ela]}}}", "no settings for dataset 'digits'"),
    ("axes: {mapping: [beta, beta]}", "two cells are both named"),
])
def test_bad_study_files_fail_before_any_run_with_the_key_named(tmp_path, text, message, capsys):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_study(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out)]) == 2  # one line on stderr, nothing written
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not out.exists()


def test_a_flag_that_an_axis_sets_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--mapping is set by an axis"):
        load_study(write(tmp_path, "axes: {mapping: [beta, gamma]}"), flags={"mapping": "beta"})


def test_out_holding_another_study_or_other_files_is_refused(tmp_path):
    a = load_study(write(tmp_path, "name: a\naxes: {mapping: [beta, gamma]}\nsettings: {epochs: 3, windows: [[1, 1]]}"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"identity": a.identity()}))
    check_out_dir(a, out)  # the same study continues
    b = load_study(write(tmp_path, "name: a\naxes: {mapping: [beta, gamma]}\nsettings: {epochs: 4, windows: [[1, 1]]}"))
    with pytest.raises(ValueError, match=r"holds a different study .*epochs 3 -> 4"):
        check_out_dir(b, out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a study folder"):
        check_out_dir(a, other)


def test_fixed_count_per_window_prunes_each_rounds_count():
    model = elanet.create_model("resnet56_ela")
    schedule = PruningSchedule([(1, 1), (2, 2)], strategy="fixed", fixed_count=[2, 1])
    g = torch.Generator().manual_seed(0)
    for epoch, want in ((1, 2), (2, 1)):
        with elanet.record_attention(model) as rec:
            model(torch.randn(4, 3, 32, 32, generator=g))
        schedule.accumulate(rec)
        assert len(schedule.end_epoch(epoch, model)["pruned"]) == want
    assert get_mask(model).count(False) == 3
    with pytest.raises(ValueError, match="one per window"):
        PruningSchedule([(1, 1)], strategy="fixed", fixed_count=[1, 2])


# --- a real tiny study: interrupted, continued, equal to an uninterrupted one ------------------------

def study_cmd(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "elanet", "study", str(spec), "--out", str(out), "--threads", "1", "--no-plots"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def full_study(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("study")
    out = d / "full"
    spec = write(d, TINY)
    r = subprocess.run(study_cmd(spec, out), env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 done, 0 running, 0 left" in r.stdout
    return out


def test_study_writes_ordinary_runs_tables_and_matches_fixed_count(full_study):
    rows = read_rows(full_study / "study.csv")
    assert [r["cell"] for r in rows] == ["method=ebqm,seed=3", "method=fixed,seed=3"]
    for r in rows:
        run = full_study / r["run_dir"]
        assert {"config.yaml", "metrics.csv", "last.pt", "summary.json"} <= {p.name for p in run.iterdir()}
        summary = json.loads((run / "summary.json").read_text())
        assert float(r["best_top1"]) == pytest.approx(summary["best_top1"], abs=1e-3)
        assert r["mask"] == "".join("1" if m else "0" for m in summary["mask"]) and int(r["epochs"]) == 2
    ebqm_rounds = json.loads((full_study / rows[0]["run_dir"] / "pruning.json").read_text())["rounds"]
    fixed_cfg = (full_study / rows[1]["run_dir"] / "config.yaml").read_text()
    counts = [len(r["pruned"]) for r in ebqm_rounds]
    assert f"fixed_count:\n- {counts[0]}" in fixed_cfg and "strategy: fixed" in fixed_cfg
    assert rows[1]["pruned_blocks"] == rows[0]["pruned_blocks"] == str(sum(counts))  # EBQM's count, same seed
    md = (full_study / "study.md").read_text()
    assert "| method | runs | best top-1 (%)" in md and "| ebqm | 1/1 |" in md and "| 1.00 |" in md  # ratio of row 1


def test_viz_study_redraws_the_figures(full_study, tmp_path):
    assert main(["viz", "study", str(full_study), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "study_accuracy.png").stat().st_size > 0 and (tmp_path / "study_pruning.png").is_file()


def test_killed_study_continues_to_the_same_results(full_study, tmp_path):
    spec = write(tmp_path, TINY)
    out = tmp_path / "cut"
    p = subprocess.Popen(study_cmd(spec, out), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = out / "runs" / "method=fixed,seed=3"
    deadline = time.time() + 600
    while not (second / "metrics.csv").is_file() or len(read_rows(second / "metrics.csv")) < 1:  # in epoch 2 of cell 2
        assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else "timeout"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)  # the study alone: it passes SIGINT on, the run saves a checkpoint mid-epoch
    out_text = p.communicate(timeout=300)[0]
    assert p.returncode == 130, out_text
    assert (out / "runs" / "method=ebqm,seed=3" / "summary.json").is_file() and not (second / "summary.json").is_file()
    assert (second / "last.pt").is_file()
    r = subprocess.run(study_cmd(spec, out), env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 done, 1 to run" in r.stdout and "--resume" in (out / "logs" / "method=fixed,seed=3.log").read_text()

    def strip(rows):
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]

    assert strip(read_rows(out / "study.csv")) == strip(read_rows(full_study / "study.csv"))
