"""lab.py's difficulty knob (issue 15): level 0 is the old lab example for example, higher
levels give a weaker warm start (fewer searches, confused blurts that are always wrong)
without changing what counts as search or direct, and train.py passes --lab-level through."""

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
    want = {"search": 0.6 * (1 - level), "confused": (0.4 + 0.6 * level) * level, "guess": (0.4 + 0.6 * level) * (1 - level)}
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
    assert seen == [{"steps": 3}, {"steps": 3, "p_direct": pytest.approx(0.94), "p_confused": 0.9}]


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
