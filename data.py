"""data.py: math problems in, prompt token ids out.

What this file owns
-------------------
1. A registry of the paper's datasets: short name -> hub dataset id, split, the files
   of that split, and the column mapping, written in code (`SOURCES`):

     name     hub id                              split  k   columns used
     dapo     BytedTsinghua-SIA/DAPO-Math-17k     train  -   prompt[user].content (unwrapped), reward_model.ground_truth, extra_info.index
     aime24   HuggingFaceH4/aime_2024             train  32  id, problem, answer, solution
     aime25   MathArena/aime_2025                 train  32  problem_idx, problem, answer
     aime26   MathArena/aime_2026                 train  32  problem_idx, problem, answer (int64)
     hmmt25   MathArena/hmmt_feb_2025             train  32  problem_idx, problem, answer
     minerva  math-ai/minervamath                 test   4   question, answer
                                                             (or knoveleng/Minerva-Math, Qwen2.5-Math's
                                                             evaluation/data/minerva_math: problem, idx and
                                                             the answer as the solution's last \\boxed{})
     math500  HuggingFaceH4/MATH-500              test   4   unique_id, problem, answer, solution
     gsm8k    openai/gsm8k (config main)          test   1   question, answer ("<solution> #### <number>")

   `k` is the evaluation's samples per problem: the paper's avg@32 on AIME / HMMT and
   avg@4 on Minerva; MATH-500 (4) and GSM8K (1) are not in the paper's table, our
   defaults. Each entry's `checked` field says which parts were verified against the
   hub's dataset cards / file listings and which are assumed.

2. Loading: `load_problems(spec)` where spec is
     - a short name above ("aime24"): the split's files from the hub through
       `huggingface_hub.snapshot_download` (cached; HF_HUB_OFFLINE=1 reuses the cache);
     - "name=PATH": a local file (or a downloaded snapshot folder) in that dataset's
       own column layout, e.g. "dapo=/data/dapo-math-17k.parquet";
     - "PATH": a local file in our schema, one problem per row:
         problem   str, required, non-empty
         answer    str (or int), required, non-empty: the reference final answer
         solution  str, optional
         id        str or int, optional (default: the row index)
   Files: .jsonl (one JSON object a line), .json (a list of objects), .parquet
   (needs pyarrow or pandas: `pip install pyarrow`; not a hard dependency, and the
   `datasets` package is never needed). Rows -> [{"id", "problem", "answer",
   "solution"?}] with ids and answers as strings.

   A plain PATH is read in whichever of these layouts its rows have: our schema (or
   `question` for `problem`, `label` for `answer`, `problem_idx` / `unique_id` / `idx`
   for `id`, or only a `solution` whose last \\boxed{} is the answer), or DAPO's
   (`prompt` + `reward_model` / `label`).
   Integer answers are written without leading zeros (AIME 2024 stores "025"; the
   grader never cared, exact-string uses such as majority votes do).

   Nothing is dropped silently. A malformed row (missing field, empty answer, wrong
   type) raises `DataError` naming the file and the row; with on_error="skip" it is
   skipped and counted instead. Duplicates (same problem text after whitespace
   normalisation) are dropped and counted. A problem that appears with two different
   answers is dropped whole (every copy) and counted as one conflict; the first few
   are printed with their answers. The counts come back in a report dict and are
   printed as one line.

   The real DAPO-Math-17k parquet (hub revision 6587709, as recorded by the row-for-row
   dump github.com/Geraldxm/math-vault): 1,791,700 rows = one 17,917-row
   block repeated 100 times; 17,188 distinct problems after whitespace normalisation,
   12 of them with two different answers (4 of those a "-1" placeholder next to the
   true 554, 230, 683, 913), so 17,176 problems are kept.

3. The paper's prompt: the user turn is

       Solve the following math problem. Place the final answer in \\boxed{}.

       <problem>

   `user_text(problem)` returns that string; `format_prompt(tokenizer, problem)` wraps
   it in the model's own chat template (add_generation_prompt=True) and returns the
   token ids as a plain list of ints. [D] The instruction's wording is the paper's;
   the paper does not print the joiner, we put a blank line between instruction and
   problem. No system prompt (the template's default, if any, applies).
   `think_prefix(tokenizer, prompt_ids)` says whether the template left a <think> block
   open in the prompt (thinking-model templates); graders must see that tag.

DAPO-Math-17k ships its problems inside a verl prompt ("Solve the following math
problem step by step. The last line of your response should be of the form Answer:
$Answer ... \\n\\n<problem>\\n\\nRemember to put your answer on its own line after
\"Answer:\"."); we strip that wrapper so training sees the same prompt as
evaluation. Public copies also come with the wrapper already stripped (counted as
`unwrapped`) or with another wording ("... of the form Answer: \\boxed{$Answer} where
...", answer in a `label` column, e.g. zhuzilin/dapo-math-17k as used by slime); both
wordings are stripped (`DAPO_PREFIXES`, `DAPO_SUFFIX`). A problem that still carries
an answer-format instruction after unwrapping (`ANSWER_FORMAT`: "last line of your
response", "$Answer", "put your final answer within \\boxed{}", ...) would reach the
model with two conflicting instructions: the loader counts such problems
(`instructed`) and prints a warning with an example, for every dataset.

Run: python data.py aime24 --show 2        (prints the report and two rows)
     python -m pytest -q tests/test_data.py
"""

import argparse
import glob
import json
import os
import re
from dataclasses import dataclass

# ----------------------------------------------------------------------------
# the prompt

INSTRUCTION = "Solve the following math problem. Place the final answer in \\boxed{}."


def user_text(problem):
    """The user message for one problem: the paper's instruction, a blank line, the problem."""
    return f"{INSTRUCTION}\n\n{problem.strip()}"


def format_prompt(tokenizer, problem, *, enable_thinking=None):
    """Token ids (list[int]) of the chat-formatted prompt, ending with the assistant header.

    enable_thinking: passed to the chat template only when not None (Qwen3 templates read
    it; False appends an empty think block to the generation prompt).
    """
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    # transformers 5.x: tokenize=True returns a BatchEncoding unless return_dict=False
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text(problem)}],
        add_generation_prompt=True, tokenize=True, return_dict=False, **kw,
    )  # fmt: skip
    if hasattr(ids, "keys"):  # a tokenizer that ignores return_dict
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def think_prefix(tokenizer, prompt_ids):
    """"<think>" if the prompt leaves a think block open (templates of thinking models that
    start the assistant turn with <think>), else "".

    The response then holds only "...</think> answer"; graders must see the opening tag,
    or a response truncated inside its thinking would be graded on its thoughts. Grade
    `think_prefix(...) + response`.
    """
    text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    return "<think>" if text.rfind("<think>") > text.rfind("</think>") else ""


def graded_texts(tokenizer, tokens, lengths, finished, prefixes):
    """The text each response is graded on, in training (train.py) and evaluation (eval.py) alike.

    tokens: (N, T) right-padded response ids, lengths (N,), finished (N,) bool (the row emitted a
    stop token), prefixes: N strings, think_prefix() of each row's prompt.
    A finished row's last token is the stop token that ended it (counted in its length, not
    content): dropped. The rest is decoded WITH special tokens, so `</think>` is seen whatever the
    tokenizer calls it, behind the prompt's open `<think>` (else a response cut inside its thoughts
    would be graded on them). Issue 10: training once skipped special tokens and the prefix.
    """
    toks, L, F = tokens.cpu(), [int(x) for x in lengths], [bool(x) for x in finished]  # one device->host copy
    assert len(prefixes) == len(L) == len(F) == toks.shape[0], (len(prefixes), len(L), len(F), tuple(toks.shape))
    return [p + tokenizer.decode(toks[r, : L[r] - int(F[r])].tolist(), skip_special_tokens=False) for r, p in enumerate(prefixes)]


# ----------------------------------------------------------------------------
# errors and field access


class DataError(ValueError):
    """A malformed file or row. The message names the file and the row."""


class _BadRow(Exception):
    """Internal: what is wrong with one row (wrapped into DataError with its location)."""


def _get(row, path):
    """row["a"]["b"] for path "a.b"; list indices as digits ("prompt.0.content")."""
    cur = row
    for key in path.split("."):
        if isinstance(cur, dict):
            if key not in cur:
                raise _BadRow(f"missing field {path!r}")
            cur = cur[key]
        elif isinstance(cur, (list, tuple)) and key.isdigit():
            if int(key) >= len(cur):
                raise _BadRow(f"missing field {path!r} (list too short)")
            cur = cur[int(key)]
        else:
            raise _BadRow(f"field {path!r}: expected an object at {key!r}, got {type(cur).__name__}")
    return cur


def _opt(row, path):
    try:
        return _get(row, path)
    except _BadRow:
        return None


def _text(value, field):
    """A required non-empty string."""
    if not isinstance(value, str):
        raise _BadRow(f"field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"field {field!r} is empty")
    return value.strip()


_ZERO_PADDED = re.compile(r"^([-+]?)0+(?=\d)")


def _answer(value, field):
    """The reference answer as a non-empty string; numbers are accepted (MathArena stores int64;
    a JSON 1.5 is the answer "1.5").

    An integer written with leading zeros ("025", AIME 2024) comes back without them ("25").
    """
    if isinstance(value, bool):  # bool is an int subclass; never an answer
        raise _BadRow(f"field {field!r} must be a string or a number, got bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not value == value or value in (float("inf"), float("-inf")):
            raise _BadRow(f"field {field!r} is {value}, not an answer")
        return str(int(value)) if value.is_integer() else repr(value)
    text = _text(value, field)
    if re.fullmatch(r"[-+]?\d+", text):
        text = _ZERO_PADDED.sub(r"\1", text, count=1)
    return text


def _id(value):
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise _BadRow(f"field 'id' must be a string or an integer, got {type(value).__name__}")


# ----------------------------------------------------------------------------
# the column mappings: row (dict) -> (raw id or None, problem, answer, solution or None)

# The verl prompt DAPO-Math-17k ships (the official parquet), and the other wording
# public copies use (zhuzilin/dapo-math-17k, slime's example data: answer in `label`).
DAPO_PREFIXES = (
    "Solve the following math problem step by step. The last line of your response should "
    "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n",
    "Solve the following math problem step by step. The last line of your response should "
    "be of the form Answer: \\boxed{$Answer} where $Answer is the answer to the problem.\n\n",
)
DAPO_PREFIX = DAPO_PREFIXES[0]
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

# An answer-format instruction left inside a problem: it would contradict ours.
ANSWER_FORMAT = re.compile(
    r"last line of your response|\$Answer\b|on its own line after|"
    r"\b(?:put|place|output|write|enclose)\s+(?:\w+\s+){0,3}answers?\b[^.\n]{0,30}\\boxed|\\boxed\{\s*\}",
    re.IGNORECASE,
)  # fmt: skip


def unwrap_dapo(content):
    """(problem, was_wrapped): strip DAPO's verl instruction wrapper (either wording) from a prompt.

    The prefix and the suffix are stripped independently: a copy that kept only one of
    them is unwrapped too.
    """
    problem, wrapped = content, False
    for prefix in DAPO_PREFIXES:
        if problem.startswith(prefix):
            problem, wrapped = problem[len(prefix):], True
            break
    if problem.endswith(DAPO_SUFFIX):
        problem, wrapped = problem[: -len(DAPO_SUFFIX)], True
    return problem.strip(), wrapped


def _first(row, fields):
    """(field, value) of the first of `fields` the row has (dotted paths allowed), else (None, None)."""
    for f in fields:
        try:
            return f, _get(row, f)
        except _BadRow:
            continue
    return None, None


def _boxed_answer(solution, field):
    """The last \\boxed{...} of a worked solution: the answer of layouts that have no answer column."""
    import grading  # the grader's own extractor: the same braces rule as for model responses

    box = grading.extract_answer(_text(solution, field))
    if box is None:
        raise _BadRow(f"field {field!r} has no \\boxed{{}} answer")
    return box


def _map_generic(row):
    """Our schema, and the usual variants of its column names; DAPO's layout if the row has `prompt`."""
    pf, problem = _first(row, ("problem", "question"))
    if pf is None and "prompt" in row:
        return _map_dapo(row)
    if pf is None:
        raise _BadRow("missing field 'problem' (or 'question', or DAPO's 'prompt')")
    af, answer = _first(row, ("answer", "label", "ground_truth"))
    sol = row.get("solution")
    if af is None and sol is not None:
        answer = _boxed_answer(sol, "solution")
    elif af is None:
        raise _BadRow("missing field 'answer' (or 'label', 'ground_truth', or a 'solution' with a \\boxed{} answer)")
    else:
        answer = _answer(answer, af)
    _, raw_id = _first(row, ("id", "problem_idx", "unique_id", "idx"))
    return _id(raw_id), _text(problem, pf), answer, sol


def _map_dapo(row):
    """DAPO-Math-17k: the official verl layout, the `label` copies, and stripped copies.

    problem: the last user message of `prompt` (a chat list), or `prompt` as a string, or
        `problem` (copies that stored the unwrapped problem);
    answer: reward_model.ground_truth, else `label`, else `answer`;
    id: extra_info.index, else `id`.
    """
    prompt = row.get("prompt")
    if prompt is None:
        pf, problem = _first(row, ("problem", "question"))
        if pf is None:
            raise _BadRow("missing field 'prompt' (or 'problem')")
        problem = _text(problem, pf)
    elif isinstance(prompt, str):
        problem = _text(prompt, "prompt")
    elif isinstance(prompt, (list, tuple)) and prompt:
        user = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not user:
            raise _BadRow("field 'prompt' has no user message")
        problem = _text(user[-1].get("content"), "prompt[user].content")
    else:
        raise _BadRow(f"field 'prompt' must be a non-empty list of chat messages or a string, got {type(prompt).__name__}")
    af, answer = _first(row, ("reward_model.ground_truth", "label", "answer"))
    if af is None:
        raise _BadRow("missing the answer: none of 'reward_model.ground_truth', 'label', 'answer'")
    _, raw_id = _first(row, ("extra_info.index", "id"))
    return _id(raw_id), problem, _answer(answer, af), None


def _map_h4_aime(row):  # HuggingFaceH4/aime_2024: id, problem, solution, answer, url, year
    return _id(_opt(row, "id")), _text(_get(row, "problem"), "problem"), _answer(_get(row, "answer"), "answer"), row.get("solution")


def _map_matharena(row):  # MathArena/*: problem_idx, problem, answer (str or int64), [problem_type]
    return _id(_opt(row, "problem_idx")), _text(_get(row, "problem"), "problem"), _answer(_get(row, "answer"), "answer"), None


def _map_minerva(row):
    """math-ai/minervamath: question, answer. knoveleng/Minerva-Math and Qwen2.5-Math's
    evaluation/data/minerva_math: problem, solution, type, idx, with the answer only as
    the solution's last \\boxed{} (the same 272 answers)."""
    if "question" in row:
        return _id(row.get("idx")), _text(row["question"], "question"), _answer(_get(row, "answer"), "answer"), None
    if "problem" in row and "solution" in row:
        return _id(row.get("idx")), _text(row["problem"], "problem"), _boxed_answer(row["solution"], "solution"), row["solution"]
    raise _BadRow("missing field 'answer': expected question/answer (math-ai/minervamath) "
                  "or problem/solution (knoveleng/Minerva-Math)")  # fmt: skip


def _map_math500(row):  # HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id
    return _id(_opt(row, "unique_id")), _text(_get(row, "problem"), "problem"), _answer(_get(row, "answer"), "answer"), row.get("solution")


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def _map_gsm8k(row):  # openai/gsm8k: question, answer = "<worked solution>\n#### <number>"
    full = _text(_get(row, "answer"), "answer")
    if "####" not in full:
        raise _BadRow("field 'answer' has no '####' final-answer marker")
    solution, final = full.rsplit("####", 1)
    final = _THOUSANDS.sub("", final.strip())  # "1,000" -> "1000"
    return None, _text(_get(row, "question"), "question"), _answer(final, "answer after ####"), solution.strip()


@dataclass(frozen=True)
class Source:
    name: str
    hub_id: str
    split: str
    files: tuple  # glob patterns of the split's files inside the dataset repo
    map_row: object  # row dict -> (raw id, problem, answer, solution)
    k: int  # evaluation samples per problem (paper protocol where the paper says)
    checked: str  # what was verified against the hub, what is assumed


SOURCES = {
    s.name: s
    for s in [
        Source("dapo", "BytedTsinghua-SIA/DAPO-Math-17k", "train", ("data/dapo-math-17k.parquet",), _map_dapo, 0,
               "verified: file path, prompt as a chat list, reward_model.ground_truth, extra_info.index, "
               "the verl wrapper text (public loaders strip the same strings); 1,791,700 rows = 17,917 x 100, "
               "17,188 distinct problems, 12 with conflicting answers (math-vault's dump of revision 6587709)"),
        Source("aime24", "HuggingFaceH4/aime_2024", "train", ("data/train-*.parquet",), _map_h4_aime, 32,
               "verified: dataset card features id(int64) problem solution answer(string) url year, split train, 30 rows"),
        Source("aime25", "MathArena/aime_2025", "train", ("data/train-*.parquet",), _map_matharena, 32,
               "verified on the row-for-row dump of hub revision c94da77 (github.com/Geraldxm/math-vault): "
               "data/train-00000-of-00001.parquet, problem_idx, problem, answer (int64), problem_type; 30 rows"),
        Source("aime26", "MathArena/aime_2026", "train", ("data/train-*.parquet",), _map_matharena, 32,
               "verified: dataset card features problem_idx(int64) answer(int64) problem, split train, 30 rows"),
        Source("hmmt25", "MathArena/hmmt_feb_2025", "train", ("data/train-*.parquet",), _map_matharena, 32,
               "verified on the dump of hub revision 6fdc427 (math-vault): data/train-00000-of-00001.parquet, "
               "problem_idx, problem, answer (string), problem_type; 30 rows"),
        Source("minerva", "math-ai/minervamath", "test", ("test*", "data/test*"), _map_minerva, 4,
               "verified: dataset card features question, answer; split test (272 rows) from files 'test*' "
               "(root or data/; jsonl or parquet, both are read). Also reads the knoveleng/Minerva-Math and "
               "Qwen2.5-Math layout (problem, solution, type, idx; verified on their files: the same 272 rows)"),
        Source("math500", "HuggingFaceH4/MATH-500", "test", ("test.jsonl",), _map_math500, 4,
               "verified: test.jsonl with problem solution answer subject level unique_id, 500 rows"),
        Source("gsm8k", "openai/gsm8k", "test", ("main/test-*.parquet",), _map_gsm8k, 1,
               "verified: main/test-00000-of-00001.parquet, columns question, answer ('... #### n')"),
    ]
}
GENERIC_K = 4  # [D] samples per problem for a local file in our schema


# ----------------------------------------------------------------------------
# file readers: each yields (location string, row dict) without holding the whole file
# in memory as Python objects when it can (the DAPO parquet has 1.79M rows)


def _plain(x):
    """numpy / pandas values -> plain Python (pandas turns list columns into arrays)."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _decode(raw, path, lineno=None):
    """bytes -> str, or a DataError naming the file, line and byte that are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno if lineno is not None else raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None


def _read_jsonl(path):
    with open(path, "rb") as f:  # bytes: a bad byte is reported with its line, not as a bare UnicodeDecodeError
        row = 0
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            loc = f"{path}: row {row} (line {lineno})"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{loc}: not valid JSON ({e.msg})") from None
            yield loc, obj
            row += 1
    if row == 0:
        raise DataError(f"{path}: no rows (the file is empty or blank)")


def _read_json(path):
    with open(path, "rb") as f:
        text = _decode(f.read(), path)
    if not text.strip():
        raise DataError(f"{path}: no rows (the file is empty or blank)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(obj, dict):  # {"<split or 'data'>": [rows]} with exactly one list inside
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of objects (or an object holding exactly one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of objects, got {type(obj).__name__}")
    if not obj:
        raise DataError(f"{path}: no rows (an empty list)")
    for i, row in enumerate(obj):
        yield f"{path}: row {i}", row


def _read_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        i = 0
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow's errors (ArrowInvalid) name no file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        for batch in pf.iter_batches(batch_size=8192):  # streamed, batch by batch
            for row in batch.to_pylist():
                yield f"{path}: row {i}", row
                i += 1
        if i == 0:
            raise DataError(f"{path}: no rows")
        return
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow or pandas (optional extras): pip install pyarrow"
        ) from None
    df = pd.read_parquet(path)
    if len(df) == 0:
        raise DataError(f"{path}: no rows")
    for i, row in enumerate(df.to_dict("records")):
        yield f"{path}: row {i}", _plain(row)


def read_rows(path):
    """(location, row dict) for each row of a .jsonl / .json / .parquet file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return _read_jsonl(path)
    if ext == ".json":
        return _read_json(path)
    if ext == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type {ext!r} (use .jsonl, .json or .parquet)")


# ----------------------------------------------------------------------------
# finding the files of a spec


_DATA_EXTS = (".jsonl", ".json", ".parquet")


def _split_files(root, source):
    """The split's data files under a snapshot folder.

    A vendored copy may keep its data under another split's name (knoveleng/Minerva-Math:
    data/train-*.parquet for minerva's test split); the error then lists the data files
    found, so the user can pass the file itself.
    """
    files = sorted({f for pat in source.files for f in glob.glob(os.path.join(root, pat))
                    if f.endswith(_DATA_EXTS)})  # fmt: skip
    if not files:
        found = sorted(os.path.relpath(f, root) for f in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                       if f.endswith(_DATA_EXTS))  # fmt: skip
        hint = f"; data files there: {', '.join(found[:5])}{' ...' if len(found) > 5 else ''} (pass one as " \
               f"'{source.name}=FILE')" if found else ""  # fmt: skip
        raise FileNotFoundError(f"{root}: no files matching {list(source.files)} for {source.name} ({source.hub_id}){hint}")
    return files


def hub_files(source, *, revision=None, cache_dir=None):
    """Download (or find in the cache) the split's files of a registered dataset."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("loading from the hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        root = snapshot_download(repo_id=source.hub_id, repo_type="dataset", allow_patterns=list(source.files),
                                 revision=revision, cache_dir=cache_dir)  # fmt: skip
    except Exception as e:
        raise RuntimeError(
            f"could not fetch {source.hub_id} ({source.name}) from the Hugging Face hub: {type(e).__name__}: {e}\n"
            f"Offline? Download its files {list(source.files)} elsewhere and pass "
            f"'{source.name}=PATH', or set HF_HUB_OFFLINE=1 to use a warm cache."
        ) from None
    return _split_files(root, source)


def resolve(spec):
    """spec -> (name, source or None, files or None). files None means 'download from the hub'.

    "aime24" | "HuggingFaceH4/aime_2024" -> registered, from the hub
    "aime24=PATH"                        -> registered layout, local file or snapshot folder
    "PATH"                               -> our schema, named after the file
    """
    by_hub = {s.hub_id: s for s in SOURCES.values()}
    if spec in SOURCES or spec in by_hub:
        src = SOURCES.get(spec) or by_hub[spec]
        return src.name, src, None
    if "=" in spec and not os.path.exists(spec):
        name, path = spec.split("=", 1)
        if name not in SOURCES:
            raise ValueError(f"unknown dataset layout {name!r} in {spec!r}; known: {', '.join(SOURCES)}")
        src = SOURCES[name]
        files = _split_files(path, src) if os.path.isdir(path) else [path]
        return name, src, files
    if os.path.exists(spec) or spec.endswith((".jsonl", ".json", ".parquet")):
        name = os.path.splitext(os.path.basename(spec.rstrip("/")))[0]
        return name, None, [spec]
    raise ValueError(
        f"unknown dataset {spec!r}: use one of {', '.join(SOURCES)}, NAME=PATH for a local copy "
        f"in that dataset's layout, or a .jsonl/.json/.parquet path with problem/answer fields"
    )


# ----------------------------------------------------------------------------
# loading


def _norm(text):
    return " ".join(text.split())


def load_problems(spec, *, limit=None, on_error="raise", dedup=True, verbose=True, revision=None, cache_dir=None):
    """Load one dataset. Returns (problems, report).

    problems: [{"id": str, "problem": str, "answer": str, "solution": str (when known)}]
    report: {"name", "files", "rows", "kept", "duplicates", "conflicts", "conflict_examples",
             "skipped", "skip_reasons" (first 5), "unwrapped", "instructed",
             "instructed_examples", "k"}; printed (describe, warnings) if verbose.
        duplicates: rows dropped as repeats of an earlier problem (same text after
            whitespace normalisation);
        conflicts: problems dropped (every copy) because their copies carry different
            answers; conflict_examples: the first 3, {"id", "problem", "answers"};
        unwrapped: DAPO problems (distinct, kept) that had no DAPO wrapper to strip;
        instructed: kept problems still holding an answer-format instruction
            (`ANSWER_FORMAT`) after unwrapping; instructed_examples: the first 3, {"id", "text"
            (the instruction with some context)}.
    on_error: "raise" (default) a DataError naming file and row, or "skip" and count.
    limit: keep only the first `limit` problems (after dedup and conflicts: the whole file
        is read, so a conflict further down still drops its problem).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    name, src, files = resolve(spec)
    if files is None:
        files = hub_files(src, revision=revision, cache_dir=cache_dir)
    map_row = src.map_row if src is not None else _map_generic
    is_dapo = src is not None and src.name == "dapo"
    report = dict(name=name, files=files, rows=0, kept=0, duplicates=0, conflicts=0, conflict_examples=[],
                  skipped=0, skip_reasons=[], unwrapped=0, instructed=0, instructed_examples=[],
                  k=src.k if src is not None else GENERIC_K)  # fmt: skip
    problems, wrapped_flags, ids = [], [], set()
    first, answers = {}, {}  # normalised problem -> its index in problems; -> its distinct answers (whitespace-normalised), in order seen
    for path in files:
        for loc, row in read_rows(path):
            report["rows"] += 1
            try:
                if not isinstance(row, dict):
                    raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
                raw_id, problem, answer, solution = map_row(row)
                problem, wrapped = unwrap_dapo(problem)  # DAPO's wording only: a no-op elsewhere
                if not problem:
                    raise _BadRow("the problem is empty once the DAPO wrapper is removed")
                if solution is not None and not isinstance(solution, str):
                    raise _BadRow(f"field 'solution' must be a string, got {type(solution).__name__}")
            except _BadRow as e:
                if on_error == "raise":
                    raise DataError(f"{loc}: {e}") from None
                report["skipped"] += 1
                if len(report["skip_reasons"]) < 5:
                    report["skip_reasons"].append(f"{loc}: {e}")
                continue
            key = _norm(problem)
            if dedup and key in first:
                report["duplicates"] += 1
                if _norm(answer) not in answers[key]:
                    answers[key].append(_norm(answer))
                continue
            first[key], answers[key] = len(problems), [_norm(answer)]
            pid = raw_id if raw_id is not None else str(report["rows"] - 1)
            if pid in ids:  # a repeated id on a different problem: keep both, make the id unique
                pid = f"{pid}#{report['rows'] - 1}"
            ids.add(pid)
            rec = {"id": pid, "problem": problem, "answer": answer}
            if solution:
                rec["solution"] = solution.strip()
            problems.append(rec)
            wrapped_flags.append(wrapped)
    # a problem with two answers has at most one right one, and nothing says which:
    # drop it whole (DAPO: 12 problems; 4 of them keep a "-1" placeholder first)
    conflicted = [key for key, a in answers.items() if len(a) > 1]
    if conflicted:
        drop = {first[key] for key in conflicted}
        report["conflicts"] = len(conflicted)
        report["conflict_examples"] = [
            {"id": problems[first[key]]["id"], "problem": problems[first[key]]["problem"], "answers": answers[key]}
            for key in conflicted[:3]
        ]
        keep = [i for i in range(len(problems)) if i not in drop]
        problems, wrapped_flags = [problems[i] for i in keep], [wrapped_flags[i] for i in keep]
    if limit is not None:
        problems, wrapped_flags = problems[:limit], wrapped_flags[:limit]
    if is_dapo:
        report["unwrapped"] = sum(not w for w in wrapped_flags)
    for p in problems:
        m = ANSWER_FORMAT.search(p["problem"])
        if m:
            report["instructed"] += 1
            if len(report["instructed_examples"]) < 3:  # the instruction with some context before it
                report["instructed_examples"].append({"id": p["id"], "text": p["problem"][max(0, m.start() - 60): m.end() + 60]})
    report["kept"] = len(problems)
    if verbose:
        print(describe(report))
        for line in warnings(report):
            print(line)
    return problems, report


def describe(report):
    """One line: what was read, kept, dropped."""
    s = (f"[data] {report['name']}: {report['rows']} rows -> {report['kept']} problems "
         f"({report['duplicates']} duplicates dropped")  # fmt: skip
    if report["conflicts"]:
        s += f", {report['conflicts']} problems with conflicting answers dropped"
    s += f", {report['skipped']} malformed rows skipped"
    if report["unwrapped"]:
        s += f", {report['unwrapped']} problems without the DAPO wrapper"
    return s + ")"


def _snippet(text, n=100):
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def warnings(report):
    """Lines to print loudly: the dropped conflicts, problems that keep an answer-format instruction."""
    out = []
    for c in report["conflict_examples"]:
        out.append(f"  conflict: id {c['id']} has answers {' vs '.join(map(repr, c['answers']))}: {_snippet(c['problem'])!r}")
    if report["conflicts"] > len(report["conflict_examples"]):
        out.append(f"  ... and {report['conflicts'] - len(report['conflict_examples'])} more conflicting problems")
    if report["instructed"]:
        ex = report["instructed_examples"][0]
        out.append(
            f"[data] WARNING {report['name']}: {report['instructed']} problems still carry an answer-format "
            f"instruction after unwrapping (the prompt adds ours: two conflicting instructions), "
            f"e.g. id {ex['id']}: {'...' + _snippet(ex['text'], 200)!r}"
        )
    return out


def main(args):
    problems, report = load_problems(args.spec, limit=args.limit, on_error=args.on_error)
    for reason in report["skip_reasons"]:
        print("  skipped:", reason)
    for p in problems[: args.show]:
        print(json.dumps(p, ensure_ascii=False)[:400])
        print("  prompt:", repr(user_text(p["problem"])[:200]))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="load a dataset and print its report")
    p.add_argument("spec", help=f"a registered name ({', '.join(SOURCES)}), NAME=PATH, or a .jsonl/.json/.parquet path")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N problems (default: all)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="malformed rows: stop with an error, or skip and count")
    p.add_argument("--show", type=int, default=3, help="print the first N problems")
    main(p.parse_args())
