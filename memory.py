"""memory.py: where the bytes go when one GPU fully fine-tunes a 4B model, and the budgets that follow.

    python memory.py --model random:Qwen/Qwen3-4B-Instruct-2507 --gpu-gib 79.6   # the plan on an H100 80GB
    plan = memory.plan(model.config, gpu_bytes=79.6 * 2**30, rows=256, prompt_len=256, new_tokens=8192)
    print(plan.table())

What this file owns
-------------------
1. `AdamW`: the optimizer whose state layout the plan assumes. bf16 weights alone cannot take
   the paper's updates: AdamW moves a weight by about lr = 1e-6 per step, while a bf16 weight of
   size 0.03 has a spacing of 1.2e-4, so round-to-nearest throws almost every update away (and a
   bf16 second moment with beta2 = 0.999 loses its 0.1% increments the same way). So for bf16 /
   fp16 models the optimizer keeps an fp32 MASTER copy of every weight and fp32 moments, and
   writes the rounded master back into the bf16 weight after each step (`states="fp32"`, the
   default). `states="param"` keeps the moments in the weights' dtype and no master copy (half
   the optimizer memory, for experiments that accept the rounding). For fp32 models the two are
   the same thing and bit-identical to torch.optim.AdamW (tests/test_memory.py checks it).
   Its state is a flat dict {param name: {exp_avg, exp_avg_sq, step[, master]}} of tensors
   (DTensors under TP / FSDP), allocated at construction, so torch.distributed.checkpoint
   can save and load it in place, sharded (dist.py).

2. `plan(config, ...)`: the memory estimate train.py prints at startup, per GPU:

       weights      n_params x bytes(dtype)                                   bf16: 2 B/param
       grads        n_params x 4: fp32 sums whatever the dtype (AdamW above)  4 B/param
       optimizer    fp32: master 4 + exp_avg 4 + exp_avg_sq 4 = 12 B/param;  param: 2 x bytes(dtype)
       activations  per token of a training micro-batch (below); the micro-batch TOKEN budget is
                    what is left after the fixed parts, divided by this
       head         the output head's backward for one chunk (model.response_logprobs scores
                    `chunk` positions at a time): 5 fp32 (chunk x V) buffers (logits, scaled
                    logits, softmax, their gradients) + a (V x D) fp32-sized weight-gradient
                    temporary (measured on a GPU, issue 10: 4.37 GiB at 4B widths, V = 151936,
                    D = 2560, chunk 1024, where 3 buffers alone said 1.74)
       KV cache     2 (K, V) x layers x kv_heads x head_dim x bytes per token of a sampled row;
                    while sampling the grads are freed and (one GPU, `offload=True`) AdamW's
                    state sits in pinned CPU memory (AdamW.offload), so the sampler's paged KV
                    pool (rollout.py) gets everything but the weights, the reserve and its
                    per-row (rows, V) buffers (fp32 logits, log-softmax, probabilities, fp64
                    CDF: 24 B x V per row). Reported: the KV budget in tokens, the WORST-CASE
                    rows (every row at prompt + max new tokens) and, from `concurrent_rows`,
                    the rows decoding at once for a realistic length distribution.

   Activations saved for backward, per token and decoder layer (b = bytes of the dtype; D
   hidden, I intermediate, q = heads x head_dim, k = kv_heads x head_dim), counting what
   HF's Qwen3 layer keeps under sdpa attention:
       2 RMSNorms (fp32 copy of the input + the bf16 output)   2 (4 + b) D
       q_norm / k_norm (same, on q and k)                       (4 + b)(q + k)
       q, k after RoPE, v, attention output                     b (2q + 2k)
       MLP: gate, up, silu(gate), silu(gate) * up               4 b I
   With gradient checkpointing (each decoder layer recomputed in backward, the default for
   real models) only each layer's input (b D per layer) is kept, plus one layer's full set
   during its recompute. These are estimates (tests/test_memory.py checks them against the
   tensors autograd really saves on the tiny model: within 10%); bench/bench_gpu.py measures
   the real peak on a GPU.

3. `micro_batches` / `split_to`: the training micro-batches by a token budget (rows x padded
   length), rows of similar length together, and the same number of them on every FSDP rank.

Shapes / symbols: N rows, P prompt tokens, T new tokens, D hidden, I intermediate, V vocab.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, field

import torch

GiB = 2**30
SAMPLER_BYTES_PER_VOCAB = 24  # rollout._next_token per row: fp32 logits, log-softmax, probabilities (12 B) + fp64 CDF (8 B) + slack


# ---------------------------------------------------------------------------------------
# The optimizer: AdamW with an fp32 master copy for low-precision weights.
# ---------------------------------------------------------------------------------------


class AdamW:
    """AdamW (decoupled weight decay) over named parameters; see the module docstring.

    named_params: iterable of (name, parameter), e.g. model.named_parameters(); tied weights
        appear once (named_parameters already dedups them).
    states: "fp32" (fp32 master weights + fp32 moments for bf16/fp16 parameters) or "param"
        (moments in the parameter dtype, no master). fp32 parameters never get a master copy.
    The update, per parameter (the same operations in the same order as torch.optim.AdamW):
        w <- w (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
        w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    where w is the master (if any) and the parameter is then set to w rounded to its dtype.

    Gradients of low-precision (bf16 / fp16) parameters are ACCUMULATED in fp32 (issue 10): a
    post-accumulate-grad hook moves each backward's `p.grad` into an fp32 buffer of this optimizer
    and frees it, so a step of 64 micro-batches does not sum 64 bf16 gradients in bf16 (measured
    relative L2 error 0.84% after 64 such sums; the fp32 master cannot undo it). `grad(name)` /
    `grads()` are the gradients step() uses (clip them, not `p.grad`); zero_grad frees them.
    What one backward sums inside autograd (e.g. a tied embedding's lookup and head chunks) is
    still summed in the parameter's dtype. A `.grad` set by hand, or by a wrapper that runs no
    hooks, is added to the sum at the next grad() / step(); as in torch, gradients add up until
    zero_grad().
    """

    STATES = ("fp32", "param")

    def __init__(self, named_params, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, states: str = "fp32"):
        if states not in self.STATES:
            raise ValueError(f"AdamW: states must be one of {self.STATES}, got {states!r}")
        self.lr, self.betas, self.eps, self.weight_decay, self.states = lr, tuple(betas), eps, weight_decay, states
        self.params: dict[str, torch.nn.Parameter] = {n: p for n, p in named_params if p.requires_grad}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in self.params.items():
            master = states == "fp32" and p.dtype != torch.float32
            sdt = torch.float32 if master else p.dtype
            s = {"exp_avg": torch.zeros_like(p, dtype=sdt), "exp_avg_sq": torch.zeros_like(p, dtype=sdt), "step": torch.zeros((), dtype=torch.float32)}
            if master:
                s["master"] = p.detach().to(torch.float32, copy=True)
            self.state[name] = s
        self._grad32: dict[str, torch.Tensor] = {}  # name -> fp32 gradient sum of a low-precision parameter
        self._held: set[str] = set()  # names whose .grad the caller hands over (hold / take), not the hook
        for name, p in self.params.items():
            if p.dtype != torch.float32:
                p.register_post_accumulate_grad_hook(self._hook(name))

    def hold(self, names) -> None:
        """These parameters' gradients are NOT taken by the post-accumulate hook; the caller hands
        them over with take() once they are final (dist.hold_replicated_grads: under tensor parallel,
        transformers sums q_norm / k_norm's partial gradients over the ranks in a hook of its own,
        which must run before the fp32 sum sees them)."""
        self._held |= set(names)

    def take(self, name: str) -> None:
        """Add the parameter's current .grad into its fp32 sum and free it (a held parameter's turn)."""
        if self.params[name].dtype != torch.float32:
            self._take(name, self.params[name])

    def _hook(self, name: str):
        me = weakref.ref(self)  # the parameter keeps its hooks: never let them keep an old optimizer's states alive

        def take(p: torch.Tensor) -> None:  # runs right after autograd (or FSDP) wrote p.grad
            opt = me()
            if opt is not None and name not in opt._held:
                opt._take(name, p)

        return take

    def _take(self, name: str, p: torch.Tensor) -> None:
        """Add p.grad into the fp32 buffer and free it (transient: one parameter's low-precision grad)."""
        if p.grad is None:
            return
        buf = self._grad32.get(name)
        if buf is None:
            self._grad32[name] = p.grad.to(torch.float32, copy=True)
        else:
            buf.add_(p.grad)  # (bf16 + fp32 in fp32)
        p.grad = None

    def grad(self, name: str, create: bool = False) -> torch.Tensor | None:
        """The gradient step() will use for parameter `name`: the fp32 sum (low-precision parameters)
        or `.grad` (fp32 ones); None if it has none, or zeros of the right kind when create=True."""
        p = self.params[name]
        if p.dtype == torch.float32:
            if p.grad is None and create:
                p.grad = torch.zeros_like(p)
            return p.grad
        self._take(name, p)
        if name not in self._grad32 and create:
            self._grad32[name] = torch.zeros_like(p, dtype=torch.float32)
        return self._grad32.get(name)

    def grads(self) -> list[torch.Tensor]:
        """Every existing gradient step() will use, in parameter order (for clipping and its norm)."""
        return [g for g in (self.grad(n) for n in self.params) if g is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for name, p in self.params.items():
            if set_to_none:
                p.grad = None
                self._grad32.pop(name, None)
            else:
                for g in (p.grad, self._grad32.get(name)):
                    if g is not None:
                        g.zero_()

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for name, p in self.params.items():
            g = self.grad(name)
            if g is None:  # like torch: a parameter without a gradient is not stepped
                continue
            s = self.state[name]
            w = s.get("master", p)
            g = g if g.dtype == w.dtype else g.to(w.dtype)  # (states="param": one parameter's copy at a time)
            s["step"] += 1
            t = float(s["step"])
            if self.weight_decay != 0:
                w.mul_(1 - self.lr * self.weight_decay)
            s["exp_avg"].lerp_(g, 1 - b1)
            s["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (s["exp_avg_sq"].sqrt() / (1 - b2**t) ** 0.5).add_(self.eps)
            w.addcdiv_(s["exp_avg"], denom, value=(self.lr / (1 - b1**t)) * -1)
            if w is not p:
                p.copy_(w)  # round the fp32 master to the parameter's dtype

    @torch.no_grad()
    def offload(self, device="cpu") -> None:
        """Move every state tensor (fp32 master, moments) to `device` (pinned CPU memory when CUDA
        is in use), freeing its GPU memory for the sampler's KV cache; `reload()` brings it back
        before the update. Copies are exact, so the update after a round trip is bit-identical
        (tests/test_memory.py). The copies are issued non-blocking on the current stream, so
        later kernels on that stream (the sampler, the reload) are ordered after them."""
        device = torch.device(device)
        pin = device.type == "cpu" and torch.cuda.is_available()
        for s in self.state.values():
            for k, v in s.items():
                if k == "step":
                    continue
                new = torch.empty(v.shape, dtype=v.dtype, device=device, pin_memory=pin)
                s[k] = new.copy_(v, non_blocking=True)

    @torch.no_grad()
    def reload(self) -> None:
        """Move the state back next to its parameters (undoes `offload`)."""
        for name, s in self.state.items():
            dev = self.params[name].device
            for k, v in s.items():
                if k != "step" and v.device != dev:
                    s[k] = v.to(dev, non_blocking=True)

    def state_dict(self) -> dict:
        """{"hparams": {...}, "state": {name: {exp_avg, exp_avg_sq, step[, master]}}}: the live tensors
        (not copies), so torch.distributed.checkpoint can load into them in place."""
        return {"hparams": dict(lr=self.lr, betas=list(self.betas), eps=self.eps, weight_decay=self.weight_decay, states=self.states), "state": self.state}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd["state"]) != set(self.state):
            raise ValueError(f"AdamW.load_state_dict: parameter names differ: {sorted(set(sd['state']) ^ set(self.state))[:5]}")
        with torch.no_grad():
            for name, s in self.state.items():
                for k, v in s.items():
                    if k not in sd["state"][name]:
                        raise ValueError(f"AdamW.load_state_dict: {name} has no {k!r} (saved with states={sd['hparams'].get('states')!r}?)")
                    if v.data_ptr() != sd["state"][name][k].data_ptr():
                        v.copy_(sd["state"][name][k])


# ---------------------------------------------------------------------------------------
# Micro-batches by a token budget.
# ---------------------------------------------------------------------------------------


def micro_batches(prompt_lens: list[int], lengths: list[int], *, max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """Split rows 0..N-1 into micro-batches (lists of row indices) for the training forward/backward.

    Rows are taken in order of prompt + response length (ties by index), as the scoring pass
    orders them, so each micro-batch holds rows of similar length and little padding (issue 10:
    prompt-major slices padded every batch to its longest row). Each holds at most max_rows rows
    and, when max_tokens is given, at most max_tokens PADDED tokens: rows x (longest prompt +
    longest response in the batch), which is what model.response_logprobs allocates. A single row
    longer than the budget is a batch alone. The loss does not depend on the split (policy_loss
    divides by the step's token count). Every row is in exactly one batch.
    """
    assert len(prompt_lens) == len(lengths) and max_rows >= 1
    order = sorted(range(len(lengths)), key=lambda i: (prompt_lens[i] + lengths[i], i))
    out, a, n = [], 0, len(order)
    while a < n:
        b, mp, ml = a + 1, prompt_lens[order[a]], lengths[order[a]]
        while b < n and b - a < max_rows:
            mp2, ml2 = max(mp, prompt_lens[order[b]]), max(ml, lengths[order[b]])
            if max_tokens is not None and (b - a + 1) * (mp2 + ml2) > max_tokens:
                break
            mp, ml, b = mp2, ml2, b + 1
        out.append(order[a:b])
        a = b
    return out


def split_to(batches: list[list[int]], count: int) -> list[list[int]]:
    """Halve the largest micro-batches until there are `count` of them. FSDP: every rank must
    run the same number of forward/backward passes (each one all-gathers every layer), so ranks
    with fewer batches than the busiest one split theirs. count <= rows always works."""
    out = [list(b) for b in batches]
    while len(out) < count:
        i = max(range(len(out)), key=lambda j: len(out[j]))
        rows = out[i]
        if len(rows) < 2:
            raise ValueError(f"split_to: cannot make {count} micro-batches from {sum(map(len, out))} rows")
        mid = len(rows) // 2
        out[i : i + 1] = [rows[:mid], rows[mid:]]
    return out


def optimizer_bytes_per_param(param_bytes: int, states: str) -> int:
    """Bytes of AdamW state per parameter: fp32 master + 2 fp32 moments, or 2 moments in the param dtype."""
    if states == "fp32":
        return 8 if param_bytes == 4 else 12
    return 2 * param_bytes


# ---------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------


def count_params(config) -> int:
    """Parameters of a Qwen3 / Qwen3-MoE causal LM from its config (tied embeddings counted once)."""
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    D, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    hd = getattr(c, "head_dim", None) or D // c.num_attention_heads
    q, k = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn = D * q + 2 * D * k + q * D + 2 * hd  # q, k, v, o projections + q_norm, k_norm
    if getattr(c, "num_experts", 0):
        mlp = c.num_experts * 3 * D * c.moe_intermediate_size + D * c.num_experts  # experts + router
    else:
        mlp = 3 * D * c.intermediate_size
    per_layer = attn + mlp + 2 * D  # + the two RMSNorms
    emb = V * D * (1 if c.tie_word_embeddings else 2)
    return L * per_layer + emb + D  # + the final norm


def activation_bytes_per_token(config, dtype_bytes: int, grad_ckpt: bool) -> int:
    """Bytes kept for backward per token of a training micro-batch (module docstring's table)."""
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    b, D, L = dtype_bytes, c.hidden_size, c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or D // c.num_attention_heads
    q, k = c.num_attention_heads * hd, c.num_key_value_heads * hd
    inter = c.moe_intermediate_size * c.num_experts_per_tok if getattr(c, "num_experts", 0) else c.intermediate_size
    layer = 2 * (4 + b) * D + (4 + b) * (q + k) + b * (2 * q + 2 * k) + 4 * b * inter
    head = (4 + b) * D  # final norm
    if grad_ckpt:
        return L * b * D + layer + head  # every layer's input + one layer recomputed at a time
    return L * layer + head


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """KV cache bytes per token of one sampled row: K and V for every layer."""
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * hd * dtype_bytes


def configure_cuda_allocator() -> None:
    """Ask PyTorch's CUDA allocator for expandable segments (issue 10), unless the user configured
    it: a step alternates a long sampling phase (KV caches of every size) with training (activation
    blocks of every size); fixed-size segments fragment, and the plan's budgets assume the free
    memory is usable. Call before the first CUDA allocation (train.py / eval.py main do); later,
    the runtime setting is tried instead. No effect on CPU."""
    if not torch.cuda.is_available() or any(k in os.environ for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        return
    if torch.cuda.is_initialized():
        setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
        if setter is not None:
            setter("expandable_segments:True")
        return
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    # torch 2.9 renamed the variable (the old name still works there, with a deprecation warning)
    os.environ["PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def head_backward_bytes(config, chunk: int = 1024) -> int:
    """Peak bytes of the output head's backward over one chunk (module docstring, "head")."""
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return 5 * chunk * c.vocab_size * 4 + c.vocab_size * c.hidden_size * 4


def sample_rows_that_fit(config, free_bytes: int, row_tokens: int, *, dtype_bytes: int = 2, group: int = 1, tp: int = 1) -> int:
    """Rows whose full-length KV cache (row_tokens each) and the sampler's per-step fp32 (rows, V)
    buffers (logits, log-softmax, uniforms, ...) fit in free_bytes; whole groups of `group` rows
    when at least one fits. Used by plan() and by eval.py (which has no plan: free memory)."""
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    per_row = row_tokens * (kv_bytes_per_token(c, dtype_bytes) // tp) + 5 * 4 * c.vocab_size
    fit = max(0, free_bytes) // per_row
    return fit // group * group if fit >= group else fit


@dataclass
class Plan:
    """The estimate (bytes) and the budgets chosen from it. See the module docstring."""

    n_params: int
    dtype_bytes: int
    states: str
    grad_ckpt: bool
    gpu_bytes: int
    weights: int
    grads: int
    optimizer: int
    act_per_token: int
    logits: int
    kv_per_token: int
    reserve: int
    vocab: int
    rows: int  # rollouts per step (on this GPU)
    row_tokens: int  # prompt + new tokens of the longest row
    micro_batch_tokens: int  # chosen: padded tokens per training micro-batch
    sample_rows: int  # worst case: rows whose full-length KV cache fits at once (whole groups)
    group: int  # rows of one prompt
    offload: bool = True  # AdamW state in CPU memory while sampling
    kv_tokens: int = 0  # chosen: the sampler's KV pool, tokens
    notes: list[str] = field(default_factory=list)

    @property
    def fixed_train(self) -> int:
        return self.weights + self.grads + self.optimizer + self.logits + self.reserve

    @property
    def fixed_sample(self) -> int:  # grads are freed (zero_grad(set_to_none)) before sampling; AdamW offloaded
        return self.weights + (0 if self.offload else self.optimizer) + self.reserve

    @property
    def sampler_buffers(self) -> int:  # the sampler's per-row (rows, V) buffers, all rows live
        return self.rows * SAMPLER_BYTES_PER_VOCAB * self.vocab

    def table(self) -> str:
        g = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
        mb_act = self.micro_batch_tokens * self.act_per_token
        kv = self.kv_tokens * self.kv_per_token
        size = f"{self.n_params / 1e9:.2f}B" if self.n_params >= 1e8 else f"{self.n_params / 1e6:.1f}M"
        lines = [
            f"memory plan ({size} params, {self.dtype_bytes} B/param weights, optimizer states {self.states}, "
            f"grad ckpt {'on' if self.grad_ckpt else 'off'}, {self.gpu_bytes / GiB:.1f} GiB per device)",
            f"  weights      {g(self.weights)}",
            f"  grads        {g(self.grads)}   (fp32 sums over the micro-batches)",
            f"  optimizer    {g(self.optimizer)}   ({optimizer_bytes_per_param(self.dtype_bytes, self.states)} B/param)",
            f"  reserve      {g(self.reserve)}   (CUDA context, allocator slack)",
            f"  head chunk   {g(self.logits)}   (backward of one output-head chunk)",
            f"  activations  {g(mb_act)}   ({self.act_per_token / 2**10:.1f} KiB/token x {self.micro_batch_tokens} tokens per micro-batch)",
            f"  = training peak {g(self.fixed_train + mb_act)}",
            f"  KV cache     {g(kv)}   ({self.kv_per_token / 2**10:.1f} KiB/token x {self.kv_tokens} tokens: the sampler's paged pool; "
            f"optimizer {'in CPU memory' if self.offload else 'resident'} while sampling)",
            f"  sampler bufs {g(self.sampler_buffers)}   ({self.rows} rows x {SAMPLER_BYTES_PER_VOCAB} B x {self.vocab} vocab)",
            f"  = sampling peak {g(self.fixed_sample + kv + self.sampler_buffers)}",
            f"  budget: micro-batch {self.micro_batch_tokens} tokens; KV {self.kv_tokens} tokens = {self.sample_rows} of {self.rows} rows "
            f"at the worst case ({self.row_tokens} tokens each), more when responses are shorter (continuous batching)",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def plan(
    config,
    *,
    gpu_bytes: int,
    dtype_bytes: int = 2,
    states: str = "fp32",
    grad_ckpt: bool = True,
    rows: int = 256,
    prompt_len: int = 256,
    new_tokens: int = 8192,
    group: int = 8,
    micro_batch_rows: int | None = None,
    chunk: int = 1024,
    shards: int = 1,
    tp: int = 1,
    n_params: int | None = None,
    reserve: int = 2 * GiB,
    act_fraction: float = 0.75,
    offload: bool = True,
) -> Plan:
    """The memory plan for one GPU (module docstring); budgets fill what the fixed parts leave.

    rows: rollouts this GPU samples and trains on per step (B x G, or its data-parallel share).
    micro_batch_rows: train.py's --micro-batch cap: a micro-batch never holds more than this
    many full-length rows, so the token budget is at most that.
    prompt_len + new_tokens: the longest row. shards: weights / grads / optimizer states are
    split over this many GPUs (FSDP world or TP degree; 1 on one GPU; FSDP keeps the embedding and
    head whole, so this is a slight underestimate there). tp: the KV cache is split over the TP
    degree (its heads are). n_params: the real count
    (default: from the config). act_fraction: share of the free memory given to activations.
    offload: AdamW's state goes to CPU memory while sampling (train.py on one GPU; False keeps
    it resident, e.g. under FSDP / TP).
    """
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = n_params if n_params is not None else count_params(c)
    weights = n * dtype_bytes // shards
    grads = n * 4 // shards  # fp32 sums (memory.AdamW), also for bf16 weights
    optimizer = n * optimizer_bytes_per_param(dtype_bytes, states) // shards
    act = activation_bytes_per_token(c, dtype_bytes, grad_ckpt)
    logits = head_backward_bytes(c, chunk)
    kv = kv_bytes_per_token(c, dtype_bytes) // tp  # TP splits the KV heads
    row_tokens = prompt_len + new_tokens
    p = Plan(n, dtype_bytes, states, grad_ckpt, gpu_bytes, weights, grads, optimizer, act, logits, kv, reserve, c.vocab_size, rows, row_tokens, 0, 0, group, offload)
    free_train = gpu_bytes - p.fixed_train
    p.micro_batch_tokens = max(0, int(act_fraction * free_train) // act)
    if micro_batch_rows is not None:
        p.micro_batch_tokens = min(p.micro_batch_tokens, micro_batch_rows * row_tokens)
    if p.micro_batch_tokens < row_tokens:
        p.notes.append(f"a micro-batch of {p.micro_batch_tokens} tokens holds less than one {row_tokens}-token row: lower --max-new-tokens or shard (--fsdp)")
    p.kv_tokens = max(0, gpu_bytes - p.fixed_sample - p.sampler_buffers) // kv
    fit = p.kv_tokens // row_tokens  # rows whose full-length KV cache fits
    p.sample_rows = min(rows, fit // group * group if fit >= group else fit)
    if p.kv_tokens < row_tokens:
        p.notes.append(f"the KV budget ({p.kv_tokens} tokens) holds less than one {row_tokens}-token row: lower --max-new-tokens")
    return p


def lognormal_lengths(rows: int, *, median: float, sigma: float, cap: int, seed: int = 0) -> list[int]:
    """Response lengths ~ lognormal(log median, sigma), capped at `cap` tokens (at least 1): a
    stand-in for a reasoning model's length distribution (median 1.5K, sigma 0.75: mean ~2K)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(median) + sigma * torch.randn(rows, generator=g, dtype=torch.float64))
    return x.round().clamp(1, cap).long().tolist()


def concurrent_rows(p: Plan, lengths: list[int], *, prompt_len: int, page_size: int = 16) -> dict:
    """The schedule rollout.py's engine gets on this plan's KV budget for these response lengths
    (rows prompt-major, `p.group` per prompt), simulated without a model (rollout.simulate).
    Returns its stats plus the ideal decode calls, the lower bound
        max(longest, total tokens / rows, KV token-steps / KV budget)
    (every call decodes at most all rows, and at most kv_tokens tokens of context in all)."""
    import rollout

    n, B = p.group, len(lengths) // p.group
    T = p.row_tokens - prompt_len
    st = rollout.simulate([prompt_len] * B, n, lengths, T, num_pages=p.kv_tokens // page_size, page_size=page_size, max_rows=len(lengths))
    L = [min(x, T) for x in lengths]
    kv_steps = sum(prompt_len * x + x * (x - 1) // 2 for x in L)  # context tokens held, summed over decode steps
    ideal = max(max(L) - 1, math.ceil((sum(L) - len(L)) / len(L)), math.ceil(kv_steps / max(1, p.kv_tokens)))
    mean_live = st["decode_rows"] / max(1, st["decode_calls"])
    return dict(st, ideal_decode_calls=ideal, ratio_to_ideal=st["decode_calls"] / max(1, ideal), mean_live_rows=mean_live,
                mean_length=sum(L) / len(L), longest=max(L))  # fmt: skip


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="print the memory plan for one GPU (no weights are built)")
    ap.add_argument("--model", default="random:Qwen/Qwen3-4B-Instruct-2507", help='"random:<hub id>" of model.REAL_CONFIGS, or a local HF directory')
    ap.add_argument("--gpu-gib", type=float, default=79.6, help="GPU memory in GiB as torch reports it (an H100 80GB: 79.6, an H200: 139.8)")
    ap.add_argument("--states", default="fp32", choices=AdamW.STATES, help="optimizer states: fp32 master + moments, or in the param dtype")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="plan without gradient checkpointing")
    ap.add_argument("--rows", type=int, default=256, help="rollouts per step (B x G)")
    ap.add_argument("--new-tokens", type=int, default=8192, help="max new tokens per rollout")
    ap.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (padded)")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    ap.add_argument("--keep-optim-on-gpu", action="store_true", help="plan with AdamW's state resident while sampling (default: offloaded to CPU)")
    ap.add_argument("--median-len", type=float, default=1500, help="median response length of the simulated lognormal distribution, tokens")
    ap.add_argument("--sigma", type=float, default=0.75, help="sigma of the lognormal (0.75 with median 1.5K: mean ~2K tokens)")
    a = ap.parse_args()
    if a.model.startswith("random:"):
        import model as model_lib
        from transformers import AutoConfig

        kw = model_lib._rope(model_lib.REAL_CONFIGS[a.model.split(":", 1)[1]])
        cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(a.model)
    p = plan(cfg, gpu_bytes=int(a.gpu_gib * GiB), states=a.states, grad_ckpt=not a.no_grad_ckpt, rows=a.rows, prompt_len=a.prompt_len,
             new_tokens=a.new_tokens, group=a.group, offload=not a.keep_optim_on_gpu)  # fmt: skip
    print(p.table())
    if p.kv_tokens >= p.row_tokens:
        lens = lognormal_lengths(a.rows, median=a.median_len, sigma=a.sigma, cap=a.new_tokens)
        st = concurrent_rows(p, lens, prompt_len=a.prompt_len)
        print(f"  schedule (lognormal lengths, median {a.median_len:.0f}, sigma {a.sigma}, capped at {a.new_tokens}: mean {st['mean_length']:.0f}, "
              f"longest {st['longest']}): up to {st['max_live_rows']} rows decoding at once (the KV holds {p.kv_tokens // (a.prompt_len + round(st['mean_length']))} "
              f"at the mean length), {st['mean_live_rows']:.0f} on average over decode calls (the long tail runs alone), "
              f"{st['decode_calls']} decode calls = {st['ratio_to_ideal']:.2f}x the ideal {st['ideal_decode_calls']}, {st['preemptions']} preemptions")
