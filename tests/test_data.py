"""data.py: loaders on fixtures in each dataset's real column layout, errors, dedup, the prompt."""

import json
import os
import re
import sys

import pytest

import data
from data import DataError, load_problems

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def fx(name):
    return os.path.join(FIX, name)


# --- every registered dataset, from a local file in its own layout ---------------------
# (real rows; tests/fixtures/README.md names the source of each file)

EXPECTED = {  # name -> (fixture, rows, kept, first id, first answer)
    "dapo": ("dapo.jsonl", 14, 3, "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079", "34"),
    "aime24": ("aime24_h4.jsonl", 3, 3, "60", "204"),
    "aime25": ("aime25.jsonl", 2, 2, "1", "70"),  # int64 answers become strings
    "aime26": ("aime26.jsonl", 2, 2, "1", "277"),
    "hmmt25": ("hmmt25.jsonl", 3, 3, "3", "\\frac{1}{576}"),
    "minerva": ("minerva.jsonl", 7, 7, "0", "1.6"),  # no id column: the row index
    "math500": ("math500.jsonl", 3, 3, "test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    "gsm8k": ("gsm8k.jsonl", 2, 2, "0", "18"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_benchmark_fixture(name):
    fixture, rows, kept, first_id, first_answer = EXPECTED[name]
    problems, report = load_problems(f"{name}={fx(fixture)}", verbose=False)
    assert (report["rows"], report["kept"], len(problems)) == (rows, kept, kept)
    assert problems[0]["id"] == first_id and problems[0]["answer"] == first_answer
    assert report["k"] == data.SOURCES[name].k
    assert report["instructed"] == 0  # no answer-format instruction left in any real problem
    for p in problems:
        assert set(p) <= {"id", "problem", "answer", "solution"}
        assert all(isinstance(p[f], str) and p[f] for f in ("id", "problem", "answer"))
    assert len({p["id"] for p in problems}) == len(problems)


def test_paper_protocol_k():
    assert [data.SOURCES[n].k for n in ("aime24", "aime25", "aime26", "hmmt25", "minerva")] == [32, 32, 32, 32, 4]


# --- DAPO: wrapper, duplicates, conflicting answers, the public layouts --------------------

DAPO_ANSWERS = ["34", "113", "-3"]


def test_dapo_unwraps_prompt_and_drops_conflicting_problems(capsys):
    problems, report = load_problems(f"dapo={fx('dapo.jsonl')}")
    assert [p["answer"] for p in problems] == DAPO_ANSWERS
    assert problems[0]["problem"].startswith("In triangle $ABC$") and problems[0]["problem"].endswith("find $a + b + c$.")
    assert all("Answer" not in p["problem"] and "Remember" not in p["problem"] for p in problems)
    # 14 rows = 7 rows x 2; 5 distinct problems, of which 2 carry two answers each: dropped whole
    assert (report["duplicates"], report["conflicts"], report["skipped"], report["unwrapped"]) == (9, 2, 0, 0)
    assert [c["answers"] for c in report["conflict_examples"]] == [["-1", "554"], ["64", "6"]]
    assert report["conflict_examples"][0]["id"] == "de2e8f5b-ec62-4229-8880-395cb4bc476a"  # the -1 placeholder came first
    out = capsys.readouterr().out
    assert "14 rows -> 3 problems (9 duplicates dropped, 2 problems with conflicting answers dropped" in out
    assert "'-1' vs '554'" in out and "The sides of rectangle" in out


def test_dapo_all_twelve_real_conflicts_are_dropped(tmp_path):
    """math-vault's conflicts.jsonl (all 12 of the real file) expanded into one row per copy."""
    rows = []
    for c in map(json.loads, open(fx("dapo_conflicts.jsonl"))):
        rows += [{"id": s["id"], "problem": c["problem"], "answer": s["answer"]} for s in c["source_rows"]]
    rows += [json.loads(line) for line in open(fx("dapo_dedup.jsonl"))]  # three clean problems after them
    p = tmp_path / "dapo_copy.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems, report = load_problems(f"dapo={p}", verbose=False)
    assert report["conflicts"] == 12 and report["rows"] == 27 and [q["answer"] for q in problems] == DAPO_ANSWERS
    assert data.warnings(report)[-1] == "  ... and 9 more conflicting problems" and len(data.warnings(report)) == 4
    # and limit counts kept problems after the drop, reading the whole file first
    problems, report = load_problems(f"dapo={p}", limit=2, verbose=False)
    assert [q["answer"] for q in problems] == DAPO_ANSWERS[:2] and report["conflicts"] == 12


@pytest.mark.parametrize("fixture", ["dapo_label.jsonl", "dapo_dedup.jsonl"])
def test_dapo_public_copies_load_the_same_problems(fixture):
    ref, _ = load_problems(f"dapo={fx('dapo.jsonl')}", verbose=False)
    for spec in (f"dapo={fx(fixture)}", fx(fixture)):  # registered layout, and a plain path (detected)
        problems, report = load_problems(spec, verbose=False)
        assert [(p["problem"], p["answer"]) for p in problems] == [(p["problem"], p["answer"]) for p in ref]
        assert report["instructed"] == 0 and report["skipped"] == 0
    _, report = load_problems(f"dapo={fx(fixture)}", verbose=False)
    assert report["unwrapped"] == (3 if fixture == "dapo_dedup.jsonl" else 0)  # stripped copy: nothing to strip


def test_dapo_plain_path_in_verl_layout():
    problems, report = load_problems(fx("dapo.jsonl"), verbose=False)
    assert [p["answer"] for p in problems] == DAPO_ANSWERS and report["conflicts"] == 2
    assert problems[0]["id"] == "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"


def test_dapo_unwrap_keeps_unwrapped_and_counts(tmp_path):
    p = tmp_path / "d.jsonl"
    row = {"prompt": [{"role": "user", "content": "Plain problem?"}], "reward_model": {"ground_truth": "1"}, "extra_info": {"index": 3}}
    p.write_text(json.dumps(row) + "\n")
    problems, report = load_problems(f"dapo={p}", verbose=False)
    assert problems == [{"id": "3", "problem": "Plain problem?", "answer": "1"}]
    assert report["unwrapped"] == 1


def test_unwrap_dapo_each_part():
    body = "What is $1+1$?"
    for prefix in data.DAPO_PREFIXES:
        assert data.unwrap_dapo(prefix + body + data.DAPO_SUFFIX) == (body, True)
        assert data.unwrap_dapo(prefix + body) == (body, True)  # a copy that kept only the prefix
    assert data.unwrap_dapo(body + data.DAPO_SUFFIX) == (body, True)
    assert data.unwrap_dapo(body) == (body, False)


def test_leftover_answer_instruction_is_counted_and_shown(tmp_path, capsys):
    """A wording we do not strip (verl's MATH/GSM8K suffix) stays in the problem: say so loudly."""
    verl = " Let's think step by step and output the final answer within \\boxed{}."
    rows = [json.loads(line) for line in open(fx("dapo_dedup.jsonl"))]
    rows[1]["problem"] += verl
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems, report = load_problems(f"dapo={p}")
    assert report["instructed"] == 1 and report["instructed_examples"][0]["id"] == rows[1]["id"]
    out = capsys.readouterr().out
    assert "WARNING dapo: 1 problems still carry an answer-format instruction" in out and "output the final answer" in out
    assert len(problems) == 3  # kept: the user decides


@pytest.mark.parametrize(
    "text, instructed",
    [
        ("Find $x$. The last line of your response should be of the form Answer: $Answer", True),
        ("Find $x$. Please put your final answer within \\boxed{}.", True),
        ('Find $x$.\n\nRemember to put your answer on its own line after "Answer:".', True),
        ("Give  your answer in units of ergs per second, to two significant figures.", False),  # Minerva, a unit
        ("... it must be classified as a \\boxed{semiconductor} since it exhibits a band gap", False),  # Minerva 159
        ("Express your answer as a common fraction.", False),
    ],
)
def test_answer_format_pattern(text, instructed):
    assert bool(data.ANSWER_FORMAT.search(text)) == instructed


def test_dedup_off_and_limit():
    problems, report = load_problems(f"dapo={fx('dapo.jsonl')}", dedup=False, verbose=False)
    assert len(problems) == 14 and report["duplicates"] == 0 and report["conflicts"] == 0
    problems, _ = load_problems(f"dapo={fx('dapo.jsonl')}", limit=2, verbose=False)
    assert len(problems) == 2


# --- Minerva: both layouts, and the hub's data/ folder --------------------------------------


def test_minerva_knoveleng_layout_answers_from_the_last_box():
    ours, _ = load_problems(f"minerva={fx('minerva.jsonl')}", verbose=False)
    kn, report = load_problems(f"minerva={fx('minerva_knoveleng.jsonl')}", verbose=False)
    assert [p["answer"] for p in kn] == [p["answer"] for p in ours]
    assert [p["answer"] for p in kn] == ["1.6", "4.5e33", "np.arcsin(10/13)", "-1./3", "\\frac{37}{4} m", "\\frac{1}{m} t", "\\frac{1}{\\sqrt{2}}c"]
    assert [p["id"] for p in kn] == ["0", "1", "5", "38", "104", "116", "137"]  # the idx column
    assert [p["problem"] for p in kn] == [p["problem"] for p in ours] and "solution" in kn[0]
    # a plain path in that layout reads the same answers (the solution's last box)
    plain, _ = load_problems(fx("minerva_knoveleng.jsonl"), verbose=False)
    assert [p["answer"] for p in plain] == [p["answer"] for p in kn] and plain[3]["id"] == "38"


def test_minerva_golds_fixture_is_the_272_real_answers():
    golds = [json.loads(line) for line in open(fx("minerva_golds.jsonl"))]
    assert len(golds) == 272 and [g["idx"] for g in golds] == list(range(272))
    assert sum(bool(re.search(r"\d[eE][-+]?\d", g["answer"])) for g in golds) == 58  # e-notation, issue 11


def test_minerva_snapshot_with_data_folder(tmp_path):
    """math-ai/minervamath's files as a snapshot: data/test-00000-of-00001.* (also the hub pattern)."""
    root = _fake_snapshot(tmp_path, {"data/test-00000-of-00001.jsonl": "minerva.jsonl"})
    problems, report = load_problems(f"minerva={root}", verbose=False)
    assert len(problems) == 7 and report["files"] == [os.path.join(root, "data", "test-00000-of-00001.jsonl")]
    assert "data/test*" in data.SOURCES["minerva"].files


def test_snapshot_with_the_split_under_another_name_says_which_files_are_there(tmp_path):
    root = _fake_snapshot(tmp_path, {"data/train-00000-of-00001.jsonl": "minerva_knoveleng.jsonl"})  # knoveleng's name
    with pytest.raises(FileNotFoundError, match=r"data/train-00000-of-00001.jsonl \(pass one as 'minerva=FILE'\)"):
        load_problems(f"minerva={root}", verbose=False)


# --- answers and ids as the real files store them ---------------------------------------------


def test_zero_padded_integer_answers_are_canonical():
    problems, _ = load_problems(f"aime24={fx('aime24_h4.jsonl')}", verbose=False)
    assert [p["answer"] for p in problems] == ["204", "25", "73"]  # stored "204", "025", "073"
    assert [data._answer(a, "answer") for a in ("-007", "+2", "0", "000", "100", "0.50", "025.0")] == [
        "-7", "+2", "0", "0", "100", "0.50", "025.0",  # only integers; decimals are left alone
    ]


@pytest.mark.parametrize("fixture, ids", [("aime25.jsonl", ["1", "2"]), ("hmmt25.jsonl", ["3", "10", "17"]),
                                          ("math500.jsonl", ["test/precalculus/807.json", "test/intermediate_algebra/1994.json",
                                                             "test/prealgebra/1044.json"])])  # fmt: skip
def test_plain_path_keeps_the_files_own_ids(fixture, ids):
    problems, _ = load_problems(fx(fixture), verbose=False)  # no NAME=: the ids are still problem_idx / unique_id
    assert [p["id"] for p in problems] == ids


def test_gsm8k_splits_solution_and_strips_thousands():
    problems, _ = load_problems(f"gsm8k={fx('gsm8k.jsonl')}", verbose=False)
    assert problems[0]["answer"] == "18" and "<<16-3-4=9>>" in problems[0]["solution"]
    assert problems[1]["answer"] == "2125"  # stored "#### 2,125"


def test_generic_jsonl_and_json():
    problems, report = load_problems(fx("generic.jsonl"), verbose=False)
    assert report["name"] == "generic" and report["k"] == data.GENERIC_K
    assert problems == [
        {"id": "p1", "problem": "What is $1+1$?", "answer": "2", "solution": "$1+1=2$."},
        {"id": "1", "problem": "What is $2 \\cdot 3$?", "answer": "6"},
    ]
    problems, _ = load_problems(fx("generic.json"), verbose=False)
    assert [(p["id"], p["answer"]) for p in problems] == [("0", "7"), ("5", "4")]


def test_repeated_ids_are_made_unique(tmp_path):
    p = tmp_path / "ids.jsonl"
    p.write_text("".join(json.dumps({"id": 1, "problem": f"Q{i}", "answer": "1"}) + "\n" for i in range(3)))
    problems, _ = load_problems(str(p), verbose=False)
    assert [q["id"] for q in problems] == ["1", "1#1", "1#2"]


# --- malformed input: errors name file and row ------------------------------------------


def test_malformed_file_names_file_and_row():
    with pytest.raises(DataError) as e:
        load_problems(fx("malformed.jsonl"), verbose=False)
    msg = str(e.value)
    assert "malformed.jsonl" in msg and "row 2" in msg and "line 3" in msg and "missing field 'answer'" in msg


def test_malformed_skip_counts_every_bad_row():
    problems, report = load_problems(fx("malformed.jsonl"), on_error="skip", verbose=False)
    assert len(problems) == 2 and report["skipped"] == 3
    reasons = "\n".join(report["skip_reasons"])
    assert "row 2" in reasons and "missing field 'answer'" in reasons
    assert "row 3" in reasons and "'answer' is empty" in reasons
    assert "row 4" in reasons and "'problem' must be a string" in reasons


@pytest.mark.parametrize(
    "row, spec, needle",
    [
        ({"problem": "Q", "answer": None}, None, "'answer' must be a string"),
        ({"problem": "Q", "answer": True}, None, "got bool"),
        ({"problem": "", "answer": "1"}, None, "'problem' is empty"),
        ({"problem": "Q", "answer": "1", "solution": 3}, None, "'solution' must be a string"),
        ({"problem": "Q", "answer": "1", "id": [1]}, None, "'id' must be"),
        ({"prompt": 7, "reward_model": {"ground_truth": "1"}}, "dapo", "list of chat messages or a string"),
        ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "dapo", "list of chat messages or a string"),
        ({"prompt": [{"role": "system", "content": "Q"}], "label": "1"}, "dapo", "no user message"),
        ({"prompt": [{"role": "user", "content": "Q"}], "reward_model": {}}, "dapo", "reward_model.ground_truth"),
        ({"prompt": [{"role": "user", "content": data.DAPO_PREFIX + data.DAPO_SUFFIX}], "label": "1"}, "dapo", "empty once the DAPO wrapper"),
        ({"problem": "Q", "solution": "no box here"}, None, "no \\boxed{} answer"),
        ({"question": "Q", "solution": "x"}, "minerva", "missing field 'answer'"),
        ({"problem": "Q", "solution": "no box"}, "minerva", "no \\boxed{} answer"),
        ({"question": "Q", "answer": "no marker"}, "gsm8k", "####"),
        ({"problem_idx": 1, "problem": "Q"}, "aime26", "missing field 'answer'"),
        ({"question": "Q"}, "minerva", "missing field 'answer'"),
    ],
)
def test_malformed_rows(tmp_path, row, spec, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"problem": "fine", "answer": "1", "question": "fine", "problem_idx": 0}) + "\n" + json.dumps(row) + "\n")
    if spec == "dapo":  # the good first row in dapo's layout
        good = {"prompt": [{"role": "user", "content": "fine"}], "reward_model": {"ground_truth": "1"}}
        p.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    if spec == "gsm8k":
        p.write_text(json.dumps({"question": "fine", "answer": "x\n#### 1"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        load_problems(f"{spec}={p}" if spec else str(p), verbose=False)
    assert str(p) in str(e.value) and "row 1" in str(e.value) and needle in str(e.value)


def test_bad_files(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"problem": "Q", "answer": "1"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken.jsonl: row 1 \(line 2\): not valid JSON"):
        load_problems(str(p), verbose=False)
    q = tmp_path / "list.jsonl"
    q.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="row 0.*expected a JSON object"):
        load_problems(str(q), verbose=False)
    r = tmp_path / "x.json"
    r.write_text('{"a": 1}')
    with pytest.raises(DataError, match="list of objects"):
        load_problems(str(r), verbose=False)
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_problems(f"aime24={tmp_path / 'x.csv'}", verbose=False)
    with pytest.raises(FileNotFoundError):
        load_problems(str(tmp_path / "missing.jsonl"), verbose=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_problems("aime2030", verbose=False)
    with pytest.raises(ValueError, match="unknown dataset layout"):
        load_problems(f"nope={p}", verbose=False)
    with pytest.raises(ValueError, match="on_error"):
        load_problems(str(p), on_error="ignore", verbose=False)


# --- parquet (optional extra) -------------------------------------------------------------


def test_parquet_in_real_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(fx("dapo.jsonl"))]
    path = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)  # nested prompt list + reward_model struct, as on the hub
    problems, report = load_problems(f"dapo={path}", verbose=False)
    assert report["kept"] == 3 and report["duplicates"] == 9 and report["conflicts"] == 2
    assert [p["answer"] for p in problems] == DAPO_ANSWERS and problems[0]["problem"].startswith("In triangle $ABC$")
    rows = [json.loads(line) for line in open(fx("aime26.jsonl"))]
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    problems, _ = load_problems(f"aime26={path}", verbose=False)
    assert [p["answer"] for p in problems] == ["277", "62"]


def test_parquet_without_pyarrow_or_pandas_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_problems(str(path), verbose=False)


# --- the hub path (network replaced by a local snapshot folder) ----------------------------


def _fake_snapshot(tmp_path, layout):
    """A folder laid out like the dataset repo: {relative path: fixture file}."""
    for rel, src in layout.items():
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(open(fx(src)).read())
    return str(tmp_path)


def test_hub_download_uses_split_files(tmp_path, monkeypatch):
    import huggingface_hub

    root = _fake_snapshot(tmp_path, {"test.jsonl": "math500.jsonl", "README.md": "generic.jsonl"})
    calls = []

    def fake_snapshot_download(**kw):
        calls.append(kw)
        return root

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    problems, report = load_problems("math500", verbose=False)
    assert calls[0]["repo_id"] == "HuggingFaceH4/MATH-500" and calls[0]["repo_type"] == "dataset"
    assert calls[0]["allow_patterns"] == ["test.jsonl"]
    assert report["files"] == [os.path.join(root, "test.jsonl")] and len(problems) == 3
    # the hub id works as a spec too
    assert load_problems("HuggingFaceH4/MATH-500", verbose=False)[1]["name"] == "math500"


def test_local_snapshot_folder(tmp_path):
    root = _fake_snapshot(tmp_path, {"test.jsonl": "minerva.jsonl"})
    problems, report = load_problems(f"minerva={root}", verbose=False)  # minerva's files pattern is "test*"
    assert len(problems) == 7
    with pytest.raises(FileNotFoundError, match="no files matching"):
        load_problems(f"aime24={root}", verbose=False)


def test_hub_offline_error_says_what_to_do(monkeypatch):
    import huggingface_hub

    def offline(**kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="aime24=PATH") as e:
        load_problems("aime24", verbose=False)
    assert "HuggingFaceH4/aime_2024" in str(e.value)


# --- the prompt ----------------------------------------------------------------------------


def test_user_text_is_the_papers_instruction():
    assert data.INSTRUCTION == "Solve the following math problem. Place the final answer in \\boxed{}."
    assert data.user_text("  What is 1+1?\n") == "Solve the following math problem. Place the final answer in \\boxed{}.\n\nWhat is 1+1?"


def test_format_prompt_uses_the_chat_template():
    from model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ids = data.format_prompt(tok, "What is 2 + 2?")
    assert isinstance(ids, list) and all(type(t) is int for t in ids)  # not a BatchEncoding
    text = tok.decode(ids)
    assert text == "<|im_start|>user\n" + data.user_text("What is 2 + 2?") + "<|im_end|>\n<|im_start|>assistant\n"
    off = tok.decode(data.format_prompt(tok, "What is 2 + 2?", enable_thinking=False))
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(data.format_prompt(tok, "What is 2 + 2?", enable_thinking=True)) == text


def test_think_prefix_for_templates_that_open_think():
    from model import CHAT_TEMPLATE, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    assert data.think_prefix(tok, data.format_prompt(tok, "Q?")) == ""
    assert data.think_prefix(tok, data.format_prompt(tok, "Q?", enable_thinking=False)) == ""  # empty block, closed
    tok.chat_template = CHAT_TEMPLATE + "{%- if add_generation_prompt %}{{- '<think>\\n' }}{%- endif %}"
    assert data.think_prefix(tok, data.format_prompt(tok, "Q?")) == "<think>"


def test_graded_texts_drop_the_stop_token_keep_special_tokens_and_the_prefix():
    import torch

    from model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    body = tok("so \\boxed{4}", add_special_tokens=False)["input_ids"]
    think = tok.convert_tokens_to_ids(["</think>"])
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = [think + body + [eos], think + body, body + [pad]]  # finished on EOS, truncated, finished on a second stop id
    T = max(map(len, rows))
    tokens = torch.tensor([r + [pad] * (T - len(r)) for r in rows])  # (3, T) right-padded
    lengths = torch.tensor([len(r) for r in rows])
    finished = torch.tensor([True, False, True])
    texts = data.graded_texts(tok, tokens, lengths, finished, ["<think>", "<think>", ""])
    assert texts[0] == "<think></think>so \\boxed{4}"  # stop token dropped, </think> kept (a special token)
    assert texts[1] == texts[0]  # truncated: all its tokens (none is a stop token)
    assert texts[2] == "so \\boxed{4}"  # whichever stop id ended it
