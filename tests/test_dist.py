"""dist.py under torchrun on CPU (gloo, 2 processes): tensor parallel and FSDP2 on the tiny lab.

  - TP: `torchrun --nproc-per-node 2 train.py --tp 2` samples the same tokens as one process
    (same seed), so its per-step loss and gradient norm must match a single-process run; rank 0
    writes one metrics file and one HF checkpoint that plain transformers loads.
  - FSDP: each rank samples its own prompts (its own stream), so a step is not the single
    process's step; it must train, save an HF checkpoint + sharded optimizer, and resume exactly.
  - tests/dist_check.py: the update itself (loss over all ranks' tokens, gradients, clipping,
    AdamW, sampling, checkpoint round trips) against one process on the same batch, both modes.
Every run uses `torchrun --standalone` (a free port) with OMP_NUM_THREADS=1, tiny budgets, and a
shared working directory so the lab's warm start is computed once.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
FAST = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "24", "--warm-steps", "3", "--eval-limit", "4",
        "--eval-k", "1", "--micro-batch", "3", "--warmup-steps", "1", "--eval-every", "0", "--gate", "none"]  # fmt: skip
# --gate none: lambda = 0.5 from step 1, so the token term gives step 1 a non-zero gradient even
# though the 3-step warm start solves nothing yet (all rewards 0, A_seq = 0)


# Hides `accelerate` from the workers (transformers then reports it unavailable), so the TP load
# is tested the way CI runs it (requirements.txt has no accelerate), whatever this machine has.
NO_ACCELERATE = '''import importlib.machinery
_find = importlib.machinery.PathFinder.find_spec.__func__
def _hide(cls, name, path=None, target=None):
    return None if name.split(".")[0] == "accelerate" else _find(cls, name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(_hide)
'''


def torchrun(cwd, *argv, timeout=150):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, argv)]
    site = os.path.join(cwd, "no_accelerate")
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(NO_ACCELERATE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([site, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\n--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-6000:]}"
    return p


def steps(run_dir):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "loss" in r]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


def loads_and_generates(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Which pair sums to 5? A: 1 4, B: 2 2"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert not any(k.startswith(("_orig_mod", "_fsdp")) for k in model.state_dict())
    return model


def test_tensor_parallel_matches_one_process(work, monkeypatch):
    p = torchrun(work, TRAIN, "--tp", "2", "--steps", "2", "--out", "tp", *FAST)
    assert "tensor parallel 2" in p.stdout and "memory plan" in p.stdout
    monkeypatch.chdir(work)  # the same warm-start cache
    train.main(train.get_parser().parse_args([*FAST, "--steps", "2", "--out", str(work / "single")]))
    tp, one = steps(work / "tp"), steps(work / "single")
    assert [r["step"] for r in tp] == [1, 2]  # rank 0 alone writes metrics
    for a, b in zip(tp, one):
        assert a["reward_mean"] == b["reward_mean"] and a["resp_len_mean"] == b["resp_len_mean"]  # the same tokens
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] > 0 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    ckpt = work / "tp" / "checkpoint-2"
    model = loads_and_generates(ckpt)  # one ordinary HF checkpoint, gathered from the shards
    assert model.get_output_embeddings().weight.shape[0] == model.config.vocab_size
    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["optimizer"] is None  # sharded instead:
    assert sorted(f for f in os.listdir(ckpt / "optimizer") if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (work / "tp" / ".tp-init").exists()  # the scratch copy for loading the preset with TP is gone


def test_fsdp_trains_saves_and_resumes_exactly(work):
    p = torchrun(work, TRAIN, "--fsdp", "--steps", "3", "--save-every", "2", "--out", "fa", *FAST)
    assert "FSDP over 2 ranks, B 1 each" in p.stdout
    full = steps(work / "fa")
    assert [r["step"] for r in full] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() and r["grad_norm"] > 0 for r in full)
    assert all(r["resp_len_mean"] > 0 for r in full)  # whole-step metrics (both ranks' rows)
    loads_and_generates(work / "fa" / "checkpoint-3")
    assert sorted(f for f in os.listdir(work / "fa" / "checkpoint-3" / "optimizer") if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # resume from the step-2 checkpoint: step 3 must be the uninterrupted run's step 3
    os.makedirs(work / "fb")
    shutil.copytree(work / "fa" / "checkpoint-2", work / "fb" / "checkpoint-2")
    torchrun(work, TRAIN, "--fsdp", "--steps", "3", "--resume", "--out", "fb", *FAST)
    resumed = steps(work / "fb")
    assert [r["step"] for r in resumed] == [3]
    for k in ("loss", "grad_norm", "reward_mean", "resp_len_mean", "u_mean"):
        assert resumed[0][k] == pytest.approx(full[2][k], abs=1e-6), k


def test_parallel_update_matches_one_process_on_the_same_batch(work):
    torchrun(work, os.path.join(ROOT, "tests", "dist_check.py"), work / "check.json")
    res = json.load(open(work / "check.json"))
    for mode in ("tp", "fsdp"):
        r = res[mode]
        assert r["loss"] == pytest.approx(r["ref_loss"], abs=1e-6), mode
        assert r["grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=1e-5), mode
        assert r["grad_diff"] < 1e-5 and r["weight_diff"] < 1e-5, (mode, r)
        assert r["same_tokens"] and r["optim_roundtrip_diff"] == 0.0 and r["ckpt_diff"] == 0.0, (mode, r)
    assert all(x["tp"] and x["fsdp"] for x in res["same_tokens_all_ranks"])
    assert [x["tp"] for x in res["from_main_all_ranks"]] == [0, 0] and [x["fsdp"] for x in res["from_main_all_ranks"]] == [0, 1]  # TP: rank 0's grades everywhere
    assert res["accelerate_available"] is False  # the TP load above ran without accelerate
    # bf16 (the GPU case): the optimizer's fp32 sums over the micro-batches equal one process's within
    # bf16 rounding (measured 3%); under TP, taking q_norm / k_norm's grads before transformers' TP hook
    # sums them gave 80% (5.17, silently) or a crash (5.24)
    for mode in ("tp", "fsdp"):
        b = res[f"{mode}_bf16"]
        assert b["grads_fp32"] and b["max_rel_grad_err"] < 0.1, (mode, b)


@pytest.mark.parametrize("argv,msg", [(["--tp", "2"], "torchrun"), (["--fsdp"], "torchrun"), (["--tp", "2", "--fsdp"], "exclude")])
def test_parallel_flags_need_torchrun(tmp_path, monkeypatch, argv, msg):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit) as e:
        train.main(train.get_parser().parse_args(["--out", str(tmp_path / "x"), "--steps", "1", *argv]))
    assert msg in str(e.value)


def test_device_index_sets_the_current_cuda_device(monkeypatch):
    """Issue 10 item 12: --device cuda:1 in one process never called set_device (peak-memory stats read cuda:0)."""
    import dist as dist_lib

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    assert dist_lib.setup(device="cuda:1").device == torch.device("cuda:1") and calls == [torch.device("cuda:1")]
    calls.clear()
    dist_lib.setup(device="cpu")
    assert calls == []


class _HalfOfTwo:
    """A data-parallel rank of 2 whose partner holds the same counts (sum doubles): enough to see the
    sharding and the recombination of train.evaluate without processes."""

    def __init__(self, rank):
        self.mode, self.rank, self.dp_rank, self.dp_size, self.world = "fsdp", rank, rank, 2, 2

    def sum(self, x):
        return type(x)(2 * x)


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_evaluation_splits_the_problems_over_ranks(monkeypatch, rank):
    """Issue 10 item 14: every FSDP rank ran the whole benchmark; now each runs every 2nd problem."""
    import eval as eval_lib
    import lab
    import model as model_lib

    seen = []

    def lab_eval(model, tok, held_out, **k):
        seen.append([p["id"] for p in held_out])
        return {"eval_acc": 0.5, "frac_search": 0.25, "acc_search": 1.0, "acc_direct": 1 / 3}

    def run_benchmarks(model, tok, benches, **k):
        seen.append({n: [p["id"] for p in b["problems"]] for n, b in benches.items()})
        return {"benches": {n: {"avg": 40.0, "n": len(b["problems"]), "k": b["k"]} for n, b in benches.items()}, "Avg": 40.0}  # as evaluate's

    monkeypatch.setattr(lab, "evaluate", lab_eval)
    monkeypatch.setattr(eval_lib, "run_benchmarks", run_benchmarks)
    m, tok = model_lib.load("tiny")
    args = train.resolve_args(train.get_parser().parse_args(["--out", "x", "--eval-k", "2"]))
    task = type("T", (), {"lab": True, "held_out": [{"id": i} for i in range(5)], "template_kw": {}})()
    r = train.evaluate(args, task, m, tok, 0, D=_HalfOfTwo(rank))
    assert seen[-1] == [i for i in range(5) if i % 2 == rank]
    assert r == pytest.approx({"eval_acc": 0.5, "frac_search": 0.25, "acc_search": 1.0, "acc_direct": 1 / 3})
    task.lab = False
    benches = {"a": {"problems": [{"id": i} for i in range(3)], "k": 2}, "b": {"problems": [{"id": 8}, {"id": 9}], "k": 4}}
    r = train.evaluate(args, task, m, tok, 0, benches, D=_HalfOfTwo(rank))
    assert seen[-1] == ({"a": [0, 2], "b": [8]} if rank == 0 else {"a": [1], "b": [9]})
    assert r == pytest.approx({"eval_acc": 0.4, "eval_a": 40.0, "eval_b": 40.0})
