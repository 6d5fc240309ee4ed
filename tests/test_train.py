"""train.py end to end on the tiny lab: smoke run, every method and gate mode, exact resume,
checkpoint loading with plain transformers, non-finite updates skipped, bad flags rejected.

Runs use a tiny budget (2 prompts x 4 samples, 24 new tokens, a 3-step warm start) in a
temporary working directory, so the warm-start cache never lands in the repo.
"""

import json
import math
import os

import pytest
import torch

import train

FAST = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "24", "--warm-steps", "3",
        "--eval-limit", "4", "--eval-k", "1", "--micro-batch", "3", "--warmup-steps", "1"]  # fmt: skip


def run(tmp_path, *extra, out="run"):
    args = train.get_parser().parse_args([*FAST, "--out", str(tmp_path / out), *extra])
    summary = train.main(args)
    recs = [json.loads(line) for line in open(tmp_path / out / "metrics.jsonl")]
    return summary, [r for r in recs if "loss" in r], [r for r in recs if "eval_acc" in r]


@pytest.fixture(scope="session")
def _lab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(autouse=True)
def _cwd(_lab_dir, monkeypatch):
    # .cache/lab (the warm-start cache) is shared by this file's tests and never touches the
    # repo; the first test pays for the 3-step warm start, the rest load it
    monkeypatch.chdir(_lab_dir)


def test_smoke_default_loop_writes_metrics_checkpoint_and_samples(tmp_path):
    summary, steps, evals = run(tmp_path, "--steps", "2", "--sample-every", "1")
    assert [r["step"] for r in steps] == [1, 2]
    need = {"loss", "reward_mean", "step_time", "frac_zero_var", "resp_len_mean", "truncated_frac", "policy_entropy",
            "teacher_entropy_median", "teacher_entropy_mean", "gate_open", "lam", "u_mean", "u_frac_neg", "u_p1",
            "u_p99", "phi_mean", "grad_norm", "tokens_per_s", "t_sample", "t_score", "t_update", "peak_mem_gb"}  # fmt: skip
    assert need <= set(steps[0]), need - set(steps[0])
    assert [e["step"] for e in evals] == [0, 2] and set(summary) == {"eval_before", "eval_after"}
    assert all(0.0 <= e["eval_acc"] <= 1.0 for e in evals)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file() and (ckpt / "args.json").is_file()
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "run").iterdir())  # atomic: no temp dirs left
    dumps = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert len(dumps) == 2 and len(dumps[0]["tokens"]) == len(dumps[0]["u"]) > 0
    assert json.load(open(tmp_path / "run" / "args.json"))["method"] == "antisd"


@pytest.mark.parametrize(
    "extra",
    [["--method", "grpo"], ["--method", "grpo", "--log-teacher"], ["--method", "sd"], ["--method", "revkl"],
     ["--method", "mult"], ["--gate", "none"], ["--gate", "mean"], ["--no-teacher"], ["--tau", "0.9"]],
)  # fmt: skip
def test_every_method_and_gate_mode_runs_a_step(tmp_path, extra):
    _, steps, _ = run(tmp_path, "--steps", "2", "--eval-every", "0", *extra)
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    r = steps[-1]
    if extra[:2] == ["--method", "grpo"]:
        assert r["lam"] == 0.0
        assert (r["teacher_entropy_median"] is None) == ("--log-teacher" not in extra)
    elif "--gate" in extra and "none" in extra or extra == ["--method", "sd"]:
        assert r["lam"] == 0.5 and r["gate_open"]  # always open: no warmup
    else:
        assert steps[0]["lam"] == 0.0  # warmup step (--warmup-steps 1)
        assert steps[0]["gate_open"] is False  # the state the step used (issue 10: the step ending the warm-up said open)


def test_resume_continues_exactly(tmp_path):
    # uninterrupted 6 steps vs 4 steps + resume to 6: steps 5-6 must match
    _, full, _ = run(tmp_path, "--steps", "6", "--eval-every", "0", "--save-every", "100", out="full")
    run(tmp_path, "--steps", "4", "--eval-every", "0", "--save-every", "100", out="cut")
    _, resumed, _ = run(tmp_path, "--steps", "6", "--eval-every", "0", "--save-every", "100", "--resume", out="cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full[4:], resumed[4:]):
        assert a["step"] == b["step"]
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["reward_mean"] - b["reward_mean"]) < 1e-4
        assert a["lam"] == b["lam"] and a["gate_open"] == b["gate_open"]


def test_checkpoint_loads_with_plain_transformers_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run(tmp_path, "--steps", "1", "--eval-every", "0")
    path = tmp_path / "run" / "checkpoint-1"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Which pair sums to 5? A: 1 4, B: 2 2"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


def test_init_from_starts_a_new_run_and_rewarms_the_gate(tmp_path):
    run(tmp_path, "--steps", "2", "--eval-every", "0", "--method", "grpo", out="base")
    _, steps, _ = run(tmp_path, "--steps", "1", "--eval-every", "0", "--init-from", str(tmp_path / "base" / "checkpoint-2"), out="cont")
    assert steps[0]["step"] == 1 and steps[0]["lam"] == 0.0  # gate warmup again


def test_non_finite_update_is_skipped(tmp_path, monkeypatch):
    import antisd

    real = antisd.policy_loss
    monkeypatch.setattr(antisd, "policy_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    _, steps, _ = run(tmp_path, "--steps", "1", "--eval-every", "0")
    assert steps[0]["skipped"] is True
    import glob

    from safetensors.torch import load_file

    # the checkpoint holds the warm-started weights unchanged (no NaN reached it)
    sd = load_file(tmp_path / "run" / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())
    (warm,) = glob.glob(os.path.join(".cache", "lab", "warm-*", "model.safetensors"))  # the shared warm start
    ref = load_file(warm)
    assert ref.keys() == sd.keys() and all(torch.equal(ref[k], sd[k]) for k in ref)


@pytest.mark.parametrize(
    "argv,msg",
    [(["--group-size", "1"], "--group-size"), (["--temperature", "0"], "--temperature"), (["--top-p", "0"], "--top-p"),
     (["--resume"], "--resume"), (["--model", "random:nope"], "random:nope")],
)  # fmt: skip
def test_bad_flags_fail_with_a_clear_message(tmp_path, argv, msg):
    args = train.get_parser().parse_args(["--out", str(tmp_path / "bad"), "--steps", "1", *argv])
    with pytest.raises((SystemExit, ValueError)) as e:
        train.main(args)
    assert msg in str(e.value)


def test_real_model_path_on_local_files(tmp_path):
    """The non-lab job: a local HF directory as --model, a local jsonl as --data (graded by
    grading.py), periodic eval through eval.py's benchmarks: the path `--model Qwen/...` takes."""
    import model as model_lib

    m, tok = model_lib.load("tiny")
    model_lib.save(m, tok, str(tmp_path / "hf"))
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    _, steps, evals = run(
        tmp_path, "--model", str(tmp_path / "hf"), "--data", os.path.join(fixtures, "generic.jsonl"),
        "--steps", "2", "--eval-every", "1", "--eval-bench", os.path.join(fixtures, "tiny_eval.jsonl"),
        "--max-new-tokens", "8", "--lr", "1e-5",
    )  # fmt: skip
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["reward_mean"] == 0.0 for r in steps)  # a random model writes no \boxed{} answer
    assert [e["step"] for e in evals] == [0, 1, 2] and all(e["eval_acc"] == 0.0 for e in evals)
    args = json.load(open(tmp_path / "run" / "args.json"))
    assert args["lr"] == 1e-5 and args["micro_batch"] == 3  # flags beat the real-model defaults


@pytest.mark.parametrize("method", ["antisd", "sd", "grpo"])
def test_official_recipe_runs_and_logs_its_quantities(tmp_path, method):
    _, steps, _ = run(tmp_path, "--steps", "3", "--eval-every", "0", "--recipe", "official", "--method", method, "--warmup-steps", "2")
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert all(r["recipe"] == "official" for r in steps)
    keys = ("lam_std", "lam_max", "lam_pos_frac", "u_zeroed_frac", "sigma_ref", "tppl_mean", "tppl_target", "tppl_masked_frac", "len_masked_frac")
    if method == "grpo":
        assert all(r["lam"] == 0.0 and all(r[k] is None for k in keys) for r in steps)
        return
    warm, post = steps[:2], steps[2]
    assert all(r["lam"] == 0.0 and r["lam_max"] == 0.0 and r["tppl_target"] is None and r["sigma_ref"] is None for r in warm)
    assert post["tppl_target"] >= 1.01 and post["sigma_ref"] > 0 and 0 <= post["u_zeroed_frac"] <= 1
    assert 0 <= post["lam"] <= post["lam_max"] <= 0.5 and post["gate_kind"] == "tppl"
    args = json.load(open(tmp_path / "run" / "args.json"))
    assert args["recipe"] == "official" and args["len_mask"] == round(24 * 12000 / 16384)


def test_official_resume_mid_warmup_continues_exactly(tmp_path):
    # warm-up of 3 steps; cut after step 2 (inside it): steps 3-5 (end of warm-up, calibration,
    # the hysteresis) must match an uninterrupted run
    flags = ["--eval-every", "0", "--save-every", "100", "--recipe", "official", "--warmup-steps", "3"]
    _, full, _ = run(tmp_path, "--steps", "5", *flags, out="full")
    run(tmp_path, "--steps", "2", *flags, out="cut")
    _, resumed, _ = run(tmp_path, "--steps", "5", *flags, "--resume", out="cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(full[2:], resumed[2:]):
        for k in ("loss", "reward_mean", "lam", "lam_max", "tppl_mean", "tppl_target", "sigma_ref", "u_zeroed_frac"):
            assert (a[k] is None and b[k] is None) or abs(a[k] - b[k]) < 1e-5, (a["step"], k, a[k], b[k])
        assert a["gate_open"] == b["gate_open"]
    assert full[-1]["tppl_target"] is not None


@pytest.mark.parametrize(
    "argv,msg",
    [(["--recipe", "official", "--method", "revkl"], "--recipe official"), (["--recipe", "official", "--no-teacher"], "--no-teacher"),
     (["--len-mask", "10"], "--len-mask"), (["--recipe", "official", "--len-mask", "-1"], "--len-mask")],
)  # fmt: skip
def test_official_recipe_bad_flags(tmp_path, argv, msg):
    args = train.get_parser().parse_args(["--out", str(tmp_path / "bad"), "--steps", "1", *argv])
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert msg in str(e.value)


def test_official_recipe_on_local_files(tmp_path):
    """--recipe official with a local HF directory and a local jsonl (no lab): the path a real
    model takes (a random model is never correct: every teacher prompt is feedback-only)."""
    import model as model_lib

    m, tok = model_lib.load("tiny")
    model_lib.save(m, tok, str(tmp_path / "hf"))
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    _, steps, _ = run(tmp_path, "--model", str(tmp_path / "hf"), "--data", os.path.join(fixtures, "generic.jsonl"), "--steps", "2",
                      "--eval-every", "0", "--max-new-tokens", "8", "--recipe", "official")  # fmt: skip
    assert [r["step"] for r in steps] == [1, 2] and all(r["recipe"] == "official" for r in steps)
    args = json.load(open(tmp_path / "run" / "args.json"))
    assert args["max_solution_tokens"] == 3072 and args["len_mask"] == round(8 * 12000 / 16384)


def _bench_gpu():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_gpu

    return bench_gpu


def test_peer_choice_draws_on_a_cpu_generator_of_its_own_and_resumes_exactly(tmp_path, monkeypatch):
    """Issue 10 item 1: the teacher-context choice once drew CPU numbers from the sampler's
    generator, which on CUDA raises ("Expected a 'cpu' device type for generator") at the first
    correct rollout. Every random draw with a generator must land on the generator's device; the
    peer choice must come from a CPU generator that is not the sampler's, saved in the checkpoint
    (the resumed step sees the same teacher prompts)."""
    import antisd

    seen = {"teacher": [], "sampler": [], "draws": 0}
    real_tp, real_sample, real_randint = antisd.teacher_prompts, train.sample, torch.randint

    def tp(*a, generator=None, **k):
        seen["teacher"].append(generator)
        return real_tp(*a, generator=generator, **k)

    def sample(*a, generator=None, **k):
        seen["sampler"].append(generator)
        return real_sample(*a, generator=generator, **k)

    def randint(*a, generator=None, **k):
        out = real_randint(*a, generator=generator, **k)
        if generator is not None:
            assert out.device == generator.device, f"a draw on {out.device} from a generator on {generator.device}"
            seen["draws"] += 1
        return out

    monkeypatch.setattr(antisd, "teacher_prompts", tp)
    monkeypatch.setattr(train, "sample", sample)
    monkeypatch.setattr(torch, "randint", randint)
    with _bench_gpu().one_correct_per_group():  # every group has one correct peer: the choice runs
        _, full, _ = run(tmp_path, "--steps", "3", "--eval-every", "0", "--save-every", "100", out="full")
        run(tmp_path, "--steps", "2", "--eval-every", "0", "--save-every", "100", out="cut")
        _, resumed, _ = run(tmp_path, "--steps", "3", "--eval-every", "0", "--save-every", "100", "--resume", out="cut")
    assert seen["draws"] >= 3 * 2 * 3  # per step and group, rows 1-3 choose among their one peer (row 0 gets the reference)
    assert all(g is not None and g.device.type == "cpu" for g in seen["teacher"])
    assert not {id(g) for g in seen["teacher"]} & {id(g) for g in seen["sampler"]}  # never the sampler's stream
    assert all(r["reward_mean"] == 0.25 for r in full)  # 1 of each group of 4 correct
    ts = torch.load(tmp_path / "cut" / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    assert ts["rng"]["teacher_pickers"] is not None
    a, b = full[2], resumed[2]
    assert a["step"] == b["step"] == 3
    assert abs(a["u_mean"] - b["u_mean"]) < 1e-5 and abs(a["loss"] - b["loss"]) < 1e-5  # same teacher prompts after resume


def test_training_and_eval_stop_on_the_same_ids_and_grade_the_same_text(tmp_path, monkeypatch):
    """Issue 10 item 5: training stopped on the tokenizer's EOS alone (Qwen3's generation config
    also lists <|endoftext|>) and graded text decoded without special tokens or the prompt's open
    <think>; eval.py did both. Now one function decides each (model.stop_token_ids,
    data.graded_texts): the same stop ids reach both samplers and both graders see the prefix."""
    import grading
    import model as model_lib
    import rollout

    m, tok = model_lib.load("tiny")
    m.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]  # two end ids, as Qwen3's config
    tok.chat_template = model_lib.CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n' }}", "'<|im_start|>assistant\\n<think>\\n' }}")  # opens a think block
    model_lib.save(m, tok, str(tmp_path / "hf"))
    seen = {"train": [], "eval": [], "train_text": [], "eval_text": []}
    real_sample, real_rsample, real_grade, real_many = train.sample, rollout.sample, train.Task.grade, grading.grade_many

    def spy(key, fn):
        def wrapped(*a, eos_token_ids, **k):
            seen[key].append(sorted(eos_token_ids))
            return fn(*a, eos_token_ids=eos_token_ids, **k)

        return wrapped

    def grade(self, texts, answers):
        seen["train_text"] += texts
        return real_grade(self, texts, answers)

    def grade_many(responses, answers, **k):
        seen["eval_text"] += responses
        return real_many(responses, answers, **k)

    monkeypatch.setattr(train, "sample", spy("train", real_sample))
    monkeypatch.setattr(rollout, "sample", spy("eval", real_rsample))
    monkeypatch.setattr(train.Task, "grade", grade)
    monkeypatch.setattr(grading, "grade_many", grade_many)
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    run(tmp_path, "--model", str(tmp_path / "hf"), "--data", os.path.join(fixtures, "generic.jsonl"), "--steps", "1", "--eval-every", "1",
        "--eval-bench", os.path.join(fixtures, "tiny_eval.jsonl"), "--max-new-tokens", "8", "--enable-thinking", "true")  # fmt: skip
    want = sorted({tok.eos_token_id, tok.pad_token_id})
    assert seen["train"] and seen["eval"] and all(e == want for e in seen["train"] + seen["eval"])
    assert seen["train_text"] and seen["eval_text"]
    assert all(t.startswith("<think>") for t in seen["train_text"] + seen["eval_text"])  # the prompt's open think block


def test_real_models_default_to_the_papers_non_thinking_mode():
    """Issue 10 item 6: the paper (and the authors' launcher) ran Qwen3 non-thinking; the lab keeps its template's default."""
    resolve = lambda *a: train.resolve_args(train.get_parser().parse_args(["--out", "x", *a]))  # noqa: E731
    assert resolve("--model", "Qwen/Qwen3-8B").enable_thinking == "false"
    assert resolve("--model", "Qwen/Qwen3-8B", "--enable-thinking", "true").enable_thinking == "true"
    assert resolve().enable_thinking is None  # the lab


def test_resume_loads_the_checkpoint_on_the_host_and_keeps_nothing_of_it(tmp_path, monkeypatch):
    """Issue 10 item 8: --resume put the checkpoint's AdamW states on the GPU beside the live ones
    (torch.load without map_location) and kept them referenced. The load must be on the CPU
    (mmap'd), the resumed optimizer state must live in the optimizer's own tensors on the
    parameters' device, and no tensor of the loaded checkpoint may survive the resume."""
    import gc
    import weakref

    import memory

    run(tmp_path, "--steps", "1", "--eval-every", "0")
    loaded, opts, checked = [], [], []
    real_load, real_lsd, real_plan = torch.load, memory.AdamW.load_state_dict, memory.plan

    def load(path, *a, **k):
        obj = real_load(path, *a, **k)
        if str(path).endswith("trainer_state.pt"):
            assert k.get("map_location") == "cpu" and k.get("mmap") is True, k
            stack = [obj]
            while stack:  # every tensor of the checkpoint, weakly
                x = stack.pop()
                if isinstance(x, torch.Tensor):
                    assert x.device.type == "cpu"
                    loaded.append(weakref.ref(x))
                elif isinstance(x, dict):
                    stack += list(x.values())
                elif isinstance(x, (list, tuple)):
                    stack += list(x)
        return obj

    def load_state_dict(self, sd):
        opts.append(self)
        return real_lsd(self, sd)

    def plan(*a, **k):  # runs right after the resume block
        gc.collect()
        checked.append(sum(r() is not None for r in loaded))
        opt = opts[0]
        for name, s in opt.state.items():
            p = opt.params[name]
            assert all(t.device == p.device for t in s.values())
        return real_plan(*a, **k)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(memory.AdamW, "load_state_dict", load_state_dict)
    monkeypatch.setattr(memory, "plan", plan)
    _, steps, _ = run(tmp_path, "--steps", "2", "--eval-every", "0", "--resume")
    assert len(loaded) > 10 and opts and checked == [0], (len(loaded), checked)  # every loaded tensor freed
    assert steps[-1]["step"] == 2


def test_quantile_is_torch_quantile_without_its_size_limit():
    """Issue 10 item 11: torch.quantile raises above 2^24 elements (64 x 8 x 32K valid tokens)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 100, 1001):
        x = torch.randn(n, generator=g)
        for q in (0.0, 0.01, 0.25, 0.5, 0.99, 1.0):
            assert train.quantile(x, q) == pytest.approx(float(torch.quantile(x, q)), abs=1e-6), (n, q)
    big = torch.rand(2**24 + 1, generator=g)
    with pytest.raises(RuntimeError):
        torch.quantile(big, 0.5)
    assert train.quantile(big, 0.5) == pytest.approx(0.5, abs=1e-3) and train.quantile(big, 0.0) == float(big.min())
    assert math.isnan(train.quantile(torch.zeros(0), 0.5))


def test_a_bf16_lab_run_stays_bf16_through_the_warm_start_cache_and_resumes(tmp_path):
    """Found preparing the GPU checks (issue 10): a cached warm start was loaded in model.load's
    default dtype for a directory (fp32 on CPU, bf16 on CUDA), not the run's, so the lab's dtype
    changed between runs and a resume met an optimizer state saved for the other dtype."""
    from safetensors.torch import load_file

    run(tmp_path, "--steps", "1", "--eval-every", "0", "--dtype", "bfloat16", out="a")  # trains (or loads) the bf16 warm start
    run(tmp_path, "--steps", "1", "--eval-every", "0", "--dtype", "bfloat16", out="b")  # the cache hit
    for out in ("a", "b"):
        sd = load_file(tmp_path / out / "checkpoint-1" / "model.safetensors")
        assert {v.dtype for v in sd.values()} == {torch.bfloat16}, out
    _, steps, _ = run(tmp_path, "--steps", "2", "--eval-every", "0", "--dtype", "bfloat16", "--resume", out="b")
    assert steps[-1]["step"] == 2


def test_all_wrong_watch_counts_all_wrong_steps_with_the_token_term_on():
    rec = lambda step, aw, tok: {"step": step, "frac_all_wrong": aw, "tok_term_abs_mean": tok, "u_mean": -3.0, "truncated_frac": 1.0}  # noqa: E731
    streak, out = 0, []
    for step, (aw, tok) in enumerate([(1.0, 0.1), (1.0, 0.1), (0.875, 0.1), (1.0, 0.1), (1.0, 0.0), (1.0, 0.2), (1.0, 0.2), (1.0, 0.2), (1.0, 0.2)], 1):
        streak, w = train.all_wrong_watch(streak, rec(step, aw, tok), steps=3)
        out.append((streak, w is not None))
    # a mixed group or a token term of 0 (GRPO, a shut gate) resets the streak; it warns once, at 3
    assert out == [(1, False), (2, False), (0, False), (1, False), (0, False), (1, False), (2, False), (3, True), (4, False)]
    assert "all-wrong for 3 steps" in train.all_wrong_watch(2, rec(7, 1.0, 0.2), steps=3)[1]


def test_all_wrong_run_warns_once_the_streak_is_reached(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.Task, "grade", lambda self, texts, answers: [0.0] * len(texts))  # every rollout wrong
    monkeypatch.setattr(train, "ALL_WRONG_STEPS", 2)
    _, steps, _ = run(tmp_path, "--steps", "3", "--eval-every", "0", "--gate", "none")  # gate none: the token term is on from step 1
    assert all(r["frac_all_wrong"] == 1.0 and r["seq_adv_abs_mean"] == 0.0 and r["tok_term_abs_mean"] > 0 for r in steps)
    assert capsys.readouterr().out.count("all-wrong for 2 steps") == 1
