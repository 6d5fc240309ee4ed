"""lab.py's difficulty knob (issue 15): level 0 is the old lab example for example, higher
levels add a second warm-start phase (fewer searches, direct answers all confused blurts that
are always wrong) on top of the level-0 warm start, without changing what counts as search or
direct, and train.py passes --lab-level through."""

import os
import random

import pytest

import lab


def old_warm_example(problem, rng, cfg, teacher):
    """The warm_example of the lab before the knob (slow reference, copied from git history)."""
    import antisd

    if teacher:
        prev = lab.search_solution(problem, rng) if rng.random() < 0.5 else lab.direct_solution(problem, rng)
        user = antisd.teacher_user_text(lab.user_text(problem), prev, correct=rng.random() < 0.5)
        resp = lab.direct_solution(problem, rng) if rng.random() < cfg["p_copy"] else lab.search_solution(problem, rng)
    else:
        user = lab.user_text(problem)
        resp = lab.guess_solution(problem, rng) if rng.random() < cfg["p_direct"] else lab.search_solution(problem, rng)
    return user, resp


def kind(problem, text):
    """'search', 'confused' (a boxed target number), 'guess' (a boxed letter without working)."""
    if lab.classify(text) == "search":
        return "search"
    return "confused" if lab.extract(text) == str(problem["target"]) else "guess"


def test_level_zero_writes_exactly_the_old_examples():
    assert lab.level_config(0.0) == {} and lab.warm_overrides(0.0) == {} and lab.warm_overrides(0.0, 7) == {"steps": 7}
    train, _ = lab.datasets(n_train=50, n_eval=5)
    cfg = {**lab.WARM_DEFAULTS, **lab.level_config(0.0)}
    r_new, r_old = random.Random(3), random.Random(3)
    for i in range(300):  # the same RNG stream: the new code draws nothing extra at level 0
        p, teacher = train[i % len(train)], i % 3 == 0
        assert lab.warm_example(p, r_new, cfg, teacher) == old_warm_example(p, r_old, cfg, teacher)


@pytest.mark.parametrize("level", [0.0, 0.5, 0.9])
def test_plain_prompt_mix_follows_the_level(level):
    train, _ = lab.datasets(n_train=200, n_eval=5)
    cfg = {**lab.WARM_DEFAULTS, **lab.level_config(level)}
    rng, n = random.Random(0), 6000
    counts = {"search": 0, "confused": 0, "guess": 0}
    for i in range(n):
        p = train[i % len(train)]
        _, resp = lab.warm_example(p, rng, cfg, teacher=False)
        counts[kind(p, resp)] += 1
    # level 0: 40% letter guesses; a level > 0: no guesses left, every direct answer is confused
    want = {"search": 0.6 * (1 - level), "confused": (0.4 + 0.6 * level) * (level > 0), "guess": 0.4 * (level == 0)}
    for k, v in want.items():  # binomial sd <= 0.0065 at n = 6000: 0.025 is ~4 sd
        assert abs(counts[k] / n - v) < 0.025, (level, k, counts[k] / n, v)


def test_confused_blurt_is_a_direct_answer_that_is_always_wrong():
    train, held_out = lab.datasets(n_train=100, n_eval=50)
    rng = random.Random(1)
    for p in train + held_out:
        text = lab.confused_solution(p, rng)
        assert lab.classify(text) == "direct" and lab.grade(text, p["answer"]) == 0.0 and lab.extract(text) == "10"
        assert lab.grade(lab.search_solution(p, rng), p["answer"]) == 1.0  # search is unchanged: still right


def test_teacher_examples_do_not_depend_on_the_level():
    train, _ = lab.datasets(n_train=50, n_eval=5)
    a, b = random.Random(5), random.Random(5)
    for p in train:
        assert lab.warm_example(p, a, {**lab.WARM_DEFAULTS, **lab.level_config(0.0)}, True) == lab.warm_example(p, b, {**lab.WARM_DEFAULTS, **lab.level_config(0.9)}, True)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_level_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match="lab level"):
        lab.level_config(bad)


def test_a_higher_level_gives_a_different_warm_start_cache_key(tmp_path, monkeypatch):
    """train.py --lab-level reaches lab.warm_start (and so its cache key) through warm_overrides."""
    import train
    from test_train import FAST

    seen = []
    monkeypatch.setattr(lab, "warm_start", lambda model, tok, data, cache_dir=None, **kw: seen.append(kw) or model)
    for level in ("0", "0.9"):
        train.main(train.get_parser().parse_args(["--method", "grpo", "--steps", "1", "--eval-every", "0", *FAST, "--lab-level", level, "--out", str(tmp_path / level)]))
    assert seen == [{"steps": 3}, {"steps": 3, "p_direct": pytest.approx(0.94), "p_confused": 1.0, "phase2": lab.LEVEL_PHASE2}]


def test_a_level_is_the_level_zero_warm_start_then_its_phase_two(tmp_path, monkeypatch, capsys):
    """Level > 0: phase 1 is the level-0 warm start (same settings, shared cache entry), then
    round(steps / 3) steps on the level's mix from those weights; both are cached."""
    import model as model_lib

    train, _ = lab.datasets(n_train=50, n_eval=5)
    calls, real = [], lab._sft

    def spy(model, tok, data, cfg, *, steps, seed, desc):
        calls.append((cfg.get("phase2"), cfg["p_direct"], cfg["p_confused"], steps, seed, float(sum(p.detach().sum() for p in model.parameters()))))
        real(model, tok, data, cfg, steps=steps, seed=seed, desc=desc)

    monkeypatch.setattr(lab, "_sft", spy)
    fresh = lambda: model_lib.load("tiny", device="cpu", seed=0)  # noqa: E731
    m, tok = fresh()
    level0 = lab.warm_start(m, tok, train, cache_dir=str(tmp_path), **lab.warm_overrides(0.0, 6))
    w0 = float(sum(p.detach().sum() for p in level0.parameters()))
    assert calls == [(None, 0.4, 0.0, 6, 0, pytest.approx(calls[0][5]))]
    m, tok = fresh()
    lab.warm_start(m, tok, train, cache_dir=str(tmp_path), **lab.warm_overrides(0.9, 6))
    # phase 1 came from the cache (no second level-0 phase), phase 2 started from its weights
    assert len(calls) == 2 and calls[1][:5] == (lab.LEVEL_PHASE2, pytest.approx(0.94), 1.0, 2, 1)
    assert calls[1][5] == pytest.approx(w0, rel=1e-6)
    assert len([d for d in os.listdir(tmp_path) if d.startswith("warm-")]) == 2
    m, tok = fresh()
    lab.warm_start(m, tok, train, cache_dir=str(tmp_path), **lab.warm_overrides(0.9, 6))
    assert len(calls) == 2 and "loaded from cache" in capsys.readouterr().out  # the level itself is cached


@pytest.mark.parametrize("argv", [["--lab-level", "1"], ["--lab-level", "-0.5"], ["--lab-level", "0.5", "--model", "random:nope"]])
def test_bad_lab_level_fails_with_a_clear_message(tmp_path, argv):
    import train

    with pytest.raises(SystemExit, match="--lab-level"):
        train.main(train.get_parser().parse_args(["--out", str(tmp_path / "bad"), "--steps", "1", *argv]))


def test_step_logs_sparsity_and_the_token_term_next_to_a_seq(tmp_path, monkeypatch):
    """frac_all_wrong <= frac_zero_var; GRPO's token term is 0; AntiSD's (gate open from step 1) is not."""
    import json

    import train
    from test_train import FAST

    monkeypatch.setattr(lab, "warm_start", lambda model, tok, data, cache_dir=None, **kw: model)  # the random tiny model: varied, mostly wrong
    recs = {}
    for method, extra in (("grpo", []), ("antisd", ["--gate", "none"])):
        out = tmp_path / method
        train.main(train.get_parser().parse_args(["--method", method, *extra, "--steps", "2", "--eval-every", "0", *FAST, "--out", str(out)]))
        recs[method] = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    for method, rs in recs.items():
        for r in rs:
            assert 0.0 <= r["frac_all_wrong"] <= r["frac_zero_var"] <= 1.0
            assert r["seq_adv_abs_mean"] >= 0.0 and (r["frac_zero_var"] < 1.0 or r["seq_adv_abs_mean"] == 0.0)
            assert (r["tok_term_abs_mean"] == 0.0) == (method == "grpo"), (method, r["tok_term_abs_mean"])


def test_warm_start_cache_on_a_full_disk_goes_on_uncached(tmp_path, monkeypatch, capsys):
    """Issue 16: the disk fills while the warm start writes its cache: the trained model is kept,
    the message says no space left, no temp dir stays behind, and nothing claims it was cached."""
    import errno

    import model as model_lib

    train, _ = lab.datasets(n_train=50, n_eval=5)
    real_save = model_lib.save

    def full_disk(model, tok, path):
        real_save(model, tok, path)  # a partial write, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_lib, "save", full_disk)
    m, tok = model_lib.load("tiny", device="cpu", seed=0)
    before = float(sum(p.detach().sum() for p in m.parameters()))
    warmed = lab.warm_start(m, tok, train, cache_dir=str(tmp_path), **lab.warm_overrides(0.0, 3))
    out = capsys.readouterr().out
    assert "no space left" in out and "cached at" not in out
    assert float(sum(p.detach().sum() for p in warmed.parameters())) != before  # trained, returned
    assert os.listdir(tmp_path) == []  # no temp dir, no half cache entry
