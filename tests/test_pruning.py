"""ELA pruning: the mask, what a pruned block does, KL and EBQM against float64 references, the schedule."""
from __future__ import annotations

import copy
import io
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import betainc, gammainc

import elanet
from elanet import AttentionRecord, PruningSchedule, adjacent_kl, ebqm, format_round, get_mask, map_scores, set_mask
from elanet.pruning import check_ebqm_args, ela_blocks

EPS = 1e-8


# ---------------------------------------------------------------- float64 references
def kl_ref(p: np.ndarray, q: np.ndarray, eps: float = EPS) -> np.ndarray:
    """SPEC §3.1: pad p with eps to q's support, clamp both to >= eps, sum p log(p / q) over layers."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    pad = np.full(p.shape[:-1] + (q.shape[-1] - p.shape[-1],), eps)
    pp, qq = np.maximum(np.concatenate([p, pad], -1), eps), np.maximum(q, eps)
    return (pp * np.log(pp / qq)).sum(-1)


def ebqm_ref(scores, gamma: float, alpha: float, beta: float) -> np.ndarray:
    """SPEC §3.2 step by step; non-finite scores and non-candidates map to 1."""
    a = np.asarray(scores, np.float64)
    out = np.ones(len(a))
    finite = [i for i in range(len(a)) if np.isfinite(a[i])]
    if len(finite) < 2:
        return out
    q = np.quantile(a[finite], gamma)
    cand = [i for i in finite if a[i] <= q]
    lo, hi = min(a[cand]), max(a[cand])
    if len(cand) < 2 or hi == lo:
        return out
    for i in cand:
        out[i] = betainc(alpha, beta, (a[i] - lo) / (hi - lo))
    return out


def attention_macs(c: int, h: int, n: int, k: int) -> int:
    """What flop_counter counts for one active block (pooling, softmax, BN, ReLU and adds are not counted):
    depthwise 3x3 value 9CHW, 1-D query and key convs Ck each, scores C*n (heads * d * n), aggregation CHW*n."""
    return 9 * c * h * h + 2 * c * k + c * n + c * h * h * n


ECA_K = {64: 3, 128: 5, 256: 5}  # by hand from k = int(|(log2 C + 1) / 2|), made odd


def synthetic_record(model, gen: torch.Generator, batch: int = 4, heads: int = 2, scale: float = 2.0) -> AttentionRecord:
    """A record shaped like a real forward under the model's current mask, with random distributions."""
    rec, counts = AttentionRecord(), defaultdict(int)
    for b in ela_blocks(model):
        if b.active:
            counts[b.stage_index] += 1
            w = torch.softmax(scale * torch.randn(batch, heads, counts[b.stage_index], generator=gen), -1)
            rec.add(b.block_index, b.stage_index, w)
    return rec


def pair_positions(rec: AttentionRecord) -> list[int]:
    return [i for i in range(len(rec.blocks) - 1) if rec.stages[i] == rec.stages[i + 1]]


def expected_scores(records: list[AttentionRecord]) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Mean over samples of the head-averaged KL of every adjacent active pair, over all steps."""
    pairs = [(records[0].blocks[i], records[0].blocks[i + 1]) for i in pair_positions(records[0])]
    total, count = np.zeros(len(pairs)), 0
    for rec in records:
        for j, i in enumerate(pair_positions(rec)):
            total[j] += kl_ref(rec.weights[i].numpy(), rec.weights[i + 1].numpy()).mean(1).sum(0)
        count += rec.weights[0].shape[0]
    return pairs, total / count


def is_plain_data(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and is_plain_data(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(is_plain_data(v) for v in x)
    return x is None or isinstance(x, (bool, int, float, str))


# ---------------------------------------------------------------- mask
def test_get_and_set_mask_in_forward_order():
    model = elanet.create_model("resnet20_ela")
    blocks = ela_blocks(model)
    assert [b.block_index for b in blocks] == list(range(6))
    assert [b.first_in_stage for b in blocks] == [True, False] * 3
    assert get_mask(model) == [True] * 6
    mask = [True, False, True, True, True, False]
    set_mask(model, mask)
    assert get_mask(model) == mask and [b.active for b in blocks] == mask
    set_mask(model, np.array(mask))  # numpy booleans (e.g. from a comparison) are booleans too
    assert get_mask(model) == mask


@pytest.mark.parametrize(
    "mask, message",
    [
        ([True] * 5, "mask has 5 entries but the model has 6"),
        ([True] * 7, "mask has 7 entries"),
        ([True, "no", True, True, True, True], "mask entry 1"),
        ([True, 0.5, True, True, True, True], "mask entry 1"),
        ([True, None, True, True, True, True], "mask entry 1"),
        ([True, True, True, True, True, 2], "mask entry 5"),
        ([False, True, True, True, True, True], "first of stage 1"),
        ([True, True, True, True, False, False], "first of stage 3"),
    ],
)
def test_set_mask_rejects_bad_masks_and_changes_nothing(mask, message):
    model = elanet.create_model("resnet20_ela")
    set_mask(model, [True, False] * 3)
    with pytest.raises(ValueError, match=message):
        set_mask(model, mask)
    assert get_mask(model) == [True, False] * 3


@pytest.mark.parametrize("name", ["resnet20", "resnet20_mrla_b", "resnet20_mrla_l"])
def test_mask_needs_ela_blocks(name):
    model = elanet.create_model(name)
    assert get_mask(model) == []
    with pytest.raises(ValueError, match="no ELA blocks"):
        set_mask(model, [])


def test_mask_travels_in_the_model_state_dict():
    model = elanet.create_model("resnet20_ela")
    set_mask(model, [True, False, True, True, True, False])
    fresh = elanet.create_model("resnet20_ela")
    fresh.load_state_dict(model.state_dict())
    assert get_mask(fresh) == get_mask(model)
    assert [all(p.requires_grad for p in b.parameters()) for b in ela_blocks(fresh)] == get_mask(model)


# ---------------------------------------------------------------- what a pruned block does
MASK56 = [True, False, True, False, True, True] + [True, True, False, False, False, True] + [True] * 5 + [False]


def test_pruned_block_does_no_attention_work_and_leaves_the_memory():
    model = elanet.create_model("resnet56_ela").eval()
    set_mask(model, MASK56)
    blocks = ela_blocks(model)
    calls = defaultdict(int)
    memory_len = {}
    for i, b in enumerate(blocks):
        for sub in (b.conv_v, b.bn):
            sub.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

        def query_key(x, i=i, qk=b.query_key):  # conv_q and conv_k run inside it, as one product
            calls[i] += 2
            return qk(x)

        b.query_key = query_key
        b.register_forward_pre_hook(lambda mod, args, i=i: memory_len.__setitem__(i, len(args[2])))
    bottlenecks = [m for m in model.modules() if isinstance(m, elanet.models.Bottleneck)]
    io_pairs = {}
    for i, blk in enumerate(bottlenecks):
        blk.register_forward_hook(lambda mod, args, out, i=i: io_pairs.__setitem__(i, (args[0], out)))

    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    for i, on in enumerate(MASK56):
        assert calls[i] == (4 if on else 0)  # q, k, v and BN run only in active blocks
        stage = blocks[i].stage_index
        earlier_active = sum(MASK56[j] for j in range(i) if blocks[j].stage_index == stage)
        assert memory_len[i] == earlier_active  # the memory holds exactly the earlier active blocks
        if not on:  # (a) output = the plain residual block computed without attention
            blk = bottlenecks[i]
            attn, blk.attn = blk.attn, None
            with torch.no_grad():
                plain = blk(io_pairs[i][0])
            blk.attn = attn
            torch.testing.assert_close(io_pairs[i][1], plain, rtol=0, atol=0)


def test_attention_covers_exactly_the_active_blocks_of_the_stage():
    model = elanet.create_model("resnet56_ela").eval()
    set_mask(model, MASK56)
    with torch.no_grad(), elanet.record_attention(model) as rec:
        model(torch.randn(3, 3, 16, 16))
    active = [i for i, on in enumerate(MASK56) if on]
    assert rec.blocks == active
    blocks = ela_blocks(model)
    for i, w in zip(rec.blocks, rec.weights):
        stage = blocks[i].stage_index
        n = sum(MASK56[j] for j in range(i + 1) if blocks[j].stage_index == stage)
        assert w.shape == (3, blocks[i].heads, n)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, blocks[i].heads))


def expected_macs(model, mask, size: int) -> int:
    """Hand count for a mask. A stage's first active block aggregates one value under a softmax over one
    layer (exactly 1) and returns the value without the product: no CHW*n term for it."""
    total, counts = 0, defaultdict(int)
    for b, on in zip(ela_blocks(model), mask):
        if on:
            counts[b.stage_index] += 1
            c, h = b.channels, size // (1, 2, 4)[b.stage_index]  # stage strides 1 / 2 / 2 (SPEC §1)
            total += attention_macs(c, h, counts[b.stage_index], ECA_K[c]) - (c * h * h if counts[b.stage_index] == 1 else 0)
    return total


def test_macs_count_only_the_active_blocks_attention():
    plain = elanet.profile(elanet.create_model("resnet56"), (3, 16, 16)).macs
    model = elanet.create_model("resnet56_ela")
    full = [True] * 18
    firsts = [b.first_in_stage for b in ela_blocks(model)]
    for mask in (full, MASK56, firsts):
        set_mask(model, mask)
        assert elanet.profile(model, (3, 16, 16)).macs == plain + expected_macs(model, mask, 16)
    # with everything prunable pruned, only the stage-first blocks' attention (n = 1) remains
    assert expected_macs(model, firsts, 16) == sum(attention_macs(c, h, 1, ECA_K[c]) - c * h * h for c, h in ((64, 16), (128, 8), (256, 4)))


def test_pruned_model_trains_and_pruned_blocks_get_no_gradient():
    model = elanet.create_model("resnet20_ela", drop_path=0.2).train()
    mask = [True, False, True, True, True, False]
    set_mask(model, mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    before = [[p.detach().clone() for p in b.parameters()] for b in ela_blocks(model)]
    loss = F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for b, on in zip(ela_blocks(model), mask):
        for p in b.parameters():
            assert p.requires_grad == on and (p.grad is not None) == on
    assert model.layer1[1].conv1.weight.grad is not None  # the backbone of a pruned block still trains
    opt.step()
    for b, on, old in zip(ela_blocks(model), mask, before):
        unchanged = [torch.equal(p, o) for p, o in zip(b.parameters(), old)]
        assert all(unchanged) if not on else not any(unchanged)
    set_mask(model, [True] * 6)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- KL
@pytest.mark.parametrize("m, n", [(1, 2), (3, 4), (2, 4), (1, 6), (4, 7)])
def test_adjacent_kl_matches_reference(m, n):
    p = torch.softmax(3 * torch.randn(3, 4, m), -1)
    q = torch.softmax(3 * torch.randn(3, 4, n), -1)
    q[0, 0, 0] = 0.0  # clamped to eps before the log
    q[1, 2, -1] = 1e-12
    p[2, 1, 0] = 1e-20
    got = adjacent_kl(p, q, check=False)  # the zeroed entries leave some rows unnormalised on purpose
    assert got.shape == (3, 4) and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), kl_ref(p.numpy(), q.numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adjacent_kl(p, q, eps=1e-4, check=False).numpy(), kl_ref(p.numpy(), q.numpy(), 1e-4),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [1, 3])
def test_adjacent_kl_of_identical_distributions_is_zero(extra):
    p = torch.softmax(torch.randn(2, 3, 4), -1)
    q = torch.cat([p, torch.zeros(2, 3, extra)], -1)  # the later block puts no mass on the new layers
    assert adjacent_kl(p, q).abs().max() < 1e-6
    tiny = torch.cat([p * (1 - 1e-3), torch.full((2, 3, extra), 1e-3 / extra)], -1)
    # almost the same distribution: log(1 / (1 - 1e-3)) on P's support plus the eps tail
    np.testing.assert_allclose(adjacent_kl(p, tiny).numpy(), kl_ref(p.numpy(), tiny.numpy()), rtol=1e-4)


@pytest.mark.parametrize(
    "p_shape, q_shape, eps, message",
    [
        ((2, 3, 2), (2, 4, 3), EPS, "leading shapes differ"),
        ((2, 3, 3), (2, 3, 3), EPS, "fewer layers"),
        ((2, 3, 4), (2, 3, 3), EPS, "fewer layers"),
        ((2, 3, 2), (2, 3, 3), 0.0, "eps must be in"),
    ],
)
def test_adjacent_kl_rejects_bad_shapes(p_shape, q_shape, eps, message):
    with pytest.raises(ValueError, match=message):
        adjacent_kl(torch.rand(p_shape), torch.rand(q_shape), eps)


# ---------------------------------------------------------------- EBQM
@pytest.mark.parametrize("gamma, alpha, beta", [(0.5, 5.0, 1.0), (0.5, 2.0, 5.0), (1.0, 2.0, 5.0), (0.3, 0.7, 0.4)])
def test_ebqm_matches_reference_in_input_order(gamma, alpha, beta):
    rng = np.random.default_rng(1)
    scores = rng.exponential(0.05, size=15)
    got = ebqm(scores, gamma=gamma, alpha=alpha, beta=beta)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ebqm_ref(scores, gamma, alpha, beta), rtol=1e-12, atol=0)
    assert (got < 1).sum() >= 1 and got.min() == 0.0  # the smallest candidate maps to F(0) = 0
    perm = rng.permutation(15)
    np.testing.assert_array_equal(ebqm(scores[perm], gamma=gamma, alpha=alpha, beta=beta), got[perm])


@pytest.mark.parametrize(
    "scores",
    [[], [0.2], [0.1, 0.2], [0.3] * 6, [0.1, 0.1, 0.1, 0.5, 0.9]],
    ids=["empty", "one", "two-one-candidate", "all-equal", "equal-candidates"],
)
def test_ebqm_prunes_nothing_without_spread(scores):
    got = ebqm(scores, gamma=0.5, alpha=5.0, beta=1.0)
    np.testing.assert_array_equal(got, np.ones(len(scores)))
    np.testing.assert_array_equal(got, ebqm_ref(scores, 0.5, 5.0, 1.0))
    if scores:
        assert map_scores(scores, gamma=0.5, alpha=5.0, beta=1.0)[1] is not None  # and says why


def test_ebqm_non_finite_scores_are_kept_with_a_warning():
    scores = [0.1, np.nan, 0.3, np.inf, 0.05, -np.inf, 0.5, 0.2, 0.4]  # six finite: the median interpolates
    with pytest.warns(RuntimeWarning, match="3 non-finite"):
        got = ebqm(scores, gamma=0.5, alpha=5.0, beta=1.0)
    assert got[1] == got[3] == got[5] == 1.0
    np.testing.assert_allclose(got, ebqm_ref(scores, 0.5, 5.0, 1.0), rtol=1e-12)
    assert got[4] == 0.0


@pytest.mark.parametrize("kwargs", [dict(gamma=0.0), dict(gamma=1.5), dict(gamma=-0.2), dict(alpha=0.0), dict(beta=-1.0)])
def test_ebqm_rejects_bad_parameters(kwargs):
    args = dict(gamma=0.5, alpha=5.0, beta=1.0) | kwargs
    with pytest.raises(ValueError, match="gamma|alpha"):
        ebqm([0.1, 0.2, 0.3], **args)
    with pytest.raises(ValueError):
        PruningSchedule([(1, 1)], **args)


@pytest.mark.parametrize("tau", [-0.1, 1.01])
def test_tau_outside_unit_interval_is_rejected(tau):
    with pytest.raises(ValueError, match="tau"):
        check_ebqm_args(gamma=0.5, alpha=5.0, beta=1.0, tau=tau)
    with pytest.raises(ValueError, match="tau"):
        PruningSchedule([(1, 1)], tau=tau)
    check_ebqm_args(gamma=1.0, alpha=1.0, beta=1.0, tau=0.0)  # the closed ends are allowed


def test_other_mappings_against_scipy():
    scores = np.array([0.4, 0.1, 0.25, 0.9, 0.05, 0.3])
    cand = scores <= np.quantile(scores, 0.5)
    x = (scores[cand] - scores[cand].min()) / np.ptp(scores[cand])
    gamma_cdf, _ = map_scores(scores, mapping="gamma", alpha=2.0, beta=3.0)
    np.testing.assert_allclose(gamma_cdf[cand], gammainc(2.0, 3.0 * x), rtol=1e-12)
    sig, _ = map_scores(scores, mapping="sigmoid", alpha=4.0)
    np.testing.assert_allclose(sig[cand], 1 / (1 + np.exp(-4.0 * (x - 0.5))), rtol=1e-12)
    assert (gamma_cdf[~cand] == 1).all() and (sig[~cand] == 1).all()
    with pytest.raises(ValueError, match="unknown mapping"):
        map_scores(scores, mapping="cauchy")


# ---------------------------------------------------------------- schedule
SPEC_PRESETS = {
    "cifar": ([(1, 3), (45, 48), (91, 93)], 5.0, 1.0, 0.3),
    "imagenet": ([(1, 3), (51, 53)], 2.0, 5.0, 0.25),
    "coco": ([(1, 1), (7, 7)], 2.0, 5.0, 0.2),
}


@pytest.mark.parametrize("name", list(SPEC_PRESETS))
def test_presets_match_spec(name):
    s = PruningSchedule.preset(name)
    windows, alpha, beta, tau = SPEC_PRESETS[name]
    assert (s.windows, s.alpha, s.beta, s.tau, s.gamma) == (windows, alpha, beta, tau, 0.5)
    inside = {e for a, b in windows for e in range(a, b + 1)}
    assert [s.measuring(e) for e in range(1, 101)] == [e in inside for e in range(1, 101)]
    assert PruningSchedule.preset(name, tau=0.1).tau == 0.1


def test_preset_and_epoch_checks():
    with pytest.raises(ValueError, match="unknown pruning preset"):
        PruningSchedule.preset("voc")
    s = PruningSchedule.preset("cifar")
    s.check_epochs(180)
    with pytest.raises(ValueError, match="ends after the last epoch"):
        s.check_epochs(92)


@pytest.mark.parametrize("windows", [[(0, 2)], [(3, 2)], [(1, 3), (3, 5)], [(5, 6), (1, 2)], [(2, 4), (3, 6)]])
def test_invalid_windows_raise(windows):
    with pytest.raises(ValueError, match="windows"):
        PruningSchedule(windows)


def test_accumulate_real_forwards_matches_reference():
    model = elanet.create_model("resnet20_ela").eval()
    schedule = PruningSchedule.preset("cifar")
    records = []
    for batch in (3, 5):  # the score is a per-sample mean: batches of different size weigh by their samples
        with torch.no_grad(), elanet.record_attention(model) as rec:
            model(torch.randn(batch, 3, 16, 16))
        schedule.accumulate(rec)
        records.append(rec)
    pairs, scores = schedule.scores()
    want_pairs, want = expected_scores(records)
    assert pairs == want_pairs == [(0, 1), (2, 3), (4, 5)]
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    assert schedule.state_dict()["count"] == [8.0, 8.0, 8.0]


def _two_layer_record(later: list[float]) -> AttentionRecord:
    rec = AttentionRecord()
    for s in range(3):
        rec.add(2 * s, s, torch.ones(1, 1, 1))
        rec.add(2 * s + 1, s, torch.tensor([[later]]))
    return rec


def test_accumulation_is_float64():
    schedule = PruningSchedule([(1, 1)])
    schedule.accumulate(_two_layer_record([1e-5, 1 - 1e-5]))  # KL = log(1e5), about 11.5
    first = schedule.state_dict()["sum"][0]
    schedule.accumulate(_two_layer_record([1 - 1e-7, 1e-7]))  # KL of order 1e-7: lost in a float32 sum
    added = schedule.state_dict()["sum"][0] - first
    small = adjacent_kl(torch.ones(1, 1), torch.tensor([[1 - 1e-7, 1e-7]])).item()
    assert first == pytest.approx(np.log(1e5), rel=1e-5) and small > 0
    assert added == pytest.approx(small, rel=1e-3)


def test_decisions_are_cumulative_and_rescore_only_active_pairs():
    model = elanet.create_model("resnet56_ela")
    gen = torch.Generator().manual_seed(3)
    schedule = PruningSchedule([(1, 2), (4, 4)], gamma=0.5, alpha=5.0, beta=1.0, tau=0.3)
    masks = [get_mask(model)]
    for window_end in (2, 4):
        records = [synthetic_record(model, gen, batch=b) for b in (4, 2, 3)]
        for r in records:
            schedule.accumulate(r)
        assert schedule.end_epoch(window_end - 1, model) is None  # not the end of a window: no decision
        assert get_mask(model) == masks[-1]
        report = schedule.end_epoch(window_end, model)
        pairs, scores = expected_scores(records)
        active = [i for i, on in enumerate(masks[-1]) if on]
        blocks = ela_blocks(model)
        assert pairs == [(a, b) for a, b in zip(active, active[1:]) if blocks[a].stage_index == blocks[b].stage_index]
        assert [tuple(p) for p in report["pairs"]] == pairs
        np.testing.assert_allclose(report["scores"], scores, rtol=1e-5)
        mapped = ebqm_ref(report["scores"], 0.5, 5.0, 1.0)  # the scores themselves are float32 KL: map them as given
        np.testing.assert_allclose(report["mapped"], mapped, rtol=1e-12, atol=0)
        pruned = [b for (_, b), v in zip(pairs, mapped) if v < 0.3]
        assert report["pruned"] == pruned and pruned  # the lowest candidate maps to 0: something is pruned
        want = [on and i not in pruned for i, on in enumerate(masks[-1])]
        assert get_mask(model) == report["mask"] == want
        masks.append(want)
        assert schedule.scores()[0] == []  # the accumulators restart after a decision
    assert all(not b or a for a, b in zip(masks[1], masks[2]))  # a pruned block stays pruned
    assert sum(masks[2]) < sum(masks[1]) < 18
    assert [r["round"] for r in schedule.rounds] == [1, 2]


def test_changing_the_mask_inside_a_window_is_an_error():
    model = elanet.create_model("resnet56_ela")
    gen = torch.Generator().manual_seed(0)
    schedule = PruningSchedule([(1, 1)])
    schedule.accumulate(synthetic_record(model, gen))
    set_mask(model, MASK56)
    with pytest.raises(RuntimeError, match="active blocks changed"):
        schedule.accumulate(synthetic_record(model, gen))


def test_reduce_fn_sees_sums_and_counts():
    model = elanet.create_model("resnet20_ela")
    gen = torch.Generator().manual_seed(1)
    other = torch.tensor([[0.5, 1.0, 2.0], [6.0, 6.0, 6.0]], dtype=torch.float64)  # another rank's sums / counts
    seen = []

    def fake_all_reduce(t: torch.Tensor) -> None:
        seen.append(t.clone())
        t += other

    schedule = PruningSchedule([(1, 1)], reduce_fn=fake_all_reduce)
    records = [synthetic_record(model, gen, batch=4) for _ in range(2)]
    for r in records:
        schedule.accumulate(r)
    _, mine = expected_scores(records)
    report = schedule.end_epoch(1, model)
    assert len(seen) == 1 and seen[0].dtype == torch.float64 and seen[0].shape == (2, 3)
    np.testing.assert_allclose(seen[0][0].numpy(), mine * 8, rtol=1e-5)
    np.testing.assert_array_equal(seen[0][1].numpy(), [8.0, 8.0, 8.0])
    np.testing.assert_allclose(report["scores"], (mine * 8 + other[0].numpy()) / 14, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["threshold", "fixed"])
def test_threshold_and_fixed_strategies(strategy):
    model = elanet.create_model("resnet56_ela")
    rec = synthetic_record(model, torch.Generator().manual_seed(5))
    pairs, scores = expected_scores([rec])
    later = [b for _, b in pairs]
    if strategy == "threshold":
        kwargs = dict(threshold=float(np.median(scores)))
        want = [b for b, s in zip(later, scores) if s < kwargs["threshold"]]
    else:
        kwargs = dict(fixed_count=3)
        want = sorted(later[i] for i in np.argsort(scores)[:3])
    schedule = PruningSchedule([(1, 1)], strategy=strategy, **kwargs)
    schedule.accumulate(rec)
    report = schedule.end_epoch(1, model)
    assert sorted(report["pruned"]) == want and len(want) >= 3
    assert get_mask(model) == [i not in want for i in range(18)]


def test_non_finite_score_keeps_its_block():
    model = elanet.create_model("resnet20_ela")
    rec = synthetic_record(model, torch.Generator().manual_seed(2))
    rec.weights[1] = torch.full_like(rec.weights[1], float("nan"))  # pair (0, 1) scores NaN
    schedule = PruningSchedule([(1, 1)])
    schedule.accumulate(rec)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        report = schedule.end_epoch(1, model)
    assert 1 not in report["pruned"] and report["scores"][0] is None and get_mask(model)[1]
    assert "nan" in format_round(report)


def test_format_round_table():
    model = elanet.create_model("resnet56_ela")
    schedule = PruningSchedule([(1, 1)], tau=0.3)
    schedule.accumulate(synthetic_record(model, torch.Generator().manual_seed(4)))
    report = schedule.end_epoch(1, model)
    lines = format_round(report).splitlines()
    assert lines[0] == "pruning round 1 (epoch 1), tau=0.3"
    assert lines[1].split() == ["pair", "score", "mapped", "decision"]
    rows = [line.split() for line in lines[2:-1]]
    assert [r[0] for r in rows] == [f"{a}->{b}" for a, b in report["pairs"]]
    for r, (_, b), s, m in zip(rows, report["pairs"], report["scores"], report["mapped"]):
        assert float(r[1]) == pytest.approx(s, abs=1e-6) and float(r[2]) == pytest.approx(m, abs=1e-4)
        assert r[3] == ("pruned" if b in report["pruned"] else "kept")
        assert (r[3] == "pruned") == (m < 0.3)
    assert lines[-1].startswith(f"  active blocks: {18 - len(report['pruned'])}/18")


def test_format_round_shows_why_nothing_was_pruned():
    model = elanet.create_model("resnet20_ela")
    report = PruningSchedule([(1, 1)]).end_epoch(1, model)
    text = format_round(report)
    assert "no scores were accumulated" in text and "pruned this round: none" in text


def test_state_dict_round_trips_through_torch_save_weights_only():
    model = elanet.create_model("resnet56_ela")
    gen = torch.Generator().manual_seed(6)
    schedule = PruningSchedule.preset("cifar", gamma=0.6)
    for _ in range(2):
        schedule.accumulate(synthetic_record(model, gen))
    schedule.end_epoch(3, model)
    partial = synthetic_record(model, gen)
    schedule.accumulate(partial)  # a partial second window

    state = schedule.state_dict()
    assert is_plain_data(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = PruningSchedule([(1, 1)])
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.state_dict() == state
    pairs, scores = schedule.scores()
    assert restored.scores()[0] == pairs
    np.testing.assert_array_equal(restored.scores()[1], scores)

    # both continue identically to the end of the window
    model_b = copy.deepcopy(model)
    nxt = synthetic_record(model, gen)
    schedule.accumulate(nxt)
    restored.accumulate(nxt)
    assert schedule.end_epoch(48, model) == restored.end_epoch(48, model_b)
    assert get_mask(model) == get_mask(model_b)
