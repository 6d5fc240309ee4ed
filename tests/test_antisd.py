"""AntiSD core (antisd.py) against slow, obviously correct references on the tiny model."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import model as model_lib
from antisd import (
    FEEDBACK_CORRECT,
    FEEDBACK_INCORRECT,
    group_advantages,
    phi,
    pmi,
    policy_loss,
    strip_think,
    teacher_prompts,
    token_advantages,
)

LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def tiny():
    return model_lib.load("tiny", device="cpu", seed=0)  # (model, tokenizer)


def mask_of(lengths, T):
    return torch.arange(T)[None, :] < lengths[:, None]  # (N, T)


# --- phi -------------------------------------------------------------------------------


def test_phi_values_and_properties():
    assert phi(torch.tensor(0.0)).item() == 0.0
    u = torch.linspace(-30, 30, 601, dtype=torch.float64)
    ref = 0.5 * (torch.log1p(torch.exp(u)) - LOG2)  # naive, fine in fp64 on this range
    # F.softplus returns u itself above u = 20 (error log1p(e^-20) ~ 2e-9, far below fp32 eps)
    torch.testing.assert_close(phi(u), ref, rtol=1e-8, atol=1e-8)
    assert (phi(u) >= -0.5 * LOG2).all()
    assert phi(torch.tensor(-60.0, dtype=torch.float64)).item() == pytest.approx(-0.5 * LOG2, abs=1e-12)
    assert phi(torch.tensor(1.0)).item() == pytest.approx(0.5 * (math.log(1 + math.e) - LOG2), rel=1e-6)


def test_phi_slope_is_half_sigmoid():
    u = torch.linspace(-20, 20, 81, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(phi(u).sum(), u)
    torch.testing.assert_close(g, torch.sigmoid(u.detach()) / 2)


def test_phi_finite_at_extremes():
    u = torch.tensor([-1e4, -100.0, 100.0, 1e4])  # fp32: naive exp(1e4) = inf
    y = phi(u)
    assert torch.isfinite(y).all()
    assert y[0].item() == pytest.approx(-0.5 * LOG2)
    assert y[3].item() == pytest.approx(0.5 * (1e4 - LOG2))


# --- group advantages ------------------------------------------------------------------


def test_group_advantages_unbiased_zscore():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # B=2, G=4
    adv = group_advantages(r, 4, eps=0.0)
    for g in range(2):
        grp = r[4 * g : 4 * g + 4].tolist()
        mu, sd = statistics.mean(grp), statistics.stdev(grp)  # stdev: the unbiased one
        torch.testing.assert_close(adv[4 * g : 4 * g + 4], torch.tensor([(x - mu) / sd for x in grp]))
    assert adv.shape == (8,) and adv.dtype == torch.float32


def test_group_advantages_zero_variance_groups_are_exactly_zero():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 1.0, 0.0, 1.0])  # B=4, G=3
    adv = group_advantages(r, 3)
    assert (adv[:9] == 0).all()  # all-correct, all-wrong, all-equal non-binary
    assert (adv[9:] != 0).all()
    assert (group_advantages(torch.tensor([1.0, 0.0, 1.0]), 1) == 0).all()  # G = 1: no nan
    with pytest.raises(ValueError):
        group_advantages(torch.ones(7), 4)


# --- token advantages ------------------------------------------------------------------


def test_token_advantages_each_method():
    torch.manual_seed(0)
    N, T = 4, 6
    a = torch.randn(N)
    u = 5 * torch.randn(N, T)
    lengths = torch.tensor([6, 3, 1, 0])
    mask = mask_of(lengths, T)
    lam = 0.5
    ph = 0.5 * (F.softplus(u) - LOG2)
    expected = {
        "grpo": a[:, None].expand(N, T),
        "sd": a[:, None] + lam * u,
        "antisd": a[:, None] - lam * ph,
        "revkl": a[:, None] - lam * u,
        "mult": a[:, None] * (1 - lam * ph),
    }
    for method, ref in expected.items():
        out = token_advantages(a, u, mask, method=method, lam=lam)
        assert out.shape == (N, T)
        torch.testing.assert_close(out, torch.where(mask, ref, 0.0), msg=method)
        assert (out[~mask] == 0).all()
    # lam = 0 is GRPO for every additive method
    for method in ("sd", "antisd", "revkl", "mult"):
        torch.testing.assert_close(token_advantages(a, u, mask, method=method, lam=0.0), expected["grpo"] * mask)


def test_token_advantages_zero_variance_group_still_gets_token_term():
    u = torch.tensor([[-10.0, 0.0, 10.0]])
    out = token_advantages(torch.zeros(1), u, torch.ones(1, 3, dtype=torch.bool), method="antisd", lam=0.5)
    torch.testing.assert_close(out, -0.5 * phi(u))
    assert out[0, 0] > 0 and out[0, 1] == 0 and out[0, 2] < 0  # deliberation bonus, shortcut penalty


def test_token_advantages_u_is_a_constant_and_errors():
    u = torch.randn(2, 3, requires_grad=True)
    out = token_advantages(torch.randn(2), u, torch.ones(2, 3, dtype=torch.bool), method="antisd", lam=0.5)
    assert not out.requires_grad
    with pytest.raises(ValueError, match="unknown method"):
        token_advantages(torch.randn(2), u, torch.ones(2, 3, dtype=torch.bool), method="jsd", lam=0.5)
    with pytest.raises(ValueError):
        token_advantages(torch.randn(2), None, torch.ones(2, 3, dtype=torch.bool), method="sd", lam=0.5)
    assert token_advantages(torch.ones(2), None, torch.ones(2, 3, dtype=torch.bool), method="grpo", lam=0.5).sum() == 6


# --- policy loss -----------------------------------------------------------------------


def test_policy_loss_clipping_per_token():
    # one token per row: (log ratio, advantage) -> expected loss, expected d loss / d logp
    cases = [
        (math.log(1.5), 1.0, -1.2, 0.0),  # A>0, ratio above 1+eps: clipped, no gradient
        (math.log(0.5), -1.0, 0.8, 0.0),  # A<0, ratio below 1-eps: clipped, no gradient
        (math.log(0.5), 1.0, -0.5, -0.5),  # A>0, ratio low: unclipped (pessimistic min)
        (math.log(1.5), -1.0, 1.5, 1.5),  # A<0, ratio high: unclipped
        (0.0, 2.0, -2.0, -2.0),  # on-policy: -A, gradient -A
    ]
    old = torch.zeros(len(cases), 1)
    logp = torch.tensor([[c[0]] for c in cases], requires_grad=True)
    adv = torch.tensor([[c[1]] for c in cases])
    mask = torch.ones(len(cases), 1, dtype=torch.bool)
    per = [policy_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], num_tokens=1) for i in range(len(cases))]
    for c, l in zip(cases, per):
        assert l.item() == pytest.approx(c[2], abs=1e-6)
    loss = policy_loss(logp, old, adv, mask, num_tokens=len(cases))
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g[:, 0], torch.tensor([c[3] for c in cases]) / len(cases))
    # asymmetric clip (clip_high) is honoured
    l = policy_loss(logp[:1], old[:1], adv[:1], mask[:1], clip_high=0.28, num_tokens=1)
    assert l.item() == pytest.approx(-1.28, abs=1e-6)


def test_policy_loss_ignores_padding_garbage():
    logp = torch.tensor([[0.0, float("nan")]])
    out = policy_loss(logp, torch.tensor([[0.0, 50.0]]), torch.tensor([[1.0, float("inf")]]), torch.tensor([[True, False]]), num_tokens=1)
    assert out.item() == -1.0


def test_loss_and_grad_identical_for_micro_batches(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    N, T, V = 6, 8, model.config.vocab_size
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 7, 5, 2, 9, 4)]
    responses = torch.randint(0, V, (N, T))
    lengths = torch.tensor([8, 2, 5, 1, 7, 3])
    mask = mask_of(lengths, T)
    num_tokens = int(mask.sum())
    with torch.no_grad():
        old, _ = model_lib.response_logprobs(model, prompts, responses, lengths)
    old = torch.where(mask, old + 0.4 * torch.randn(N, T), 0.0)  # an off-policy old policy: clipping engages
    adv = torch.where(mask, torch.randn(N, T), 0.0)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads_for(splits):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for lo, hi in splits:
            logp, _ = model_lib.response_logprobs(model, prompts[lo:hi], responses[lo:hi], lengths[lo:hi])
            loss = policy_loss(logp, old[lo:hi], adv[lo:hi], mask[lo:hi], num_tokens=num_tokens)
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in params]

    full_loss, full_g = grads_for([(0, 6)])
    split_loss, split_g = grads_for([(0, 1), (1, 4), (4, 6)])
    model.zero_grad(set_to_none=True)
    assert split_loss == pytest.approx(full_loss, rel=1e-5, abs=1e-7)
    for a, b in zip(full_g, split_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert sum(g.abs().sum() for g in full_g) > 0
    with torch.no_grad():
        logp, _ = model_lib.response_logprobs(model, prompts, responses, lengths)
    ratio = torch.exp(logp - old)[mask]
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()  # both regimes
    # and the pitfall (per-micro-batch mean) would NOT match: the test can tell
    with torch.no_grad():
        bad = 0.0
        for lo, hi in [(0, 1), (1, 4), (4, 6)]:
            logp, _ = model_lib.response_logprobs(model, prompts[lo:hi], responses[lo:hi], lengths[lo:hi])
            bad += policy_loss(logp, old[lo:hi], adv[lo:hi], mask[lo:hi], num_tokens=int(mask[lo:hi].sum())).item()
    assert abs(bad - full_loss) > 1e-3


# --- teacher prompts -------------------------------------------------------------------


def encode_responses(tok, texts, eos=True, T=None):
    """Right-padded (N, T) response ids + lengths, each text's ids followed by EOS."""
    rows = [tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []) for t in texts]
    T = T or max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


def user_turn(tok, prompt_ids):
    """The user-message content of a decoded teacher prompt."""
    text = tok.decode(prompt_ids, skip_special_tokens=False)
    head = "<|im_start|>user\n"
    assert text.startswith(head), text
    return text[len(head) : text.index("<|im_end|>")]


def solution_of(tok, prompt_ids):
    u = user_turn(tok, prompt_ids)
    return u.split("Your previous attempt:\n", 1)[1].split("\n\nPrevious assessment:", 1)[0]


def test_teacher_prompt_layout_exact(tiny):
    _, tok = tiny
    problem = "Solve the following math problem: 3 + 4 = ?"
    texts = ["The answer is \\boxed{7}.", "The answer is \\boxed{8}."]
    responses, lengths = encode_responses(tok, texts)
    rewards = torch.tensor([1.0, 0.0])
    before = responses.clone()
    tp = teacher_prompts(tok, [problem], responses, lengths, rewards, 2, references=["\\boxed{7}"], enable_thinking=False)
    assert torch.equal(responses, before)  # the response tensor is never touched
    expected_1 = (
        "<|im_start|>user\n" + problem + "\n\nYour previous attempt:\nThe answer is \\boxed{7}."
        "\n\nPrevious assessment:\nYour answer is incorrect.\n\nNow solve this problem step by step."
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tok.decode(tp[1], skip_special_tokens=False) == expected_1
    # rollout 0 is the only correct one: it gets the reference, and its own feedback is "correct"
    assert solution_of(tok, tp[0]) == "\\boxed{7}"
    assert user_turn(tok, tp[0]).endswith("Previous assessment:\n" + FEEDBACK_CORRECT + "\n\nNow solve this problem step by step.")
    assert FEEDBACK_INCORRECT in user_turn(tok, tp[1])
    # Same generation header as the student's prompt, so the same response ids follow it.
    student = tok.apply_chat_template([{"role": "user", "content": problem}], add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=False)
    header = tok("<|im_start|>assistant\n<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    assert student[-len(header) :] == header and tp[0][-len(header) :] == header
    assert all(len(p) > len(student) for p in tp)
    # enable_thinking=None: the template's default (no empty think block for the tiny one)
    tp_think = teacher_prompts(tok, [problem], responses, lengths, rewards, 2, references=["\\boxed{7}"])
    assert tok.decode(tp_think[1], skip_special_tokens=False).endswith("step by step.<|im_end|>\n<|im_start|>assistant\n")


def test_teacher_prompt_never_picks_itself_and_is_uniform(tiny):
    _, tok = tiny
    G = 4
    texts = [f"So the answer is \\boxed{{{k}}}." for k in (10, 11, 12, 13, 20, 21, 22, 23)]  # B=2
    responses, lengths = encode_responses(tok, texts)
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    sol_text = {i: strip_think(t) for i, t in enumerate(texts)}
    seen = {i: set() for i in range(8)}
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        tp = teacher_prompts(tok, ["P0", "P1"], responses, lengths, rewards, G, references=["REF0", "REF1"], generator=gen)
        for i in range(8):
            seen[i].add(solution_of(tok, tp[i]))
    # group 0: correct {0, 1, 3}; every row sees exactly the OTHER correct ones, each at least once
    assert seen[0] == {sol_text[1], sol_text[3]}
    assert seen[1] == {sol_text[0], sol_text[3]}
    assert seen[2] == {sol_text[0], sol_text[1], sol_text[3]}
    assert seen[3] == {sol_text[0], sol_text[1]}
    # group 1: only row 5 is correct -> it falls back to the reference, the others read row 5
    assert seen[5] == {"REF1"}
    assert seen[4] == seen[6] == seen[7] == {sol_text[5]}


def test_teacher_prompt_reproducible_with_generator(tiny):
    _, tok = tiny
    texts = [f"So the answer is \\boxed{{{k}}}." for k in range(8)]
    responses, lengths = encode_responses(tok, texts)
    rewards = torch.ones(8)
    args = (tok, ["P"], responses, lengths, rewards, 8)
    a = teacher_prompts(*args, references=["R"], generator=torch.Generator().manual_seed(3))
    b = teacher_prompts(*args, references=["R"], generator=torch.Generator().manual_seed(3))
    c = teacher_prompts(*args, references=["R"], generator=torch.Generator().manual_seed(4))
    assert a == b and a != c


def test_strip_think():
    assert strip_think("<think>\nWait, maybe 6.\n</think>\n\nThe answer is 7.") == "The answer is 7."
    assert strip_think("<think>a</think>x<think>b</think>y") == "xy"
    assert strip_think("I think... so 6</think>\n\nThe answer is 7.") == "The answer is 7."  # opened in the prompt
    assert strip_think("The answer is 7.<think>never closed") == "The answer is 7."
    assert strip_think("<think>never closed at all") == ""
    assert strip_think("No thinking here.") == "No thinking here."


def test_teacher_prompt_strips_think_and_skips_empty(tiny):
    _, tok = tiny
    texts = [
        "<think>\nWait, let me check. Maybe 6.\n</think>\n\nThe answer is \\boxed{7}.",  # correct, with a think block
        "<think>\nLet me check each",  # "correct" but all thought: nothing to show
        "The answer is \\boxed{6}.",  # wrong
    ]
    responses, lengths = encode_responses(tok, texts)
    rewards = torch.tensor([1.0, 1.0, 0.0])
    for seed in range(10):
        tp = teacher_prompts(tok, ["P"], responses, lengths, rewards, 3, references=["R"], generator=torch.Generator().manual_seed(seed))
        assert solution_of(tok, tp[2]) == "The answer is \\boxed{7}."  # never the empty one
        assert solution_of(tok, tp[1]) == "The answer is \\boxed{7}."
        assert solution_of(tok, tp[0]) == "R"  # the only other correct one is empty
        assert "<think>" not in user_turn(tok, tp[2])


def test_teacher_prompt_truncation_keeps_the_end(tiny):
    _, tok = tiny
    long_sol = "Let me check each pair. " * 30 + "So the answer is \\boxed{7}."
    responses, lengths = encode_responses(tok, [long_sol, "no"])
    rewards = torch.tensor([1.0, 0.0])
    budget = 12
    tp = teacher_prompts(tok, ["P"], responses, lengths, rewards, 2, references=["Given it. " * 40 + "\\boxed{7}"], max_solution_tokens=budget)
    sol = solution_of(tok, tp[1])
    assert sol.endswith("So the answer is \\boxed{7}.")
    assert len(tok(sol, add_special_tokens=False)["input_ids"]) <= budget + 2
    ref = solution_of(tok, tp[0])  # the reference is cut the same way
    assert ref.endswith("\\boxed{7}") and len(ref) < 60
    full = teacher_prompts(tok, ["P"], responses, lengths, rewards, 2, references=["R"], max_solution_tokens=None)
    assert solution_of(tok, full[1]) == long_sol


# --- PMI against brute force -----------------------------------------------------------


def brute_force_scores(model, prompt, response, temperature):
    """One sequence, no padding: full forward of prompt + response, log_softmax, per token."""
    ids = torch.tensor(prompt + response)[None]  # (1, P+L)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature  # (P+L, V)
    lp = torch.log_softmax(logits, dim=-1)
    P = len(prompt)
    rows = lp[P - 1 : P - 1 + len(response)]  # (L, V): position P-1+j predicts response token j
    logp = rows.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    ent = -(rows.exp() * rows).sum(-1)
    return logp, ent


def test_pmi_matches_brute_force(tiny):
    model, tok = tiny
    torch.manual_seed(1)
    V = model.config.vocab_size
    B, G, T = 2, 3, 9
    problems = ["Solve 3 + 4 = ?", "Which pair sums to 10?"]
    student = []
    for p in problems:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False)
        student += [ids] * G
    lengths = torch.tensor([9, 4, 1, 6, 9, 2])  # ragged
    responses = torch.randint(0, V, (B * G, T))  # garbage beyond lengths must not matter
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    tp = teacher_prompts(tok, problems, responses, lengths, rewards, G, references=["\\boxed{7}", "\\boxed{10}"], generator=torch.Generator().manual_seed(0))
    assert all(len(t) > len(s) + 10 for t, s in zip(tp, student))
    temperature = 0.7
    u, ent, s, t = pmi(model, student, tp, responses, lengths, temperature=temperature, chunk_size=4)
    mask = mask_of(lengths, T)
    for x in (u, ent, s, t):
        assert x.shape == (B * G, T) and x.dtype == torch.float32
        assert (x[~mask] == 0).all()
    for i in range(B * G):
        L = int(lengths[i])
        resp = responses[i, :L].tolist()
        s_ref, _ = brute_force_scores(model, student[i], resp, temperature)
        t_ref, h_ref = brute_force_scores(model, tp[i], resp, temperature)
        torch.testing.assert_close(s[i, :L].double(), s_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(t[i, :L].double(), t_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(u[i, :L].double(), t_ref - s_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ent[i, :L].double(), h_ref, rtol=1e-4, atol=1e-4)
    assert (u[mask].abs() > 1e-6).any()  # the context changes the scores: u is not trivially 0


def test_pmi_no_teacher(tiny):
    model, tok = tiny
    torch.manual_seed(2)
    V = model.config.vocab_size
    student = [torch.randint(0, V, (n,)).tolist() for n in (4, 6)]
    responses = torch.randint(0, V, (2, 5))
    lengths = torch.tensor([5, 3])
    u, ent, s, t = pmi(model, student, None, responses, lengths, no_teacher=True, temperature=1.3)
    mask = mask_of(lengths, 5)
    torch.testing.assert_close(u, -s)
    assert (t == 0).all() and (u[mask] > 0).all()
    for i in range(2):
        L = int(lengths[i])
        s_ref, h_ref = brute_force_scores(model, student[i], responses[i, :L].tolist(), 1.3)
        torch.testing.assert_close(s[i, :L].double(), s_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ent[i, :L].double(), h_ref, rtol=1e-4, atol=1e-4)  # the student's entropy
