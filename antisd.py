"""antisd.py: the AntiSD algorithm on top of GRPO, as pure functions (SPEC sections 1-2).

Anti-Self-Distillation (Shen et al., arXiv 2605.11609). One training step, B prompts x G
rollouts, and what each function here computes:

    rewards R_i in {0,1}                                      (grading.py)
    A_seq_i = (R_i - mean_g R) / (std_g R + eps)              group_advantages
              0 for a group whose rewards are all equal
    c_i     = verified solution + feedback on rollout i       teacher_prompts
    s_t     = log pi(y_t | x, y_<t)          student score    the update's own forward (train.py 8)
    t_t     = log pi(y_t | x, c_i, y_<t)     teacher score    model.shared_prefix_logprobs (same weights, no_grad)
    u_t     = t_t - s_t                      PMI(y_t ; c | x, y_<t), fp32, never clamped: pmi_from_logprobs
                                             (pmi: both scores in one call, the reference and the inspector's)
    phi(u)  = 0.5 * (softplus(u) - log 2)                     phi
    A_i,t   = A_seq_i - lambda * stopgrad(phi(u_i,t))         token_advantages (method="antisd")
    lambda  = 0.5 * g,  g in {0,1} from the entropy gate      gate.py
    L       = -sum_{i,t in mask} min(r A, clip(r, 1-e_lo, 1+e_hi) A) / num_tokens
              r = exp(logp - old_logp)                        policy_loss

Why -phi(u): AntiSD *ascends* JSD(student, teacher). With r = pi_S / pi_T = e^-u the
score-function gradient of that JSD gives the per-token advantage -phi(u), whose slope is
-sigmoid(u)/2. Tokens the solution makes unnecessary ("Wait", "Let", u << 0) get a bonus
capped at +0.5 log 2 ~ 0.347; tokens the solution implies ("Given", "boxed", u >> 0) get a
penalty linear in u. Default self-distillation (method="sd") is the opposite sign, +u.

The variants of SPEC section 2, all selected by `token_advantages(method=...)`:

    grpo    A_seq                        (lam ignored)
    sd      A_seq + lam * u
    antisd  A_seq - lam * phi(u)
    revkl   A_seq - lam * u              (reverse-KL ascent)
    mult    A_seq * (1 - lam * phi(u))   [D] the paper does not give the exact form
    no teacher: the teacher log-prob := 0, so u = -s (pmi(no_teacher=True); train.py --no-teacher), then "antisd"

Departures from the paper and choices it leaves open (all [D] in SPEC):
  - The verified solution is never rollout i itself: a uniformly random *other* correct
    rollout of the group (one whose text is non-empty after think stripping), else the
    dataset reference. Think blocks are stripped, the text is truncated to
    `max_solution_tokens` keeping its END (the final answer).
  - `references` are used verbatim: for answer-only datasets (DAPO-Math-17k) the caller
    passes "\\boxed{answer}" (data.py owns that), for datasets with worked solutions the
    solution text.
  - With no_teacher there is no teacher forward at all, so the entropy `pmi` returns (the
    gate's statistic) is the *student's* entropy. The gate then watches the policy itself.
  - The loss divides by the token count of the whole optimizer step (DAPO token-mean), so
    the micro-batch split does not change the loss or its gradient.

The authors' released code ("--recipe official", section at the end of this file; README
"Which AntiSD?") does more than the paper's text: u is clipped, the token term is z-scored
within each response, lambda is per response from the teacher's perplexity (gate.py
PerplexityGate), and the peer solution comes from the group only:

    u'      = 0 where |u| > K_SIGMA * sigma_ref (after warm-up), then clamp(u', +-LOG_CLIP)   u_clip
    term_i  = clamp(zscore_within_row_i(phi(u')), +-PRM_CLIP), 0 for rows >= len_mask        seq_zscore
    A_i,t   = A_seq_i - lambda_i * term_i,t      (sd: + lambda_i * term_i,t)      official_token_advantages

Shapes: B prompts, G rollouts per prompt, N = B*G rollouts (prompt-major: rows
[g*G:(g+1)*G] are prompt g's), T padded response length, V vocabulary.
Masks are always built from lengths: mask = arange(T)[None] < lengths[:, None]  (N, T).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

import model as model_lib

METHODS = ("grpo", "sd", "antisd", "revkl", "mult")
RECIPES = ("paper", "official")  # the paper's text / the authors' launcher (README "Which AntiSD?")
OFFICIAL_METHODS = ("grpo", "sd", "antisd")  # the only ones the official launcher has

LOG2 = math.log(2.0)

# The teacher's user turn (SPEC section 1 step 4, the paper's appendix wording).
TEACHER_TEMPLATE = "{problem}\n\nYour previous attempt:\n{solution}\n\nPrevious assessment:\n{feedback}\n\nNow solve this problem step by step."
FEEDBACK_CORRECT = "Your answer is correct."
FEEDBACK_INCORRECT = "Your answer is incorrect."


# ---------------------------------------------------------------------------------------
# Shaping and advantages.
# ---------------------------------------------------------------------------------------


def phi(u: torch.Tensor) -> torch.Tensor:
    """phi(u) = 0.5 * (softplus(u) - log 2), elementwise (SPEC section 1 step 7).

    phi(0) = 0, phi'(u) = sigmoid(u) / 2, phi >= -0.5 log 2, phi ~ u/2 for large u.
    F.softplus switches to the identity above its threshold, so it is finite for any finite
    u (log(1 + exp(u)) written naively overflows at u ~ 89 in fp32).
    """
    return 0.5 * (F.softplus(u) - LOG2)


def mask_from_lengths(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(N, T) bool, True on real response tokens. The project's one mask convention."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (N, T)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO sequence advantage: z-score of each reward within its group of G consecutive rows.

    rewards: (N,) float, N = B*G, prompt-major. Returns (N,) fp32.

    std is the *unbiased* (Bessel, /(G-1)) sample std, as torch.std and verl's
    compute_grpo_outcome_advantage use: the paper trains with verl, so this keeps the
    advantage scale equal to the paper's (for G=8 the two differ by sqrt(8/7) ~ 7%).
    A group whose rewards are all equal (checked exactly, max == min) gets exactly 0 rather
    than 0/eps noise; this also covers G = 1, where the unbiased std is undefined.
    """
    assert rewards.dim() == 1, rewards.shape
    N = rewards.shape[0]
    G = int(group_size)
    if G < 1 or N % G != 0:
        raise ValueError(f"group_advantages: {N} rewards do not split into groups of {G}")
    r = rewards.float().view(N // G, G)  # (B, G)
    mean = r.mean(dim=1, keepdim=True)  # (B, 1)
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # (B, 1) zero variance
    # For G = 1 std would be nan; those groups are all `flat`, and where() discards it.
    std = r.std(dim=1, keepdim=True, correction=1) if G > 1 else torch.ones_like(mean)  # (B, 1)
    adv = torch.where(flat, torch.zeros_like(r), (r - mean) / (std + eps))  # (B, G)
    return adv.view(N)


def token_advantages(
    seq_adv: torch.Tensor,
    u: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    method: str,
    lam: float,
) -> torch.Tensor:
    """Per-token advantage A_{i,t} for every variant of SPEC section 2; 0 outside mask.

    seq_adv: (N,) A_seq from group_advantages. u: (N, T) PMI from pmi_from_logprobs / pmi
    (may be None for method="grpo"). Every term is per row, so train.py applies it to each
    micro-batch of whole rows (N = that micro-batch's rows) with u from the update's forward.
    mask: (N, T) bool. lam: the gate's lambda (0.5 * g), a python float.
    u is detached: the shaping term is part of the advantage (stopgrad in the paper), never a
    path for gradients. The term is added AFTER group normalisation, so all-correct and
    all-wrong groups (A_seq = 0) still get it while the gate is open (SPEC step 9).
    """
    if method not in METHODS:
        raise ValueError(f"token_advantages: unknown method {method!r}; expected one of {METHODS}")
    N, T = mask.shape
    assert seq_adv.shape == (N,), (seq_adv.shape, mask.shape)
    a = seq_adv.float()[:, None].expand(N, T)  # (N, T)
    if method == "grpo":
        out = a
    else:
        if u is None:
            raise ValueError(f"token_advantages: method {method!r} needs the PMI u")
        assert u.shape == (N, T), (u.shape, mask.shape)
        u = u.detach().float()  # (N, T) stopgrad
        if method == "sd":
            out = a + lam * u
        elif method == "antisd":
            out = a - lam * phi(u)
        elif method == "revkl":
            out = a - lam * u
        else:  # "mult"
            out = a * (1.0 - lam * phi(u))
    # where(), not multiply: u beyond a row's length is garbage-free by contract, but a
    # stray inf/nan there must not leak (inf * 0 = nan).
    return torch.where(mask, out, torch.zeros_like(out))  # (N, T)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    num_tokens: int | float | torch.Tensor,
) -> torch.Tensor:
    """PPO clipped surrogate, token-summed over mask, divided by num_tokens. Returns a scalar.

    logp: (n, T) current log-probs (with grad), old_logp: (n, T) the sampler's (no grad),
    adv: (n, T) from token_advantages, mask: (n, T) bool. n is this micro-batch's rows.
    num_tokens: the number of masked tokens in the WHOLE optimizer step (every micro-batch,
    every rank). Because each micro-batch divides by the same constant, summing the losses
    (or accumulating their gradients) over any split equals the full-batch loss exactly:
    the DAPO token-level mean (SPEC step 10; the per-micro-batch mean is SPEC 5's pitfall).

    per token: r = exp(logp - old_logp);  l = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)
    Strictly on-policy (one update per rollout batch) r == 1 and this is plain REINFORCE with
    the token advantages; the clip matters only if the caller reuses a batch.
    """
    assert logp.shape == old_logp.shape == adv.shape == mask.shape, (logp.shape, old_logp.shape, adv.shape, mask.shape)
    n_tok = float(num_tokens)
    if not n_tok > 0:
        raise ValueError(f"policy_loss: num_tokens must be > 0, got {num_tokens}")
    # Padded positions: zero the log-ratio first so exp() never sees garbage there.
    log_ratio = torch.where(mask, logp - old_logp.detach(), torch.zeros_like(logp))  # (n, T)
    ratio = torch.exp(log_ratio)  # (n, T)
    adv = adv.detach()
    surr = ratio * adv  # (n, T)
    surr_clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv  # (n, T)
    per_tok = -torch.minimum(surr, surr_clipped)  # (n, T)
    return torch.where(mask, per_tok, torch.zeros_like(per_tok)).sum() / n_tok


# ---------------------------------------------------------------------------------------
# The privileged context: teacher prompts (SPEC section 1 steps 3-4).
# ---------------------------------------------------------------------------------------

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_think(text: str) -> str:
    """Remove reasoning blocks from a response, keeping only what follows them.

    1. every closed `<think>...</think>` block;
    2. an orphan `</think>` (templates of thinking models open `<think>` in the PROMPT, so the
       response starts inside the block): everything up to and including the last one;
    3. an unclosed `<think>` (the response ran out mid-thought): it and everything after.
    """
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


def _truncate_keep_end(tokenizer, text: str, max_tokens: int | None) -> str:
    """Keep the last max_tokens tokens of text (the final answer is at the end).

    The cut is in token space, then decoded back to text because it goes into a chat
    message. A cut through a multi-byte character can leave a replacement char at the start;
    harmless for a context. The teacher context is re-tokenized by the template, so its
    length is max_tokens up to a few tokens; only the RESPONSE must keep its exact ids.
    """
    if max_tokens is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[len(ids) - max_tokens :], skip_special_tokens=False)


def _response_text(tokenizer, ids: list[int]) -> str:
    """Decode one rollout's tokens (already cut at its length) to its answer text.

    Trailing EOS / pad ids are removed by id (they are the stop token, not content), then the
    text is decoded WITHOUT skip_special_tokens: some tokenizers mark <think> as special and
    skipping it would leave the thought text behind; strip_think removes the block instead.
    """
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    while ids and ids[-1] in stop:
        ids = ids[:-1]
    return strip_think(tokenizer.decode(ids, skip_special_tokens=False))


def teacher_user_text(problem: str, solution: str, correct: bool) -> str:
    """The teacher's user turn (SPEC section 1 step 4): problem, solution, feedback, instruction."""
    return TEACHER_TEMPLATE.format(problem=problem, solution=solution, feedback=FEEDBACK_CORRECT if correct else FEEDBACK_INCORRECT)


def teacher_prompts(
    tokenizer,
    user_texts: list[str],
    responses: torch.Tensor,
    lengths: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    *,
    references: list[str],
    max_solution_tokens: int | None = 1024,
    enable_thinking: bool | None = None,
    generator: torch.Generator | None = None,
    recipe: str = "paper",
    answers: list[str] | None = None,
    answer_match=None,
) -> list[list[int]]:
    """Token ids of every rollout's teacher prompt (prompt-major, N = B*G lists).

    user_texts: B strings, the exact user-message content the student saw for each prompt.
    responses: (N, T) long right-padded rollouts, lengths: (N,), rewards: (N,) (correct means
    reward > 0.5). references: B strings used verbatim when no other rollout of the group is
    correct (the caller passes "\\boxed{answer}" for answer-only datasets).
    max_solution_tokens: token budget of the solution, keeping its end (None: no limit).
    enable_thinking: passed to the chat template only when not None; use the student's.
    generator: a CPU torch.Generator for the choice among correct rollouts (None: torch's global
    RNG, the usual torch convention; pass one for reproducible runs). The choice is made on the
    host, so the generator must live there: a CUDA generator with a CPU draw raises on the first
    correct rollout (train.py keeps a CPU generator for it apart from the sampler's, issue 10).

    For rollout i of group g:
      solution = strip_think(a uniformly chosen correct rollout j != i of group g), else
                 references[g]; then cut to the last max_solution_tokens tokens;
      feedback = "Your answer is correct." if reward_i > 0.5 else "Your answer is incorrect.";
      prompt   = chat_template([user: teacher_user_text(...)], add_generation_prompt=True).
    The response is not touched: the teacher scores the same `responses` tensor (pmi), only
    behind this longer prompt.

    recipe="official": the authors' context rules instead (official_teacher_prompts): group
    peers only (no reference fallback), cut after the final answer (`answers`, B gold answers,
    compared by `answer_match`), the launcher's templates and token budget; `references` and
    `generator` are then unused.
    """
    if recipe == "official":
        assert answers is not None, "teacher_prompts(recipe='official') needs the gold answers"
        return official_teacher_prompts(tokenizer, user_texts, responses, lengths, rewards, group_size, answers=answers, match=answer_match,
                                        max_solution_tokens=max_solution_tokens, enable_thinking=enable_thinking)  # fmt: skip
    if recipe != "paper":
        raise ValueError(f"teacher_prompts: unknown recipe {recipe!r}; expected one of {RECIPES}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"teacher_prompts: the peer choice is drawn on the host; pass a CPU torch.Generator, not one on {generator.device}")
    N, T = responses.shape
    G = int(group_size)
    B = len(user_texts)
    assert N == B * G, f"teacher_prompts: {N} rollouts != {B} prompts x {G}"
    assert len(references) == B, (len(references), B)
    assert lengths.shape == (N,) and rewards.shape == (N,), (lengths.shape, rewards.shape)
    correct = (rewards > 0.5).tolist()  # N bools
    lens = lengths.tolist()
    responses = responses.cpu()  # one device->host copy, not one per decoded row

    convs = []
    for g in range(B):
        rows = range(g * G, (g + 1) * G)
        # Decode + strip + truncate each correct rollout once per group, not once per reader.
        sols = {}
        for j in rows:
            if correct[j]:
                text = _response_text(tokenizer, responses[j, : lens[j]].tolist())
                if text:  # a correct rollout that is all thought has nothing to show
                    sols[j] = _truncate_keep_end(tokenizer, text, max_solution_tokens)
        ref = None  # truncated lazily: most rows of a learning run never need it
        for i in rows:
            others = [j for j in sols if j != i]  # never rollout i itself
            if others:
                k = int(torch.randint(len(others), (1,), generator=generator, device="cpu"))
                solution = sols[others[k]]
            else:
                if ref is None:
                    ref = _truncate_keep_end(tokenizer, references[g], max_solution_tokens)
                solution = ref
            user = teacher_user_text(user_texts[g], solution, correct[i])
            convs.append([{"role": "user", "content": user}])

    prompts = _render(tokenizer, convs, enable_thinking)
    assert len(prompts) == N
    return prompts


def _render(tokenizer, convs: list[list[dict]], enable_thinking: bool | None) -> list[list[int]]:
    """Token ids of chat conversations, each ending with the assistant header."""
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    # transformers 5.x: apply_chat_template(tokenize=True) returns a BatchEncoding unless
    # return_dict=False; one batched call renders all N conversations.
    out = tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=False, **kw)
    if isinstance(out, Mapping):  # be robust to versions that ignore return_dict
        out = out["input_ids"]
    return [list(map(int, p)) for p in out]


# ---------------------------------------------------------------------------------------
# PMI: two scores of the same response tokens (SPEC section 1 steps 5-6).
# ---------------------------------------------------------------------------------------


def pmi_from_logprobs(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """u = t - s on the response tokens, 0 elsewhere; fp32, detached, never clamped.

    teacher_logp, student_logp, mask: (n, T), aligned by RESPONSE index (both from
    model.response_logprobs / shared_prefix_logprobs, which return a response's scores on its
    own columns). train.py's update forms u per micro-batch from its own forward's detached
    log-probs (strictly on-policy s_t = old_logp), so no separate student pass is needed.
    The no-teacher ablation passes teacher_logp = 0 (u = -s).
    """
    assert teacher_logp.shape == student_logp.shape == mask.shape, (teacher_logp.shape, student_logp.shape, mask.shape)
    u = teacher_logp.detach().float() - student_logp.detach().float()  # (n, T)
    return torch.where(mask, u, torch.zeros((), device=u.device))  # (n, T)


def pmi(
    model,
    student_prompts: list[list[int]],
    teacher_prompts: list[list[int]] | None,
    responses: torch.Tensor,
    lengths: torch.Tensor,
    *,
    no_teacher: bool = False,
    temperature: float = 1.0,
    chunk_size: int | None = None,
):
    """u = t - s for every response token, plus the gate's entropy. All under no_grad.

    Returns (u, entropy, student_logp, teacher_logp), each (N, T) fp32, exactly 0 at
    positions >= lengths:
      u            t_t - s_t, aligned by RESPONSE index (response_logprobs returns both on
                   the response's own columns, so the longer teacher prompt cannot shift it)
      entropy      the teacher's full-vocabulary entropy H_t (the gate's statistic);
                   with no_teacher, the student's (there is no teacher pass)
      student_logp s_t;  teacher_logp t_t (zeros with no_teacher)
    no_teacher=True is the paper's no-teacher ablation: the teacher log-prob is taken as 0, so
    u = -s_t (every token looks like "deliberation"); teacher_prompts may then be None.
    The teacher is the current policy itself (same weights, no EMA / frozen copy).
    temperature: the sampling temperature, applied to both scores (SPEC section 5).
    """
    N, T = responses.shape
    assert len(student_prompts) == N and lengths.shape == (N,), (len(student_prompts), responses.shape, lengths.shape)
    kw = {"temperature": temperature}
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size
    with torch.no_grad():
        if no_teacher:
            s, ent = model_lib.response_logprobs(model, student_prompts, responses, lengths, with_entropy=True, **kw)
            t = torch.zeros_like(s)
        else:
            assert teacher_prompts is not None and len(teacher_prompts) == N, "pmi: need one teacher prompt per rollout"
            s, _ = model_lib.response_logprobs(model, student_prompts, responses, lengths, **kw)
            t, ent = model_lib.response_logprobs(model, teacher_prompts, responses, lengths, with_entropy=True, **kw)
    s, t, ent = s.float(), t.float(), ent.float()  # (N, T) each
    mask = mask_from_lengths(lengths.to(s.device), T)  # (N, T)
    zero = torch.zeros((), device=s.device)
    u = pmi_from_logprobs(t, s, mask)  # (N, T) fp32, no clamping (values ~ -20 are normal)
    assert u.shape == ent.shape == (N, T), (u.shape, ent.shape)
    return u, torch.where(mask, ent, zero), torch.where(mask, s, zero), torch.where(mask, t, zero)


# ---------------------------------------------------------------------------------------
# The authors' recipe (--recipe official). Every constant names the launcher's knob. Sources
# (README "Which AntiSD?" says what each is and how it was read):
#   [L] FloyedShen/AntiSD recipe/antisd/_launchers/launch_short.sh and run/<model>/*.sh
#   [K] the fork's grpo_ca loss: a verl workers/actor/dp_actor.py in the search index that
#       implements every ccir.* knob [L] sets (the index does not name its repository)
#   [T] the fork's teacher-prompt builder (verl trainer/ppo/ray_trainer.py, same provenance)
#   [C] the fork's actor config dataclass (verl workers/config/actor.py, same provenance)
#   [F] alexhuang13/FlowBalance recipe/antisd/antisd_core_algos.py, a third-party port of [K]
#   [I] inferred: no readable source shows it
# The per-response lambda and its warm-up / hysteresis live in gate.py (PerplexityGate).
# ---------------------------------------------------------------------------------------

LOG_CLIP = 5.0  # prm_forward_log_clip=$LOG_CLIP (5.0) [L]: u clamped to [-5, 5] before phi [K, F]
K_SIGMA = 2.0  # prm_u_clip_mode=adaptive, prm_u_clip_k_sigma=$K_SIGMA (2.0) [L]: |u| > 2 sigma_ref -> u := 0 [K, F]
PRM_CLIP = 5.0  # prm_clip=$PRM_CLIP (5.0) [L]: the z-scored term clamped to [-5, 5] [K, F]
SEQ_STD_FLOOR = 1e-6  # prm_normalize_mode=sequence [L]: the per-response std is floored at 1e-6 [K, F]
# prm_length_mask_threshold=$LEN_MASK [L]: rows of >= LEN_MASK tokens get no token term [K].
# Every run/<model>/*.sh sets LEN_MASK=12000 at 16,384-token responses (the launcher's own
# default is 0 = off); scaling it to other lengths by the same fraction is [I].
LEN_MASK_FRACTION = 12000 / 16384
OFFICIAL_MAX_SOLUTION_TOKENS = 3072  # self_distillation.max_solution_tokens [L]
OFFICIAL_MAX_REPROMPT_LEN = 4096  # self_distillation.max_reprompt_len [L]: the solution budget leaves room for the prompt [T]
OFFICIAL_CHAT_OVERHEAD = 300  # [T] _truncate_solution_to_budget(chat_overhead=300)
OFFICIAL_MIN_SOLUTION_TOKENS = 128  # [T] available = max(available, 128)
# The teacher's user turn: the defaults of the fork's SelfDistillationConfig [C] (reprompt_template,
# solution_template, feedback_template, reprompt_template_feedback_only). The launcher loads
# --config-name sdpo, whose yaml was not readable: that it leaves them unchanged is [I]. The
# feedback strings are FEEDBACK_CORRECT / FEEDBACK_INCORRECT (include_environment_feedback=true,
# provide_ground_truth_in_feedback=false [L]); the reward function that writes them was not
# readable, so their exact wording is [I] (the paper's).
OFFICIAL_REPROMPT = "{prompt}{solution}{feedback}\n\nNow solve this problem step by step.\n"
OFFICIAL_SOLUTION = "\nYour previous attempt:\n\n{attempt}\n\n"
OFFICIAL_FEEDBACK = "\nPrevious assessment: {feedback}\n"
OFFICIAL_FEEDBACK_ONLY = "{prompt}{feedback}\n\nNow solve this problem step by step.\n"


def teacher_perplexity(teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tppl_i = exp(-mean_{t in row i} t_{i,t}): the teacher's perplexity of each response.

    ca_lambda_mode=teacher_perp, ca_lambda_tppl_scope=per_seq [L]; formula [K, F]. teacher_logp,
    mask: (N, T). Returns (N,) fp64 (a row the teacher finds very unlikely overflows fp32's exp;
    inf is a valid perplexity, the gate masks it). A row without tokens counts as length 1
    (mean 0, tppl 1), as [K]'s clamp(min=1).
    """
    assert teacher_logp.shape == mask.shape, (teacher_logp.shape, mask.shape)
    t = torch.where(mask, teacher_logp.detach().double(), torch.zeros((), dtype=torch.float64, device=mask.device))  # (N, T)
    n = mask.sum(dim=1).clamp(min=1).double()  # (N,)
    return torch.exp(-t.sum(dim=1) / n)  # (N,)


def u_clip(u: torch.Tensor, mask: torch.Tensor, sigma_ref: float | None, *, k_sigma: float = K_SIGMA, log_clip: float = LOG_CLIP):
    """The official u before phi: outliers zeroed (not clamped), then clamped to [-log_clip, log_clip].

    u, mask: (N, T). sigma_ref: gate.PerplexityGate.sigma_ref, None during the warm-up (then
    nothing is zeroed: [K] calibrates first and only then zeroes). Returns (u', zeroed), both
    (N, T): u' = 0 where |u| > k_sigma * sigma_ref, clamp(u', -log_clip, log_clip), 0 outside
    mask; zeroed is True on the valid tokens that were zeroed. [K]'s comment on why: an
    extreme u "is likely spurious outlier signal; better to ignore than to push in any direction".
    """
    assert u.shape == mask.shape, (u.shape, mask.shape)
    u = u.detach().float()
    zero = torch.zeros((), device=u.device)
    if sigma_ref is None:
        zeroed = torch.zeros_like(mask)
    else:
        zeroed = mask & (u.abs() > k_sigma * float(sigma_ref))  # (N, T); |u| == range is kept, as [K]
    u = torch.where(zeroed, zero, u).clamp(-log_clip, log_clip)
    return torch.where(mask, u, zero), zeroed


def seq_zscore(x: torch.Tensor, mask: torch.Tensor, *, clip: float | None = PRM_CLIP, floor: float = SEQ_STD_FLOOR) -> torch.Tensor:
    """z-score of x within each row over its own tokens, then clamped to [-clip, clip].

    x, mask: (N, T); ragged rows are fine (each row's mean and std use only its tokens).
    std is the population one (/n, not /(n-1)) floored at `floor` [K, F]: a one-token row or a
    constant row becomes all zeros. Returns (N, T), 0 outside mask.
    """
    assert x.shape == mask.shape, (x.shape, mask.shape)
    zero = torch.zeros((), device=x.device)
    x = torch.where(mask, x.float(), zero)  # (N, T) where(), so garbage past a row's end cannot leak
    n = mask.sum(dim=1, keepdim=True).clamp(min=1).float()  # (N, 1)
    mean = x.sum(dim=1, keepdim=True) / n  # (N, 1)
    c = torch.where(mask, x - mean, zero)  # (N, T)
    std = (c.square().sum(dim=1, keepdim=True) / n).sqrt().clamp(min=floor)  # (N, 1)
    z = c / std
    if clip is not None:
        z = z.clamp(-clip, clip)
    return torch.where(mask, z, zero)  # (N, T)


def official_token_advantages(
    seq_adv: torch.Tensor,
    u: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    method: str,
    lam: torch.Tensor | None,
    sigma_ref: float | None,
    len_mask: int = 0,
):
    """Per-token advantage of the official recipe; 0 outside mask. Returns (adv, zeroed), (N, T).

        u'     = u_clip(u, sigma_ref)                                  (N, T)
        term   = seq_zscore(phi(u')), 0 for rows with >= len_mask tokens (len_mask > 0)
        antisd A_i,t = A_seq_i - lam_i * term_i,t     prm_renyi_sign=-1 [L]
        sd     A_i,t = A_seq_i + lam_i * term_i,t     PRM_RENYI_SIGN=+1 in run/<model>/sd.sh [L]
        grpo   A_i,t = A_seq_i

    [K] writes the term as sign * 0.5 (softplus(u') - log 2) = sign * phi(u') and z-scores
    that; the z-score and the symmetric clamp commute with the sign, so this is the same.
    Tokens zeroed by the u-clip still count in their row's z-score (phi(0) = 0 is a value).
    seq_adv: (N,) A_seq. u: (N, T) PMI. lam: (N,) per-response lambda (gate.PerplexityGate).
    Everything is per row, so any set of whole rows (a micro-batch) gives its rows' exact
    values; sigma_ref and the gate's state are the only step-level inputs.
    """
    if method not in OFFICIAL_METHODS:
        raise ValueError(f"official_token_advantages: method {method!r} is not in the official recipe; expected one of {OFFICIAL_METHODS}")
    N, T = mask.shape
    assert seq_adv.shape == (N,), (seq_adv.shape, mask.shape)
    a = seq_adv.float()[:, None].expand(N, T)  # (N, T)
    if method == "grpo":
        return torch.where(mask, a, torch.zeros_like(a)), torch.zeros_like(mask)
    if u is None or lam is None:
        raise ValueError(f"official_token_advantages: method {method!r} needs u and lam")
    assert u.shape == (N, T) and lam.shape == (N,), (u.shape, lam.shape, mask.shape)
    u_c, zeroed = u_clip(u, mask, sigma_ref)  # (N, T) each
    term = seq_zscore(phi(u_c), mask)  # (N, T)
    if len_mask > 0:
        short = mask.sum(dim=1) < len_mask  # (N,) rows shorter than LEN_MASK keep the term
        term = term * short[:, None]
    sign = -1.0 if method == "antisd" else 1.0
    out = a + sign * lam.float()[:, None] * term  # (N, T) explicit broadcast of the row's lambda
    return torch.where(mask, out, torch.zeros_like(out)), zeroed


def _boxes(text: str) -> list[tuple[int, str]]:
    """(end, content) of every \\boxed{...} with balanced braces, in order; end is one past '}'."""
    out, start = [], 0
    while (pos := text.find("\\boxed{", start)) != -1:
        depth, i = 0, pos + len("\\boxed{")
        while i < len(text):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                if depth == 0:
                    out.append((i + 1, text[pos + len("\\boxed{") : i]))
                    break
                depth -= 1
            i += 1
        start = pos + len("\\boxed{")
    return out


def cut_at_final_answer(text: str, answer: str, match=None) -> str:
    """truncate_solution_at_correct_answer=true [L]: the text up to the end of the LAST
    \\boxed{...} whose content is the gold answer; unchanged when none is [T].

    Content and answer are compared stripped, then by match(content, answer) if given ([T]
    falls back to math-verify; train.py passes grading.py's). Scanning from the end keeps the
    whole reasoning up to the final answer, not an intermediate box that happens to match.
    """
    gold = str(answer).strip()
    for end, content in reversed(_boxes(text)):
        if content.strip() == gold or (match is not None and match(content.strip(), gold)):
            return text[:end]
    return text


def _head_tail(tokenizer, text: str, budget: int) -> str:
    """[T] _truncate_solution_to_budget: over `budget` tokens, keep the first 25% and the last
    75% of the budget, joined by "\\n...\\n" (the final answer is in the tail)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text
    head = budget // 4
    dec = lambda x: tokenizer.decode(x, skip_special_tokens=False)  # noqa: E731
    return dec(ids[:head]) + "\n...\n" + dec(ids[len(ids) - (budget - head) :])


def official_teacher_prompts(
    tokenizer,
    user_texts: list[str],
    responses: torch.Tensor,
    lengths: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    *,
    answers: list[str],
    match=None,
    max_solution_tokens: int | None = OFFICIAL_MAX_SOLUTION_TOKENS,
    max_reprompt_len: int = OFFICIAL_MAX_REPROMPT_LEN,
    enable_thinking: bool | None = None,
) -> list[list[int]]:
    """Teacher prompts under the official context rules (prompt-major, N = B*G token lists).

    For rollout i of group g (arguments as teacher_prompts; answers: B gold answers):
      peer     = the FIRST correct rollout j != i of group g, in row order: solution_source=
                 group_only, dont_reprompt_on_self_success=true [L]; [T] takes
                 solution_idxs[0] although the launcher says solution_selection=random (the G
                 samples are i.i.d., so "first" is a uniform draw in distribution)
      solution = peer text, think blocks stripped, cut_at_final_answer, then if longer than
                 min(max(max_reprompt_len - |prompt| - |feedback| - 300, 128), max_solution_tokens)
                 tokens: its head 25% + "\\n...\\n" + tail 75% [T]
      no peer  : no dataset fallback; the teacher sees the problem and the feedback only
                 (OFFICIAL_FEEDBACK_ONLY) and the row still gets its token term [T]: the
                 fork's self_distillation_mask marks such rows as taking part, and its grpo_ca
                 loss with prm_normalize_mode=sequence does not read that mask [K]
      feedback = "Your answer is (in)correct." about rollout i itself.
    Think blocks: [L] strips them (remove_thinking_from_demonstration) in the thinking launcher
    and not in the no-think one, where there are none; stripping always is the same in both.
    [T]'s safety net that cuts the middle of a whole prompt over max_reprompt_len is omitted.
    """
    N, T = responses.shape
    G = int(group_size)
    B = len(user_texts)
    assert N == B * G, f"official_teacher_prompts: {N} rollouts != {B} prompts x {G}"
    assert len(answers) == B, (len(answers), B)
    assert lengths.shape == (N,) and rewards.shape == (N,), (lengths.shape, rewards.shape)
    correct = (rewards > 0.5).tolist()  # N bools
    lens = lengths.tolist()
    responses = responses.cpu()
    ntok = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    fb_len = {True: ntok(FEEDBACK_CORRECT), False: ntok(FEEDBACK_INCORRECT)}

    convs = []
    for g in range(B):
        rows = range(g * G, (g + 1) * G)
        sols = {}  # j -> text, in row order (dicts keep insertion order)
        for j in rows:
            if correct[j]:
                text = _response_text(tokenizer, responses[j, : lens[j]].tolist())
                if text:
                    sols[j] = cut_at_final_answer(text, answers[g], match)
        p_len = ntok(user_texts[g])
        cut = {}  # (peer, own correctness) -> budgeted text: the budget depends on the feedback length
        for i in rows:
            fb = OFFICIAL_FEEDBACK.format(feedback=FEEDBACK_CORRECT if correct[i] else FEEDBACK_INCORRECT)
            others = [j for j in sols if j != i]  # never rollout i itself
            if not others:
                user = OFFICIAL_FEEDBACK_ONLY.format(prompt=user_texts[g], feedback=fb)
            else:
                key = (others[0], correct[i])
                if key not in cut:
                    budget = max(max_reprompt_len - p_len - fb_len[correct[i]] - OFFICIAL_CHAT_OVERHEAD, OFFICIAL_MIN_SOLUTION_TOKENS)
                    if max_solution_tokens is not None:
                        budget = min(budget, max_solution_tokens)
                    cut[key] = _head_tail(tokenizer, sols[others[0]], budget)
                user = OFFICIAL_REPROMPT.format(prompt=user_texts[g], solution=OFFICIAL_SOLUTION.format(attempt=cut[key]), feedback=fb)
            convs.append([{"role": "user", "content": user}])
    prompts = _render(tokenizer, convs, enable_thinking)
    assert len(prompts) == N
    return prompts
