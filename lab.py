"""lab.py: the CPU lab, a tiny world where AntiSD's argument can be watched on 2 cores.

The task ("which pair makes ten?"):

    user:      Which pair sums to 10?
               A: 4 9
               B: 7 3
               C: 5 6
    search:    Let me check each pair.
               A: 4 + 9 = 13, no.
               B: 7 + 3 = 10, yes.
               So the answer is \\boxed{B}.
    direct:    The answer is \\boxed{B}.

How it maps onto the paper's LLM setting
----------------------------------------
- A *search* response is deliberation: it enumerates candidates and checks each ("Let",
  "check", the "no" verdicts, sometimes a "Wait, let me double check" re-verification).
  Each check is a copy and a one-digit addition that a 1M-parameter transformer learns in
  a few hundred supervised steps, so search is reliable.
- A *direct* response is a shortcut. Without the context the warm start only ever shows
  direct answers that are blurted guesses (a uniformly random letter, right 1 time in K):
  a base model that sometimes answers without working and is then usually wrong.
- The warm start (`warm_start`) mixes both styles for plain prompts (40% guesses), so the
  starting policy is a mixture and RL must learn to prefer search: held-out accuracy rises
  as P(search) rises. GRPO learns that from the sequence reward alone.
- The difficulty knob (issue 15, `level_config`, `train.py --lab-level L`, L in [0, 1)): a
  base model that can search but rarely does, and whose shortcut never pays. L = 0 is the
  first study's lab, example for example (one warm-start phase, letter guesses). A level
  L > 0 is a two-phase warm start: the level-0 warm start (the same cached model), then a
  second supervised phase of a third as many steps (`phase2`) on the level's mix, where plain
  prompts get search with probability 0.6 (1 - L) and otherwise a *confused blurt* that boxes
  the target number instead of a letter ("The answer is \\boxed{10}.", the wrong quantity:
  always wrong). Phase 1 teaches search to the level-0 standard (~0.97 correct), so the
  difficulty is only *how rarely* the step-0 policy deliberates: P(correct) ~ 0.58 (1 - L),
  most groups of G rollouts are all-wrong and GRPO's A_seq is 0 for them (`frac_zero_var` in
  metrics.jsonl, `frac_all_wrong` its all-wrong part). The only way to reward is to search.
  Why this knob (pilots, LOG.md): more candidates cannot do it (a letter guess is right 1 time
  in K <= 6, which keeps most groups mixed); a one-phase weaker warm start (pilot 1) trains
  search on fewer examples, so search itself was unreliable (~0.4 correct), and keeping a
  share of letter guesses let GRPO climb by boxing letters (~0.3 accuracy) instead of
  learning to search. What counts as deliberation and as shortcut does not change: a
  confused blurt is a direct answer (`classify`), the problems, the held-out set, the search
  traces and the teacher-format examples are the same at every level; the levels > 0 differ
  only in the search share of phase 2 (level 0, with its letter guesses that sometimes pay,
  is not one of them: the sweep uses levels > 0 only).
- The privileged context: the warm start also shows teacher-format prompts (a correct
  previous attempt + "Your answer is correct/incorrect.", the paper's wording), and there
  the model mostly *copies* the answer directly, the way a pretrained LLM shortcuts when it
  sees a solution. So under the teacher prompt, deliberation tokens ("Let", the checks)
  lose probability (u < 0) and shortcut tokens ("The answer is", the right letter) gain
  (u > 0): the PMI pattern the paper reports for LLMs.
  - SD (advantage +u) therefore pushes the student towards direct answers it cannot get
    right without the context: it should fall behind GRPO.
  - AntiSD (-phi(u)) adds a per-token bonus to deliberation on top of GRPO's signal: it
    should reach GRPO's accuracy sooner.

What the lab cannot show: the copy-under-a-solution behaviour and the guessing are put in
by the warm start (a real LLM brings its habits from pre-training); there is one kind of
deliberation, not the open variety of an LLM's; responses are 10-50 tokens, not 32K; and
the entropy-collapse dynamics that the gate reacts to in a 4B model need not appear in a
1M one. It is a lab for the mechanism, not evidence for the paper's numbers.

Grading is exact match on the last \\boxed{...} letter (a truncated response has no box: 0).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil

import torch
from tqdm.auto import tqdm

import antisd
import model as model_lib

LETTERS = "ABCDEF"
TARGET = 10  # fixed, like a "make ten" puzzle: checking a pair is then a property of its sum
BOX = re.compile(r"\\boxed\{([^{}]*)\}")


# ---------------------------------------------------------------------------------------
# Problems and the two response styles.
# ---------------------------------------------------------------------------------------


def make_problem(rng: random.Random, min_pairs: int = 3, max_pairs: int = 4, target: int = TARGET) -> dict:
    """A random problem: pairs of digits, exactly one of which sums to the target."""
    while True:
        k = rng.randint(min_pairs, max_pairs)
        pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(k)]
        ans = rng.randrange(k)
        a = rng.randint(max(0, target - 9), min(9, target))
        pairs[ans] = (a, target - a)
        if sum(sum(p) == target for p in pairs) == 1:  # unique answer
            break
    # one pair per line, so "\nA: 6 4" in the prompt and "\nA: 6 + 4" in a search trace share
    # their tokens: copying a pair is a plain induction-head lookup for the tiny model
    body = "\n".join(f"{LETTERS[i]}: {a} {b}" for i, (a, b) in enumerate(pairs))
    problem = f"Which pair sums to {target}?\n{body}"
    return {"id": hashlib.md5(problem.encode()).hexdigest()[:12], "problem": problem, "answer": LETTERS[ans], "pairs": pairs, "target": target}


def user_text(problem: dict) -> str:
    """The student's user message (the lab's problem statement is the whole prompt)."""
    return problem["problem"]


def reference(problem: dict) -> str:
    """The dataset reference used when no peer rollout is correct: answer-only, like DAPO."""
    return f"\\boxed{{{problem['answer']}}}"


def search_solution(problem: dict, rng: random.Random) -> str:
    """Deliberation: try the pairs in order until one checks out."""
    opener = rng.choice(["Let me check each pair.", "Let me check each pair.", "Let me try them.", "Maybe check each pair."])
    lines = [opener]
    t = problem["target"]
    for i, (a, b) in enumerate(problem["pairs"]):
        ok = a + b == t
        if ok and rng.random() < 0.2:  # occasional re-verification: the lab's "Wait"
            lines.append(f"{LETTERS[i]}: {a} + {b} = {a + b}. Wait, let me double check: {a} + {b} = {a + b}, yes.")
        else:
            lines.append(f"{LETTERS[i]}: {a} + {b} = {a + b}, {'yes' if ok else 'no'}.")
        if ok:
            break
    lines.append(f"So the answer is \\boxed{{{problem['answer']}}}.")
    return "\n".join(lines)


def direct_solution(problem: dict, rng: random.Random, letter: str | None = None) -> str:
    """Shortcut: name an answer at once (`letter`, default the right one)."""
    return rng.choice(["The answer is \\boxed{{{a}}}.", "The answer is \\boxed{{{a}}}.", "So the answer is \\boxed{{{a}}}."]).format(a=letter or problem["answer"])


def guess_solution(problem: dict, rng: random.Random) -> str:
    """A blurted guess: a direct answer with a uniformly random letter (right 1 time in K)."""
    return direct_solution(problem, rng, letter=rng.choice(LETTERS[: len(problem["pairs"])]))


def confused_solution(problem: dict, rng: random.Random) -> str:
    """A confused blurt: a direct answer that boxes the target number, not a letter (always wrong)."""
    return direct_solution(problem, rng, letter=str(problem["target"]))


def extract(text: str) -> str | None:
    m = BOX.findall(text)
    return m[-1].strip() if m else None


def grade(response: str, answer: str) -> float:
    """Exact match of the last \\boxed{...} against the answer letter."""
    return float(extract(response) == answer)


def classify(text: str) -> str:
    """'search' if the response checks candidates, else 'direct' (for the lab's metrics)."""
    return "search" if ("+" in text and "=" in text) else "direct"


def problems(seed: int, n: int, exclude: set[str] = frozenset()) -> list[dict]:
    """n distinct problems from a seed, skipping ids in `exclude` (held-out stays held out)."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        p = make_problem(rng)
        if p["id"] not in seen:
            seen.add(p["id"])
            out.append(p)
    return out


def datasets(n_train: int = 20000, n_eval: int = 200, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """(train, held_out): disjoint by problem id, deterministic."""
    held_out = problems(seed + 1, n_eval)
    train = problems(seed + 2, n_train, exclude={p["id"] for p in held_out})
    return train, held_out


# ---------------------------------------------------------------------------------------
# Warm start: a short supervised phase that gives the tiny model a base model's habits.
# ---------------------------------------------------------------------------------------

WARM_DEFAULTS = dict(steps=600, batch=16, lr=1e-3, p_direct=0.4, p_confused=0.0, p_copy=0.8, p_teacher=0.3, seed=0)


LEVEL_PHASE2 = 1 / 3  # a level > 0: its second warm-start phase has this share of the first's steps


def level_config(level: float) -> dict:
    """The warm-start settings of lab difficulty `level` (see the module docstring).

    L = 0 is the default lab ({}: one phase, p_direct 0.4, letter guesses). L in (0, 1): after
    the level-0 warm start, a second phase of round(steps * LEVEL_PHASE2) steps on plain prompts
    that search with probability 0.6 (1 - L) and otherwise blurt the target number (p_confused
    1: no letter guesses, the shortcut is always wrong). Step-0 P(correct) is then about
    0.58 (1 - L): with G = 8, frac_zero_var ~ (1 - 0.58 (1 - L))^8 (L 0.8: ~0.4, L 0.9: ~0.6).
    """
    if not 0.0 <= level < 1.0:
        raise ValueError(f"lab level must be in [0, 1), got {level}")
    return {"p_direct": 0.4 + 0.6 * level, "p_confused": 1.0, "phase2": LEVEL_PHASE2} if level else {}


def warm_overrides(level: float = 0.0, steps: int | None = None) -> dict:
    """warm_start(**overrides) of train.py's lab flags (--lab-level, --warm-steps); study.py
    calls it too, so its prebuilt cache has the key the runs look up."""
    return {**level_config(level), **({} if steps is None else {"steps": steps})}


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a one-turn chat prompt ending with the assistant header."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False))


def warm_example(problem: dict, rng: random.Random, cfg: dict, teacher: bool) -> tuple[str, str]:
    """(user message, response text) for one supervised example, in teacher format or not.

    Plain prompts: search with probability 1 - p_direct, else a direct answer: a confused blurt
    with probability p_confused, else a blurted guess (no extra random draw when p_confused
    is 0, so level 0 writes exactly the examples it always did). Teacher-format
    prompts (a correct previous attempt in context): copy its answer directly with
    probability p_copy, else search.
    """
    if teacher:
        prev = search_solution(problem, rng) if rng.random() < 0.5 else direct_solution(problem, rng)
        user = antisd.teacher_user_text(user_text(problem), prev, correct=rng.random() < 0.5)
        resp = direct_solution(problem, rng) if rng.random() < cfg["p_copy"] else search_solution(problem, rng)
    else:
        user = user_text(problem)
        if rng.random() < cfg["p_direct"]:
            confused = cfg["p_confused"] > 0 and rng.random() < cfg["p_confused"]
            resp = confused_solution(problem, rng) if confused else guess_solution(problem, rng)
        else:
            resp = search_solution(problem, rng)
    return user, resp


def warm_start(model, tokenizer, train: list[dict], *, cache_dir: str | None = None, **overrides):
    """Supervised warm start (cross-entropy on response tokens incl. EOS), cached on disk.

    The cache key hashes the settings, the tiny model config, the data and lab.py's source,
    so changing any of them retrains. Returns the model (loaded from the cache when present).
    steps=0: no warm start (the model as it is, nothing cached). A cache_dir that cannot be
    written (a read-only working directory) is found before training: trained, not cached.
    A level > 0 (`phase2` in the settings, level_config) is the level-0 warm start (its own
    cache entry, shared by every level) followed by the level's phase 2, cached under its key.
    """
    cfg = {**WARM_DEFAULTS, **overrides}
    if cfg["steps"] < 0:
        raise ValueError(f"warm_start: steps must be >= 0, got {cfg['steps']}")
    if cfg["steps"] == 0:
        return model
    # the key covers the settings, the model config, the data and this file's code (a change
    # to how examples are written must never reuse a stale warm start)
    src = hashlib.md5(open(__file__, "rb").read()).hexdigest()
    key = hashlib.md5(json.dumps({"cfg": cfg, "config": model.config.to_json_string(), "n": len(train), "first": train[0]["id"], "src": src}, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"warm-{key}") if cache_dir else None
    if path and os.path.isfile(os.path.join(path, "config.json")):
        warmed, _ = model_lib.load(path, dtype=model.dtype, device=next(model.parameters()).device)  # the dtype it was asked for (a path alone loads bf16 on CUDA)
        print(f"warm start: loaded from cache {path}")
        return warmed
    if path and not _writable(cache_dir):
        print(f"warm start: cannot write the cache in {cache_dir} (read-only?): training it anyway, not cached (every run retrains)")
        cache_dir = path = None
    if cfg.get("phase2"):
        # phase 1: the level-0 warm start with the same steps/batch/lr/seed (loaded if cached)
        base = {k: cfg[k] for k in WARM_DEFAULTS if k not in ("p_direct", "p_confused")}
        model = warm_start(model, tokenizer, train, cache_dir=cache_dir, **base)
        # phase 2: the level's mix, a fresh optimizer and schedule, its own example stream
        _sft(model, tokenizer, train, cfg, steps=max(1, round(cfg["steps"] * cfg["phase2"])), seed=cfg["seed"] + 1, desc="warm start phase 2 (the level's mix)")
    else:
        _sft(model, tokenizer, train, cfg, steps=cfg["steps"], seed=cfg["seed"], desc="warm start (SFT)")
    if path:
        tmp = f"{path}.tmp-{os.getpid()}"  # atomic: write aside, then one rename
        try:
            model_lib.save(model, tokenizer, tmp)
        except OSError as e:  # disk full, quota: the trained model is still good; go on uncached
            shutil.rmtree(tmp, ignore_errors=True)
            why = "no space left on the device" if getattr(e, "errno", None) == errno.ENOSPC else str(e)
            print(f"warm start: could not cache it at {path} ({why}): going on with the trained model, not cached", flush=True)
            return model
        if os.path.exists(path):  # another process cached the same warm start first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, path)
        print(f"warm start: cached at {path}")
    return model


def _sft(model, tokenizer, train: list[dict], cfg: dict, *, steps: int, seed: int, desc: str) -> None:
    """`steps` supervised steps on warm_example's mix of `cfg`, in place (model left in eval mode)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    # linear warmup over 30 steps, constant, then a linear decay over the last 20%
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30, 5 * (1 - s / steps)))
    eos = tokenizer.eos_token_id
    model.train()
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        # a batch is all teacher-format or all plain: similar prompt lengths, little padding
        teacher = rng.random() < cfg["p_teacher"]
        batch = [warm_example(rng.choice(train), rng, cfg, teacher) for _ in range(cfg["batch"])]
        prompts = [chat_ids(tokenizer, u) for u, _ in batch]
        resp = [tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for _, r in batch]
        lengths = torch.tensor([len(r) for r in resp])  # (N,)
        T = int(lengths.max())
        ids = torch.full((len(resp), T), tokenizer.pad_token_id, dtype=torch.long)  # (N, T)
        for i, r in enumerate(resp):
            ids[i, : len(r)] = torch.tensor(r)
        logp, _ = model_lib.response_logprobs(model, prompts, ids, lengths)  # (N, T), 0 past length
        loss = -logp.sum() / lengths.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def _writable(d: str) -> bool:
    """Can files be created in d (made if missing)? Tried, not guessed from permission bits."""
    try:
        os.makedirs(d, exist_ok=True)
        probe = os.path.join(d, f".probe-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# Held-out evaluation.
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, held_out: list[dict], *, k: int = 4, temperature: float = 0.7, max_new_tokens: int = 96, batch: int = 64, generator: torch.Generator | None = None) -> dict:
    """avg@k held-out accuracy (mean over all k samples of every problem), plus the share of
    search-style responses and the accuracy of each style."""
    import data
    import model as model_lib
    from rollout import sample

    g = generator if generator is not None else torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    eos = model_lib.stop_token_ids(model, tokenizer)  # the stop ids and graded text of training (train.py) and eval.py
    correct, styles = [], []
    for s in tqdm(range(0, len(held_out), batch), desc=f"eval ({len(held_out)} problems x {k})", leave=False, disable=None):
        chunk = held_out[s : s + batch]
        prompts = [chat_ids(tokenizer, user_text(p)) for p in chunk]
        r = sample(model, prompts, n=k, max_new_tokens=max_new_tokens,
                   temperature=temperature, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, generator=g)  # fmt: skip
        texts = data.graded_texts(tokenizer, r.tokens, r.lengths, r.finished, [data.think_prefix(tokenizer, prompts[i // k]) for i in range(len(r.lengths))])
        for i, text in enumerate(texts):
            correct.append(grade(text, chunk[i // k]["answer"]) if r.finished[i] else 0.0)
            styles.append(classify(text))
    acc = sum(correct) / len(correct)
    n_search = sum(s == "search" for s in styles)
    acc_s = sum(c for c, s in zip(correct, styles) if s == "search") / max(1, n_search)
    acc_d = sum(c for c, s in zip(correct, styles) if s == "direct") / max(1, len(styles) - n_search)
    return {"eval_acc": acc, "frac_search": n_search / len(styles), "acc_search": acc_s, "acc_direct": acc_d}
