"""inspect_pmi.py: look at u = PMI(y_t ; c | x, y_<t) token by token, as a heatmap.

    python inspect_pmi.py                                     # the lab: warm-started tiny model, a held-out problem
    python inspect_pmi.py --model runs/antisd-tiny-s0/checkpoint-60 --problem 3   # after `python train.py`
    python inspect_pmi.py --model .cache/smollm2 --prompt "Tom has 3 apples and buys 5 more. How many?" \
        --context "3 + 5 = 8. The answer is 8." --temperature 0

For one prompt x: sample a response y (or take --response), build the teacher prompt with a
privileged context c exactly as training does (antisd.teacher_user_text: problem, "Your
previous attempt:" c, "Previous assessment:" feedback, instruction; the model's chat
template), score the SAME response ids under both prompts with antisd.pmi and show

    u_t = log pi(y_t | x, c, y_<t) - log pi(y_t | x, y_<t)

as an HTML heatmap (blue u < 0, red u > 0, value on hover, a legend), a colored terminal
view (ANSI 24-bit backgrounds), and per-category statistics (count, mean u, fraction u < 0):

    deliberation  Wait / Let / Maybe / Alternatively / check / try / verify / the lab's "no" checks
    structural    whitespace, punctuation, template tokens, and the answer-announcing words
                  (So / the / answer / is / boxed / Therefore / Given / holds / ####)
    other         everything else (numbers, content words, the answer letter of the lab)

The paper's observation (SPEC section 1, "where the signs come from"): with a solution in
context, deliberation tokens get u << 0 (the solution makes them unnecessary) and shortcut
tokens u >> 0. AntiSD's advantage term -phi(u) rewards the former and penalises the latter.

Categories are decided per WORD, not per token: a token continues the previous token's word
when both touch without a space or punctuation in between (" Altern" + "atively" is one word,
"Alternatively"), so subword tokenizers do not hide markers. The word lists are heuristics
for English math text and the lab; `categorize` is the one place that decides.

Lab defaults: --model tiny loads the tiny model and its supervised warm start (lab.warm_start,
cached in .cache/lab; trained there first if missing, a few minutes on 1 CPU thread); the
context is a correct search-style solution of the same problem (lab.search_solution) and the
feedback line grades the response (lab.grade), as in training where a correct peer rollout
would be the context.

Reused by probe_llm.py and the tests: chat_ids, teacher_ids, token_u, token_u_batch,
categorize, categorize_tokens, label, category_stats, html_heatmap, ansi_view.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import random
import statistics


# The parser needs no torch: `--help` and a mistyped flag answer before the heavy imports below.
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and prompt")
    g.add_argument("--model", default="tiny", help='"tiny" (the warm-started lab model), a lab checkpoint dir, or any HF model dir / hub id')
    g.add_argument("--warm-steps", type=int, default=None, help="tiny only: warm-start steps (default: lab's; 0 = no warm start, a random model)")
    g.add_argument("--problem", type=int, default=0, help="lab: index of the held-out problem to inspect")
    g.add_argument("--prompt", default=None, help="user message (default: the lab problem; required for non-lab models)")
    g.add_argument("--context", default=None, help="privileged context c, a correct solution (default: lab.search_solution of the problem)")
    g.add_argument("--response", default=None, help="score this response text instead of sampling one (EOS appended)")
    g.add_argument("--feedback", default="auto", choices=["auto", "correct", "incorrect"], help="the teacher's 'Your answer is ...' line; auto grades the response (lab), else 'correct'")
    g = p.add_argument_group("sampling and scoring")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy); scores use it too (1.0 when greedy), as training does")
    g.add_argument("--max-new-tokens", type=int, default=96, help="response length cap in tokens")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (and the lab context's wording)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads; default $OMP_NUM_THREADS if set, else 1 for the lab (as train.py), torch's own otherwise")
    g = p.add_argument_group("output")
    g.add_argument("--html", default="pmi.html", help="HTML heatmap path")
    g.add_argument("--json", default=None, help="also write tokens, u, categories and stats here")
    g.add_argument("--scale", type=float, default=4.0, help="|u| (nats) at which the color saturates")
    g.add_argument("--no-color", action="store_true", help="plain terminal output (no ANSI colors)")
    return p


if __name__ == "__main__":
    ARGS = get_parser().parse_args()

import torch  # noqa: E402

import antisd  # noqa: E402
import model as model_lib  # noqa: E402

CATEGORIES = ("deliberation", "structural", "other")

# Words (lowercased, surrounding punctuation stripped) that mark deliberation: re-checking,
# hedging, enumerating alternatives. "no" is the lab's rejected-candidate verdict ("A: 4 + 9
# = 13, need 11, no."), the checks a solution makes unnecessary.
DELIBERATION_WORDS = frozenset(
    "wait let let's lets maybe alternatively alternative check checks checking checked recheck "
    "double try trying tried verify verifying verified verification hmm perhaps actually "
    "reconsider suppose consider think mistake no".split()
)
# Words that announce or frame the answer rather than compute it (the paper's shortcut tokens
# "Given", "holds", "boxed"), plus the lab's "So the answer is \\boxed{...}".
STRUCTURAL_WORDS = frozenset(
    "so the answer is boxed therefore thus hence given holds final total".split()
)


# ---------------------------------------------------------------------------------------
# Categories.
# ---------------------------------------------------------------------------------------


def categorize(token_str: str) -> str:
    """'deliberation' | 'structural' | 'other' for one token or one whole word.

    Whitespace-only, punctuation/symbol-only and special template tokens ("<|im_end|>") are
    structural; otherwise the alphanumeric core of the text is looked up in the word lists.
    """
    s = token_str.strip()
    if not s or (s.startswith("<|") and s.endswith("|>")) or s in ("<think>", "</think>"):
        return "structural"
    core = s.strip("\\.,;:!?()[]{}\"'`*#-").lower()
    if not core or not any(ch.isalnum() for ch in core):
        return "structural"
    if core in DELIBERATION_WORDS:
        return "deliberation"
    if core in STRUCTURAL_WORDS:
        return "structural"
    return "other"


def categorize_tokens(tokens: list[str]) -> list[str]:
    """One category per token, decided on the whole word the token belongs to.

    A token continues the current word when it starts with a letter/digit and the previous
    token ended with one ("Altern" + "atively"); anything else starts a new word. Punctuation
    tokens are their own words, so "boxed{C}." splits as boxed | { | C | }.
    """
    words: list[list[int]] = []  # token indices per word
    for i, t in enumerate(tokens):
        joins = i > 0 and t[:1].isalnum() and tokens[i - 1][-1:].isalnum()
        if joins:
            words[-1].append(i)
        else:
            words.append([i])
    cats = [""] * len(tokens)
    for w in words:
        c = categorize("".join(tokens[i] for i in w))
        for i in w:
            cats[i] = c
    return cats


def label(tokens_u: list[tuple[str, float]]) -> list[tuple[str, str, float]]:
    """[(token, u)] of one response -> [(token, category, u)]."""
    cats = categorize_tokens([t for t, _ in tokens_u])
    return [(t, c, u) for (t, u), c in zip(tokens_u, cats)]


def category_stats(rows: list[tuple[str, str, float]]) -> dict:
    """Per category (and "all"): n, mean u, median u, fraction u < 0. rows from label(), any
    number of responses concatenated. A category with no token has n = 0 and None values."""
    out = {}
    for cat in (*CATEGORIES, "all"):
        us = [u for _, c, u in rows if cat in ("all", c)]
        out[cat] = {
            "n": len(us),
            "mean_u": sum(us) / len(us) if us else None,
            "median_u": statistics.median(us) if us else None,
            "frac_neg": sum(u < 0 for u in us) / len(us) if us else None,
        }
    return out


def format_stats(stats: dict, title: str = "") -> str:
    """A fixed-width table of category_stats."""
    f = lambda v, p=3: "-" if v is None else f"{v:+.{p}f}"  # noqa: E731
    lines = [title] if title else []
    lines.append(f"{'category':<14}{'n':>6}{'mean u':>9}{'median u':>10}{'frac u<0':>10}")
    for cat, s in stats.items():
        fn = "-" if s["frac_neg"] is None else f"{s['frac_neg']:.2f}"
        lines.append(f"{cat:<14}{s['n']:>6}{f(s['mean_u']):>9}{f(s['median_u']):>10}{fn:>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Prompts and scores.
# ---------------------------------------------------------------------------------------


def chat_ids(tokenizer, user: str, **template_kw) -> list[int]:
    """Token ids of a one-turn chat ending with the assistant header (the student prompt)."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True, return_dict=False, **template_kw)
    return [int(i) for i in (out["input_ids"] if isinstance(out, dict) else out)]


def teacher_ids(tokenizer, user: str, context: str, correct: bool, **template_kw) -> list[int]:
    """The teacher prompt training builds (antisd.teacher_prompts does the same per rollout):
    the problem, `Your previous attempt:` + context, `Previous assessment:` + feedback, the
    instruction, in the model's chat template. The context is used verbatim (no truncation)."""
    return chat_ids(tokenizer, antisd.teacher_user_text(user, context, correct), **template_kw)


def token_u_batch(model, tokenizer, prompts: list[list[int]], teachers: list[list[int]], responses: list[list[int]], *, temperature: float = 1.0, rows: int = 8) -> list[list[tuple[str, float]]]:
    """u per response token for N (prompt, teacher prompt, response) triples, via antisd.pmi.

    Rows are scored `rows` at a time (memory); each response keeps its exact ids (never
    re-tokenized). Returns N lists of (decoded token, u)."""
    assert len(prompts) == len(teachers) == len(responses), (len(prompts), len(teachers), len(responses))
    assert all(len(r) > 0 for r in responses), "token_u_batch: empty response"
    device = next(model.parameters()).device
    out = []
    for a in range(0, len(responses), rows):
        chunk = responses[a : a + rows]
        lengths = torch.tensor([len(r) for r in chunk], device=device)  # (n,)
        T = int(lengths.max())
        ids = torch.full((len(chunk), T), tokenizer.pad_token_id, dtype=torch.long, device=device)  # (n, T)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        u, _, _, _ = antisd.pmi(model, prompts[a : a + rows], teachers[a : a + rows], ids, lengths, temperature=temperature)  # (n, T)
        for i, r in enumerate(chunk):
            out.append([(tokenizer.decode([t]), float(v)) for t, v in zip(r, u[i, : len(r)].tolist())])
    return out


def token_u(model, tokenizer, prompt_ids: list[int], teacher_ids: list[int], response_ids: list[int], *, temperature: float = 1.0) -> list[tuple[str, float]]:
    """[(decoded token, u)] for one response: u = t - s from antisd.pmi, aligned by response index."""
    return token_u_batch(model, tokenizer, [prompt_ids], [teacher_ids], [response_ids], temperature=temperature)[0]


def sample_responses(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, seed: int, eos_token_ids=None) -> list[list[int]]:
    """One response per prompt with rollout.sample (T = 0: greedy). The EOS, when emitted, is
    part of the response (training scores it too)."""
    from rollout import sample

    device = next(model.parameters()).device
    eos = eos_token_ids if eos_token_ids is not None else [tokenizer.eos_token_id]
    g = torch.Generator(device=device).manual_seed(seed)
    r = sample(model, prompts, n=1, max_new_tokens=max_new_tokens, temperature=temperature, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, generator=g)
    return r.to_lists()


# ---------------------------------------------------------------------------------------
# Views.
# ---------------------------------------------------------------------------------------


def _rgb(u: float, scale: float) -> tuple[int, int, int]:
    """White at u = 0, saturating to blue (u <= -scale) or red (u >= scale). The intensity is
    sqrt(|u| / scale), so the many small values (|u| ~ 0.1-0.5) stay visible."""
    a = min(1.0, abs(u) / scale) ** 0.5 if math.isfinite(u) else 1.0
    blue, red = (40, 100, 235), (225, 45, 45)
    end = blue if u < 0 else red
    return tuple(int(round(255 + a * (c - 255))) for c in end)


def html_heatmap(rows: list[tuple[str, str, float]], *, title: str = "u = PMI(y_t ; c | x, y_<t)", sections: dict | None = None, stats: dict | None = None, scale: float = 4.0) -> str:
    """A standalone HTML page: tokens on colored backgrounds (hover for u and category), a
    legend, optional text sections (prompt, context) and the category table."""
    spans = []
    for tok, cat, u in rows:
        r, g, b = _rgb(u, scale)
        shown = html.escape(tok).replace("\n", "\u23ce<br>") or "\u2205"
        tip = html.escape(f"u = {u:+.3f} | {cat} | {tok!r}", quote=True)
        spans.append(f'<span class="t" style="background:rgb({r},{g},{b})" title="{tip}">{shown}</span>')
    stops = ", ".join(f"rgb{_rgb(v, scale)}" for v in (-scale, -scale / 2, 0.0, scale / 2, scale))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".resp{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ccc;padding:1em}"
        ".t{padding:1px 0;border-radius:2px}.bar{height:14px;width:24em;border:1px solid #999}"
        "table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right}pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}</style>",
        "</head><body>",
        f"<h2>{html.escape(title)}</h2>",
        "<p>u<sub>t</sub> = log &pi;(y<sub>t</sub> | x, c, y<sub>&lt;t</sub>) &minus; log &pi;(y<sub>t</sub> | x, y<sub>&lt;t</sub>): "
        "blue = the context makes the token less likely (u &lt; 0, AntiSD rewards it), red = more likely (u &gt; 0, AntiSD penalises it). "
        "Hover a token for its value.</p>",
        f"<div class='bar' style='background:linear-gradient(to right, {stops})'></div>",
        f"<div style='width:24em;display:flex;justify-content:space-between'><span>u &le; {-scale:g}</span><span>0</span><span>u &ge; {scale:g}</span></div>",
        "<h3>response</h3>",
        "<div class='resp'>" + "".join(spans) + "</div>",
    ]
    if stats:
        parts.append("<h3>per category</h3><table><tr><th>category</th><th>n</th><th>mean u</th><th>median u</th><th>frac u&lt;0</th></tr>")
        for cat, s in stats.items():
            cells = [str(s["n"])] + ["-" if s[k] is None else f"{s[k]:+.3f}" for k in ("mean_u", "median_u")]
            cells.append("-" if s["frac_neg"] is None else f"{s['frac_neg']:.2f}")
            parts.append(f"<tr><td style='text-align:left'>{cat}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    for name, text in (sections or {}).items():
        parts.append(f"<h3>{html.escape(name)}</h3><pre>{html.escape(text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def ansi_view(rows: list[tuple[str, str, float]], *, scale: float = 4.0) -> str:
    """The response with 24-bit ANSI background colors (blue u < 0, red u > 0), black text."""
    out = []
    for tok, _, u in rows:
        r, g, b = _rgb(u, scale)
        text = tok.replace("\n", "\u23ce")
        out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m" + ("\n" if "\n" in tok else ""))
    return "".join(out)


# ---------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------


def load_model(name: str, *, warm_steps: int | None = None, seed: int = 0):
    """(model, tokenizer) on CPU fp32. "tiny" is the lab model after its supervised warm start
    (lab.warm_start, cached in .cache/lab; warm_steps 0 = the raw random model)."""
    model, tok = model_lib.load(name, device="cpu", seed=seed)
    if name == "tiny" and warm_steps != 0:
        import lab

        train, _ = lab.datasets()
        kw = {} if warm_steps is None else {"steps": warm_steps}
        model = lab.warm_start(model, tok, train, cache_dir=os.path.join(".cache", "lab"), **kw)
    return model.eval(), tok


def is_lab_model(name: str) -> bool:
    """The tiny preset, or a train.py checkpoint of a lab run (its args.json says data == lab)."""
    if name == "tiny":
        return True
    path = os.path.join(name, "args.json")
    return os.path.isfile(path) and json.load(open(path)).get("data") == "lab"




def check_args(args: argparse.Namespace) -> None:
    """Bad flags end here with a message naming the flag, before any model is loaded."""
    checks = [
        (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (args.temperature >= 0, "--temperature must be >= 0 (0 = greedy)"),
        (args.scale > 0, "--scale must be > 0"),
        (args.warm_steps is None or args.warm_steps >= 0, "--warm-steps must be >= 0 (0 = no warm start)"),
        (args.problem >= 0, "--problem must be >= 0"),
        (args.threads is None or args.threads >= 1, "--threads must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"inspect_pmi.py: {msg}")
    if args.prompt is None and is_lab_model(args.model):  # the lab's held-out set (a few ms), before a warm start
        import lab

        n = len(lab.datasets(n_train=1)[1])
        if args.problem >= n:
            raise SystemExit(f"inspect_pmi.py: --problem {args.problem}: the lab has {n} held-out problems (0 to {n - 1})")
    for flag, path in (("--html", args.html), ("--json", args.json)):  # the outputs, tried before the work
        if not path:
            continue
        if os.path.isdir(path):
            raise SystemExit(f"inspect_pmi.py: {flag} {path} is a directory, not a file")
        existed = os.path.exists(path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "a").close()
            if not existed:
                os.remove(path)
        except OSError as e:
            raise SystemExit(f"inspect_pmi.py: {flag} {path}: cannot write there ({e.strerror or e})") from None


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    threads = args.threads or (1 if is_lab_model(args.model) and "OMP_NUM_THREADS" not in os.environ else None)
    if threads:  # the lab (its warm start, when not cached): 1 thread, as train.py
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    try:
        model, tok = load_model(args.model, warm_steps=args.warm_steps, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:  # a missing checkpoint dir: one line, not a hub traceback
        raise SystemExit(f"inspect_pmi.py: --model: {e}") from None
    lab_mode = is_lab_model(args.model) and args.prompt is None
    problem = None
    if lab_mode:
        import lab

        _, held_out = lab.datasets(n_train=1)  # (--problem is in range: check_args)
        problem = held_out[args.problem]
        user = lab.user_text(problem)
        context = args.context if args.context is not None else lab.search_solution(problem, random.Random(args.seed))
    else:
        if args.prompt is None or args.context is None:
            raise SystemExit("inspect_pmi.py: --prompt and --context are required for a non-lab model")
        user, context = args.prompt, args.context

    prompt = chat_ids(tok, user)
    if args.response is not None:
        response = tok(args.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    else:
        response = sample_responses(model, tok, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)[0]
    text = tok.decode(response, skip_special_tokens=True)
    if args.feedback == "auto":
        correct = bool(lab.grade(text, problem["answer"])) if lab_mode else True
    else:
        correct = args.feedback == "correct"

    tu = token_u(model, tok, prompt, teacher_ids(tok, user, context, correct), response, temperature=args.temperature if args.temperature > 0 else 1.0)
    rows = label(tu)
    stats = category_stats(rows)

    print(f"prompt:\n{user}\n\ncontext c:\n{context}\n\nfeedback: {'correct' if correct else 'incorrect'}\n")
    print("response, colored by u (blue < 0 < red):" if not args.no_color else "response:")
    print(ansi_view(rows, scale=args.scale) if not args.no_color else text)
    print()
    print(format_stats(stats))
    sections = {"prompt x": user, "privileged context c": context, "feedback": "correct" if correct else "incorrect"}
    os.makedirs(os.path.dirname(os.path.abspath(args.html)), exist_ok=True)
    with open(args.html, "w", encoding="utf-8") as f:
        f.write(html_heatmap(rows, title=f"u per token: {args.model}", sections=sections, stats=stats, scale=args.scale))
    print(f"\nheatmap: {args.html}")
    result = {"model": args.model, "prompt": user, "context": context, "correct": correct, "response": text,
              "tokens": [t for t, _, _ in rows], "categories": [c for _, c, _ in rows], "u": [u for _, _, u in rows], "stats": stats}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(ARGS)
