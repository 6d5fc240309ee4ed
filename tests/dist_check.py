"""dist_check.py: TP and FSDP2 against one process, on the tiny model, under torchrun (gloo on CPU).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 tests/dist_check.py OUT.json

tests/test_dist.py runs it. Every rank also builds the plain single-process model from the same
seed, so the reference is computed in the same process. For each mode it checks, on one
fixed batch (ragged prompts and responses, random advantages):
  - the loss (token-mean over ALL ranks' tokens) and the gradient norm against one process on
    the whole batch, with gradient checkpointing on (the reference without); FSDP gets a different share of rows per rank and a small head chunk, so
    the ranks make different numbers of head calls (the case that forced the replicated head);
  - every gradient after clipping, gathered, against the reference's;
  - the weights after one memory.AdamW step;
  - sampling: the sampler's tokens on the parallel model equal the plain model's;
  - the checkpoint: save_model writes an HF directory that AutoModelForCausalLM loads with
    exactly the stepped weights; the optimizer state survives a torch.distributed.checkpoint round trip.
Rank 0 writes the largest differences to OUT.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import antisd  # noqa: E402
import dist as dist_lib  # noqa: E402
import memory  # noqa: E402
import model as model_lib  # noqa: E402
from rollout import sample  # noqa: E402

torch.set_num_threads(1)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 500, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    lengths = torch.tensor([9, 2, 7, 5, 1, 8][:n])
    resp = torch.randint(3, 500, (n, int(lengths.max())), generator=g)
    adv = torch.randn(n, int(lengths.max()), generator=g)
    return prompts, resp, lengths, adv


def loss_and_backward(m, prompts, resp, lengths, adv, num_tokens, batches, chunk, D=dist_lib.Dist(), opt=None):
    total = 0.0
    for rows in batches:
        idx = torch.tensor(rows) if isinstance(rows, list) else rows  # memory.micro_batches' index lists (or a slice)
        Tm = int(lengths[idx].max())
        logp, _ = model_lib.response_logprobs(m, [prompts[i] for i in rows] if isinstance(rows, list) else prompts[idx], resp[idx, :Tm], lengths[idx], chunk_size=chunk)
        mask = antisd.mask_from_lengths(lengths[idx], Tm)
        loss = antisd.policy_loss(logp, logp.detach(), adv[idx, :Tm], mask, num_tokens=num_tokens)
        dist_lib.backward(loss, m, D, opt)
        total += loss.item()
    return total


def check(mode, D, out_dir):
    D.mode = mode
    ref, tok = model_lib.load("tiny", seed=0)
    ref.train()
    prompts, resp, lengths, adv = batch()
    N = len(prompts)
    num_tokens = int(lengths.sum())
    ref_loss = loss_and_backward(ref, prompts, resp, lengths, adv, num_tokens, [slice(0, N)], 1024)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5 * ref_norm)  # clipping binds: the scaled grads are checked too
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_opt = memory.AdamW(ref.named_parameters(), lr=1e-2, eps=1e-3)  # (a large eps: near-zero grads would turn rounding into sign flips)
    ref_opt.step()

    m, _ = model_lib.load("tiny", seed=0)
    m = dist_lib.parallelize(m, tok, D, scratch=os.path.join(out_dir, "scratch"))
    dist_lib.enable_grad_ckpt(m)  # after wrapping, as train.py does (recomputation must not change anything)
    m.train()
    # data: TP = every row on every rank; FSDP = rank 0 rows 0-1 (short), rank 1 rows 2-5, head chunks of 3 positions
    rows = list(range(N)) if mode == "tp" else ([0, 1] if D.rank == 0 else [2, 3, 4, 5])
    p_loc, r_loc, l_loc, a_loc = [prompts[i] for i in rows], resp[rows], lengths[rows], adv[rows]
    batches = memory.micro_batches([len(p) for p in p_loc], l_loc.tolist(), max_rows=2)
    batches = memory.split_to(batches, D.max(len(batches)))
    loss = D.sum(loss_and_backward(m, p_loc, r_loc, l_loc, a_loc, D.sum(int(l_loc.sum())), batches, 3 if mode == "fsdp" else 1024, D))
    dist_lib.sync_replicated_grads(m, D)
    norm = dist_lib.clip_grad_norm_(m.parameters(), 0.5 * ref_norm)
    grad_diff = max(float((full(p.grad) - ref_grads[n]).abs().max()) for n, p in m.named_parameters())
    opt = memory.AdamW(m.named_parameters(), lr=1e-2, eps=1e-3)
    opt.step()
    R = dict(ref.named_parameters())
    stepped = {n: full(p.detach()).clone() for n, p in m.named_parameters()}
    weight_diff = max(float((stepped[n] - R[n].detach()).abs().max()) for n in stepped)

    # sampling with the stepped weights: the same tokens as the plain model (FSDP: unsharded once)
    m.eval()
    ref.eval()
    kw = dict(n=2, max_new_tokens=6, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    with dist_lib.unsharded(m):
        a = sample(m, prompts[:2], generator=torch.Generator().manual_seed(5 + D.dp_rank), **kw)
    b = sample(ref, prompts[:2], generator=torch.Generator().manual_seed(5 + D.dp_rank), **kw)
    D.check_same(a.tokens, "tokens")
    same_tokens = bool(torch.equal(a.tokens, b.tokens))

    # checkpoint: HF directory on rank 0, optimizer shards through torch.distributed.checkpoint
    path = os.path.join(out_dir, f"ckpt-{mode}")
    dist_lib.save_model(m, tok, path, D)
    dist_lib.save_optimizer(opt, path, D)
    saved = {n: full(s["exp_avg_sq"]).clone() for n, s in opt.state.items()}
    for s in opt.state.values():
        s["exp_avg_sq"].zero_()
    dist_lib.load_optimizer(opt, path, None, D)
    optim_diff = max(float((full(s["exp_avg_sq"]) - saved[n]).abs().max()) for n, s in opt.state.items())
    ckpt_diff = None
    if D.is_main:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(path)
        L = dict(loaded.named_parameters())
        ckpt_diff = max(float((L[n].detach() - stepped[n]).abs().max()) for n in stepped)  # exactly what was trained
    # host-side results (grades) from rank 0 alone under TP; each rank's own otherwise
    from_main = D.from_main(lambda: D.rank)
    return dict(from_main=from_main, loss=loss, ref_loss=ref_loss, grad_norm=norm, ref_grad_norm=ref_norm, grad_diff=grad_diff, weight_diff=weight_diff,
                same_tokens=same_tokens, optim_roundtrip_diff=optim_diff, ckpt_diff=ckpt_diff)  # fmt: skip


def check_bf16(mode, D, out_dir):
    """TP / FSDP with bf16 weights, as on a GPU: memory.AdamW's fp32 gradient sums (its post-accumulate
    hooks registered before the first forward, as train.py does) over several micro-batches, against
    one process on the whole batch. TP: the q_norm / k_norm gradients are partial per rank and summed by
    transformers' TP hook; the optimizer must take them only after that sum (dist.hold_replicated_grads):
    taking them first gave half-sized (5.17: the hook then sees no grad) or crashing (5.24) sums.
    FSDP: each rank its own rows; FSDP2 runs the hooks on the sharded grads after its reduce-scatter, the
    whole embedding / head / final norm are summed by sync_replicated_grads from the fp32 sums."""
    D.mode = mode
    prompts, resp, lengths, adv = batch()
    N = len(prompts)
    num_tokens = int(lengths.sum())
    ref, tok = model_lib.load("tiny", seed=0, dtype=torch.bfloat16)
    ref.train()
    ref_opt = memory.AdamW(ref.named_parameters(), lr=1e-2)
    loss_and_backward(ref, prompts, resp, lengths, adv, num_tokens, memory.micro_batches([len(p) for p in prompts], lengths.tolist(), max_rows=2), 1024)
    ref_g = {n: ref_opt.grad(n).clone() for n in ref_opt.params}
    m, _ = model_lib.load("tiny", seed=0, dtype=torch.bfloat16)
    m = dist_lib.parallelize(m, tok, D, scratch=os.path.join(out_dir, f"scratch-bf16-{mode}"))
    m.train()
    opt = memory.AdamW(m.named_parameters(), lr=1e-2)
    dist_lib.hold_replicated_grads(opt, m, D)
    rows = list(range(N)) if mode == "tp" else ([0, 1] if D.rank == 0 else [2, 3, 4, 5])
    p_loc, r_loc, l_loc, a_loc = [prompts[i] for i in rows], resp[rows], lengths[rows], adv[rows]
    batches = memory.split_to(memory.micro_batches([len(p) for p in p_loc], l_loc.tolist(), max_rows=2), D.max(2))
    loss_and_backward(m, p_loc, r_loc, l_loc, a_loc, num_tokens, batches, 1024, D, opt=opt)
    dist_lib.sync_replicated_grads(m, D, opt)
    rel = {}
    for n in ref_g:  # the same order on every rank (full() of a sharded grad is a collective)
        g = full(opt.grad(n)).float()
        rel[n] = float((g - ref_g[n]).norm() / ref_g[n].norm().clamp_min(1e-12))
    worst = max(rel, key=rel.get)
    qk = [v for k, v in rel.items() if "q_norm" in k or "k_norm" in k]
    return dict(max_rel_grad_err=rel[worst], worst_param=worst, qk_norm_rel_err=max(qk),
                grads_fp32=all(full(opt.grad(n)).dtype == torch.float32 for n in opt.params))


if __name__ == "__main__":
    out = sys.argv[1]
    D = dist_lib.setup(fsdp=True)  # the process group; check() switches the mode
    res = {mode: check(mode, D, os.path.dirname(os.path.abspath(out))) for mode in ("tp", "fsdp")}
    res["same_tokens_all_ranks"] = D.gather_object({k: v["same_tokens"] for k, v in res.items()})
    res["from_main_all_ranks"] = D.gather_object({k: v["from_main"] for k, v in res.items() if isinstance(v, dict) and "from_main" in v})
    for mode in ("tp", "fsdp"):
        res[f"{mode}_bf16"] = check_bf16(mode, D, os.path.dirname(os.path.abspath(out)))
    from transformers.utils import is_accelerate_available

    res["accelerate_available"] = is_accelerate_available()  # test_dist.py hides it: TP must not need it
    if D.is_main:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    dist_lib.teardown(D)
