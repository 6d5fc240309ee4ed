"""The official recipe (--recipe official): antisd.py's u-clip, per-response z-score, token
advantages and context rules, and gate.py's PerplexityGate, each against a slow reference
written from the README's "Which AntiSD?" table (plain python loops, no shared code)."""

import json
import math
import statistics

import pytest
import torch

import model as model_lib
from antisd import (
    FEEDBACK_CORRECT,
    FEEDBACK_INCORRECT,
    cut_at_final_answer,
    official_teacher_prompts,
    official_token_advantages,
    phi,
    seq_zscore,
    teacher_perplexity,
    teacher_prompts,
    u_clip,
)
from gate import EntropyGate, PerplexityGate

LOG2 = math.log(2.0)


def ragged(seed=0, lengths=(7, 1, 4, 9, 3), T=10, scale=3.0):
    """(u, mask): random u with garbage (inf) past each row's length, mask from lengths."""
    g = torch.Generator().manual_seed(seed)
    N = len(lengths)
    u = torch.randn(N, T, generator=g) * scale
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]  # (N, T)
    u = torch.where(mask, u, torch.full_like(u, float("inf")))  # must never leak
    return u, mask


# --- slow references, written from the table -----------------------------------------


def ref_u_clip(x, sigma_ref, k=2.0, c=5.0):
    if sigma_ref is not None and abs(x) > k * sigma_ref:
        return 0.0, True
    return min(max(x, -c), c), False


def ref_zscore(xs, clip=5.0):
    m = sum(xs) / len(xs)
    sd = max(math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)), 1e-6)
    return [min(max((x - m) / sd, -clip), clip) for x in xs]


def ref_phi(x):
    return 0.5 * (math.log1p(math.exp(x)) - LOG2) if x < 30 else 0.5 * (x - LOG2)


def ref_lambda(tppl, target):
    if tppl > 3.0:
        return 0.0
    return min(max(0.1 * 2.0 * math.log(min(max(tppl / target, 0.5), 3.0)), 0.0), 0.5)


# --- u-clip, z-score ------------------------------------------------------------------


@pytest.mark.parametrize("sigma_ref", [None, 0.5, 1.0, 4.0])  # exact in fp32: the boundary test is exact
def test_u_clip_zeroes_outliers_then_clamps(sigma_ref):
    u, mask = ragged(scale=4.0)
    u[0, 0], u[0, 1] = 2.0 * (sigma_ref or 1.0), -2.0 * (sigma_ref or 1.0)  # exactly at the range: kept
    out, zeroed = u_clip(u, mask, sigma_ref)
    for i in range(u.shape[0]):
        for t in range(u.shape[1]):
            if not mask[i, t]:
                assert out[i, t] == 0.0 and not zeroed[i, t]
                continue
            want, z = ref_u_clip(float(u[i, t]), sigma_ref)
            assert out[i, t].item() == pytest.approx(want, abs=1e-6) and bool(zeroed[i, t]) == z
    assert (out.abs() <= 5.0).all() and torch.isfinite(out).all()
    if sigma_ref is None:
        assert not zeroed.any()  # warm-up: nothing zeroed
    if sigma_ref == 0.5:
        assert zeroed.any()


def test_seq_zscore_per_ragged_row():
    u, mask = ragged(seed=1)
    x = torch.where(mask, u, torch.zeros_like(u))
    x[2, :4] = 1.5  # a constant row -> zeros
    z = seq_zscore(torch.where(mask, x, torch.full_like(x, float("nan"))), mask)
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        want = ref_zscore([float(v) for v in x[i, :n]])
        assert z[i, :n].tolist() == pytest.approx(want, abs=1e-5)
        assert (z[i, n:] == 0).all()
    assert z[1, 0] == 0.0 and (z[2, :4] == 0).all()  # one-token row, constant row
    # one outlier among n tokens has z = (n-1)/sqrt(n): 40 tokens -> 6.2, clamped to +5
    spike = torch.zeros(1, 40)
    spike[0, 0] = 80.0
    zs = seq_zscore(spike, torch.ones(1, 40, dtype=torch.bool))
    assert zs[0, 0] == 5.0 and zs[0, 1:].tolist() == pytest.approx([-1 / math.sqrt(39)] * 39, abs=1e-5)
    # population std (/n): a two-token row [0, 2] -> [-1, +1] (Bessel's /(n-1) would give +-0.707)
    m2 = torch.tensor([[True, True, False]])
    assert seq_zscore(torch.tensor([[0.0, 2.0, 9.0]]), m2).tolist() == [[-1.0, 1.0, 0.0]]


# --- token advantages -----------------------------------------------------------------


def ref_advantages(seq_adv, u, mask, method, lam, sigma_ref, len_mask=0):
    N, T = mask.shape
    out = [[0.0] * T for _ in range(N)]
    for i in range(N):
        n = int(mask[i].sum())
        clipped = [ref_u_clip(float(u[i, t]), sigma_ref)[0] for t in range(n)]
        term = ref_zscore([ref_phi(x) for x in clipped]) if n else []
        if len_mask and n >= len_mask:
            term = [0.0] * n
        for t in range(n):
            if method == "grpo":
                out[i][t] = float(seq_adv[i])
            else:
                sign = -1.0 if method == "antisd" else 1.0
                out[i][t] = float(seq_adv[i]) + sign * float(lam[i]) * term[t]
    return torch.tensor(out)


@pytest.mark.parametrize("method", ["antisd", "sd", "grpo"])
@pytest.mark.parametrize("sigma_ref,len_mask", [(None, 0), (0.8, 0), (0.8, 5)])
def test_official_token_advantages_against_the_formula(method, sigma_ref, len_mask):
    u, mask = ragged(seed=2, scale=2.0)
    seq_adv = torch.tensor([1.2, -0.5, 0.0, 0.0, -1.1])  # incl. zero-variance rows: they still get the term
    lam = torch.tensor([0.1, 0.0, 0.22, 0.05, 0.5])
    adv, zeroed = official_token_advantages(seq_adv, u, mask, method=method, lam=lam, sigma_ref=sigma_ref, len_mask=len_mask)
    want = ref_advantages(seq_adv, u, mask, method, lam, sigma_ref, len_mask)
    assert torch.allclose(adv, want, atol=1e-5), (adv - want).abs().max()
    assert torch.isfinite(adv).all() and (adv[~mask] == 0).all()
    if method != "grpo" and sigma_ref is not None:
        assert zeroed.any() and not zeroed[~mask].any()
    if method != "grpo":  # rows with A_seq = 0 and lambda > 0 get a non-zero term
        assert adv[2, :4].abs().sum() > 0
    # any set of whole rows (a micro-batch) gives its rows' values (to fp32 reduction order)
    idx = torch.tensor([3, 0])
    sub, _ = official_token_advantages(seq_adv[idx], u[idx], mask[idx], method=method, lam=lam[idx], sigma_ref=sigma_ref, len_mask=len_mask)
    assert torch.allclose(sub, adv[idx], atol=1e-6, rtol=0)


def test_official_token_advantages_rejects_other_methods():
    u, mask = ragged()
    with pytest.raises(ValueError, match="official"):
        official_token_advantages(torch.zeros(5), u, mask, method="revkl", lam=torch.zeros(5), sigma_ref=None)
    with pytest.raises(ValueError, match="needs u"):
        official_token_advantages(torch.zeros(5), None, mask, method="antisd", lam=None, sigma_ref=None)


def test_teacher_perplexity_per_row():
    t = -torch.rand(4, 6) * 3
    lengths = torch.tensor([6, 1, 3, 0])
    mask = torch.arange(6)[None] < lengths[:, None]
    got = teacher_perplexity(torch.where(mask, t, torch.full_like(t, float("nan"))), mask)
    for i, n in enumerate(lengths.tolist()):
        want = math.exp(-sum(float(x) for x in t[i, :n]) / n) if n else 1.0
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    assert got.dtype == torch.float64
    very_unlikely = teacher_perplexity(torch.full((1, 3), -1000.0), torch.ones(1, 3, dtype=torch.bool))
    assert very_unlikely.item() == float("inf")  # a valid perplexity; the gate masks it


# --- the per-response lambda ----------------------------------------------------------


def warmed(target_median=1.5, steps=5, **kw):
    g = PerplexityGate(steps, **kw)
    for _ in range(steps):
        g.update(torch.full((4,), target_median))
        g.record_u_std(0.5)
    return g


def test_lambda_over_a_grid_of_perplexities():
    g = warmed(1.5)  # median 1.5 -> target 0.93 * 1.5 = 1.395
    grid = torch.tensor([1.0, 1.2, 1.3, 1.395, 1.4, 1.6, 2.0, 2.5, 2.99, 3.0, 3.0001, 5.0, float("inf")], dtype=torch.float64)
    lam = g.update(grid)  # first post-warm-up step: calibrates, gate open
    assert g.target == pytest.approx(0.93 * 1.5)
    for p, l in zip(grid.tolist(), lam.tolist()):
        assert l == pytest.approx(ref_lambda(p, g.target), abs=1e-12), p
    assert lam[:4].eq(0).all()  # at or below the target: 0 (lambda_min = 0)
    assert lam[-3:].eq(0).all()  # tppl > 3: masked
    assert 0 < lam.max() <= 0.2 * math.log(3.0) + 1e-12  # "at most about 0.22"
    # the max clamp binds with a low target: tppl/target clamped to 3 -> 0.2 log 3; with base 1, 0.5
    g2 = warmed(1.0, base=1.0)  # target = max(0.93, 1.01) = 1.01
    assert g2.update(torch.tensor([2.9]))[0] == pytest.approx(0.5)
    assert g2.target == 1.01
    # lam_rows is the same pure formula for any subset of rows
    assert torch.equal(g.lam_rows(grid[[6, 2]]), lam[[6, 2]])


def test_warmup_records_spike_filtered_means_and_sigma_ref():
    g = PerplexityGate(5)
    means = [1.2, 3.5, 1.8, 1.4, 9.0]  # two spikes (>= 3) are not recorded
    stds = [0.4, 0.6, 0.5, 0.7, 0.3]
    for m, s in zip(means, stds):
        assert g.warming_up and g.update(torch.tensor([m - 0.1, m + 0.1])).eq(0).all()
        assert g.needs_u_std
        g.record_u_std(s)
        assert not g.needs_u_std
        with pytest.raises(RuntimeError):
            g.record_u_std(s)  # once per warm-up step
    assert g.warmup_tppl == pytest.approx([1.2, 1.8, 1.4])
    assert g.sigma_ref is None and g.target is None  # calibrated lazily, at step 6 (as the fork)
    g.update(torch.tensor([1.5]))
    assert g.median == pytest.approx(1.4)  # sorted [1.2, 1.4, 1.8][3 // 2]
    assert g.target == pytest.approx(max(0.93 * 1.4, 1.01))
    assert g.reactivate == pytest.approx(1.4 * 1.07)
    assert g.sigma_ref == pytest.approx(statistics.mean(stds))
    assert not g.warming_up and not g.needs_u_std
    with pytest.raises(RuntimeError):
        g.record_u_std(0.5)
    # even count: vals[len // 2] is the upper middle
    g4 = PerplexityGate(4)
    for m in (1.1, 1.3, 1.7, 1.9):
        g4.update(torch.tensor([m]))
        g4.record_u_std(1.0)
    g4.update(torch.tensor([1.5]))
    assert g4.median == pytest.approx(1.7)
    # every warm-up mean a spike: the first post-warm-up step's mean is the median
    gs = PerplexityGate(2)
    for _ in range(2):
        gs.update(torch.tensor([4.0]))
        gs.record_u_std(1.0)
    gs.update(torch.tensor([1.2, 1.6]))
    assert gs.median == pytest.approx(1.4)


def ref_hysteresis(seq, target, react):
    """The Schmitt trigger as the table states it, one step of lag: state[k] is decided from stat[k-1]."""
    active, out, prev = True, [], None
    for stat in seq:
        if prev is not None:
            if active and prev < target:
                active = False
            elif not active and prev > react:
                active = True
        out.append(active)
        prev = stat
    return out


def test_hysteresis_sequence_with_lag_strict_thresholds_and_masked_rows():
    g = warmed(2.0)  # target 1.86, reactivate 2.14
    target, react = 0.93 * 2.0, 1.07 * 2.0
    stats = [2.0, 1.90, 1.85, 1.87, 2.10, target, react, react + 0.01, 2.0, 1.0, 1.5, 2.5, 2.0]
    want = ref_hysteresis(stats, target, react)
    got = []
    for s in stats:
        rows = torch.tensor([s, s, 50.0, float("inf")], dtype=torch.float64)  # masked rows: not in the statistic
        lam = g.update(rows)
        got.append(g.active)
        assert lam[2:].eq(0).all()
        if not g.active:
            assert lam.eq(0).all()  # closed: lambda_min = 0 for every row
        else:
            assert lam[0].item() == pytest.approx(ref_lambda(s, target))
    assert got == want
    assert want[:3] == [True, True, True] and want[3] is False  # 1.85 < target closes one step later
    assert want[5:9] == [False, False, False, True]  # == target / == react do not flip; > react does
    # a step where every row is masked gives no statistic: the next step does not transition
    g.update(torch.tensor([9.0, 9.0]))
    before = g.active
    g.update(torch.tensor([1.0]))
    assert g.active == before


def test_sd_scripts_configuration_delta_target_no_hysteresis():
    g = warmed(1.5, target_ratio=0.0, reactivate_ratio=0.0)  # run/<model>/sd.sh: TP_TARGET_RATIO=0 REACTIVATE_RATIO=0
    g.update(torch.tensor([1.5]))
    assert g.target == pytest.approx(1.4) and not g.hysteresis  # median - 0.10
    for s in [1.0, 1.0, 1.0]:
        lam = g.update(torch.tensor([s, 2.0]))
        assert g.active and lam[1].item() == pytest.approx(ref_lambda(2.0, 1.4))


def test_floored_target_moves_the_reactivation_threshold():
    g = warmed(1.05)  # 0.93 * 1.05 = 0.9765 -> floored to 1.01
    g.update(torch.tensor([1.05]))
    assert g.target == 1.01 and g.reactivate == pytest.approx(1.01 / 0.93 * 1.07)


def test_state_dict_round_trip_mid_warmup_and_mid_hysteresis():
    rng = torch.Generator().manual_seed(0)
    seq = [1.3 + 0.8 * torch.rand(6, generator=rng, dtype=torch.float64) for _ in range(14)]
    stds = torch.rand(14, generator=rng).tolist()

    def drive(g, a, b):
        out = []
        for k in range(a, b):
            out.append(g.update(seq[k]).tolist())
            if g.needs_u_std:
                g.record_u_std(stds[k])
        return out

    full = drive(PerplexityGate(5), 0, 14)
    for cut in (3, 5, 9):  # mid warm-up, end of warm-up, after calibration
        a = PerplexityGate(5)
        part = drive(a, 0, cut)
        state = json.loads(json.dumps(a.state_dict()))  # JSON-able
        b = PerplexityGate(5)
        b.load_state_dict(state)
        assert part + drive(b, cut, 14) == full
    with pytest.raises(ValueError):
        PerplexityGate(4).load_state_dict(PerplexityGate(5).state_dict())
    with pytest.raises(ValueError):
        PerplexityGate(5).load_state_dict(EntropyGate(5).state_dict())
    with pytest.raises(ValueError):
        EntropyGate(5).load_state_dict(PerplexityGate(5).state_dict())
    g = PerplexityGate(5)
    drive(g, 0, 8)
    g.recalibrate()
    assert g.warming_up and g.step == 0 and g.warmup_tppl == [] and g.sigma_ref is None


# --- contexts: group only, cut at the final answer ------------------------------------


def test_cut_at_final_answer():
    t = "Try \\boxed{7}? No. Then \\boxed{\\frac{1}{2}} ... so \\boxed{7}. Let me also say more."
    assert cut_at_final_answer(t, "7") == "Try \\boxed{7}? No. Then \\boxed{\\frac{1}{2}} ... so \\boxed{7}"
    assert cut_at_final_answer(t, "\\frac{1}{2}") == "Try \\boxed{7}? No. Then \\boxed{\\frac{1}{2}}"  # nested braces
    assert cut_at_final_answer(t, "9") == t  # no box matches: unchanged
    assert cut_at_final_answer("x \\boxed{ 0.5 } y", "1/2", match=lambda c, a: c == "0.5" and a == "1/2") == "x \\boxed{ 0.5 }"
    assert cut_at_final_answer("\\boxed{7", "7") == "\\boxed{7"  # unclosed: no box
    assert cut_at_final_answer("no box", "7") == "no box"


@pytest.fixture(scope="module")
def tok():
    return model_lib.load("tiny", device="cpu", seed=0)[1]


def encode(tok, texts):
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


def expected_prompt(tok, problem, peer, correct):
    """The official teacher prompt written out by hand from the fork's templates."""
    fb = "\nPrevious assessment: " + ("Your answer is correct." if correct else "Your answer is incorrect.") + "\n"
    if peer is None:
        user = problem + fb + "\n\nNow solve this problem step by step.\n"
    else:
        user = problem + "\nYour previous attempt:\n\n" + peer + "\n\n" + fb + "\n\nNow solve this problem step by step.\n"
    return tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=False)


def test_official_contexts_group_only_first_other_peer_cut_at_answer(tok):
    G = 3
    texts = [
        # group 0: rows 0 and 2 correct; row 0 keeps talking after its final answer
        "A: 1 + 2 = 3, no. So \\boxed{B}. Wait, also \\boxed{B}. Extra words after the answer.", "\\boxed{C}", "So the answer is \\boxed{B}.",
        # group 1: nobody correct -> feedback only, no dataset fallback
        "\\boxed{A}", "\\boxed{C}", "I give up.",
        # group 2: exactly one correct -> it has no peer; the others read it
        "<think>\nhmm\n</think>\n\nThe answer is \\boxed{D}.", "\\boxed{A}", "\\boxed{B}",
    ]  # fmt: skip
    responses, lengths = encode(tok, texts)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    problems, answers = ["P0", "P1", "P2"], ["B", "B", "D"]
    tp = official_teacher_prompts(tok, problems, responses, lengths, rewards, G, answers=answers, enable_thinking=False)
    cut0 = "A: 1 + 2 = 3, no. So \\boxed{B}. Wait, also \\boxed{B}"
    want = [
        ("P0", "So the answer is \\boxed{B}", True),  # row 0: first OTHER correct is row 2 (cut after its box)
        ("P0", cut0, False),  # rows 1, 2: the first correct other row is row 0
        ("P0", cut0, True),
        ("P1", None, False), ("P1", None, False), ("P1", None, False),
        ("P2", None, True),  # the only correct row has no peer: feedback only, still a teacher prompt
        ("P2", "The answer is \\boxed{D}", False), ("P2", "The answer is \\boxed{D}", False),  # think stripped
    ]  # fmt: skip
    for i, (p, peer, c) in enumerate(want):
        assert tp[i] == expected_prompt(tok, p, peer, c), (i, tok.decode(tp[i]))
    # the same through teacher_prompts(recipe="official"); references and the generator are unused
    same = teacher_prompts(tok, problems, responses, lengths, rewards, G, references=["R"] * 3, enable_thinking=False,
                           recipe="official", answers=answers, generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert same == tp
    with pytest.raises(ValueError, match="recipe"):
        teacher_prompts(tok, problems, responses, lengths, rewards, G, references=["R"] * 3, recipe="nope")


def test_official_solution_budget_keeps_head_and_tail(tok):
    long_sol = "Let me check each pair. " * 40 + "So the answer is \\boxed{7}."
    responses, lengths = encode(tok, [long_sol, "no"])
    rewards = torch.tensor([1.0, 0.0])
    budget = 40
    tp = official_teacher_prompts(tok, ["P"], responses, lengths, rewards, 2, answers=["7"], max_solution_tokens=budget, enable_thinking=False)
    ids = tok(long_sol[: long_sol.rindex("}") + 1], add_special_tokens=False)["input_ids"]
    head, tail = budget // 4, budget - budget // 4
    peer = tok.decode(ids[:head]) + "\n...\n" + tok.decode(ids[len(ids) - tail :])
    assert tp[1] == expected_prompt(tok, "P", peer, False)
    assert peer.endswith("\\boxed{7}")
    # the default budget (3072, and 4096 - prompt - feedback - 300) leaves this text whole
    full = official_teacher_prompts(tok, ["P"], responses, lengths, rewards, 2, answers=["7"], enable_thinking=False)
    assert full[1] == expected_prompt(tok, "P", long_sol[: long_sol.rindex("}") + 1], False)
    # a long problem shrinks the budget, but never below 128 tokens
    small = official_teacher_prompts(tok, ["word " * 4000], responses, lengths, rewards, 2, answers=["7"], enable_thinking=False)
    assert "\n...\n" in tok.decode(small[1])
    assert tok.decode(small[1]).count("check each pair") > 0
    assert FEEDBACK_CORRECT not in tok.decode(tp[1]) and FEEDBACK_INCORRECT in tok.decode(tp[1])
