"""gate.py: the entropy-triggered gate that switches AntiSD's token term on and off (SPEC section 3).

Each step the caller reduces the teacher's full-vocabulary entropy over every valid
response token of the step's batch to one number,

    H = median_{i,t in mask} H_teacher(i, t)        (gate_statistic; nats)

and calls `lam = gate.update(H)` before computing that step's advantages. The gate is a
Schmitt trigger (a comparator with hysteresis):

    warmup   the first W = 5 steps: lam = 0, H recorded; then
             H_warm = median of the W warmup values, tau_down = ratio * H_warm (ratio 0.93)
    open     -> closed  when H < tau_down
    closed   -> open    only when H >= H_warm
    lam      = lam_max * g,  g = 1 if open else 0    (lam_max = 0.5)

The gate is open right after warmup [D]: the first post-warmup step is open unless its own H
is already below tau_down. The band [tau_down, H_warm) is the hysteresis: inside it the gate
keeps whatever state it had, so it does not chatter around one threshold.

Why: without the gate the paper's AntiSD run peaks early (step 30) and then collapses. The
gate switches the token term off when the teacher's entropy falls well below its warmup
level and back on only once it has fully recovered; the steps in between are plain GRPO.

Choices the paper leaves open [D]:
  - H_warm is the (true) median of the W warmup values; the statistic is a true median
    too (mean of the two middle values for an even count; torch.median would return the
    lower one).
  - Fallback: if H_warm < min_h_warm (1e-3 nats; a per-token median that collapsed to ~0,
    seen on very confident models) the statistic switches to the mean. The warmup values
    were medians, so the gate RE-RUNS the warmup on means (W more steps with lam = 0)
    rather than mix the two statistics. `gate.kind` tells the caller which statistic to
    pass next; the switch is printed once and visible as `gate.fell_back`. No second fallback.
  - always_open=True (the "no gate" ablation, and SD's "gate: none"): lam = lam_max from
    the first step, no warmup: the warmup only exists to calibrate the gate. For
    "warmup, then never close" use ratio=0.0 instead.
  - Continual AntiSD (from a GRPO checkpoint): build a fresh gate, or call recalibrate()
    on an existing one; both re-run the W-step warmup.
  - state_dict() is plain JSON-able python (config + state); load_state_dict() refuses a
    state saved with a different config, so a resumed run continues identically.

PerplexityGate (the authors' released recipe, `--recipe official`; README "Which AntiSD?")
replaces this gate with a per-response lambda from the teacher's perplexity of the response,
tppl_i = exp(-mean_t t_i,t) (antisd.teacher_perplexity):

    warm-up  the first W = 5 steps: lam = 0; record the step's mean tppl (if < 3) and the
             std of u over the step's valid tokens; then
             target   = max(0.93 * median(warm-up means), 1.01)
             sigma_ref = mean(warm-up u stds)       (antisd.u_clip zeroes |u| > 2 sigma_ref)
    lam_i    = clamp(0.1 * 2.0 * log(clamp(tppl_i / target, 0.5, 3.0)), 0, 0.5)
               = 0 where tppl_i > 3;  at most 0.2 log 3 ~ 0.22
    gate     Schmitt trigger on the mean tppl of the step's rows with tppl <= 3, decided at
             the start of each step from the PREVIOUS step's value: off when it fell below
             target, on again once it rose above 1.07 x the warm-up median. Off: every lam_i = 0.
"""

from __future__ import annotations

import copy
import math
import statistics

import torch

KINDS = ("median", "mean")


def gate_statistic(entropy: torch.Tensor, mask: torch.Tensor, kind: str = "median") -> float:
    """Median (true median: mean of the two middles when the count is even) or mean of
    entropy over the True entries of mask. entropy, mask: (N, T). Returns a python float.

    Call it on the WHOLE step's batch (all micro-batches, all ranks): the median of
    per-micro-batch medians is not the batch median.
    """
    assert entropy.shape == mask.shape, (entropy.shape, mask.shape)
    if kind not in KINDS:
        raise ValueError(f"gate_statistic: unknown kind {kind!r}; expected one of {KINDS}")
    x = entropy[mask].double()  # (M,) valid tokens only, fp64 for the reduction
    M = x.numel()
    if M == 0:
        raise ValueError("gate_statistic: mask selects no tokens")
    if kind == "mean":
        return float(x.mean())
    lo = x.kthvalue((M + 1) // 2).values  # the lower middle (1-indexed k)
    hi = x.kthvalue(M // 2 + 1).values  # the upper middle (== lo when M is odd)
    return float((lo + hi) / 2)


class EntropyGate:
    """Schmitt-trigger gate on the per-step teacher-entropy statistic; see the module docstring.

    warmup_steps: W, steps with lam = 0 used to calibrate H_warm (>= 1 unless always_open).
    ratio:        tau_down = ratio * H_warm (0.93 in the paper; 0.90 / 0.95 in its sweep).
    lam_max:      lambda while open (0.5 in the paper).
    kind:         the statistic to start with, "median" (paper) or "mean".
    always_open:  the no-gate ablation: lam = lam_max at every step, no warmup.
    min_h_warm:   below this H_warm (nats) switch the statistic to the mean and re-warm.

    Usage, once per step:
        h = gate_statistic(teacher_entropy, mask, kind=gate.kind)
        lam = gate.update(h)
    """

    def __init__(
        self,
        warmup_steps: int = 5,
        ratio: float = 0.93,
        lam_max: float = 0.5,
        *,
        kind: str = "median",
        always_open: bool = False,
        min_h_warm: float = 1e-3,
    ):
        if kind not in KINDS:
            raise ValueError(f"EntropyGate: unknown kind {kind!r}; expected one of {KINDS}")
        if warmup_steps < 1 and not always_open:
            raise ValueError("EntropyGate: warmup_steps must be >= 1 (H_warm needs at least one value)")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"EntropyGate: ratio must be in [0, 1], got {ratio}")
        # Config: fixed for the life of a run, checked on load.
        self.warmup_steps = int(warmup_steps)
        self.ratio = float(ratio)
        self.lam_max = float(lam_max)
        self.initial_kind = kind
        self.always_open = bool(always_open)
        self.min_h_warm = float(min_h_warm)
        # State: everything update() changes.
        self.step = 0  # update() calls so far
        self.kind = kind  # the statistic the caller must pass to the next update()
        self.warmup_values: list[float] = []  # H of the warmup steps of the current calibration
        self.h_warm: float | None = None  # None while warming up
        self.open = self.always_open
        self.fell_back = False  # True once the statistic switched to the mean
        self.lam = 0.0  # lambda returned by the last update()
        self.open_this_step = False  # the state the last update()'s step used (False on the step that ends the warm-up)

    @property
    def warming_up(self) -> bool:
        return not self.always_open and self.h_warm is None

    @property
    def tau_down(self) -> float | None:
        return None if self.h_warm is None else self.ratio * self.h_warm

    def update(self, h: float) -> float:
        """Feed this step's statistic (of kind `self.kind`); returns this step's lambda."""
        h = float(h)
        if not math.isfinite(h):
            raise ValueError(f"EntropyGate.update: statistic must be finite, got {h}")
        self.step += 1
        if self.always_open:
            self.open = True
        elif self.h_warm is None:  # warmup: record, lam = 0 this step
            self.warmup_values.append(h)
            if len(self.warmup_values) == self.warmup_steps:
                self._end_warmup()
            self.lam, self.open_this_step = 0.0, False
            return self.lam
        elif self.open and h < self.ratio * self.h_warm:
            self.open = False
        elif not self.open and h >= self.h_warm:
            self.open = True
        self.lam = self.lam_max if self.open else 0.0
        self.open_this_step = self.open
        return self.lam

    def _end_warmup(self) -> None:
        h_warm = statistics.median(self.warmup_values)  # true median of the W values
        if h_warm < self.min_h_warm and self.kind != "mean":
            # SPEC section 3 fallback. The recorded values are medians; recalibrate on means.
            print(
                f"[gate] step {self.step}: H_warm = {h_warm:.3g} nats < {self.min_h_warm:g} with the median "
                f"statistic; switching to the mean and re-running the {self.warmup_steps}-step warmup",
                flush=True,
            )
            self.kind = "mean"
            self.fell_back = True
            self.warmup_values = []
            return
        self.h_warm = float(h_warm)
        self.open = True  # [D] open right after warmup

    def recalibrate(self) -> None:
        """Re-run the warmup (continual AntiSD from a GRPO checkpoint, SPEC section 3)."""
        self.kind = self.initial_kind
        self.fell_back = False
        self.warmup_values = []
        self.h_warm = None
        self.open = self.always_open
        self.lam = 0.0

    # -- checkpointing: plain python types, JSON-serialisable ---------------------------

    def _config(self) -> dict:
        return {
            "warmup_steps": self.warmup_steps,
            "ratio": self.ratio,
            "lam_max": self.lam_max,
            "kind": self.initial_kind,
            "always_open": self.always_open,
            "min_h_warm": self.min_h_warm,
        }

    def state_dict(self) -> dict:
        return {
            "config": self._config(),
            "step": self.step,
            "kind": self.kind,
            "warmup_values": list(self.warmup_values),
            "h_warm": self.h_warm,
            "open": self.open,
            "fell_back": self.fell_back,
            "lam": self.lam,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self._config():
            raise ValueError(f"EntropyGate.load_state_dict: saved config {state['config']} != this gate's {self._config()}")
        self.step = int(state["step"])
        self.kind = str(state["kind"])
        self.warmup_values = [float(v) for v in state["warmup_values"]]
        self.h_warm = None if state["h_warm"] is None else float(state["h_warm"])
        self.open = bool(state["open"])
        self.fell_back = bool(state["fell_back"])
        self.lam = float(state["lam"])

    def __repr__(self) -> str:
        return (
            f"EntropyGate(step={self.step}, open={self.open}, lam={self.lam}, h_warm={self.h_warm}, "
            f"kind={self.kind!r}, warming_up={self.warming_up})"
        )


# ---------------------------------------------------------------------------------------
# The official recipe's per-response lambda (see the module docstring). Names are the
# launcher's ccir.* keys (FloyedShen/AntiSD recipe/antisd/_launchers/launch_short.sh, [L]);
# the semantics are read from the fork's grpo_ca loss [K] and the FlowBalance port [F]
# (antisd.py's official section lists the sources); [I] marks what no readable source shows.
# ---------------------------------------------------------------------------------------

CA_LAMBDA = 0.1  # ca_lambda=${CA_LAMBDA} (0.1) [L]: the base of lam_i
PERP_ALPHA = 2.0  # ca_lambda_perp_alpha=2.0 [L]: slope on log(tppl_i / target) [K, F]
LAMBDA_MIN = 0.0  # ca_lambda_min=$LAMBDA_MIN (0.0, "KKT (lambda_min=0)") [L]
LAMBDA_MAX = 0.5  # ca_lambda_max=$LAMBDA_MAX (0.5) [L]
PERP_MASK = 3.0  # ca_lambda_perp_mask=3.0 [L]: lam_i = 0 where tppl_i > 3 [K, F]
PERP_RATIO_CLAMP = (0.5, 3.0)  # [K, F]: log((tppl_i / target).clamp(0.5, 3.0))
PERP_TARGET_RATIO = 0.93  # ca_lambda_perp_target_ratio=$TP_TARGET_RATIO (0.93) [L]: target = 0.93 x warm-up median
PERP_DELTA = 0.10  # ca_lambda_perp_delta=0.10 [L]: target = median - 0.10 when the ratio is 0 (run/<model>/sd.sh) [K, F]
PERP_TARGET_FLOOR = 1.01  # [K, F]: target = max(..., 1.01)
PERP_REACTIVATE_RATIO = 1.07  # ca_lambda_perp_reactivate_ratio=$REACTIVATE_RATIO (1.07) [L]; 0 = no hysteresis (sd.sh)
PERP_WARMUP_SPIKE = 3.0  # [K]: a warm-up step's mean tppl is recorded only if < 3.0 ([F] uses 10.0)
SIGMA_FLOOR = 1e-6  # [K, F]: sigma_ref = max(mean of the warm-up stds, 1e-6)


class PerplexityGate:
    """Per-response lambda of the official recipe, its warm-up and its hysteresis; see the
    module docstring. Pure python state, checkpointed like EntropyGate.

    warmup_steps:     W, steps with lam = 0 (ca_lambda_warmup_steps=$WARMUP_STEPS, 5 [L]).
    target_ratio:     target = ratio x warm-up median; 0 -> median - delta (the SD scripts).
    reactivate_ratio: hysteresis on at ratio x warm-up median; 0 -> no hysteresis (SD scripts).

    Usage, once per step (FSDP: pass every rank's rows to update(), so all ranks agree):
        lam_rows = gate.update(tppl_all)                 # (M,) lambda of the step's rows
        lam_mine = gate.lam_rows(tppl_of_some_rows)      # the same formula for any subset
        if gate.needs_u_std: gate.record_u_std(float(u[mask].std()))   # the step's u, any time
    Departures from the fork [K], each so the result does not depend on how a step is split:
      - [K] records the warm-up mean tppl and the u std per micro-batch (and per rank) and
        averages over them; here they are per step, over all of the step's rows and tokens.
      - [K]'s hysteresis sums over the micro-batches of a step and transitions at the next
        step's first micro-batch; here the same from whole steps (no difference in effect).
    How the launcher's "Schmitt hysteresis" is applied is read from [K] (it is not in [F]):
    the statistic is the mean tppl over rows with tppl <= 3; it closes when that fell below
    target (strict), reopens when it rose above 1.07 x median (strict), with one step of lag;
    it starts open.
    """

    def __init__(
        self,
        warmup_steps: int = 5,
        *,
        base: float = CA_LAMBDA,
        alpha: float = PERP_ALPHA,
        lam_min: float = LAMBDA_MIN,
        lam_max: float = LAMBDA_MAX,
        mask: float = PERP_MASK,
        target_ratio: float = PERP_TARGET_RATIO,
        reactivate_ratio: float = PERP_REACTIVATE_RATIO,
        delta: float = PERP_DELTA,
        spike: float = PERP_WARMUP_SPIKE,
    ):
        if warmup_steps < 1:
            raise ValueError("PerplexityGate: warmup_steps must be >= 1 (the target needs a warm-up)")
        if not lam_min <= lam_max:
            raise ValueError(f"PerplexityGate: lam_min {lam_min} > lam_max {lam_max}")
        if target_ratio < 0 or reactivate_ratio < 0:
            raise ValueError("PerplexityGate: target_ratio and reactivate_ratio must be >= 0")
        # Config: fixed for the life of a run, checked on load.
        self.warmup_steps = int(warmup_steps)
        self.base, self.alpha = float(base), float(alpha)
        self.lam_min, self.lam_max = float(lam_min), float(lam_max)
        self.mask = float(mask)
        self.target_ratio, self.reactivate_ratio = float(target_ratio), float(reactivate_ratio)
        self.delta, self.spike = float(delta), float(spike)
        # State: everything update() / record_u_std() change.
        self.step = 0  # update() calls so far
        self.warmup_tppl: list[float] = []  # the warm-up steps' mean tppl (those < spike)
        self.warmup_u_std: list[float] = []  # the warm-up steps' std of u
        self.median: float | None = None  # warm-up median, set at the first post-warm-up step
        self.target: float | None = None
        self.reactivate: float | None = None  # hysteresis threshold; 0.0 = no hysteresis
        self.sigma_ref: float | None = None  # None until calibrated: antisd.u_clip zeroes nothing
        self.active = True  # the hysteresis state ([K] starts active)
        self.prev_stat: float | None = None  # last step's mean tppl over rows with tppl <= mask

    @property
    def warming_up(self) -> bool:
        """True while the next (or current) update() is a warm-up step."""
        return self.target is None

    @property
    def hysteresis(self) -> bool:
        return self.reactivate is not None and self.reactivate > self.target  # [K]: _hys_enabled

    @property
    def needs_u_std(self) -> bool:
        """True once per warm-up step, after its update(): record that step's std of u."""
        return self.target is None and len(self.warmup_u_std) < self.step

    @property
    def open(self) -> bool:
        return not self.warming_up and self.active

    @property
    def open_this_step(self) -> bool:
        """The state the last update()'s step used (EntropyGate's name; here the same as open)."""
        return self.open

    def update(self, tppl: torch.Tensor) -> torch.Tensor:
        """Advance one step with the teacher perplexity of ALL the step's rows (M,); returns
        their lambdas (M,) (zeros during the warm-up and while the hysteresis is off)."""
        tppl = torch.as_tensor(tppl).detach().double().flatten()  # (M,)
        if tppl.numel() == 0 or torch.isnan(tppl).any() or (tppl <= 0).any():
            raise ValueError(f"PerplexityGate.update: need >= 1 positive perplexity, got {tppl.tolist()[:8]}")
        self.step += 1
        if self.step <= self.warmup_steps:
            m = float(tppl.mean())
            if m < self.spike:  # [K]: spikes are not recorded
                self.warmup_tppl.append(m)
            return torch.zeros_like(tppl)
        if self.target is None:
            self._calibrate(fallback=float(tppl.mean()))
        if self.hysteresis and self.prev_stat is not None:  # decided from the previous step [K]
            if self.active and self.prev_stat < self.target:
                self.active = False
            elif not self.active and self.prev_stat > self.reactivate:
                self.active = True
        valid = tppl <= self.mask
        self.prev_stat = float(tppl[valid].mean()) if valid.any() else None  # no valid row: no transition next step
        return self.lam_rows(tppl)

    def _calibrate(self, fallback: float) -> None:
        vals = sorted(self.warmup_tppl)
        # [K, F]: vals[len // 2], the upper median for an even count; no value recorded (every
        # warm-up step a spike): the first post-warm-up step's mean
        self.median = vals[len(vals) // 2] if vals else fallback
        if self.target_ratio > 0:
            self.target = max(self.median * self.target_ratio, PERP_TARGET_FLOOR)
        else:
            self.target = max(self.median - self.delta, PERP_TARGET_FLOOR)
        # [K] recovers the warm-up median as target / target_ratio (the floored target), so
        # with a floored target reactivation is 1.07 x 1.01 / 0.93, not 1.07 x median
        if self.reactivate_ratio > 0 and self.target_ratio > 0:
            self.reactivate = self.target / self.target_ratio * self.reactivate_ratio
        else:
            self.reactivate = 0.0
        if self.warmup_u_std:
            self.sigma_ref = max(sum(self.warmup_u_std) / len(self.warmup_u_std), SIGMA_FLOOR)
        # [I] no std recorded at all (never, with record_u_std every warm-up step): sigma_ref
        # stays None and nothing is zeroed; [K] would take the current micro-batch's std

    def lam_rows(self, tppl: torch.Tensor) -> torch.Tensor:
        """lam_i for the given rows (n,) under the current state: a pure per-row formula."""
        tppl = torch.as_tensor(tppl).detach().double().flatten()  # (n,)
        if self.target is None:
            return torch.zeros_like(tppl)
        if self.hysteresis and not self.active:
            lam = torch.full_like(tppl, self.lam_min)  # [K]: closed -> lambda_min for every row
        else:
            lo, hi = PERP_RATIO_CLAMP
            lam = (self.base * self.alpha * torch.log((tppl / self.target).clamp(lo, hi))).clamp(self.lam_min, self.lam_max)
        return torch.where(tppl > self.mask, torch.zeros_like(lam), lam)  # perplexity spikes get 0 [K, F]

    def record_u_std(self, std: float) -> None:
        """The std of u over the current warm-up step's valid tokens ([K]: torch.std, unbiased)."""
        if not self.needs_u_std:
            raise RuntimeError(f"PerplexityGate.record_u_std: not expected at step {self.step} (once per warm-up step, after update())")
        std = float(std)
        if not math.isfinite(std):
            raise ValueError(f"PerplexityGate.record_u_std: std must be finite, got {std}")
        self.warmup_u_std.append(std)

    def recalibrate(self) -> None:
        """Re-run the warm-up (continual training from another run's weights)."""
        self.__init__(**self._config())

    # -- checkpointing: plain python types, JSON-serialisable ---------------------------

    def _config(self) -> dict:
        return {
            "warmup_steps": self.warmup_steps, "base": self.base, "alpha": self.alpha, "lam_min": self.lam_min,
            "lam_max": self.lam_max, "mask": self.mask, "target_ratio": self.target_ratio,
            "reactivate_ratio": self.reactivate_ratio, "delta": self.delta, "spike": self.spike,
        }  # fmt: skip

    kind = "tppl"  # the statistic it watches (EntropyGate.kind: "median" / "mean")

    _STATE = ("step", "warmup_tppl", "warmup_u_std", "median", "target", "reactivate", "sigma_ref", "active", "prev_stat")

    def state_dict(self) -> dict:
        return {"config": self._config(), "kind": "tppl", **{k: copy.copy(getattr(self, k)) for k in self._STATE}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "tppl" or state["config"] != self._config():
            raise ValueError(f"PerplexityGate.load_state_dict: saved gate {state.get('kind', 'entropy')} {state['config']} != this gate's {self._config()}")
        for k in self._STATE:
            setattr(self, k, copy.copy(state[k]))

    def __repr__(self) -> str:
        return f"PerplexityGate(step={self.step}, target={self.target}, sigma_ref={self.sigma_ref}, active={self.active}, warming_up={self.warming_up})"
