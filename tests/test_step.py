"""train.py's one-student-forward step (issue 12) against today's two-pass step.

The two-pass reference, written out here: model.response_logprobs scores the student and the
teacher row by row under no_grad (s_t = old_logp, t_t, H_t), the advantages are formed over the whole
batch, then every micro-batch runs the student again with grad. The step under test runs the
teacher only (scores_in_chunks: each distinct teacher prompt once) and forms s_t, u and the
advantages per micro-batch from the update's own forward (accumulate_grads). Same tiny model,
ragged rows, groups with 0, 1 and all rollouts correct.
"""

import pytest
import torch

import antisd
import dist as dist_lib
import model as model_lib
import train

B, G = 3, 4
N = B * G
PROBLEMS = ["Which pair sums to 13?", "Solve 3 + 4 = ?", "Which pair sums to 10?"]
# response texts: rows 0-3 all wrong, rows 4-7 one correct (row 5), rows 8-11 all correct
TEXTS = ["Let me check A.", "Wait B.", "Maybe C, no.", "So the answer is \\boxed{D}.",
         "A: 4 + 9 = 13, yes.", "The answer is \\boxed{7}.", "Let me check each pair: B", "Wait, so",
         "\\boxed{A}.", "Let me check A: 4 + 9 = 13, yes. So the answer is \\boxed{A}.", "Given A holds, \\boxed{A}.", "Yes \\boxed{A}."]  # fmt: skip
REWARDS = torch.tensor([0.0] * 4 + [0.0, 1.0, 0.0, 0.0] + [1.0] * 4)
LAM = 0.5


@pytest.fixture(scope="module")
def world():
    model, tok = model_lib.load("tiny", seed=0)
    student = []
    for p in PROBLEMS:
        student += [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False))] * G
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    T = max(len(r) for r in rows) + 2
    responses = torch.randint(0, len(tok), (N, T), generator=torch.Generator().manual_seed(0))  # junk past each length
    for i, r in enumerate(rows):
        responses[i, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])  # (N,) ragged
    teacher = antisd.teacher_prompts(tok, PROBLEMS, responses, lengths, REWARDS, G, references=["\\boxed{A}", "\\boxed{7}", "\\boxed{B}"],
                                     max_solution_tokens=32, generator=torch.Generator().manual_seed(1))  # fmt: skip
    return model, student, teacher, responses, lengths


def two_pass_grads(model, student, teacher, responses, lengths, batches, *, method, no_teacher, temperature, lam=LAM):
    """Today's step: no-grad pmi (s, t, u, H) for every row, advantages over the batch, then the
    student forward again per micro-batch with old_logp = the no-grad s."""
    mask = antisd.mask_from_lengths(lengths, responses.shape[1])
    with torch.no_grad():  # written out (not antisd.pmi, which shares code with the step under test)
        s, s_ent = model_lib.response_logprobs(model, student, responses, lengths, temperature=temperature, with_entropy=True)
        if no_teacher:
            t, ent = torch.zeros_like(s), s_ent  # the ablation: t := 0, the gate watches the student
        else:
            t, ent = model_lib.response_logprobs(model, teacher, responses, lengths, temperature=temperature, with_entropy=True)
    u = torch.where(mask, t - s, 0.0)  # (N, T)
    adv = antisd.token_advantages(antisd.group_advantages(REWARDS, G), u, mask, method=method, lam=lam)  # (N, T)
    num_tokens = int(lengths.sum())
    model.zero_grad(set_to_none=True)
    total = 0.0
    for idx in batches:
        Tm = int(lengths[idx].max())
        logp, _ = model_lib.response_logprobs(model, student[idx], responses[idx, :Tm], lengths[idx], temperature=temperature)
        loss = antisd.policy_loss(logp, s[idx, :Tm], adv[idx, :Tm], mask[idx, :Tm], num_tokens=num_tokens)
        loss.backward()
        total += loss.item()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return total, grads, u, ent, s


def one_pass_grads(model, student, teacher, responses, lengths, batches, *, method, no_teacher, temperature, with_teacher=True, rows=5, lam=LAM, old_logp=None):
    """train.py's step: sections 5, 7 and 8 as the loop calls them."""
    t_logp = ent = work = None
    if with_teacher:
        t_logp, ent, work = train.scores_in_chunks(model, student if no_teacher else teacher, responses, lengths, rows=rows, temperature=temperature)
        if no_teacher:
            t_logp = torch.zeros_like(t_logp)
    seq_adv = antisd.group_advantages(REWARDS, G)

    def token_adv(idx, u, m):
        return antisd.token_advantages(seq_adv[idx], u, m, method=method, lam=lam)

    model.zero_grad(set_to_none=True)
    total, s, u = train.accumulate_grads(model, dist_lib.setup(device="cpu"), batches, student, responses, lengths, t_logp, token_adv,
                                         temperature=temperature, clip_low=0.2, clip_high=0.2, num_tokens=int(lengths.sum()), old_logp=old_logp)  # fmt: skip
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return total, grads, u, ent, s, work


SPLIT = [slice(0, 3), slice(3, 8), slice(8, 12)]  # micro-batches of unequal sizes
SORTED = [torch.tensor([5, 0, 11]), torch.tensor([1, 2, 3, 4, 6]), torch.tensor([10, 7, 8, 9])]  # rows in any order, as train.py's length-sorted ones


@pytest.mark.parametrize("method,no_teacher", [(m, False) for m in antisd.METHODS] + [("antisd", True)])
def test_gradient_equals_two_pass_gradient(world, method, no_teacher):
    model, student, teacher, responses, lengths = world
    ref_loss, ref_g, _, _, _ = two_pass_grads(model, student, teacher, responses, lengths, SPLIT, method=method, no_teacher=no_teacher, temperature=0.9)
    loss, g, _, _, _, _ = one_pass_grads(model, student, teacher, responses, lengths, SORTED, method=method, no_teacher=no_teacher, temperature=0.9)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert sum(float(x.abs().sum()) for x in g) > 0
    if method != "grpo":  # the token term is in the gradient: GRPO's differs by far more than the tolerance
        _, g0, _, _, _, _ = one_pass_grads(model, student, teacher, responses, lengths, SPLIT, method="grpo", no_teacher=no_teacher, temperature=0.9)
        assert max(float((a - b).abs().max()) for a, b in zip(g, g0)) > 1e-4


def test_grpo_needs_no_scoring_pass_and_any_split_gives_the_same_gradient(world):
    model, student, teacher, responses, lengths = world
    _, ref_g, _, _, _ = two_pass_grads(model, student, teacher, responses, lengths, SPLIT, method="grpo", no_teacher=False, temperature=1.0)
    _, g, u, ent, _, work = one_pass_grads(model, student, teacher, responses, lengths, [slice(0, 12)], method="grpo", no_teacher=False, temperature=1.0, with_teacher=False)
    assert u is None and ent is None and work is None
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_shared_teacher_scores_equal_row_by_row(world):
    """u (from the update's s and the shared-prefix t) and the teacher entropy equal today's
    per-row pmi in fp32; the teacher prompt work is the distinct prompts' tokens."""
    model, student, teacher, responses, lengths = world
    _, _, u_ref, ent_ref, s_ref = two_pass_grads(model, student, teacher, responses, lengths, SPLIT, method="antisd", no_teacher=False, temperature=0.8)
    _, _, u, ent, s, work = one_pass_grads(model, student, teacher, responses, lengths, SPLIT, method="antisd", no_teacher=False, temperature=0.8, rows=64)
    for x, ref in ((u, u_ref), (ent, ent_ref), (s, s_ref)):
        assert x.shape == ref.shape and x.dtype == torch.float32
        torch.testing.assert_close(x, ref, atol=1e-6, rtol=1e-6)
    mask = antisd.mask_from_lengths(lengths, responses.shape[1])
    assert (u[~mask] == 0).all() and (ent[~mask] == 0).all() and (u[mask].abs() > 1e-3).any()
    # distinct teacher prompts: all-wrong group 1 (the reference, "incorrect"), one-correct
    # group 2 (its correct row sees the reference, the others it), all-correct group <= G
    distinct = [len({tuple(p) for p in teacher[g * G : (g + 1) * G]}) for g in range(B)]
    assert distinct[0] == 1 and distinct[1] == 2 and 2 <= distinct[2] <= G
    assert work["prompt_tokens_rows"] == sum(len(p) for p in teacher)
    assert work["prompt_tokens"] == sum(len(p) for p in {tuple(p) for p in teacher}) < work["prompt_tokens_rows"]

@pytest.mark.parametrize("rows", [1, 3, 4, 100])
def test_scores_in_chunks_any_chunking(world, rows):
    """Each row's scores do not depend on the chunk size; whole groups of identical prompts share
    a chunk when they fit (rows >= G: each distinct prompt once), and are split otherwise."""
    model, student, _, responses, lengths = world
    with torch.no_grad():
        ref, ref_ent = model_lib.response_logprobs(model, student, responses, lengths, with_entropy=True)
    logp, ent, work = train.scores_in_chunks(model, student, responses, lengths, rows=rows, temperature=1.0)
    torch.testing.assert_close(logp, ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=2e-6, rtol=0)
    distinct = sum(len(student[g * G]) for g in range(B))
    assert work["prompt_tokens_rows"] == sum(len(p) for p in student)
    assert work["prompt_tokens"] == (distinct if rows >= G else work["prompt_tokens_rows"] if rows == 1 else sum(len(student[g * G]) * 2 for g in range(B)))
    _, none, _ = train.scores_in_chunks(model, student, responses, lengths, rows=rows, temperature=1.0, with_entropy=False)
    assert none is None


def test_extension_point_old_logp_from_a_scoring_pass(world):
    """A fork with several updates per batch fixes old_logp by a no-grad student pass before the
    first update; on the first update that is the same gradient as the on-policy step, and on a
    later one (old != current policy) the clipped ratio differs from it."""
    model, student, teacher, responses, lengths = world
    old, _, _ = train.scores_in_chunks(model, student, responses, lengths, rows=5, temperature=1.0, with_entropy=False)
    _, g_on, u_on, _, s_on, _ = one_pass_grads(model, student, teacher, responses, lengths, SPLIT, method="antisd", no_teacher=False, temperature=1.0)
    _, g_old, u_old, _, s_old, _ = one_pass_grads(model, student, teacher, responses, lengths, SPLIT, method="antisd", no_teacher=False, temperature=1.0, old_logp=old)
    assert torch.equal(s_old, old)  # s (and so u) is the given old_logp
    torch.testing.assert_close(u_old, u_on, atol=1e-6, rtol=0)
    for a, b in zip(g_old, g_on):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    mask = antisd.mask_from_lengths(lengths, responses.shape[1])
    stale = torch.where(mask, old + 0.5, 0.0)  # a policy the update has moved away from: ratio e^-0.5 < 0.8
    _, g_stale, _, _, _, _ = one_pass_grads(model, student, teacher, responses, lengths, SPLIT, method="antisd", no_teacher=False, temperature=1.0, old_logp=stale)
    assert max(float((a - b).abs().max()) for a, b in zip(g_stale, g_on)) > 1e-4
