"""eval.py: pass@k vs brute force, the speedup metric, evaluate() bookkeeping, an end-to-end run."""

import itertools
import json
import os
import types

import pytest
import torch

import data
import eval as ev
import rollout
from model import build_tiny_tokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


# --- pass@k ----------------------------------------------------------------------------


def brute_pass_at_k(n, c, k):
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_large_n():
    assert ev.pass_at_k(32, 0, 32) == 0.0
    assert ev.pass_at_k(32, 1, 32) == 1.0
    assert ev.pass_at_k(32, 8, 1) == pytest.approx(8 / 32)  # pass@1 is the mean
    assert 0.0 < ev.pass_at_k(1000, 1, 10) == pytest.approx(0.01)  # no overflow with big n
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            ev.pass_at_k(*bad)


def test_pass_ks_and_summarize():
    assert ev.pass_ks(1) == [1]
    assert ev.pass_ks(4) == [1, 2, 4]
    assert ev.pass_ks(32) == [1, 2, 4, 8, 16, 32]
    assert ev.pass_ks(6) == [1, 2, 4, 6]
    m = ev.summarize([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], 4)
    assert m["counts"] == [1, 4, 0]
    assert m["avg"] == pytest.approx(100 * 5 / 12)
    assert m["pass"][1] == pytest.approx(m["avg"])  # pass@1 == avg@k
    assert m["pass"][4] == pytest.approx(100 * 2 / 3)
    assert m["pass"][2] == pytest.approx(100 * (0.5 + 1 + 0) / 3)


# --- speedup ---------------------------------------------------------------------------

# roughly the paper's Qwen3-4B-Instruct-2507 curves: GRPO best 51.3@200, AntiSD 62.8@100
GRPO = {0: 47.6, 20: 48.5, 50: 49.0, 100: 50.1, 150: 50.8, 190: 51.0, 200: 51.3}
ANTISD = {0: 47.6, 10: 49.0, 20: 51.5, 50: 58.0, 100: 62.8, 150: 61.0, 200: 60.2}


def test_speedup_on_hand_made_histories():
    s = ev.speedup(GRPO, ANTISD)
    assert (s["baseline_best"], s["baseline_best_step"]) == (51.3, 200)
    assert s["method_reach_step"] == 20 and s["ratio"] == pytest.approx(10.0)
    assert (s["method_peak"], s["method_peak_step"]) == (62.8, 100)
    assert (s["method_final"], s["method_final_step"]) == (60.2, 200)
    assert (s["baseline_final"], s["baseline_peak"]) == (51.3, 51.3)
    # list of pairs in any order works the same
    assert ev.speedup(list(GRPO.items())[::-1], list(ANTISD.items())) == s


def test_speedup_ties_never_and_step_zero():
    s = ev.speedup({10: 5.0, 20: 7.0, 30: 7.0, 40: 6.0}, {10: 7.0, 20: 8.0})
    assert s["baseline_best_step"] == 20 and s["baseline_final"] == 6.0  # first step of the best; final differs
    assert s["method_reach_step"] == 10 and s["ratio"] == 2.0
    s = ev.speedup({10: 5.0, 20: 7.0}, {10: 6.0, 20: 6.9})
    assert s["method_reach_step"] is None and s["ratio"] is None  # never reached
    s = ev.speedup({0: 5.0, 10: 7.0}, {0: 7.5, 10: 8.0})
    assert s["method_reach_step"] == 0 and s["ratio"] is None  # reached before training: undefined
    # issue 10 item 7: the baseline's best is its step-0 eval and the method passes it later (a 0/10
    # once): no ratio, "never improved"
    s = ev.speedup({0: 7.0, 10: 6.0, 20: 6.5}, {0: 7.0 - 1.0, 10: 8.0})
    assert s["baseline_never_improved"] and s["method_reach_step"] == 10 and s["ratio"] is None
    assert "never improved" in ev.format_speedup(s, "grpo", "antisd")
    assert not ev.speedup(GRPO, ANTISD)["baseline_never_improved"]
    with pytest.raises(ValueError):
        ev.speedup({}, {1: 1.0})


def test_read_history_and_speedup_cli(tmp_path, capsys):
    base, meth = tmp_path / "grpo.jsonl", tmp_path / "antisd.jsonl"
    with open(base, "w") as f:
        for step, v in GRPO.items():
            f.write(json.dumps({"step": step, "loss": 0.1}) + "\n")  # a training record: ignored
            f.write(json.dumps({"step": step, "eval_acc": v}) + "\n")
    with open(meth, "w") as f:
        for step, v in ANTISD.items():
            f.write(json.dumps({"step": step, "eval_acc": {"aime24": v - 1, "Avg": v}}) + "\n")
        f.write("\n")
    assert ev.read_history(str(base)) == GRPO
    assert ev.read_history(str(meth)) == ANTISD
    per_bench = tmp_path / "pb.jsonl"
    per_bench.write_text(json.dumps({"step": 5, "eval_acc": {"a": 10.0, "b": 20.0}}) + "\n" + json.dumps({"step": 5, "eval_acc": 30.0}) + "\n")
    assert ev.read_history(str(per_bench)) == {5: 30.0}  # a step logged twice keeps the last
    per_bench.write_text(json.dumps({"step": 5, "eval_acc": {"a": 10.0, "b": 20.0}}) + "\n")
    assert ev.read_history(str(per_bench)) == {5: 15.0}  # per-benchmark dict: averaged
    with pytest.raises(ValueError, match="no records"):
        ev.read_history(str(per_bench), key="nope")

    s = ev.main(ev.get_parser().parse_args(["--speedup", str(base), str(meth)]))
    out = capsys.readouterr().out
    assert s["ratio"] == pytest.approx(10.0)
    assert "51.3@200" in out and "62.8@100" in out and "60.2@200" in out and "speedup 10.0x" in out


# --- evaluate() with a scripted sampler: the bookkeeping, exactly --------------------------


def test_work_items():
    assert ev._work_items(5, 4, 8) == [([0, 1], 4), ([2, 3], 4), ([4], 4)]
    assert ev._work_items(2, 5, 3) == [([0], 3), ([0], 2), ([1], 3), ([1], 2)]
    assert ev._work_items(1, 32, 32) == [([0], 32)]


PROBLEMS = [
    {"id": "p0", "problem": "Alpha?", "answer": "A"},
    {"id": "p1", "problem": "Beta?", "answer": "2"},
    {"id": "p2", "problem": "Gamma?", "answer": "\\frac{1}{2}"},
]


def scripted_sampler(tok, calls):
    """Stands in for rollout.sample. Sample s of problem "X?" answers: s == 0 right, s == 1 right in
    a different form ("0.5" for 1/2) or only inside a think block, s >= 2 wrong; rows of p2 never finish.
    """
    by_prompt = {}  # prompt text -> next sample index of that problem

    def sample(model, prompts, *, n, max_new_tokens, eos_token_ids, pad_token_id, **kw):
        calls.append((len(prompts), n, kw["temperature"], kw["top_p"]))
        rows = []
        for p in prompts:
            text = tok.decode(p)
            prob = next(q for q in PROBLEMS if q["problem"] in text)
            for _ in range(n):
                s = by_prompt.get(prob["id"], 0)
                by_prompt[prob["id"]] = s + 1
                if s == 0:
                    resp = f"so \\boxed{{{prob['answer']}}}"
                elif s == 1:
                    resp = "so \\boxed{0.5}" if prob["id"] == "p2" else f"<think>\\boxed{{{prob['answer']}}}</think> no idea"
                else:
                    resp = "\\boxed{999}"
                ids = tok.encode(resp, add_special_tokens=False)
                done = prob["id"] != "p2"
                rows.append((ids + [eos_token_ids[0]] if done else ids, done))
        T = max(len(r) for r, _ in rows)
        tokens = torch.full((len(rows), T), pad_token_id)
        for i, (r, _) in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r, _ in rows])
        finished = torch.tensor([d for _, d in rows])
        return rollout.Rollout(tokens=tokens, lengths=lengths, finished=finished, logprobs=torch.zeros(tokens.shape))

    return sample


class _Stub(torch.nn.Module):  # evaluate only needs .eval()/.training and a generation_config
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("batch_size", [2, 64])  # k split across calls / several problems per call
def test_evaluate_bookkeeping(monkeypatch, batch_size):
    tok = build_tiny_tokenizer()
    calls = []
    monkeypatch.setattr(rollout, "sample", scripted_sampler(tok, calls))
    r = ev.evaluate(_Stub(), tok, PROBLEMS, k=3, max_new_tokens=50, batch_size=batch_size, progress=False, grade_workers=0)
    assert all(c[2:] == (0.7, 0.95) for c in calls)  # the paper's eval sampling by default
    assert sum(c[0] * c[1] for c in calls) == 9 and max(c[0] * c[1] for c in calls) <= batch_size
    got = [(s["id"], s["sample"], s["correct"], s["finished"]) for s in r["samples"]]
    assert got == [
        ("p0", 0, 1.0, True), ("p0", 1, 0.0, True), ("p0", 2, 0.0, True),  # think-only answer: 0
        ("p1", 0, 1.0, True), ("p1", 1, 0.0, True), ("p1", 2, 0.0, True),
        ("p2", 0, 1.0, False), ("p2", 1, 1.0, False), ("p2", 2, 0.0, False),  # 0.5 == 1/2; truncated still graded
    ]  # fmt: skip
    assert r["samples"][0]["response"] == "so \\boxed{A}"  # the EOS token is not part of the text
    assert r["samples"][7]["extracted"] == "0.5"
    assert [p["correct"] for p in r["per_problem"]] == [1, 1, 2]
    assert r["avg"] == pytest.approx(100 * 4 / 9)
    assert r["pass"][1] == pytest.approx(r["avg"])
    assert r["pass"][3] == pytest.approx(100.0)
    assert r["truncated"] == pytest.approx(100 / 3)


def test_evaluate_custom_grader(monkeypatch):
    tok = build_tiny_tokenizer()
    monkeypatch.setattr(rollout, "sample", scripted_sampler(tok, []))
    r = ev.evaluate(_Stub(), tok, PROBLEMS[:1], k=2, max_new_tokens=50, progress=False, grader=lambda resp, ans: ans in resp)
    assert [s["correct"] for s in r["samples"]] == [1.0, 1.0]  # a substring grader, as asked


def test_evaluate_skips_and_lists_prompts_over_the_limit(monkeypatch, capsys):
    tok = build_tiny_tokenizer()
    calls = []
    monkeypatch.setattr(rollout, "sample", scripted_sampler(tok, calls))
    long_p1 = [PROBLEMS[0], {**PROBLEMS[1], "problem": "Beta? " + "and so on " * 60}, PROBLEMS[2]]
    lens = [len(data.format_prompt(tok, p["problem"])) for p in long_p1]
    limit = max(lens[0], lens[2])
    assert lens[1] > limit
    r = ev.evaluate(_Stub(), tok, long_p1, k=2, max_new_tokens=50, progress=False, grade_workers=0, max_prompt_tokens=limit)
    assert r["n"] == 2 and r["skipped"] == ["p1"] and [p["id"] for p in r["per_problem"]] == ["p0", "p2"]
    assert sum(c[0] * c[1] for c in calls) == 4  # p1 was never sampled
    assert "skipped 1 of 3 problems" in capsys.readouterr().out
    assert "1 problems skipped" in ev.format_table({"benches": {"b": r}, "Avg": r["avg"]})
    # the model's context bounds the prompt too: room for max_new_tokens, whatever the flag
    stub = _Stub()
    stub.config = types.SimpleNamespace(max_position_embeddings=limit + 50)
    assert ev.evaluate(stub, tok, long_p1, k=1, max_new_tokens=50, progress=False, grade_workers=0)["skipped"] == ["p1"]
    stub.config.max_position_embeddings = min(lens) + 49
    with pytest.raises(ev.PromptsTooLong, match="context minus --max-new-tokens 50"):
        ev.evaluate(stub, tok, long_p1, k=1, max_new_tokens=50, progress=False, grade_workers=0)


def test_cli_every_prompt_too_long_is_a_clear_error(capsys):
    argv = ["--model", "tiny", "--bench", f"{FIX}/tiny_eval.jsonl", "--k", "1", "--max-new-tokens", "4", "--limit", "2", "--quiet", "--grade-workers", "0"]
    with pytest.raises(SystemExit, match=r"eval.py: --bench tiny_eval: every prompt is longer than 3 tokens \(--max-prompt-tokens 3"):
        ev.main(ev.get_parser().parse_args([*argv, "--max-prompt-tokens", "3"]))
    with pytest.raises(SystemExit, match="--max-prompt-tokens must be >= 1"):
        ev.main(ev.get_parser().parse_args([*argv, "--max-prompt-tokens", "0"]))


# --- end to end on the tiny model ------------------------------------------------------


def test_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "tiny", "--bench", f"{FIX}/tiny_eval.jsonl,aime24={FIX}/aime24.jsonl", "--k", "2",
            "--max-new-tokens", "6", "--limit", "2", "--batch-size", "4", "--out", str(out), "--quiet", "--grade-workers", "0"]  # fmt: skip
    result = ev.main(ev.get_parser().parse_args(argv))
    printed = capsys.readouterr().out
    assert "tiny_eval" in printed and "aime24" in printed and "Avg" in printed
    assert set(result["benches"]) == {"tiny_eval", "aime24"}
    lines = [json.loads(x) for x in open(out / "samples.jsonl")]
    assert len(lines) == 2 * 2 * 2  # benches x problems x k
    assert set(lines[0]) == {"bench", "id", "sample", "response", "extracted", "answer", "correct", "finished", "length"}
    assert [(x["id"], x["sample"]) for x in lines[:4]] == [("t1", 0), ("t1", 1), ("t2", 0), ("t2", 1)]
    assert all(1 <= x["length"] <= 6 for x in lines)
    summary = json.load(open(out / "summary.json"))
    assert summary["args"]["k"] == 2 and "samples" not in summary["benches"]["aime24"]
    assert summary["Avg"] == pytest.approx((result["benches"]["tiny_eval"]["avg"] + result["benches"]["aime24"]["avg"]) / 2)

    # the same seed gives the same samples
    again = ev.main(ev.get_parser().parse_args(argv[:-5] + ["--quiet", "--grade-workers", "0"]))
    assert [s["response"] for s in again["benches"]["aime24"]["samples"]] == [
        x["response"] for x in lines if x["bench"] == "aime24"
    ]


def test_evaluate_template_that_opens_think(monkeypatch):
    from model import CHAT_TEMPLATE

    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE + "{%- if add_generation_prompt %}{{- '<think>\\n' }}{%- endif %}"
    texts = iter(["I guess \\boxed{A}", "hmm</think>so \\boxed{A}"])  # truncated in thought / answered

    def sample(model, prompts, *, n, eos_token_ids, pad_token_id, **kw):
        rows = [tok.encode(next(texts), add_special_tokens=False) for _ in range(n)]
        T = max(map(len, rows))
        tokens = torch.full((n, T), pad_token_id)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        return rollout.Rollout(tokens, lengths, torch.zeros(n, dtype=torch.bool), torch.zeros(tokens.shape))

    monkeypatch.setattr(rollout, "sample", sample)
    r = ev.evaluate(_Stub(), tok, PROBLEMS[:1], k=2, max_new_tokens=50, progress=False, grade_workers=0)
    assert [s["correct"] for s in r["samples"]] == [0.0, 1.0]
    assert [s["extracted"] for s in r["samples"]] == [None, "A"]
    assert r["samples"][0]["response"] == "I guess \\boxed{A}"  # stored as generated


def test_load_and_run_benchmarks(monkeypatch):
    tok = build_tiny_tokenizer()
    benches = ev.load_benchmarks([f"aime24={FIX}/aime24.jsonl", f"{FIX}/generic.jsonl"], limit=2, verbose=False)
    assert {n: (len(b["problems"]), b["k"]) for n, b in benches.items()} == {"aime24": (2, 32), "generic": (2, 4)}
    assert ev.load_benchmarks([f"{FIX}/generic.jsonl"], k=3, verbose=False)["generic"]["k"] == 3
    with pytest.raises(ValueError, match="given twice"):
        ev.load_benchmarks([f"{FIX}/generic.jsonl", f"{FIX}/generic.jsonl"], verbose=False)

    def sample(model, prompts, *, n, eos_token_ids, pad_token_id, **kw):  # always answers 5
        ids = tok.encode("\\boxed{5}", add_special_tokens=False) + [eos_token_ids[0]]
        N = len(prompts) * n
        return rollout.Rollout(torch.tensor([ids] * N), torch.full((N,), len(ids)), torch.ones(N, dtype=torch.bool), torch.zeros(N, len(ids)))

    monkeypatch.setattr(rollout, "sample", sample)
    res = ev.run_benchmarks(_Stub(), tok, benches, max_new_tokens=8, progress=False, grade_workers=0)
    assert res["benches"]["aime24"]["avg"] == pytest.approx(50.0)  # "5" right on the first problem, wrong on "011"
    assert res["benches"]["generic"]["avg"] == 0.0
    assert res["Avg"] == pytest.approx(25.0)
    assert "aime24 | generic | Avg" in ev.format_table(res, "m") and "50.0 | 0.0 | 25.0" in ev.format_table(res, "m")
