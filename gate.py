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
"""

from __future__ import annotations

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
            self.lam = 0.0
            return self.lam
        elif self.open and h < self.ratio * self.h_warm:
            self.open = False
        elif not self.open and h >= self.h_warm:
            self.open = True
        self.lam = self.lam_max if self.open else 0.0
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
