"""The entropy gate (gate.py) on scripted entropy sequences, and its statistic."""

import json
import statistics

import pytest
import torch

from gate import EntropyGate, gate_statistic

# --- gate_statistic --------------------------------------------------------------------


def test_statistic_true_median_and_mean_over_mask_only():
    ent = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 50.0, 0.0, 0.0]])  # (2, 4)
    lengths = torch.tensor([3, 2])
    mask = torch.arange(4)[None] < lengths[:, None]
    # valid: 1, 2, 3, 4, 50 -> median 3 (the padded 100 and 0s must not count)
    assert gate_statistic(ent, mask) == 3.0
    assert gate_statistic(ent, mask, kind="mean") == pytest.approx(60.0 / 5)
    # even count: the true median is the mean of the two middles, not torch.median's lower one
    mask2 = mask.clone()
    mask2[1, 1] = False  # valid: 1, 2, 3, 4
    assert gate_statistic(ent, mask2) == 2.5
    x = torch.rand(7, 13)
    m = torch.rand(7, 13) > 0.3
    assert gate_statistic(x, m) == pytest.approx(statistics.median(x[m].tolist()), abs=1e-7)


def test_statistic_rejects_empty_and_unknown():
    with pytest.raises(ValueError):
        gate_statistic(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        gate_statistic(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), kind="mode")


# --- the Schmitt trigger ---------------------------------------------------------------


def run(gate, hs):
    return [gate.update(h) for h in hs]


def test_warmup_then_open_and_h_warm_is_median():
    g = EntropyGate(warmup_steps=5, ratio=0.93, lam_max=0.5)
    warm = [1.0, 3.0, 2.0, 10.0, 0.5]
    lams = run(g, warm)
    assert lams == [0.0] * 5
    assert g.h_warm == 2.0  # median, not mean (3.3)
    assert g.open  # open right after warmup
    assert not g.open_this_step  # ... but the step that ended the warm-up ran with lam 0 (what train.py logs)
    assert g.update(2.0) == 0.5  # first post-warmup step
    assert g.open_this_step


def test_close_stay_closed_in_band_reopen_at_exactly_h_warm():
    g = EntropyGate(warmup_steps=5, ratio=0.93, lam_max=0.5)
    run(g, [2.0] * 5)  # H_warm = 2, tau_down = 1.86
    assert g.tau_down == pytest.approx(1.86)
    assert g.update(1.87) == 0.5  # above tau_down: stays open
    assert g.update(1.85) == 0.0 and not g.open  # below tau_down: closes this very step
    # inside the band [tau_down, H_warm): stays closed, including values above tau_down
    assert run(g, [1.9, 1.99, 1.86, 1.9999]) == [0.0] * 4
    assert g.update(2.0) == 0.5 and g.open  # reopens at exactly H_warm
    # open again: inside the band it stays open
    assert run(g, [1.9, 1.86]) == [0.5, 0.5]
    assert g.update(1.0) == 0.0


def test_first_post_warmup_step_can_close():
    g = EntropyGate(warmup_steps=3, ratio=0.9)
    run(g, [1.0, 1.0, 1.0])
    assert g.update(0.5) == 0.0  # the update precedes this step's advantages


def test_ratio_sweep_changes_threshold():
    hs = [1.0] * 5 + [0.94, 0.92, 0.91]
    assert run(EntropyGate(ratio=0.90), hs)[5:] == [0.5, 0.5, 0.5]
    assert run(EntropyGate(ratio=0.93), hs)[5:] == [0.5, 0.0, 0.0]
    assert run(EntropyGate(ratio=0.95), hs)[5:] == [0.0, 0.0, 0.0]


def test_always_open_ablation():
    g = EntropyGate(always_open=True)
    assert run(g, [5.0, 0.1, 0.0, 3.0, 0.0, 0.0, 0.0]) == [0.5] * 7
    assert g.open


def test_state_round_trip_gives_identical_future():
    torch.manual_seed(0)
    hs = (1.0 + 0.1 * torch.randn(60)).tolist()
    for cut in (2, 5, 9, 30):  # mid-warmup, at the end of warmup, and after
        ref = EntropyGate()
        expected = run(ref, hs)
        a = EntropyGate()
        got = run(a, hs[:cut])
        state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
        b = EntropyGate()
        b.load_state_dict(state)
        got += run(b, hs[cut:])
        assert got == expected
        assert b.state_dict() == ref.state_dict()
    assert 0.0 in expected and 0.5 in expected[5:]  # the sequence exercises both states


def test_load_refuses_other_config():
    a = EntropyGate(ratio=0.93)
    with pytest.raises(ValueError):
        EntropyGate(ratio=0.95).load_state_dict(a.state_dict())


def test_fallback_to_mean_when_median_collapses(capsys):
    g = EntropyGate(warmup_steps=3)
    assert g.kind == "median"
    assert run(g, [1e-5, 0.0, 2e-4]) == [0.0] * 3  # median H_warm = 1e-5 < 1e-3
    assert g.kind == "mean" and g.fell_back and g.h_warm is None
    out = capsys.readouterr().out
    assert "mean" in out and out.count("[gate]") == 1
    # the warmup is re-run on means (lam stays 0), then the gate works on the mean scale
    assert run(g, [0.2, 0.3, 0.25]) == [0.0] * 3
    assert g.h_warm == 0.25 and g.open and g.kind == "mean"
    assert g.update(0.2) == 0.0  # 0.2 < 0.93 * 0.25
    assert g.update(0.25) == 0.5
    assert capsys.readouterr().out == ""  # said once


def test_no_fallback_for_healthy_median():
    g = EntropyGate(warmup_steps=2)
    run(g, [0.01, 0.01])
    assert g.kind == "median" and g.h_warm == 0.01 and not g.fell_back


def test_recalibrate_reruns_warmup():
    g = EntropyGate(warmup_steps=2)
    run(g, [2.0, 2.0, 1.0])  # closed
    assert not g.open
    g.recalibrate()
    assert g.warming_up and not g.open
    assert run(g, [1.0, 1.0]) == [0.0, 0.0]
    assert g.h_warm == 1.0 and g.update(0.95) == 0.5  # new H_warm = 1.0: 0.95 >= 0.93


def test_bad_inputs():
    with pytest.raises(ValueError):
        EntropyGate(warmup_steps=0)
    with pytest.raises(ValueError):
        EntropyGate().update(float("nan"))
