"""model.py: loading models, the offline `tiny` world, and exact response scoring.

What this file owns
-------------------
1. `load(name)`: any Hugging Face causal LM by hub id or local directory, plus two
   presets that need no network:
     - "tiny": a few-M-parameter Qwen3 with a byte-level BPE tokenizer built in code
       (vocabulary: the 256 byte symbols + whole-word merges for the words of the CPU lab
       and of the teacher prompt), a ChatML chat template, and distinct pad / EOS tokens.
       Saved with `save_pretrained` it is an ordinary checkpoint that
       `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load.
     - "random:<hub id>": the real architecture of Qwen3-4B-Instruct-2507, Qwen3-8B or
       Qwen3-30B-A3B with random weights (configs written below), for benchmarks at real
       size. Its tokenizer is the tiny one (token ids are all < 151k, so that is fine for
       timing; nobody reads the text of a random model).
2. `response_logprobs(...)`: the log-probability of each *given* response token under the
   temperature-scaled next-token distribution, and optionally that distribution's entropy.

   AntiSD's signal is the difference of two such scores of the same tokens under two
   prompts (u_t = log pi(y_t | x, c, y_<t) - log pi(y_t | x, y_<t)), so an off-by-one
   here would train on noise without crashing. The layout, for a row with prompt length
   P and response length L (prompts are LEFT-padded so every response starts at the
   same column Lp = max prompt length):

       column:   0 .. Lp-P-1 | Lp-P .. Lp-1 | Lp .. Lp+L-1 | Lp+L .. Lp+T-1
       content:  pad          | prompt       | response     | pad
       logits at column c predict the token at column c+1, so response token j is
       scored by the hidden state at column Lp-1+j.

   Only the sum(lengths) real response positions go through the output head (never prompt
   or padding positions), flattened across rows, `chunk_size` positions per head call, so
   memory never holds (N, L, V) logits (with V = 151,936 and T = 4096 that would be 2.5 GB
   per row in fp32), only (chunk_size, V), whatever N and T are. Log-softmax and entropy are
   taken in fp32 whatever the model dtype (SPEC section 1 step 6).
3. `shared_prefix_logprobs(...)`: the same scores under no_grad, with each DISTINCT prompt
   computed once (issue 12). AntiSD's teacher prompts repeat within a group: rollout i's is
   problem + one correct peer of its group + a feedback line that depends only on i's own
   correctness, so a group of G has at most 2 x (correct rollouts) distinct teacher prompts,
   often 2-4 (and the G student prompts of a group are one). Each distinct prompt runs once
   with a KV cache (as the sampler's prefill does); every row then runs only its response
   tokens on top of its prompt's cache. Exact: the same numbers as `response_logprobs` up to
   float rounding (tests/test_model.py compares them on ragged rows).

Shapes: N rows, P prompt length, T response length (padded), V vocabulary, D hidden.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.utils.checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

# ---------------------------------------------------------------------------------------
# The tiny tokenizer: byte-level BPE (like Qwen's and GPT-2's) so any text round-trips
# exactly, with whole-word merges for the words the lab and the teacher prompt use, so
# those are single tokens and sequences stay short.
# ---------------------------------------------------------------------------------------

PAD, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [PAD, IM_START, EOS, THINK, END_THINK]

# The tokenizer is a real byte-level BPE *trained* (in ~5 ms, deterministically) on a tiny
# corpus of the words the lab and the teacher prompt use, so those words become single
# tokens (with and without a leading space) and sequences stay short; anything else still
# round-trips exactly through the 256 byte symbols.
_WORDS = (
    "Which pair sums to Let me check each try them Wait double So the answer is The Maybe "
    "yes no not it Yes No Your previous attempt Previous assessment correct incorrect Now "
    "solve this problem step by Solve following math Place final in user assistant system "
    "boxed Alternatively holds Given Therefore first second third and or of "
    "a an as at be for if on that then with we you I right wrong need A B C D E F G H"
).split() + [str(i) for i in range(31)]
_SNIPPETS = ["\\boxed{A}.", "\\boxed{B},", "A: 4 + 9 = 13, yes.", "B: 2 7, C: 5 5?", "\n\n", "\n", "!"]
TINY_VOCAB_SIZE = 700  # BPE target size before the special tokens (the trainer stops earlier if it runs out of pairs)


# The chat template: ChatML as Qwen uses it. `enable_thinking=False` appends an empty think
# block to the generation prompt, exactly as Qwen3's template does, so code written for
# thinking models runs unchanged on the tiny one.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer built in code (no files, no network, a few ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [v for w in _WORDS for v in (w, " " + w, "\n" + w)] * 3 + _SNIPPETS * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 byte symbols: nothing is unknown
    )  # fmt: skip
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


# ---------------------------------------------------------------------------------------
# Model configs. The real ones are copied from the models' config.json on the hub so that
# `random:` benchmarks run the exact shapes without downloading anything.
# ---------------------------------------------------------------------------------------

TINY_CONFIG = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rope_theta=10000.0,
    tie_word_embeddings=False, rms_norm_eps=1e-6, initializer_range=0.02,
)  # fmt: skip

REAL_CONFIGS = {
    "Qwen/Qwen3-4B-Instruct-2507": dict(
        model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=262144, rope_theta=5000000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
    ),
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False,
        rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
    ),
    "Qwen/Qwen3-30B-A3B": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
        tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
    ),
}  # fmt: skip


def _rope(kw: dict) -> dict:
    """transformers 5.x takes rope settings as `rope_parameters`; keep the hub-style key above."""
    kw = dict(kw)
    theta = kw.pop("rope_theta")
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return kw


def tiny_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> Qwen3Config:
    kw = _rope({**TINY_CONFIG, **overrides})
    return Qwen3Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **kw,
    )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(name: str, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None, seed: int = 0, **from_pretrained_kw):
    """Return (model, tokenizer) for a preset, a local directory, or a hub id.

    name: "tiny" | "random:<hub id in REAL_CONFIGS>" | local dir | hub id.
    dtype: default fp32 for "tiny" and on CPU, bf16 on GPU otherwise.
    seed: initialises the random weights of the presets (the same seed gives the same model).
    Extra keyword arguments go to `from_pretrained` (e.g. distributed_config for tensor parallel).
    """
    device = torch.device(device) if device is not None else _default_device()
    if dtype is None:
        dtype = torch.float32 if (name == "tiny" or device.type == "cpu") else torch.bfloat16
    if name == "tiny" or name.startswith("random:"):
        tok = build_tiny_tokenizer()
        if name == "tiny":
            config = tiny_config(tok)
        else:
            hub_id = name.split(":", 1)[1]
            if hub_id not in REAL_CONFIGS:
                raise ValueError(f"load: unknown random preset {name!r}; known: {', '.join('random:' + k for k in REAL_CONFIGS)}")
            from transformers import AutoConfig

            kw = _rope(REAL_CONFIGS[hub_id])
            model_type = kw.pop("model_type")
            config = AutoConfig.for_model(model_type, **kw)
            config.pad_token_id = tok.pad_token_id  # tiny tokenizer ids are valid in a 151k vocabulary
        torch.manual_seed(seed)  # NOTE: reseeds the global RNG; presets are for tests and benchmarks
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        return model.eval(), tok
    # A local directory or a hub id. Local paths are checked first: a missing or empty directory
    # is a clear error, not a confusing hub lookup ("Repo id must be in the form ...").
    check_local(name)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:  # not on the hub (or offline) and no such local directory either
        raise FileNotFoundError(f"load: {name!r} is no local directory, and loading it from the hub failed: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:  # e.g. Llama-style tokenizers; never reuse EOS as pad (SPEC section 5)
        raise ValueError(f"load: tokenizer of {name!r} has no pad token; add one before training")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **from_pretrained_kw)
    if "distributed_config" not in from_pretrained_kw:  # (device_map= would need `accelerate`)
        model = model.to(device)
    return model.eval(), tok


def check_local(name: str) -> None:
    """Raise ValueError for an unknown random:<hub id> preset; FileNotFoundError when `name`
    is meant as a local model directory (an existing directory, or a path a hub id cannot be:
    more than one "/", or starting with . / ~, or "dir/name" whose dir is a directory here, e.g.
    runs/x) and is not one with a config.json. Hub ids ("org/name") and the presets pass."""
    if name.startswith("random:") and name.split(":", 1)[1] not in REAL_CONFIGS:
        raise ValueError(f"load: unknown random preset {name!r}; known: {', '.join('random:' + k for k in REAL_CONFIGS)}")
    if name == "tiny" or name.startswith("random:"):
        return
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise FileNotFoundError(f"load: {name!r} is a directory but not a model (no config.json in it)")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and os.path.isdir(name.split("/")[0])):
        raise FileNotFoundError(f"load: model directory {name!r} does not exist")


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's (Qwen3's lists
    151645 <|im_end|> and 151643 <|endoftext|>). Training and evaluation both stop on these (issue
    10: training once stopped on the tokenizer's alone, so a row ending in <|endoftext|> ran on to
    the length cap and scored 0)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    ids.discard(None)
    return sorted(ids)


def save(model, tokenizer, path: str) -> None:
    """HF-format checkpoint (safetensors) from the raw module, never a compiled/wrapped one."""
    raw = getattr(model, "_orig_mod", model)  # torch.compile wraps; save the underlying module
    raw.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


# ---------------------------------------------------------------------------------------
# Batching helpers shared with the sampler.
# ---------------------------------------------------------------------------------------


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists. Returns ids (N, P) and an attention mask (N, P) built from lengths."""
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # (N,)
    if (lens == 0).any():
        raise ValueError("left_pad: empty prompt (every prompt needs at least one token)")
    P = int(lens.max())
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
    mask = torch.arange(P)[None, :] >= (P - lens)[:, None]  # (N, P) True on real tokens
    return ids.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (N, L) counting real tokens only: a left-padded row starts at 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _decoder_and_head(model):
    """The transformer body (returns hidden states) and the output head of a causal LM."""
    raw = getattr(model, "_orig_mod", model)
    return getattr(raw, raw.base_model_prefix), raw.get_output_embeddings()


# ---------------------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------------------


def _chunk_scores(head, h: torch.Tensor, tgt: torch.Tensor, temperature: float, with_entropy: bool):
    """One chunk of positions through the head, in fp32. h (c, D), tgt (c,) -> logp (c,), entropy (c,) or None.

    logp = log softmax(head(h) / temperature)[tgt]; entropy of that distribution is
    lse - sum_v p_v * z_v (z the scaled logits), a statistic (the gate's), never differentiated.
    """
    z = head(h).float() / temperature  # (c, V)
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    logp = z.gather(-1, tgt[:, None]).squeeze(-1) - lse  # (c,)
    ent = None
    if with_entropy:
        with torch.no_grad():
            z, lse = z.detach(), lse.detach()
            ent = lse - (torch.exp(z - lse[:, None]) * z).sum(-1)  # (c,)
    return logp, ent


def response_logprobs(
    model,
    prompts: list[list[int]],
    responses: torch.Tensor,
    lengths: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (and entropies) of given response tokens under their own prompts.

    prompts:   N token-id lists of any lengths (left-padded here).
    responses: (N, T) long, right-padded; tokens at or beyond a row's length are ignored.
    lengths:   (N,) response lengths.
    chunk_size: positions per output-head call, over all rows together: the head never holds
        more than (chunk_size, V) logits, whatever N and T are.
    Returns logp (N, T) fp32 = log softmax(logits / temperature)[y_t], and entropy (N, T) fp32
    of that same distribution (or None); both exactly 0 at positions >= length.
    Gradients flow into logp when the caller has grad enabled (the policy loss uses this).
    """
    N, T = responses.shape
    assert len(prompts) == N and lengths.shape == (N,), (len(prompts), responses.shape, lengths.shape)
    assert temperature > 0, "response_logprobs: temperature must be > 0 (greedy has no log-probs)"
    assert chunk_size >= 1, chunk_size
    device = next(model.parameters()).device
    body, head = _decoder_and_head(model)
    pad_id = 0  # any id: padded positions are masked out of attention and out of the result
    p_ids, p_mask = left_pad(prompts, pad_id, device)  # (N, P)
    P = p_ids.shape[1]
    lengths = lengths.to(device)
    r_mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (N, T)
    r_ids = torch.where(r_mask, responses.to(device), torch.zeros_like(responses, device=device))
    ids = torch.cat([p_ids, r_ids], dim=1)  # (N, P+T)
    attn = torch.cat([p_mask, r_mask], dim=1)  # (N, P+T)
    hidden = body(input_ids=ids, attention_mask=attn.long(), position_ids=positions_from_mask(attn), use_cache=False).last_hidden_state
    # The hidden state at column c predicts column c+1: response token j <- column P-1+j.
    # Only the M = sum(lengths) real response positions go to the head (padding never does),
    # flattened across rows (row-major), chunk_size positions per call.
    h = hidden[:, P - 1 : P - 1 + T][r_mask]  # (M, D)
    tgt = r_ids[r_mask]  # (M,)
    # Under grad, autograd would keep every chunk's (c, V) logits alive for the backward pass,
    # which is the (M, V) tensor we avoid; checkpointing each chunk keeps only h and recomputes
    # that chunk's logits during backward.
    use_ckpt = torch.is_grad_enabled() and h.requires_grad
    logps, ents = [h.new_zeros(0, dtype=torch.float32)], [h.new_zeros(0, dtype=torch.float32)]
    for s in range(0, h.shape[0], chunk_size):
        args = (head, h[s : s + chunk_size], tgt[s : s + chunk_size], temperature, with_entropy)  # (c, D), (c,)
        if use_ckpt:
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_scores, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_scores(*args)
        logps.append(lp)  # (c,)
        ents.append(ent)
    zeros = torch.zeros(N, T, dtype=torch.float32, device=device)
    logp = zeros.masked_scatter(r_mask, torch.cat(logps))  # (N, T), exactly 0 at positions >= length
    ent = zeros.masked_scatter(r_mask, torch.cat(ents)) if with_entropy else None  # (N, T)
    return logp, ent


class _SharedPrefixLayer(DynamicLayer):
    """One layer's KV cache for shared_prefix_logprobs: U distinct prompts read by N rows.

    Two kinds of pass, set by `mode` before each forward (`sel`: which prompts / rows):
      "prompt"  a bucket of prompts (similar lengths, left-padded) writes its keys and values
                RIGHT-aligned into one (U, H, P, Dh) buffer, P the longest prompt, and attends
                within itself (get_seq_length() 0);
      "rows"    a bucket of responses attends to [its prompt | itself] (get_seq_length() P,
                which HF's mask builder needs: query j sits at cache position P + j); nothing
                is stored (no-grad scoring never reads it again), so at most one layer's
                expanded keys are alive at a time, as in a plain forward without a cache.
    Buffer columns left of a prompt are zeros and masked by the caller's 2D attention mask.
    """

    def __init__(self, n_prompts: int, width: int):
        super().__init__()
        self.U, self.W = n_prompts, width
        self.mode, self.sel = "prompt", None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        k, v, n = key_states, value_states, key_states.shape[-2]  # (b, H, n, D): this pass's columns
        if not self.is_initialized:
            self.device, self.is_initialized = k.device, True
            self.keys = k.new_zeros(self.U, k.shape[1], self.W, k.shape[3])  # (U, H, P, Dh)
            self.values = v.new_zeros(self.U, v.shape[1], self.W, v.shape[3])
        if self.mode == "prompt":
            self.keys[self.sel, :, self.W - n :], self.values[self.sel, :, self.W - n :] = k, v
            return k, v
        return torch.cat([self.keys.index_select(0, self.sel), k], dim=-2), torch.cat([self.values.index_select(0, self.sel), v], dim=-2)

    def get_seq_length(self) -> int:
        return 0 if self.mode == "prompt" else self.W


def _length_buckets(lens: list[int], *, call_tokens: int, min_len: int = 1) -> list[list[int]]:
    """Indices with lens >= min_len, longest first, cut into buckets that are each padded to
    their longest: the cut minimising (padded tokens + call_tokens per bucket), by dynamic
    programming over the sorted lengths. call_tokens is what one more forward call costs, in
    padded tokens: one batch of a 100- and a 1000-token item is mostly padding, but every call
    has a fixed cost (kernel launches, Python), so small differences stay in one bucket."""
    idx = sorted((i for i in range(len(lens)) if lens[i] >= min_len), key=lambda i: (-lens[i], i))
    n = len(idx)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)  # best[k]: cost of the first k items
    for k in range(1, n + 1):
        for j in range(k):  # the last bucket is items j..k-1, padded to the longest, lens[idx[j]]
            c = best[j] + call_tokens + (k - j) * lens[idx[j]]
            if c < best[k]:
                best[k], cut[k] = c, j
    out, k = [], n
    while k > 0:
        out.append(idx[cut[k] : k])
        k = cut[k]
    return out[::-1]


def prefix_sharing_ok(model) -> bool:
    """The shared-prefix path is used when every layer is full (causal) attention under sdpa or
    eager attention (Qwen3, Qwen3-MoE, Llama), as the sampler's fast path; other models
    (sliding-window layers, flash attention) are scored row by row, which is always exact."""
    cfg = getattr(model, "_orig_mod", model).config.get_text_config(decoder=True)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in layer_types) and cfg._attn_implementation in ("sdpa", "eager")


@torch.no_grad()
def shared_prefix_logprobs(
    model,
    prompts: list[list[int]],
    responses: torch.Tensor,
    lengths: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    call_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """response_logprobs under no_grad, with each distinct prompt computed once.

    prompts: N token-id lists; identical lists (equal ids) share one prompt pass.
    responses (N, T) right-padded, lengths (N,): as response_logprobs.
    Returns logp (N, T) fp32, entropy (N, T) fp32 or None (both exactly 0 at positions >=
    length), and the work: {"prompt_tokens": tokens of the distinct prompts (computed),
    "prompt_tokens_rows": tokens of all N prompts (what row-by-row scoring computes)}.

      1. the U distinct prompts run once into a KV cache, in buckets of similar length
         (_length_buckets, each left-padded to its own longest); the hidden state at each
         prompt's last token predicts response token 0;
      2. the N responses run on top, each row reading its own prompt's cache
         (_SharedPrefixLayer), position ids continuing from its prompt's real length, in
         buckets of similar length; the hidden state at response column j predicts token j+1,
         so the last column is not run;
      3. the M = sum(lengths) real positions through the head in chunks, as response_logprobs.
    call_tokens: the cost of one more forward call in padded tokens, for the buckets (default:
    128 on CPU, where a call of the tiny model costs ~7 ms ~ 150 of its tokens; 4096 on a GPU,
    where a call is launch-bound until thousands of tokens).
    Models the shared path does not cover (prefix_sharing_ok) get response_logprobs.
    """
    N, T = responses.shape
    assert len(prompts) == N and lengths.shape == (N,), (len(prompts), responses.shape, lengths.shape)
    assert temperature > 0 and chunk_size >= 1, (temperature, chunk_size)
    first: dict[tuple, int] = {}  # distinct prompt -> its index, in order of first appearance
    inv = [first.setdefault(tuple(p), len(first)) for p in prompts]  # N prompt indices
    work = {"prompt_tokens": sum(len(p) for p in first), "prompt_tokens_rows": sum(len(p) for p in prompts)}
    if not prefix_sharing_ok(model):
        logp, ent = response_logprobs(model, prompts, responses, lengths, temperature=temperature, with_entropy=with_entropy, chunk_size=chunk_size)
        return logp, ent, {**work, "prompt_tokens": work["prompt_tokens_rows"]}
    device = next(model.parameters()).device
    call_tokens = call_tokens if call_tokens is not None else (128 if device.type == "cpu" else 4096)
    body, head = _decoder_and_head(model)
    cfg = getattr(model, "_orig_mod", model).config.get_text_config(decoder=True)
    rows = torch.tensor(inv, dtype=torch.long, device=device)  # (N,) row -> prompt
    uniq = [list(p) for p in first]  # U distinct prompts
    if any(len(p) == 0 for p in uniq):
        raise ValueError("shared_prefix_logprobs: empty prompt (every prompt needs at least one token)")
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    plen = torch.tensor([len(p) for p in uniq], device=device)  # (U,)
    P = int(plen.max())
    p_mask = ar(P)[None, :] >= (P - plen)[:, None]  # (U, P) right-aligned prompts, from lengths
    cache = Cache(layers=[_SharedPrefixLayer(len(uniq), P) for _ in range(cfg.num_hidden_layers)])
    # transformers 5.24 renamed past_key_values= to cache= (the old name warns); 5.17-5.23 ignore cache=
    ckw = {"cache" if "cache" in inspect.signature(type(body).forward).parameters else "past_key_values": cache}
    # 1) the distinct prompts, once each, in buckets of similar length (each left-padded to its
    #    own longest); the hidden state at a prompt's last token predicts response token 0
    h_last = torch.zeros(len(uniq), cfg.hidden_size, dtype=next(body.parameters()).dtype, device=device)  # (U, D)
    for b in _length_buckets(plen.tolist(), call_tokens=call_tokens):
        ids, m = left_pad([uniq[j] for j in b], 0, device)  # (u, Pb); pad id masked out
        sel = torch.tensor(b, device=device)  # (u,)
        for layer in cache.layers:
            layer.mode, layer.sel = "prompt", sel
        out = body(input_ids=ids, attention_mask=m.long(), position_ids=positions_from_mask(m), use_cache=True, **ckw)
        h_last[sel] = out.last_hidden_state[:, -1]  # (u, D) left-padded: the last column is real
    lengths = lengths.to(device)
    r_mask = ar(T)[None, :] < lengths[:, None]  # (N, T)
    r_ids = torch.where(r_mask, responses.to(device), torch.zeros_like(responses, device=device))  # (N, T)
    # 2) the responses on top of their prompts, in buckets of similar length; the hidden state at
    #    response column j predicts token j+1 (column 0's is the prompt's last)
    hidden = torch.zeros(N, T, cfg.hidden_size, dtype=h_last.dtype, device=device)  # (N, T, D)
    hidden[:, :1] = h_last.index_select(0, rows)[:, None, :][:, :T]
    lens = lengths.tolist()
    for b in _length_buckets(lens, call_tokens=call_tokens, min_len=2):  # a 1-token response needs only column 0
        sel = torch.tensor(b, device=device)  # (n,) rows of this bucket
        Tb = lens[b[0]]  # its longest response; columns 0..Tb-2 are run
        for layer in cache.layers:
            layer.mode, layer.sel = "rows", rows[sel]  # each row's prompt
        attn = torch.cat([p_mask[rows[sel]], r_mask[sel, : Tb - 1]], dim=1)  # (n, P+Tb-1)
        pos = plen[rows[sel]][:, None] + ar(Tb - 1)[None, :]  # (n, Tb-1)
        out = body(input_ids=r_ids[sel, : Tb - 1], attention_mask=attn.long(), position_ids=pos, use_cache=True, **ckw)
        hidden[sel, 1:Tb] = out.last_hidden_state  # (n, Tb-1, D)
    # 3) the head over the real positions only, chunk_size at a time
    h, tgt = hidden[r_mask], r_ids[r_mask]  # (M, D), (M,)
    logps, ents = [h.new_zeros(0, dtype=torch.float32)], [h.new_zeros(0, dtype=torch.float32)]
    for s in range(0, h.shape[0], chunk_size):
        lp, ent = _chunk_scores(head, h[s : s + chunk_size], tgt[s : s + chunk_size], temperature, with_entropy)  # (c,), (c,)
        logps.append(lp)
        ents.append(ent)
    zeros = torch.zeros(N, T, dtype=torch.float32, device=device)
    logp = zeros.masked_scatter(r_mask, torch.cat(logps))  # (N, T)
    ent = zeros.masked_scatter(r_mask, torch.cat(ents)) if with_entropy else None  # (N, T)
    return logp, ent, work
