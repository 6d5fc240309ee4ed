"""train.py: GRPO + AntiSD, one linear loop from arguments to update.

    python train.py                                        # the CPU lab, end to end (~5 min on 2 cores, 1 thread)
    python train.py --model Qwen/Qwen3-4B-Instruct-2507    # the paper's setting on a GPU
    python train.py --method grpo --out runs/grpo          # the baseline (see --help for all variants)

One step (SPEC section 1; every line below is a banner in the loop):

  1) rollouts   B prompts x G samples from the current policy (T=1, top-p 1)
  2) rewards    R in {0,1}: graded final answer, 0 for truncated responses
  3) A_seq      GRPO z-score within each group (antisd.group_advantages)
  4) context    teacher prompt per rollout: a correct OTHER rollout of the group (else the
                reference) + "Your answer is (in)correct." (antisd.teacher_prompts)
  5) scores     the teacher: t_t = log pi(y_t|x,c,y_<t) of the SAME response tokens under
                no_grad and its entropy H_t, each distinct teacher prompt computed once
                (scores_in_chunks -> model.shared_prefix_logprobs)
  6) gate       H = median teacher entropy of the step; lam = 0.5 * g (gate.EntropyGate)
  7) A_{i,t}    A_seq - lam * phi(u) (or the variant's formula; antisd.token_advantages),
                a function of whole rows that 8) applies to each micro-batch
  8) update     per micro-batch: the student forward (with grad) gives s_t, u = t - s, A_{i,t};
                clipped policy gradient, token-mean over the WHOLE step (micro-batches share
                one token count), AdamW, grad-norm clip 1.0, KL 0 (accumulate_grads)
  9) log/save   metrics.jsonl, console line, sample dumps, atomic checkpoints

--recipe official runs the authors' launcher instead of the paper's text (README "Which
AntiSD?"): 4) group-only peers cut at the final answer, 6) a per-response lambda from the
teacher's perplexity (gate.PerplexityGate), 7) the token term on a clipped u, z-scored within
each response (antisd.official_token_advantages).

Strictly on-policy (one optimizer update per rollout batch): old_logp = s_t = the update
forward's own detached log-probs, so the PPO ratio is exactly 1 and the clip never binds, and
the student runs once per step (the clipped form is kept so forks can add more epochs; they
then need a student scoring pass before the first update: see accumulate_grads). So a GRPO
step is rollouts + one forward/backward; AntiSD adds only the teacher pass, and GRPO runs
that only when --log-teacher asks for the teacher's entropy and u (the lab study plots them).

The lab (--model tiny, the default) adds a cached supervised warm start and held-out
evaluation; see lab.py for how the lab maps onto the paper's setting. Other models train on
--data (a data.py spec: "dapo", a hub id or a local .jsonl/.parquet) graded by grading.py.

Checkpoints: OUT/checkpoint-<step>/ holds the model in HF format (loadable with
AutoModelForCausalLM.from_pretrained) and trainer_state.pt (optimizer, RNG states, data
cursor, gate), written to a temp dir then renamed. --resume continues exactly, with the run's
own flags (RESUME_FLAGS may change), from the newest complete checkpoint. The run directory's
rules (one live run, no fresh run into another run's files, log lines cut back on resume, a
corrupt checkpoint skipped, disk full reported) are in runs.py. Ctrl-C, SIGTERM and the file
OUT/STOP finish the step, save and exit non-zero (130 / 143 / 75); a finished run exits 0.

Real sizes (memory.py, dist.py): at startup the memory plan is printed (weights, grads, AdamW
states, activations per micro-batch, KV cache); on a GPU it picks the micro-batch token budget
and the sampler's KV pool (rollout.py: paged, continuously batched; on one GPU AdamW's state
waits in CPU memory while sampling). Several GPUs, under torchrun:
    torchrun --nproc-per-node N train.py --model ... --tp N     # tensor parallel, one model over N GPUs
    torchrun --nproc-per-node N train.py --model ... --fsdp     # FSDP2, each rank its own B/N prompts
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import runs

# ---------------------------------------------------------------------------------------
# Arguments. `None` defaults are resolved per setting (lab vs real model) in resolve_args.
# The parser needs no torch: `--help` and a mistyped flag answer before the heavy imports
# below (torch + transformers take ~6 s). The choices of --method / --recipe / --optim-states
# are antisd.METHODS / antisd.RECIPES / memory.AdamW.STATES, spelled out here (tests/test_faults.py
# checks them).
# ---------------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="tiny", help='"tiny" (the CPU lab), a hub id, a local HF directory, or "random:<hub id>"')
    g.add_argument("--data", default=None, help='training problems: a data.py spec ("dapo", hub id, local .jsonl/.parquet with problem/answer); default: the lab task for tiny, "dapo" otherwise')
    g.add_argument("--enable-thinking", default=None, choices=["true", "false"], help="passed to the chat template (Qwen3 thinking models); default false: the paper ran Qwen3-8B / 30B-A3B non-thinking, as the authors' launcher does (enable_thinking: false); the lab: its template's own default (no thinking mode)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype; default fp32 on CPU, bf16 on GPU")
    g.add_argument("--device", default=None, help="cpu / cuda / cuda:1; default cuda if available")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads; default $OMP_NUM_THREADS if set, else 1 for the lab (on 2 cores a second thread is 1.3-1.4x faster when the machine is idle and 2-12x slower when anything else runs: LOG.md), torch's own default otherwise")
    g.add_argument("--init-from", default=None, help="start a NEW run from this checkpoint dir (weights only; fresh optimizer, gate re-warmed): continual AntiSD from a GRPO checkpoint")
    g = p.add_argument_group("method (SPEC section 2)")
    g.add_argument("--method", default="antisd", choices=["grpo", "sd", "antisd", "revkl", "mult"], help="per-token term added to A_seq: grpo none, sd +lam*u, antisd -lam*phi(u), revkl -lam*u, mult A_seq*(1-lam*phi(u))")
    g.add_argument("--recipe", default="paper", choices=["paper", "official"], help="paper: the paper's text (this list of flags); official: the authors' launcher (README 'Which AntiSD?'): clipped u, token term z-scored per response, per-response lambda from the teacher's perplexity (gate.PerplexityGate, --warmup-steps), group-only peers; --lam/--gate/--tau do not apply; methods grpo/sd/antisd")
    g.add_argument("--len-mask", type=int, default=None, help="official recipe: responses of >= this many tokens get no token term (LEN_MASK; 0 = off); default 12000/16384 of --max-new-tokens (12000 at the authors' 16384)")
    g.add_argument("--lam", type=float, default=0.5, help="lambda while the gate is open")
    g.add_argument("--gate", default=None, choices=["median", "mean", "none"], help="gate statistic; none = always open (no-gate ablation); default none for sd, median otherwise")
    g.add_argument("--tau", type=float, default=0.93, help="gate ratio: close when H < tau * H_warm")
    g.add_argument("--warmup-steps", type=int, default=5, help="gate warmup steps (lam = 0) that calibrate H_warm")
    g.add_argument("--no-teacher", action="store_true", help="no-teacher ablation: u = -log pi(y_t|x,y_<t) (teacher log-prob := 0)")
    g.add_argument("--max-solution-tokens", type=int, default=None, help="token budget of the peer solution in the teacher prompt (keeps its end); default 1024 (lab 128)")
    g.add_argument("--log-teacher", action="store_true", help="run the teacher pass for grpo too, to log teacher entropy and u (costs one no-grad forward)")
    g = p.add_argument_group("rollouts")
    g.add_argument("--prompts-per-step", type=int, default=None, help="B, prompts per step; default 32 (lab 16)")
    g.add_argument("--group-size", type=int, default=8, help="G, completions per prompt")
    g.add_argument("--max-prompt-tokens", type=int, default=2048, help="training problems whose chat prompt is longer (tokens) are skipped and counted at startup (not for the lab)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="response length cap in tokens; truncated responses get reward 0; default 8192 (lab 96); the paper used up to 32768")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (also used in every log-prob)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; the loss assumes the full distribution, keep 1.0 for training")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (= rollout batches); default 200 (lab 60)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate; default 1e-6 (lab 1e-4)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--clip-low", type=float, default=0.2, help="PPO clip: ratio >= 1 - clip_low")
    g.add_argument("--clip-high", type=float, default=0.2, help="PPO clip: ratio <= 1 + clip_high")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--micro-batch", type=int, default=None, help="rollouts per forward/backward; the loss is identical for any split; default 4 (lab 64)")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--out", default=None, help="run directory; default runs/<method>-<model>-s<seed>")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest complete checkpoint, with the run's own flags; only the RESUME_FLAGS (--steps, eval / logging / checkpoint intervals, memory knobs) may be given anew")
    g.add_argument("--overwrite", action="store_true", help="start a fresh run in an --out that holds an earlier run, deleting that run's files (without it such an --out is refused)")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling, data order and teacher-context choice")
    g.add_argument("--eval-every", type=int, default=None, help="held-out evaluation interval in steps (0 = only before and after); default 10 for the lab, 0 otherwise")
    g.add_argument("--eval-bench", default=None, help="comma-separated eval.py benchmarks for periodic eval of real models (e.g. aime24,aime25)")
    g.add_argument("--eval-k", type=int, default=None, help="samples per eval problem; default 4 (lab), each benchmark's own k otherwise")
    g.add_argument("--eval-limit", type=int, default=None, help="problems per eval benchmark (lab: held-out size, default 200)")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint interval in steps (0 = only at the end); a checkpoint is also saved at the end and when stopped (Ctrl-C, SIGTERM, the file OUT/STOP)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (older ones of this run are deleted; 0 = keep all)")
    g.add_argument("--sample-every", type=int, default=10, help="dump one rollout with per-token u every N steps (0 = never)")
    g.add_argument("--warm-steps", type=int, default=None, help="lab only: supervised warm-start steps (cached in .cache/; default lab.py's 600; 0 = none, RL from the random model)")
    g.add_argument("--lab-level", type=float, default=0.0, help="lab only: difficulty L in [0, 1), a weaker warm start (lab.level_config): 0 = the default lab; higher = sparser step-0 reward (more all-wrong groups)")
    g = p.add_argument_group("memory and several GPUs (memory.py, dist.py)")
    g.add_argument("--grad-ckpt", default="auto", choices=["auto", "on", "off"], help="recompute each decoder layer in backward (activation memory of one layer instead of all); auto: on for real models, off for the lab")
    g.add_argument("--optim-states", default="fp32", choices=["fp32", "param"], help="AdamW state of bf16 models: fp32 = fp32 master weights + moments (16 B/param in all; lr-1e-6 updates survive), param = moments in bf16, no master (8 B/param; bf16 rounds most such updates away); the same for fp32 models")
    g.add_argument("--micro-batch-tokens", type=int, default=None, help="padded tokens (rows x longest prompt+response) per training micro-batch, on top of --micro-batch rows; default: the memory plan's budget on CUDA, no limit on CPU")
    g.add_argument("--sample-rows", type=int, default=None, help="most rows decoding at once in the sampler (continuous batching: waiting prompts join as rows finish); default: all of them")
    g.add_argument("--kv-tokens", type=int, default=None, help="the sampler's paged KV pool, tokens; default: the memory plan's KV budget on CUDA, every row at full length on CPU")
    g.add_argument("--sampler-attention", default="auto", choices=["auto", "gather", "mirror", "flex"],
                   help="how the sampler's decode attention reads the paged KV cache (rollout.sample's attention=): auto = flex (in place) on CUDA, mirror on CPU")
    g.add_argument("--no-decode-graphs", action="store_true", help="run the sampler's decode step eagerly instead of as CUDA graphs per batch-size bucket (the CUDA default)")
    g.add_argument("--keep-optim-on-gpu", action="store_true", help="keep AdamW's fp32 master weights and moments on the GPU while sampling (default on one GPU: moved to pinned CPU memory, freeing ~45 GiB for the KV cache at 4B)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: run under torchrun --nproc-per-node N (transformers' TP plan; every rank samples the same tokens)")
    g.add_argument("--fsdp", action="store_true", help="FSDP2 over all torchrun processes: layers, grads and AdamW states sharded; each rank samples its own prompts-per-step / world prompts")
    return p


# Flags that --resume accepts anew: how long, how often to evaluate / log / save, and memory or
# speed knobs that leave the run's math alone. Every other flag is the run's own (its
# checkpoint's args.json) and a different value is refused; out / resume / overwrite are this
# invocation's.
RESUME_FLAGS = ("steps", "eval_every", "eval_bench", "eval_k", "save_every", "keep_last", "sample_every",
                "micro_batch", "micro_batch_tokens", "sample_rows", "kv_tokens", "keep_optim_on_gpu", "grad_ckpt", "threads", "device",
                "sampler_attention", "no_decode_graphs")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line -> args, plus args.given: the flags typed on it (main pops it). --resume
    keeps the run's own value of every flag not typed; argparse alone cannot tell a typed default
    from an omitted flag, so the line is parsed a second time with every default suppressed."""
    p = get_parser()
    args = p.parse_args(argv)
    for a in p._actions:
        a.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))
    return args


def typed_flags(args: argparse.Namespace) -> set[str]:
    """The flags the user gave: parse_args' record (popped from args), else (a Namespace from
    get_parser().parse_args) every flag whose value is not its default."""
    if "given" in vars(args):
        return set(vars(args).pop("given"))
    p = get_parser()
    return {k for k, v in vars(args).items() if v != p.get_default(k)}


if __name__ == "__main__":
    ARGS = parse_args()  # --help and argparse errors exit here, in a fraction of a second

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import antisd  # noqa: E402
import data as data_lib  # noqa: E402
import dist as dist_lib  # noqa: E402
import gate as gate_lib  # noqa: E402
import memory  # noqa: E402
import model as model_lib  # noqa: E402
from rollout import sample  # noqa: E402


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-setting defaults and reject bad flags with a message naming the flag."""
    lab = args.model == "tiny"
    real = dict(prompts_per_step=32, max_new_tokens=8192, steps=200, lr=1e-6, micro_batch=4, eval_every=0, max_solution_tokens=1024)
    small = dict(prompts_per_step=16, max_new_tokens=96, steps=60, lr=1e-4, micro_batch=64, eval_every=10, max_solution_tokens=128)
    if args.recipe == "official":  # the launcher's budget (max_solution_tokens 3072); the lab keeps its own
        real["max_solution_tokens"] = antisd.OFFICIAL_MAX_SOLUTION_TOKENS
    for k, v in (small if lab else real).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.len_mask is None:
        args.len_mask = round(antisd.LEN_MASK_FRACTION * args.max_new_tokens) if args.recipe == "official" else 0
    if args.gate is None:
        args.gate = "none" if args.method == "sd" else "median"
    if args.enable_thinking is None and not lab:
        args.enable_thinking = "false"  # the paper's setting (issue 10); the templates' own default turns Qwen3's thinking on
    if args.grad_ckpt == "auto":
        args.grad_ckpt = "off" if lab else "on"
    if args.data is None:
        args.data = "lab" if lab else "dapo"
    if args.out is None:
        tag = args.method + ("-official" if args.recipe == "official" else "")
        args.out = os.path.join("runs", f"{tag}-{args.model.replace('/', '_').replace(':', '_')}-s{args.seed}")
    if args.threads is None and lab and "OMP_NUM_THREADS" not in os.environ:
        args.threads = 1  # see --threads: one thread never collapses when the machine is shared
    on_cpu = (args.device or model_lib._default_device().type).startswith("cpu")
    checks = [
        (args.prompts_per_step >= 1, "--prompts-per-step must be >= 1"),
        (args.group_size >= 2, "--group-size must be >= 2 (GRPO needs a group)"),
        (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (args.temperature > 0, "--temperature must be > 0 for training (log-probs need a distribution)"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.steps >= 1, "--steps must be >= 1"),
        (args.lr > 0, "--lr must be > 0"),
        (args.micro_batch >= 1, "--micro-batch must be >= 1"),
        (0 <= args.tau <= 1, "--tau must be in [0, 1]"),
        (args.lam >= 0, "--lam must be >= 0"),
        (args.warmup_steps >= 1, "--warmup-steps must be >= 1"),
        (args.recipe == "paper" or args.method in antisd.OFFICIAL_METHODS, f"--recipe official has methods {'/'.join(antisd.OFFICIAL_METHODS)}, not --method {args.method}"),
        (args.recipe == "paper" or not args.no_teacher, "--recipe official has no --no-teacher ablation"),
        (args.recipe == "official" or args.len_mask == 0, "--len-mask is an option of --recipe official"),
        (args.len_mask >= 0, "--len-mask must be >= 0"),
        (not (args.resume and args.init_from), "--resume and --init-from exclude each other"),
        (not (args.resume and args.overwrite), "--resume and --overwrite exclude each other"),
        (args.clip_low >= 0 and args.clip_high >= 0, "--clip-low and --clip-high must be >= 0"),
        (args.clip_low < 1, "--clip-low must be < 1 (the ratio's lower bound 1 - clip_low must stay positive)"),
        (args.grad_clip > 0, "--grad-clip must be > 0 (a negative max norm flips the gradient: ascent; 'inf' turns clipping off)"),
        (args.weight_decay >= 0, "--weight-decay must be >= 0"),
        (args.max_solution_tokens >= 1, "--max-solution-tokens must be >= 1"),
        (args.max_prompt_tokens >= 1, "--max-prompt-tokens must be >= 1"),
        (args.save_every >= 0, "--save-every must be >= 0 (0 = only at the end)"),
        (args.keep_last >= 0, "--keep-last must be >= 0 (0 = keep all)"),
        (args.sample_every >= 0, "--sample-every must be >= 0 (0 = never)"),
        (args.eval_every >= 0, "--eval-every must be >= 0 (0 = only before and after)"),
        (args.eval_k is None or args.eval_k >= 1, "--eval-k must be >= 1"),
        (args.eval_limit is None or args.eval_limit >= 1, "--eval-limit must be >= 1"),
        (args.warm_steps is None or args.warm_steps >= 0, "--warm-steps must be >= 0 (0 = no warm start)"),
        (args.threads is None or args.threads >= 1, "--threads must be >= 1"),
        (not (args.dtype == "float16" and on_cpu), "--dtype float16 on CPU: CPUs have no fast fp16 kernels (the lab's warm start takes ~10x longer) and training has no loss scaling; use float32 on CPU, bfloat16 on a GPU"),
        (args.data != "lab" or lab, "--data lab needs --model tiny"),
        (0 <= args.lab_level < 1 and (args.lab_level == 0 or args.data == "lab"), "--lab-level must be in [0, 1) and needs the lab (--model tiny)"),
        (args.tp >= 1, "--tp must be >= 1"),
        (args.micro_batch_tokens is None or args.micro_batch_tokens >= 1, "--micro-batch-tokens must be >= 1"),
        (args.sample_rows is None or args.sample_rows >= args.group_size, "--sample-rows must be >= --group-size (a prompt's samples start together)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"train.py: {msg}")
    for flag, name in (("--model", args.model), ("--init-from", args.init_from)):
        try:  # a missing local path is said now, not as a hub error after the imports
            if name:
                model_lib.check_local(name)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"train.py: {flag}: {e}") from None
    return args


# ---------------------------------------------------------------------------------------
# Small helpers the loop calls. Each is here because the loop reads better without it.
# ---------------------------------------------------------------------------------------


class Task:
    """What the loop needs to know about a problem set: prompts, references and grading."""

    def __init__(self, args, tokenizer, problems: list[dict] | None = None):
        """problems: the training set of a non-lab run, already loaded (load_problems; main loads it
        before the model, so a bad file is named in seconds, not after a model load)."""
        self.lab = args.data == "lab"
        kw = {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking == "true"}
        self.template_kw = kw
        if self.lab:
            import lab

            self.train, self.held_out = lab.datasets(n_eval=args.eval_limit or 200)
            self.user_text, self.reference, self._grade = lab.user_text, lab.reference, lab.grade
        else:
            import data
            import grading

            self.train = problems if problems is not None else load_problems(args)
            self.held_out = None
            self.user_text = lambda p: data.user_text(p["problem"])
            # SPEC: the verified solution falls back to the dataset reference; answer-only
            # datasets (DAPO) give "\boxed{answer}".
            self.reference = lambda p: p.get("solution") or f"\\boxed{{{p['answer']}}}"
            self._grading = grading
        self.tokenizer = tokenizer
        if not self.lab:
            self.train = self.fitting(self.train, args.max_prompt_tokens)
        if not self.train:
            raise SystemExit(f"train.py: --data {args.data}: no training problems")

    def fitting(self, problems: list[dict], limit: int) -> list[dict]:
        """The problems whose prompt has at most `limit` tokens; the others are counted and
        dropped here, before a 20 MB line costs a tokenizer minute or a 20 GB KV cache."""
        keep, too_long = [], []
        # a token holds at least one byte, so most prompts are known to fit without tokenizing
        # them; > 64 characters per token would be a strange text: too long, not tokenized
        frame = len(self.prompt_ids({**problems[0], "problem": "x"})) + 16 if problems else 0  # template + instruction (+ slack)
        for p in problems:
            nbytes = len(p["problem"].encode())
            if frame + nbytes <= limit:
                keep.append(p)
                continue
            n = len(p["problem"]) if len(p["problem"]) > 64 * limit else len(self.prompt_ids(p))
            (too_long if n > limit else keep).append(p)
        if too_long:
            print(f"[train] skipped {len(too_long)} of {len(problems)} problems whose prompt exceeds --max-prompt-tokens {limit} (e.g. id {too_long[0]['id']})")
        return keep

    def prompt_ids(self, problem: dict) -> list[int]:
        msgs = [{"role": "user", "content": self.user_text(problem)}]
        return list(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False, **self.template_kw))

    def answer_match(self, content: str, answer: str) -> bool:
        """Does a \\boxed{content} answer `answer`? (the official recipe's cut at the final answer)"""
        if self.lab:
            return self._grade(f"\\boxed{{{content}}}", answer) > 0.5
        return self._grading.grade(f"\\boxed{{{content}}}", answer) > 0.5

    def grade(self, texts: list[str], answers: list[str]) -> list[float]:
        if self.lab:
            return [self._grade(t, a) for t, a in zip(texts, answers)]
        return self._grading.grade_many(texts, answers)


def load_problems(args) -> list[dict]:
    """--data's problems (data.load_problems), or exit naming the file and row."""
    import data

    try:
        problems, _ = data.load_problems(args.data)
    except (data.DataError, OSError, ValueError) as e:  # the message names the file and row
        raise SystemExit(f"train.py: --data {args.data}: {e}") from None
    if not problems:
        raise SystemExit(f"train.py: --data {args.data}: no training problems")
    return problems


def next_problems(task: Task, state: dict, B: int) -> list[dict]:
    """B problems from a seeded permutation of the training set; state['cursor'] is saved in checkpoints."""
    out = []
    while len(out) < B:
        epoch, pos = divmod(state["cursor"], len(task.train))
        order = list(range(len(task.train)))
        random.Random(state["data_seed"] + epoch).shuffle(order)  # same order on resume
        take = min(B - len(out), len(task.train) - pos)
        out += [task.train[i] for i in order[pos : pos + take]]
        state["cursor"] += take
    return out


def scores_in_chunks(model, prompts, responses, lengths, *, rows, temperature, with_entropy=True):
    """No-grad scores of the response tokens behind `prompts`, chunk by chunk (model.shared_prefix_logprobs).

    The step's one scoring pass (section 5): the teacher's (prompts = teacher prompts), or the
    student's for the no-teacher ablation (its entropy is the gate's statistic). Also the
    extension point for a fork that reuses a rollout batch (see accumulate_grads): old_logp =
    scores_in_chunks(model, student_prompts, ..., with_entropy=False)[0] before the first update.

    Rows with the same prompt are put in the same chunk (whole groups of identical prompts, up
    to `rows` rows; a bigger group is split), so each distinct prompt is computed once per
    step; groups are ordered by prompt length, so a chunk's prompts are of similar length
    (inside a chunk, shared_prefix_logprobs buckets prompts and responses by length). A row's
    scores do not depend on its chunk (tested).
    Returns logp (N, T), entropy (N, T) or None, and the work: prompt tokens computed
    ("prompt_tokens") vs the per-row total ("prompt_tokens_rows").
    """
    N, T = responses.shape
    lens = lengths.tolist()
    groups: dict[tuple, list[int]] = {}  # identical prompts -> their rows
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    chunks, cur = [], []
    for g in sorted(groups.values(), key=lambda g: (len(prompts[g[0]]), g[0])):
        g = sorted(g, key=lambda j: (lens[j], j))
        if cur and len(cur) + len(g) > rows:  # keep a group whole: start the next chunk
            chunks.append(cur)
            cur = []
        while len(g) > rows:  # a group bigger than a chunk: split it
            chunks.append(g[:rows])
            g = g[rows:]
        cur += g
    chunks.append(cur)
    logp = torch.zeros(N, T, device=responses.device)  # (N, T)
    ent = torch.zeros(N, T, device=responses.device) if with_entropy else None  # (N, T)
    work = {"prompt_tokens": 0, "prompt_tokens_rows": 0}
    for ids in chunks:
        idx = torch.tensor(ids, device=responses.device)  # (n,) rows of this chunk
        Tm = int(lengths[idx].max())  # trim the chunk to its longest response
        lp, e, w = model_lib.shared_prefix_logprobs(model, [prompts[i] for i in ids], responses[idx, :Tm], lengths[idx], temperature=temperature, with_entropy=with_entropy)
        logp[idx, :Tm] = lp
        if with_entropy:
            ent[idx, :Tm] = e
        work = {k: work[k] + w[k] for k in work}
    return logp, ent, work


def accumulate_grads(model, D, batches, student_prompts, responses, lengths, teacher_logp, token_adv, *, temperature, clip_low, clip_high, num_tokens, old_logp=None, opt=None):
    """Section 8: the step's forward/backward passes, one per micro-batch of whole rows; the
    gradients accumulate in .grad (the caller clips and steps).

    batches: the micro-batches, each a LongTensor of row indices (or a slice of rows).
    Per micro-batch (rows `idx`, padded to its longest response Tm):
        logp  = log pi(y_t | x, y_<t)            (n, Tm) the student forward, with grad
        s     = logp.detach()                    s_t = old_logp (strictly on-policy)
        u     = t - s                            antisd.pmi_from_logprobs (None without a teacher pass)
        A     = token_adv(idx, u, mask)          section 7's function of whole rows
        loss  = antisd.policy_loss(logp, s, A, mask, num_tokens)   token-mean over the WHOLE step
    One optimizer update per rollout batch (what train.py does) makes old_logp the update
    forward's own detached logp: the PPO ratio is exactly 1, so there is no separate student
    scoring pass (GRPO has no scoring pass at all, AntiSD only the teacher's).
    EXTENSION POINT for a fork that reuses a batch (PPO epochs, several mini-batches per
    rollout batch): old_logp must then be fixed before the first update, e.g.
    old_logp, _, _ = scores_in_chunks(model, student_prompts, responses, lengths, ..., with_entropy=False),
    and passed here at every update; s (hence u) is then that old_logp, the sampling policy's.
    teacher_logp: (N, T) t_t from section 5 (zeros for the no-teacher ablation), or None.
    opt: the memory.AdamW (tensor parallel: it takes the replicated parameters' gradients after each
    backward, see dist.hold_replicated_grads); None elsewhere is the same.
    Returns (the loss summed over micro-batches, s (N, T), u (N, T) or None).
    """
    N, T = responses.shape
    s_all = torch.zeros(N, T, device=responses.device)  # (N, T)
    u_all = None if teacher_logp is None else torch.zeros(N, T, device=responses.device)  # (N, T)
    loss_sum = 0.0
    for idx in batches:
        if isinstance(idx, slice):
            idx = torch.arange(N, device=responses.device)[idx]
        idx = idx.to(responses.device)  # (n,) rows
        Tm = int(lengths[idx].max())
        lens = lengths[idx]  # (n,)
        m = antisd.mask_from_lengths(lens, Tm)  # (n, Tm)
        prompts = [student_prompts[i] for i in idx.tolist()]
        logp, _ = model_lib.response_logprobs(model, prompts, responses[idx, :Tm], lens, temperature=temperature)  # (n, Tm)
        s = logp.detach() if old_logp is None else old_logp[idx, :Tm]  # (n, Tm)
        u = None if teacher_logp is None else antisd.pmi_from_logprobs(teacher_logp[idx, :Tm], s, m)  # (n, Tm)
        adv = token_adv(idx, u, m)  # (n, Tm)
        loss = antisd.policy_loss(logp, s, adv, m, clip_low=clip_low, clip_high=clip_high, num_tokens=num_tokens)
        dist_lib.backward(loss, model, D, opt)  # = loss.backward() (TP: see dist.backward)
        loss_sum += loss.item()
        s_all[idx, :Tm] = s
        if u is not None:
            u_all[idx, :Tm] = u
    return loss_sum, s_all, u_all


def quantile(x: torch.Tensor, q: float) -> float:
    """torch.quantile(x, q) (linear interpolation between the order statistics) without its 2^24-element
    limit (issue 10: 64 x 8 x 32K valid tokens is more): at most two kthvalue calls. nan when empty."""
    x = x.detach().flatten().float()  # (M,)
    n = x.numel()
    if n == 0:
        return float("nan")
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    a = float(x.kthvalue(lo + 1).values)
    frac = pos - lo
    return a if frac == 0 else a + frac * (float(x.kthvalue(min(lo + 2, n)).values) - a)


ALL_WRONG_STEPS = 10  # consecutive all-wrong steps with the token term on before all_wrong_watch warns


def all_wrong_watch(streak: int, rec: dict, steps: int = ALL_WRONG_STEPS) -> tuple[int, str | None]:
    """The collapse the lab sparsity study found (README "The lab study, part 2", item 5): every
    group all-wrong, so A_seq = 0 and the token term is the only signal, for `steps` steps in a
    row. Returns (the new streak, a warning the step it reaches `steps`, else None). A streak
    counts steps with frac_all_wrong == 1 and a nonzero token term; anything else resets it."""
    on = rec.get("frac_all_wrong") == 1.0 and (rec.get("tok_term_abs_mean") or 0.0) > 0.0
    streak = streak + 1 if on else 0
    if streak != steps:
        return streak, None
    return streak, (f"step {rec['step']}: WARNING every group has been all-wrong for {steps} steps with the token term on: A_seq is 0, "
                    f"so -lambda*phi(u) is the only signal (u_mean {rec.get('u_mean')}, truncated {rec.get('truncated_frac')}); "
                    "in the lab this is how the paper recipe collapses (README, lab study part 2)")  # fmt: skip


def save_checkpoint(args, model, tokenizer, opt, gate, state, step, gen, D, pick=None) -> str:
    """Write OUT/checkpoint-<step> atomically: a temp dir, then one rename. Every rank calls it
    (TP / FSDP: the model is gathered to rank 0, which writes it; each rank writes its optimizer
    shards to optimizer/); rank 0 writes the rest. A failed write (disk full) removes the temp
    dir and exits saying why; the previous checkpoint stays as it was."""
    final = os.path.join(args.out, f"checkpoint-{step}")
    tmp = os.path.join(args.out, f".tmp-checkpoint-{step}")
    if D.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    D.barrier()
    try:
        _write_checkpoint(args, model, tokenizer, opt, gate, state, step, gen, D, tmp, final, pick)
    except Exception as e:  # disk full, quota, I/O error: say which, leave no temp dir
        raise SystemExit(runs.write_failed(f"checkpoint-{step}", e, args.out, cleanup=tmp if D.is_main else None)) from e
    if D.is_main:
        runs.prune(args.out, step, args.keep_last)  # only this run's checkpoint-<int>, never a newer or foreign one
    D.barrier()
    return final


def _write_checkpoint(args, model, tokenizer, opt, gate, state, step, gen, D, tmp, final, pick=None) -> None:
    dist_lib.save_model(model, tokenizer, tmp, D)
    opt_state = dist_lib.save_optimizer(opt, tmp, D)  # the state dict in one process, None when sharded on disk
    samplers = D.gather_object(gen.get_state())  # FSDP: every data-parallel rank's own sampling stream
    pickers = D.gather_object(pick.get_state()) if pick is not None else None  # ... and its own teacher-context choices
    if D.is_main:
        trainer_state = {
            "step": step,
            "optimizer": opt_state,
            "gate": gate.state_dict(),
            "data": dict(state),
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(), "sampler": gen.get_state(), "samplers": samplers, "teacher_pickers": pickers,
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "args": vars(args),
        }  # fmt: skip
        torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


def latest_checkpoint(out: str) -> str | None:
    """The newest checkpoint-<int> with a trainer_state.pt (no integrity check: runs.resume_point)."""
    ckpts = [p for _, p in runs.checkpoints(out) if os.path.isfile(os.path.join(p, "trainer_state.pt"))]
    return ckpts[-1] if ckpts else None


def find_resume(args, given: set[str]) -> tuple[argparse.Namespace, str | None, list]:
    """--resume: the newest complete checkpoint in --out, and the run's own flags from it.

    Flags not typed now take the run's values; RESUME_FLAGS typed now replace them; any other
    typed flag that differs from the run's is refused, naming it. Read-only (every rank calls
    it): runs.open_dir / set_aside / truncate_log change the directory once it is locked.
    Returns (args, checkpoint dir or None, [(corrupt newer checkpoint, what is wrong)]).
    """
    if not args.resume:
        return args, None, []
    path, bad = runs.resume_point(args.out)
    if path is None:
        if bad:
            raise SystemExit(f"train.py: --resume: no complete checkpoint in {args.out}: " + "; ".join(why for _, why in bad))
        where = "" if "out" in given else " (the default --out for these flags: pass the run's --out)"
        if who := runs.holder(args.out):
            where = f" yet: a live run ({who}) writes there and has not saved one"
        raise SystemExit(f"train.py: --resume: no checkpoint in {args.out}{where}")
    with open(os.path.join(path, "args.json")) as f:
        saved = json.load(f)
    mine = {"out", "resume", "overwrite"}  # this invocation's, never the run's
    refused = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {v})" for k, v in saved.items()
               if k in given and k not in mine and k not in RESUME_FLAGS and hasattr(args, k) and getattr(args, k) != v]  # fmt: skip
    if refused:
        raise SystemExit(
            f"train.py: --resume continues the run in {args.out} with its own flags; these differ from it and cannot change "
            f"on resume: {', '.join(refused)}. Changeable: {', '.join('--' + k.replace('_', '-') for k in RESUME_FLAGS)}. "
            f"To change the others, start a new run (another --out, --init-from {path} for its weights)."
        )
    for k, v in saved.items():
        if k not in given and k not in mine and hasattr(args, k):  # (a flag this train.py no longer has is skipped)
            setattr(args, k, v)
    step = int(runs.CKPT.fullmatch(os.path.basename(path)).group(1))
    if step > args.steps:
        raise SystemExit(f"train.py: --resume: the run in {args.out} is already at step {step} ({os.path.basename(path)}), past --steps {args.steps}; pass --steps > {step} to continue it")
    return args, path, bad


def evaluate(args, task, model, tokenizer, step: int, benches=None, D=None) -> dict:
    """Held-out accuracy: the lab's avg@k, or eval.py's Avg over --eval-bench.

    FSDP: each rank evaluates every dp_size-th problem (its share) and the counts are summed over
    the ranks (issue 10: every rank once ran the whole benchmark). Always in eval mode."""
    D = D or dist_lib.Dist()
    model.eval()  # (the update left it in train mode; sample() switches too)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(10_000 + args.seed)  # same eval draws every time
    if task.lab:
        import lab

        k, mine = args.eval_k or 4, task.held_out[D.dp_rank :: D.dp_size]
        r = None
        if mine:
            with dist_lib.unsharded(model):  # FSDP: whole layers for decoding
                r = lab.evaluate(model, tokenizer, mine, k=k, max_new_tokens=args.max_new_tokens, generator=g)
        if D.dp_size == 1:
            return r
        n = len(mine) * k  # samples: counts from the rates, summed over ranks
        c, s, cs, cd = (r["eval_acc"] * n, r["frac_search"] * n, r["acc_search"] * r["frac_search"] * n, r["acc_direct"] * (1 - r["frac_search"]) * n) if r else (0.0,) * 4
        n, c, s, cs, cd = (D.sum(float(x)) for x in (n, c, s, cs, cd))
        return {"eval_acc": c / n, "frac_search": s / n, "acc_search": cs / max(1.0, s), "acc_direct": cd / max(1.0, n - s)}
    import eval as eval_lib

    mine = {name: {**b, "problems": b["problems"][D.dp_rank :: D.dp_size]} for name, b in benches.items()}
    todo = {name: b for name, b in mine.items() if b["problems"]}
    res = {"benches": {}}
    if todo:
        with dist_lib.unsharded(model):  # TP: the plan's rows per wave (its KV heads are split); else what fits
            res = eval_lib.run_benchmarks(model, tokenizer, todo, max_new_tokens=args.max_new_tokens, generator=g, enable_thinking=task.template_kw.get("enable_thinking"),
                                          batch_size=args.sample_rows if D.mode == "tp" else None)  # fmt: skip
    per = {}
    for name, b in mine.items():  # the same order on every rank (collectives)
        r = res["benches"].get(name)
        n = r["n"] * r["k"] if r else 0  # samples this rank graded (evaluate skips prompts past the context)
        per[name] = r["avg"] if D.dp_size == 1 else 100.0 * D.sum(r["avg"] / 100.0 * n if r else 0.0) / D.sum(n)
    return {"eval_acc": sum(per.values()) / len(per) / 100.0, **{f"eval_{k}": v for k, v in per.items()}}


# ---------------------------------------------------------------------------------------
# The main loop.
# ---------------------------------------------------------------------------------------


@runs.scoped  # handlers and the --out lock are given back however main ends (an in-process caller reruns)
def main(args: argparse.Namespace) -> dict:
    given = typed_flags(args)
    memory.configure_cuda_allocator()  # expandable segments, before the first CUDA allocation
    args = resolve_args(args)
    args, resume_from, corrupt = find_resume(args, given)  # --resume: the run's own flags and checkpoint
    if resume_from and os.path.basename(resume_from) == f"checkpoint-{args.steps}":
        print(f"the run in {args.out} is already finished at step {args.steps} (--steps); nothing to do: pass a larger --steps to continue it")
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = None if args.data == "lab" else load_problems(args)  # before the run dir and the model: a bad file is named in seconds

    # --- setup: processes, run directory, model, task, optimizer, gate, RNG ---
    D = dist_lib.setup(tp=args.tp, fsdp=args.fsdp, device=args.device)  # torchrun ranks; one process: nothing to start
    if args.prompts_per_step % D.dp_size:
        raise SystemExit(f"train.py: --prompts-per-step {args.prompts_per_step} must split evenly over {D.dp_size} FSDP ranks")
    if D.is_main:  # lock --out; a fresh run refuses another run's files; a resume drops what came after its checkpoint
        runs.open_dir(args.out, resume=bool(resume_from), overwrite=args.overwrite)
        if resume_from:
            runs.set_aside(corrupt, resume_from)
            k = int(runs.CKPT.fullmatch(os.path.basename(resume_from)).group(1))
            for name in ("metrics.jsonl", "samples.jsonl"):
                if n := runs.truncate_log(os.path.join(args.out, name), k):
                    print(f"resume: dropped {n} lines of {name} written after step {k} (those steps run again)")
    D.barrier()
    # the lab is fp32 unless told otherwise, also when it resumes from a checkpoint directory (which
    # model.load would otherwise load in bf16 on CUDA, beside an optimizer state saved for fp32)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.model == "tiny" else None)
    name = resume_from or args.init_from or args.model
    try:
        model, tokenizer = dist_lib.load(name, D, dtype=dtype, seed=args.seed)  # = model.load in one process
    except (FileNotFoundError, ValueError) as e:  # not a model directory and not on the hub (or offline): one line
        flag = "--resume" if resume_from else "--init-from" if args.init_from else "--model"
        raise SystemExit(f"train.py: {flag}: {e}") from None
    task = Task(args, tokenizer, problems)
    if task.lab and not (resume_from or args.init_from):
        import lab

        warm_kw = lab.warm_overrides(args.lab_level, args.warm_steps)
        with D.rank0_first():  # rank 0 trains and caches the warm start, the other ranks load the cache
            model = lab.warm_start(model, tokenizer, task.train, cache_dir=os.path.join(".cache", "lab"), **warm_kw)
    model = dist_lib.parallelize(model, tokenizer, D, scratch=os.path.join(args.out, ".tp-init"))  # TP shards / FSDP wrap
    if args.grad_ckpt == "on":
        dist_lib.enable_grad_ckpt(model)
    device = next(model.parameters()).device
    benches = None
    if not task.lab and args.eval_bench:
        import eval as eval_lib

        benches = eval_lib.load_benchmarks(args.eval_bench.split(","), k=args.eval_k, limit=args.eval_limit)
    opt = memory.AdamW(model.named_parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), states=args.optim_states)
    dist_lib.hold_replicated_grads(opt, model, D)  # TP: replicated grads reach the fp32 sums after transformers' TP hook (dist.py)
    if args.recipe == "official":  # per-response lambda; run/<model>/sd.sh: target = median - 0.1, no hysteresis
        sd = args.method == "sd"
        gate = gate_lib.PerplexityGate(args.warmup_steps, **({"target_ratio": 0.0, "reactivate_ratio": 0.0} if sd else {}))
    else:
        gate = gate_lib.EntropyGate(args.warmup_steps, args.tau, args.lam, kind="mean" if args.gate == "mean" else "median", always_open=args.gate == "none")
    # rollouts + teacher-context choice; FSDP: each data-parallel rank its own stream, TP: the same on every rank
    gen = torch.Generator(device=device).manual_seed(args.seed + D.dp_rank)
    # host-side choices (which correct peer goes into a teacher prompt) from a CPU generator of their
    # own: a CUDA generator cannot draw CPU numbers (issue 10), and the sampler's stream stays untouched
    pick = torch.Generator().manual_seed(args.seed + D.dp_rank + (1 << 32))
    state = {"cursor": 0, "data_seed": args.seed}
    random.seed(args.seed)
    start = 0
    if resume_from:
        # on the host, paged in from disk as it is copied into the live states (issue 10: a plain load put a
        # second copy of the 45 GiB of AdamW states on the GPU of a 4B run); freed below
        ts = torch.load(os.path.join(resume_from, "trainer_state.pt"), map_location="cpu", mmap=True, weights_only=False)
        dist_lib.load_optimizer(opt, resume_from, ts["optimizer"], D)  # copied into opt's own tensors; TP / FSDP: the sharded optimizer/ dir
        gate.load_state_dict(ts["gate"])
        state = dict(ts["data"])
        random.setstate(ts["rng"]["python"])
        torch.set_rng_state(ts["rng"]["torch"])
        samplers = ts["rng"].get("samplers") or [ts["rng"]["sampler"]]
        if len(samplers) != D.dp_size:
            raise SystemExit(f"train.py: --resume: the checkpoint has {len(samplers)} data-parallel sampling streams, this run {D.dp_size}")
        gen.set_state(samplers[D.dp_rank])
        if ts["rng"].get("teacher_pickers") is not None:  # (checkpoints before issue 10 drew them from the sampler's stream)
            pick.set_state(ts["rng"]["teacher_pickers"][D.dp_rank])
        if ts["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ts["rng"]["cuda"])
        start = ts["step"]
        del ts, samplers  # nothing of the checkpoint stays referenced
        print(f"resumed from {resume_from} at step {start}")

    # --- the memory plan (memory.py): printed; on a GPU it sets the micro-batch and sampling budgets ---
    B, G = args.prompts_per_step // D.dp_size, args.group_size  # B: this rank's prompts (FSDP: its share)
    N = B * G
    n_params = sum(p.numel() for p in model.parameters())  # (DTensor numel is the full size)
    offload_optim = device.type == "cuda" and D.mode == "single" and not args.keep_optim_on_gpu  # AdamW state to CPU while sampling
    mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    plan = memory.plan(model.config, gpu_bytes=mem, dtype_bytes=model.dtype.itemsize, states=args.optim_states, grad_ckpt=args.grad_ckpt == "on",
                       rows=N, prompt_len=max(len(task.prompt_ids(p)) for p in task.train[:64]), new_tokens=args.max_new_tokens, group=G, micro_batch_rows=args.micro_batch,
                       shards=D.world, tp=args.tp, n_params=n_params, offload=offload_optim)  # fmt: skip
    if device.type == "cuda" or not task.lab:
        print(plan.table() + ("" if device.type == "cuda" else "\n  (CPU: budgets not applied; --micro-batch and all rows at once)"))
    else:  # the lab on CPU: one line is enough (`python memory.py` prints a full plan)
        print(plan.table().splitlines()[0] + ": the lab fits anywhere; budgets not applied on CPU")
    if device.type == "cuda":
        args.micro_batch_tokens = args.micro_batch_tokens or max(1, plan.micro_batch_tokens)
        args.kv_tokens = args.kv_tokens or plan.kv_tokens
    if D.is_main:
        runs.write_json(os.path.join(args.out, "args.json"), vars(args))
    # only rank 0 writes metrics and samples; lines are written whole (runs.Log)
    metrics_f = runs.Log(os.path.join(args.out, "metrics.jsonl") if D.is_main else None)
    samples_f = runs.Log(os.path.join(args.out, "samples.jsonl") if D.is_main else None)
    log = metrics_f.write

    # Ctrl-C, SIGTERM or the file OUT/STOP: finish the current step, save, exit non-zero (never a half-updated checkpoint)
    stop = runs.Stop(args.out)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would land inside the step table

    use_teacher = args.method != "grpo" or args.log_teacher
    eos = model_lib.stop_token_ids(model, tokenizer)  # the tokenizer's EOS and the generation config's (eval.py's too)
    par = {"single": "", "tp": f" | tensor parallel {D.world}", "fsdp": f" | FSDP over {D.world} ranks, B {B} each"}[D.mode]
    if args.method == "grpo":
        how = "no token term" + (", teacher logged" if args.log_teacher else "")
    else:
        how = f"lam {args.lam} gate {args.gate} tau {args.tau}" if args.recipe == "paper" else f"recipe official (per-response lambda, len-mask {args.len_mask})"
    think = "template default" if args.enable_thinking is None else args.enable_thinking
    print(f"model {args.model} ({n_params / 1e6:.1f}M params, {model.dtype}, {device}) | thinking {think} | method {args.method} {how} | B {args.prompts_per_step} x G {G} | lr {args.lr} | out {args.out}{par}")
    summary = {}
    if start == 0 and (args.eval_every or task.lab or benches):
        ev = evaluate(args, task, model, tokenizer, 0, benches, D)
        log({"step": 0, **ev})
        summary["eval_before"] = ev["eval_acc"]
        print(f"eval step 0: " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()))

    header = "step | loss     | reward | len   | trunc | H_pol | H_tea | gate | lam  | u_mean | u<0  | phi    | gnorm | tok/s  | time"
    print(header)
    bar = tqdm(range(start, args.steps), desc=f"RL ({args.method})", initial=start, total=args.steps, disable=None if D.is_main else True)
    step = start
    all_wrong = 0  # all_wrong_watch's streak (restarts at 0 on resume: it only prints a warning)
    for step in range(start + 1, args.steps + 1):
        t0, c0 = time.time(), time.process_time()  # wall and this process's CPU time (the CPU one ignores other jobs' load)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model.eval()  # no dropout in sampling or scoring; the tiny/Qwen3 models have none anyway

        # --- 1) rollouts: B prompts x G samples (FSDP: this rank's block of the step's prompts) ---
        problems = D.shard(next_problems(task, state, args.prompts_per_step))
        prompts = [task.prompt_ids(p) for p in problems]  # B lists
        if offload_optim:
            opt.offload()  # AdamW's state to pinned CPU memory: the KV pool gets that memory (memory.plan counts on it)
        with dist_lib.unsharded(model):  # FSDP: all-gather the layers once, not at every decoded token
            roll = sample(model, prompts, n=G, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, generator=gen, kv_tokens=args.kv_tokens, max_rows=args.sample_rows,
                          attention=args.sampler_attention, decode_graphs=False if args.no_decode_graphs else None)  # fmt: skip
        if offload_optim:
            opt.reload()
        D.check_same(roll.tokens, "the sampled tokens")  # TP: every rank must hold the same rollouts
        responses, lengths = roll.tokens, roll.lengths  # (N, T), (N,)
        mask = roll.mask()  # (N, T) from lengths
        t_sample = time.time() - t0

        # --- 2) rewards: graded answers; truncated (no EOS) = 0 ---
        texts = data_lib.graded_texts(tokenizer, responses, lengths, roll.finished, [data_lib.think_prefix(tokenizer, prompts[i // G]) for i in range(N)])  # as eval.py grades
        graded = D.from_main(lambda: task.grade(texts, [problems[i // G]["answer"] for i in range(N)]))  # TP: graded once (rank 0)
        rewards = torch.tensor(graded, device=device) * roll.finished.float()  # (N,)

        # --- 3) GRPO sequence advantages ---
        seq_adv = antisd.group_advantages(rewards, G)  # (N,)

        # --- 4) privileged context: teacher prompts (the response tensor is not re-tokenized) ---
        t1 = time.time()
        student_prompts = [prompts[i // G] for i in range(N)]  # prompt-major rows
        teacher_prompts = None
        if use_teacher and not args.no_teacher:
            teacher_prompts = D.from_main(lambda: antisd.teacher_prompts(  # TP: built once (the official recipe grades peers' answers)
                tokenizer, [task.user_text(p) for p in problems], responses, lengths, rewards, G,
                references=[task.reference(p) for p in problems], max_solution_tokens=args.max_solution_tokens,
                enable_thinking=task.template_kw.get("enable_thinking"), generator=pick,
                recipe=args.recipe, answers=[p["answer"] for p in problems], answer_match=task.answer_match,
            ))  # fmt: skip

        # --- 5) scores: the teacher's t_t of the SAME response tokens and its entropy H_t (the gate's),
        #        no_grad, each distinct teacher prompt once; s_t comes from the update's own forward (8) ---
        t_logp, t_ent, work = None, None, None  # (N, T) each
        if use_teacher:
            with dist_lib.unsharded(model):  # no-teacher ablation: the student's pass (its entropy), t := 0
                t_logp, t_ent, work = scores_in_chunks(model, student_prompts if args.no_teacher else teacher_prompts, responses, lengths,
                                                       rows=args.micro_batch, temperature=args.temperature)  # fmt: skip
            if args.no_teacher:
                t_logp = torch.zeros_like(t_logp)  # u = -s
        t_score = time.time() - t1

        was_warming = gate.warming_up  # (the console's 'warm'; the record logs the state THIS step used, gate.open_this_step)
        # --- 6) the entropy gate (statistic over the whole step's batch: FSDP gathers every rank's tokens) ---
        lam_rows = None
        if args.recipe == "official" and args.method != "grpo":  # lambda per response from the teacher's perplexity
            tppl = antisd.teacher_perplexity(t_logp, mask)  # (N,) from the teacher pass (section 5)
            gate.update(D.gather(tppl))  # the step's statistic: every rank's rows
            lam_rows = gate.lam_rows(tppl).float()  # (N,) this rank's rows
            h, lam = float("nan"), float(D.gather(lam_rows).mean())
        elif use_teacher:
            ent_all = D.gather(t_ent[mask])  # (M,) valid tokens of the step
            h = gate_lib.gate_statistic(ent_all, torch.ones_like(ent_all, dtype=torch.bool), kind=gate.kind)
            lam = gate.update(h) if args.method != "grpo" else 0.0
        else:
            h, lam = float("nan"), 0.0

        # --- 7) per-token advantages: a function of whole rows, applied in 8) to each micro-batch, whose
        #        forward gives s_t (= old_logp) and so u = t - s there (antisd.pmi_from_logprobs) ---
        zeroed_n = [0]  # official recipe: u tokens zeroed by the u-clip, summed over the micro-batches
        term_abs = [0.0]  # sum of |A_{i,t} - A_seq_i| over valid tokens (issue 15: the token term's size), over the micro-batches

        def token_adv(idx, u, m):  # rows idx (n,) LongTensor, u and m (n, Tm) -> A_{i,t} (n, Tm)
            if args.recipe == "official":  # per whole row: lam_rows[idx] gives these rows' values
                lam_i = None if lam_rows is None else lam_rows[idx]  # (n,)
                a, z = antisd.official_token_advantages(seq_adv[idx], u, m, method=args.method, lam=lam_i, sigma_ref=gate.sigma_ref, len_mask=args.len_mask)
                zeroed_n[0] += int(z.sum())
            else:
                a = antisd.token_advantages(seq_adv[idx], u, m, method=args.method, lam=lam)
            term_abs[0] += float(((a - seq_adv[idx].float()[:, None]).abs() * m).sum())
            return a

        # --- 8) update: one token count for the whole step (all ranks), any micro-batch split ---
        t2 = time.time()
        model.train()
        num_tokens = D.sum(int(lengths.sum()))
        # micro-batches of <= --micro-batch rows and <= --micro-batch-tokens padded tokens, over the
        # rows in order of length (each micro-batch is padded to its longest row: a search response
        # next to a one-line answer would be mostly padding); FSDP: the same number on every rank
        # (each forward/backward all-gathers every layer)
        order = sorted(range(N), key=lambda i: (len(student_prompts[i]) + int(lengths[i]), i))  # N rows
        batches = memory.micro_batches([len(student_prompts[i]) for i in order], lengths[order].tolist(), max_rows=args.micro_batch, max_tokens=args.micro_batch_tokens)
        order = torch.tensor(order, device=device)  # (N,) position in the sorted order -> row
        batches = [order[b] for b in memory.split_to(batches, D.max(len(batches)))]  # row indices of each micro-batch
        opt.zero_grad(set_to_none=True)
        loss_sum, old_logp, u = accumulate_grads(model, D, batches, student_prompts, responses, lengths, t_logp, token_adv, temperature=args.temperature,
                                                 clip_low=args.clip_low, clip_high=args.clip_high, num_tokens=num_tokens, opt=opt)  # fmt: skip
        loss_sum = D.sum(loss_sum)  # FSDP: the ranks' parts of the one step loss
        dist_lib.sync_replicated_grads(model, D, opt)  # FSDP: sum the grads of the unsharded embedding / head
        grad_norm = dist_lib.clip_grads_(opt.grads(), args.grad_clip)  # the fp32 sums (memory.AdamW), DTensor-aware (TP, FSDP)
        skipped = not (math.isfinite(grad_norm) and math.isfinite(loss_sum))
        if skipped:  # never let a NaN/inf reach the weights (or a checkpoint)
            opt.zero_grad(set_to_none=True)
            print(f"step {step}: non-finite loss {loss_sum} or grad norm {grad_norm}: update skipped", flush=True)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)  # free the gradients before the next rollouts (memory.py counts on it)
        t_update = time.time() - t2
        if args.recipe == "official" and args.method != "grpo" and gate.needs_u_std:
            # warm-up (lambda = 0): sigma_ref of the u-clip, the std over the step's valid tokens of the
            # u formed in the update (recorded after it: this step's advantages did not use it)
            uv = D.gather(u[mask])  # (M,) the step's valid tokens
            gate.record_u_std(float(uv.std()) if uv.numel() > 1 else 0.0)

        # --- 9) log ---
        dt = time.time() - t0
        finished = roll.finished
        off = {}  # the official recipe's quantities (README "Which AntiSD?"); None under the paper's
        if args.recipe == "official" and args.method != "grpo":
            lam_all, tppl_all = D.gather(lam_rows), D.gather(tppl)  # (N_all,) each
            long_rows = D.gather(lengths >= args.len_mask) if args.len_mask else torch.zeros(0, dtype=torch.bool)
            off = {"lam_std": float(lam_all.std()) if lam_all.numel() > 1 else 0.0, "lam_max": float(lam_all.max()),
                   "lam_pos_frac": float((lam_all > 0).float().mean()), "u_zeroed_frac": D.sum(zeroed_n[0]) / num_tokens,
                   "sigma_ref": gate.sigma_ref, "tppl_mean": float(tppl_all.mean()), "tppl_target": gate.target,
                   "tppl_masked_frac": float((tppl_all > gate.mask).float().mean()),
                   "len_masked_frac": float(long_rows.float().mean()) if long_rows.numel() else 0.0}  # fmt: skip
        # the token term's size next to A_seq's (issue 15): mean |adv - A_seq| and mean |A_seq| over the step's valid tokens
        tok_term_abs = D.sum(term_abs[0]) / num_tokens
        seq_adv_abs = D.sum(float((seq_adv.float().abs() * lengths).sum())) / num_tokens
        if D.dp_size > 1:  # FSDP: gather every rank's rows (rank order = the step's batch), so the record is the step's
            rewards, lengths, finished = D.gather(rewards), D.gather(lengths), D.gather(finished)
            old_logp, u, t_ent = (D.gather(x) if x is not None else None for x in (old_logp, u, t_ent))
            mask = antisd.mask_from_lengths(lengths, old_logp.shape[1])
        valid_u = u[mask] if u is not None else torch.zeros(0)
        rec = {
            "step": step, "loss": loss_sum, "reward_mean": float(rewards.mean()), "step_time": dt, "step_cpu_time": time.process_time() - c0,
            "frac_zero_var": float((rewards.view(-1, G).std(-1) == 0).float().mean()),
            "frac_all_wrong": float((rewards.view(-1, G).max(-1).values == 0).float().mean()),  # the sparse part of frac_zero_var
            "tok_term_abs_mean": tok_term_abs, "seq_adv_abs_mean": seq_adv_abs,
            "resp_len_mean": float(lengths.float().mean()), "truncated_frac": float((~finished).float().mean()),
            # sample estimate of the policy's entropy: E_{y~pi}[-log pi(y)] = H(pi) (T=1)
            "policy_entropy": float(-old_logp[mask].mean()),
            "teacher_entropy_median": gate_lib.gate_statistic(t_ent, mask, "median") if use_teacher else None,
            "teacher_entropy_mean": gate_lib.gate_statistic(t_ent, mask, "mean") if use_teacher else None,
            "gate_stat": h if use_teacher else None, "gate_kind": gate.kind,
            "gate_open": bool(gate.open_this_step) if use_teacher and args.method != "grpo" else None, "lam": lam, "recipe": args.recipe,
            **{k: off.get(k) for k in ("lam_std", "lam_max", "lam_pos_frac", "u_zeroed_frac", "sigma_ref", "tppl_mean", "tppl_target", "tppl_masked_frac", "len_masked_frac")},
            "u_mean": float(valid_u.mean()) if valid_u.numel() else None,
            "u_frac_neg": float((valid_u < 0).float().mean()) if valid_u.numel() else None,
            "u_p1": quantile(valid_u, 0.01) if valid_u.numel() else None,
            "u_p99": quantile(valid_u, 0.99) if valid_u.numel() else None,
            "phi_mean": float(antisd.phi(valid_u).mean()) if valid_u.numel() else None,
            "grad_norm": grad_norm, "skipped": skipped, "tokens_per_s": num_tokens / dt,
            "t_sample": t_sample, "t_score": t_score, "t_update": t_update,
            # teacher prompt tokens computed (each distinct prompt once) vs scoring every row's own
            "teacher_prompt_tokens": D.sum(work["prompt_tokens"]) if work else None,
            "teacher_prompt_tokens_rows": D.sum(work["prompt_tokens_rows"]) if work else None,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }  # fmt: skip
        if task.lab:
            import lab

            rec["frac_search"] = D.sum(sum(lab.classify(t) == "search" for t in texts)) / len(rewards)
        log(rec)
        all_wrong, warning = all_wrong_watch(all_wrong, rec, ALL_WRONG_STEPS)
        if warning and D.is_main:
            tqdm.write(warning)
        gate_word = "   -" if rec["gate_open"] is None else "open" if rec["gate_open"] else "warm" if was_warming else "shut"
        f = lambda v, w, p=3: f"{v:{w}.{p}f}" if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else " " * (w - 1) + "-"  # noqa: E731
        tqdm.write(
            f"{step:4d} | {f(rec['loss'], 8, 4)} | {f(rec['reward_mean'], 6)} | {f(rec['resp_len_mean'], 5, 1)} | {f(rec['truncated_frac'], 5, 2)} | "
            f"{f(rec['policy_entropy'], 5)} | {f(rec['teacher_entropy_median'], 5)} | {gate_word} | "
            f"{lam:.2f} | {f(rec['u_mean'], 6)} | {f(rec['u_frac_neg'], 4, 2)} | {f(rec['phi_mean'], 6)} | {f(grad_norm, 5, 2)} | {f(rec['tokens_per_s'], 6, 0)} | {dt:.1f}s"
        )
        if args.sample_every and step % args.sample_every == 0:
            i = 0  # one rollout per dump: the first of the step, with its per-token u
            ids = responses[i, : int(lengths[i])].tolist()
            samples_f.write({
                "step": step, "prompt": tokenizer.decode(prompts[0]), "response": texts[i], "reward": float(rewards[i]),
                "tokens": [tokenizer.decode([t]) for t in ids], "u": u[i, : len(ids)].tolist() if u is not None else None,
            })  # fmt: skip
        bar.update(1)

        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            ev = evaluate(args, task, model, tokenizer, step, benches, D)
            log({"step": step, **ev})
            tqdm.write(f"eval step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        stopping = D.any(stop.requested())  # every rank stops at the same step
        if (args.save_every and step % args.save_every == 0 and step != args.steps) or stopping:  # the last step: saved below, once
            save_checkpoint(args, model, tokenizer, opt, gate, state, step, gen, D, pick)
        if stopping:
            tqdm.write(f"stopped ({stop.reason or 'another rank'}): saved checkpoint-{step}; continue with --resume --out {args.out}")
            summary["stopped"] = stop.reason or "STOP"
            break
    bar.close()

    # --- the end: final eval, final checkpoint, summary ---
    if "stopped" not in summary:
        if args.eval_every or task.lab or benches:
            ev = evaluate(args, task, model, tokenizer, step, benches, D)
            log({"step": step, **ev})
            summary["eval_after"] = ev["eval_acc"]
            print(f"eval step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        if step > start:
            save_checkpoint(args, model, tokenizer, opt, gate, state, step, gen, D, pick)
    stop.close()
    if D.is_main:
        runs.unlock(args.out)
    dist_lib.teardown(D)
    if "eval_before" in summary and "eval_after" in summary:
        print(f"held-out accuracy: {summary['eval_before']:.3f} -> {summary['eval_after']:.3f} ({100 * (summary['eval_after'] - summary['eval_before']):+.1f} points) | run dir {args.out}")
    return summary


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # step lines reach a log file (python train.py > log) as they happen
    summary = main(ARGS)
    sys.exit(runs.Stop.EXIT[summary.get("stopped")])  # 0 = finished; 130 / 143 / 75 = stopped by SIGINT / SIGTERM / OUT/STOP, resumable
