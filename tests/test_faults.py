"""Runs you can trust (issue 16): every fault drives the real entry point (train.main / eval.main /
inspect_pmi.main in this process, or `python train.py` in a subprocess) into the failure and
checks the outcome: the message names the file / row / flag, the exit is non-zero, and nothing
already written is lost.

    signals    SIGTERM mid-step then --resume == an uninterrupted run; Ctrl-C and OUT/STOP exit
               non-zero (130 / 75) with a checkpoint; an obeyed STOP whose save fails is removed
    run dirs   a fresh run into a used --out refused (--overwrite replaces it, foreign files stay);
               two live runs in one --out refused (the lock); resume keeps the run's flags, refuses
               changed ones, drops the log lines after its checkpoint, says when it is past --steps
    corrupt    a cut-off newest checkpoint falls back to the previous one, naming the file;
               checkpoint-best is ignored
    disk full  a patched writer (always) and a real 16 MB tmpfs (when this machine lets us mount
               one): "no space left", no temp dir, whole log lines, the previous checkpoint intact
    inputs     bad flags of train.py / eval.py / inspect_pmi.py, empty / blank / non-UTF-8 data files,
               a float answer, an over-long prompt, eval.py --out checked before the work (and a
               write that fails after it named), inspect_pmi's --problem / --html before the model,
               train.py's --data before the model, an unreachable hub id in one line, a read-only
               cache directory
    terminal   the last step saved once, the gate column at the last warmup step, GRPO's header,
               no transformers bars in the step table, --help without torch, eval.py's table on its
               own line in a log, `eval.py --bench lab` == train.py's held-out accuracy
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "24", "--warm-steps", "3",
        "--eval-limit", "4", "--eval-k", "1", "--micro-batch", "3", "--warmup-steps", "1", "--eval-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def _lab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(autouse=True)
def _cwd(_lab_dir, monkeypatch):
    monkeypatch.chdir(_lab_dir)  # the 3-step warm start is cached once in .cache/lab here


def run(out, *extra):
    """train.main on the tiny lab, through train.parse_args (so typed flags are known)."""
    return train.main(train.parse_args([*FAST, "--out", str(out), *extra]))


def records(out, name="metrics.jsonl"):
    return [json.loads(line) for line in open(os.path.join(out, name))]  # every line must parse


def steps_of(out):
    return [r for r in records(out) if "loss" in r]


def same_steps(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and x["reward_mean"] == y["reward_mean"] and x["lam"] == y["lam"]


def subprocess_train(cwd, *argv, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *FAST, *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Signals and the STOP file.
# ---------------------------------------------------------------------------------------


def test_sigterm_mid_step_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    run(tmp_path / "full", "--steps", "5", "--save-every", "100")
    import antisd

    real, calls = antisd.group_advantages, []

    def term_in_step_3(*a, **k):  # the signal lands in the middle of step 3 (after its rollouts)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(antisd, "group_advantages", term_in_step_3)
    before = signal.getsignal(signal.SIGTERM)
    summary = run(tmp_path / "cut", "--steps", "5", "--save-every", "100")
    assert summary["stopped"] == "SIGTERM" and train.runs.Stop.EXIT["SIGTERM"] == 143
    assert [r["step"] for r in steps_of(tmp_path / "cut")] == [1, 2, 3]  # step 3 finished, then saved
    assert (tmp_path / "cut" / "checkpoint-3" / "trainer_state.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    monkeypatch.setattr(antisd, "group_advantages", real)
    run(tmp_path / "cut", "--resume")  # --steps 5 comes from the run itself
    same_steps(steps_of(tmp_path / "full"), steps_of(tmp_path / "cut"))


def _wait_for_step(proc, path, step, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        if os.path.isfile(path) and any(json.loads(line).get("step", 0) >= step and "loss" in line for line in open(path) if line.strip()):
            return
        time.sleep(0.2)
    raise AssertionError("no step record in time")


def test_ctrl_c_and_the_stop_file_exit_non_zero_with_a_checkpoint(_lab_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess_train(_lab_dir, "--steps", "200", "--save-every", "100", "--out", str(out))
    _wait_for_step(proc, out / "metrics.jsonl", 1)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, log
    (k,) = [int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("checkpoint-")]
    assert "stopped (SIGINT): saved checkpoint-" in log and "--resume --out" in log
    assert [r["step"] for r in steps_of(out)] == list(range(1, k + 1))
    # OUT/STOP: the resumed run stops after its first step, exits 75 and removes the file
    (out / "STOP").write_text("")
    proc = subprocess_train(_lab_dir, "--resume", "--out", str(out))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, log
    assert (out / f"checkpoint-{k + 1}").is_dir() and not (out / "STOP").exists()
    assert [r["step"] for r in steps_of(out)] == list(range(1, k + 2))


def test_a_stop_whose_save_fails_does_not_stop_the_resume(tmp_path, monkeypatch):
    """OUT/STOP obeyed, then the disk is full at the save: the run ends with the disk-full message
    and the STOP file is gone (runs.scoped closes the Stop however main ends), so the resume
    once there is room runs to --steps instead of stopping after its first step."""
    out = tmp_path / "run"
    import antisd

    real_adv, real_save, calls = antisd.group_advantages, train.dist_lib.save_model, []

    def stop_in_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            (out / "STOP").write_text("")
        return real_adv(*a, **k)

    def save_model(model, tok, path, D):
        if path.endswith("checkpoint-2"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(model, tok, path, D)

    monkeypatch.setattr(antisd, "group_advantages", stop_in_step_2)
    monkeypatch.setattr(train.dist_lib, "save_model", save_model)
    with pytest.raises(SystemExit) as e:
        run(out, "--steps", "3", "--save-every", "1")
    assert "no space left on device writing checkpoint-2" in str(e.value) or "could not write checkpoint-2" in str(e.value)
    assert not (out / "STOP").exists() and (out / "checkpoint-1").is_dir()
    monkeypatch.undo()
    summary = run(out, "--resume")
    assert "stopped" not in summary and [r["step"] for r in steps_of(out)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------
# Run directories.
# ---------------------------------------------------------------------------------------


def test_a_fresh_run_into_a_used_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    run(out, "--steps", "1")
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit) as e:
        run(out, "--steps", "2", "--seed", "1")
    assert str(out) in str(e.value) and "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert (out / "metrics.jsonl").read_bytes() == before and json.load(open(out / "args.json"))["seed"] == 0
    # --overwrite: the earlier run's files go, a caller's own files and checkpoint-best stay
    (out / "train.log").write_text("mine")
    shutil.copytree(out / "checkpoint-1", out / "checkpoint-best")
    run(out, "--steps", "2", "--seed", "1", "--overwrite")
    assert (out / "train.log").read_text() == "mine" and (out / "checkpoint-best").is_dir()
    assert [r["step"] for r in records(out)] == [0, 1, 2, 2]  # one run: eval 0, steps 1-2, eval 2
    assert json.load(open(out / "args.json"))["seed"] == 1 and not (out / "checkpoint-1").exists()


def test_two_live_runs_in_one_directory(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"import runs, time; runs.lock({str(out)!r}); print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:
            run(out, "--steps", "1")
        assert "in use by a live run" in str(e.value) and f"pid {holder.pid}" in str(e.value)
        with pytest.raises(SystemExit) as e:  # a resume before the live run's first save says why there is none
            run(out, "--resume", "--steps", "1")
        assert "no checkpoint in" in str(e.value) and f"a live run (pid {holder.pid}" in str(e.value)
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    run(out, "--steps", "1")  # the kernel dropped the dead holder's lock: a stale .lock file blocks nothing


def test_a_failed_run_gives_back_its_handlers_and_lock_and_forks_get_the_defaults(tmp_path, monkeypatch):
    import multiprocessing as mp

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    seen = []

    def fork_now(*a, **k):  # grading.py forks a worker pool in the middle of a step, like this
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=lambda: q.put((signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, len(train.runs._HELD))))
        p.start()
        seen.append(q.get(timeout=60))
        p.join()
        raise OSError(errno.EIO, "Input/output error")  # then the run fails

    monkeypatch.setattr(train.dist_lib, "save_model", fork_now)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", "--steps", "1")
    assert "could not write checkpoint-1" in str(e.value) and "Input/output error" in str(e.value)
    assert seen == [(True, 0)]  # the forked worker: default SIGTERM, no lock
    assert {s: signal.getsignal(s) for s in before} == before and not train.runs._HELD
    monkeypatch.undo()
    run(tmp_path / "other", "--steps", "1")  # and this process can run again


def test_resume_keeps_the_runs_flags_and_refuses_changed_ones(tmp_path):
    out = tmp_path / "run"
    run(out, "--steps", "2", "--method", "grpo", "--save-every", "1")
    cases = [(["--method", "antisd"], ["--method antisd (the run's: grpo)"]),  # antisd is the default, typed: still refused
             (["--lr", "0.001", "--group-size", "2"], ["--lr 0.001 (the run's: 0.0001)", "--group-size 2 (the run's: 4)"]),
             (["--seed", "3"], ["--seed 3 (the run's: 0)"])]  # fmt: skip
    for typed, named in cases:
        with pytest.raises(SystemExit) as e:
            run(out, "--resume", "--steps", "3", *typed)
        assert all(n in str(e.value) for n in named) and "Changeable: --steps" in str(e.value), str(e.value)
    # the same through get_parser().parse_args (no record of typed flags: non-default values count)
    with pytest.raises(SystemExit) as e:
        train.main(train.get_parser().parse_args([*FAST, "--out", str(out), "--resume", "--method", "sd"]))
    assert "--method sd (the run's: grpo)" in str(e.value)
    # nothing typed but --steps (changeable): continues as GRPO, whatever the defaults say
    run(out, "--resume", "--steps", "3")
    args = json.load(open(out / "args.json"))
    assert args["method"] == "grpo" and args["steps"] == 3
    assert [r["lam"] for r in steps_of(out)] == [0.0, 0.0, 0.0] and [r["step"] for r in steps_of(out)] == [1, 2, 3]


def test_resume_drops_log_lines_after_the_checkpoint_and_knows_when_it_is_done(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, "--steps", "4", "--save-every", "2", "--keep-last", "3", "--sample-every", "1")
    shutil.rmtree(out / "checkpoint-4")  # as if killed after logging steps 3-4 but before saving 4
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"step": 4, "prompt": "cut off')  # and a half line
    run(out, "--resume")
    assert "dropped" in capsys.readouterr().out
    assert [r["step"] for r in records(out)] == [0, 1, 2, 3, 4, 4]  # each step once, eval 0 and eval 4
    assert [r["step"] for r in records(out, "samples.jsonl")] == [1, 2, 3, 4]
    run(out, "--resume")  # at --steps already: nothing to do, exit 0
    assert "already finished at step 4" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run(out, "--resume", "--steps", "3")
    assert "already at step 4" in str(e.value) and "past --steps 3" in str(e.value)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "nothing", "--resume")
    assert "no checkpoint in" in str(e.value)


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer_state.pt"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, victim):
    run(tmp_path / "full", "--steps", "4", "--save-every", "2")
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "full", out)
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-best")  # a stray name: ignored
    path = out / "checkpoint-4" / victim
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    run(out, "--resume")
    msg = capsys.readouterr().out
    assert f"checkpoint-4/{victim}" in msg and "checkpoint-4.corrupt" in msg and "resuming from checkpoint-2" in msg
    assert (out / "checkpoint-4.corrupt" / victim).is_file() and (out / "checkpoint-best").is_dir()
    same_steps(steps_of(tmp_path / "full"), steps_of(out))
    assert train.runs.check_checkpoint(str(out / "checkpoint-4")) is None  # written again, whole


def test_pruning_leaves_a_newer_foreign_checkpoint_alone(tmp_path):
    out = tmp_path / "run"
    os.makedirs(out)
    assert train.runs.run_files(str(out)) == []
    run(out, "--steps", "3", "--save-every", "1", "--keep-last", "1")
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-3"]
    os.rename(out / "checkpoint-3", out / "checkpoint-9")  # an older run's, newer than the step being saved
    for k in (1, 2):
        shutil.copytree(out / "checkpoint-9", out / f"checkpoint-{k}")
    shutil.copytree(out / "checkpoint-9", out / "checkpoint-best")
    train.runs.prune(str(out), 2, 1)  # saving step 2 with --keep-last 1
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-9", "checkpoint-best"]


# ---------------------------------------------------------------------------------------
# Disk full.
# ---------------------------------------------------------------------------------------


def _check_after_a_failed_save(out, e, ok_step):
    assert "no space left on device" in str(e.value) and "checkpoint-" in str(e.value) and "--resume" in str(e.value)
    assert not [d for d in os.listdir(out) if d.startswith(".tmp")]  # no temp dir left behind
    assert train.runs.check_checkpoint(os.path.join(out, f"checkpoint-{ok_step}")) is None
    records(out)  # every line of the log parses


@pytest.mark.parametrize("how", ["enospc", "torch-error"])
def test_disk_full_during_a_save(tmp_path, monkeypatch, how):
    out = tmp_path / "run"
    calls = []
    if how == "enospc":  # the model write fails with errno ENOSPC after writing part of a file
        real = train.dist_lib.save_model

        def save_model(model, tok, path, D):
            calls.append(path)
            if len(calls) == 2:
                os.makedirs(path, exist_ok=True)
                open(os.path.join(path, "model.safetensors"), "wb").write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
            real(model, tok, path, D)

        monkeypatch.setattr(train.dist_lib, "save_model", save_model)
    else:  # torch.save's own error, which names no errno (seen: "unexpected pos 4946816 vs 4946708")
        real = torch.save

        def save(obj, f, *a, **k):
            calls.append(f)
            if len(calls) == 2:
                open(f, "wb").write(b"\0" * 1000)
                free = shutil.disk_usage(out)
                monkeypatch.setattr(shutil, "disk_usage", lambda p: free._replace(free=2**20))  # the disk is now full
                raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4946816 vs 4946708")
            real(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as e:
        run(out, "--steps", "3", "--save-every", "1", "--sample-every", "1")
    _check_after_a_failed_save(out, e, 1)
    monkeypatch.undo()
    run(out, "--resume")  # continues from checkpoint-1 once there is room
    assert [r["step"] for r in steps_of(out)] == [1, 2, 3]


def test_disk_full_while_logging_leaves_whole_lines(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, n = os.write, []

    def write(fd, data):  # the third metrics line gets half written, then the disk is full
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            n.append(1)
            if len(n) == 3:
                real(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc")
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SystemExit) as e:
        run(out, "--steps", "3", "--eval-every", "1")
    assert "no space left on device writing metrics.jsonl" in str(e.value)
    assert [r["step"] for r in records(out)] == [0, 1]  # whole lines only


def test_disk_full_on_a_real_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    os.makedirs(mnt)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-writer tests cover the logic")
    try:
        out = mnt / "run"  # one ~11 MB checkpoint fits, a second does not
        with pytest.raises(SystemExit) as e:
            run(out, "--steps", "3", "--save-every", "1")
        _check_after_a_failed_save(out, e, 1)
        shutil.copytree(out, tmp_path / "moved")  # room elsewhere: the run goes on from checkpoint-1
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])  # never leave the mount behind
    run(tmp_path / "moved", "--resume")
    assert [r["step"] for r in steps_of(tmp_path / "moved")] == [1, 2, 3]


# ---------------------------------------------------------------------------------------
# Inputs: flags and files, checked before the work.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,flag",
    [(["--save-every", "-1"], "--save-every"), (["--warm-steps", "-5"], "--warm-steps"), (["--eval-limit", "-3"], "--eval-limit"),
     (["--eval-limit", "0"], "--eval-limit"), (["--eval-k", "0"], "--eval-k"), (["--grad-clip", "-1"], "--grad-clip"),
     (["--grad-clip", "0"], "--grad-clip"), (["--clip-low", "-1"], "--clip-low"), (["--clip-low", "1"], "--clip-low"),
     (["--max-solution-tokens", "0"], "--max-solution-tokens"), (["--dtype", "float16", "--device", "cpu"], "--dtype float16"),
     (["--threads", "0"], "--threads"), (["--resume", "--overwrite"], "--overwrite"), (["--keep-last", "-1"], "--keep-last"),
     (["--model", "runs/missing/checkpoint-100"], "runs/missing/checkpoint-100"), (["--init-from", "./nope"], "--init-from")],
)  # fmt: skip
def test_train_bad_flags_name_the_flag(tmp_path, argv, flag):
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "bad", "--steps", "1", *argv)
    assert flag in str(e.value) and str(e.value).startswith("train.py:")
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_data_and_model_errors_come_before_the_model_load_and_the_run_dir(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?"}\n')
    monkeypatch.setattr(train.dist_lib, "load", lambda *a, **k: pytest.fail("the model was loaded before the data was checked"))
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", "--model", "org/some-model", "--data", str(bad), "--steps", "1")
    assert str(bad) in str(e.value) and "line 1" in str(e.value) and str(e.value).startswith("train.py: --data")
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    os.makedirs("runs", exist_ok=True)  # "runs/x" is a local path when ./runs exists, never a hub id
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run2", "--model", "runs/antisd-tiny-s0", "--steps", "1")
    assert "train.py: --model" in str(e.value) and "'runs/antisd-tiny-s0' does not exist" in str(e.value)


def test_a_hub_model_that_cannot_be_reached_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", "no-such-org/no-such-model-16", "--steps", "1",
                        "--data", os.path.join(ROOT, "tests", "fixtures", "tiny_eval.jsonl"), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().startswith("train.py: --model: load: 'no-such-org/no-such-model-16'") and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_args_json_that_cannot_be_written(tmp_path):
    out = tmp_path / "run"
    os.makedirs(out / f"args.json.tmp-{os.getpid()}")  # the temp file's name taken: the write fails as on a full disk
    with pytest.raises(SystemExit) as e:
        run(out, "--steps", "1")
    assert "could not write args.json" in str(e.value) and not (out / "args.json").exists()


def test_an_empty_model_directory_is_named(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "bad", "--model", str(tmp_path / "empty"))
    assert "no config.json" in str(e.value)


def test_save_every_0_and_warm_steps_0(tmp_path):
    run(tmp_path / "run", "--steps", "2", "--save-every", "0", "--warm-steps", "0")
    assert sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("checkpoint-")) == ["checkpoint-2"]


def test_the_last_step_is_saved_once(tmp_path, monkeypatch):
    saved, real = [], train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda *a: saved.append(a[6]) or real(*a))
    run(tmp_path / "run", "--steps", "4", "--save-every", "2")
    assert saved == [2, 4]


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    import model as model_lib

    path = tmp_path_factory.mktemp("hf") / "tiny"
    m, tok = model_lib.load("tiny")
    model_lib.save(m, tok, str(path))
    return str(path)


@pytest.mark.parametrize(
    "content,expect",
    [(b"", "no rows (the file is empty or blank)"), (b"\n  \n\n", "no rows (the file is empty or blank)"),
     (b'{"problem": "1+1?", "answer": "2"}\n{"problem": "caf\xe9", "answer": "3"}\n', "line 2: not UTF-8 text (byte 0xe9)")],
)  # fmt: skip
def test_bad_data_files_are_named_by_train_and_eval(tmp_path, hf_tiny, content, expect):
    import eval as ev

    path = tmp_path / "problems.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", "--model", hf_tiny, "--data", str(path), "--steps", "1")
    assert str(path) in str(e.value) and expect in str(e.value) and "--data" in str(e.value)
    with pytest.raises(SystemExit) as e:
        ev.main(ev.get_parser().parse_args(["--model", hf_tiny, "--bench", str(path), "--quiet"]))
    assert str(path) in str(e.value) and expect in str(e.value)


def test_float_answers_and_over_long_prompts(tmp_path, hf_tiny, capsys):
    import data

    path = tmp_path / "problems.jsonl"
    rows = [{"problem": "Halve 3.", "answer": 1.5}, {"problem": "x " * 5000, "answer": "1"}, {"problem": "What is 2+2?", "answer": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems, _ = data.load_problems(str(path), verbose=False)
    assert [p["answer"] for p in problems] == ["1.5", "1", "4"]
    run(tmp_path / "run", "--model", hf_tiny, "--data", str(path), "--steps", "1", "--max-new-tokens", "4",
        "--lr", "1e-5", "--max-prompt-tokens", "256")  # fmt: skip
    assert "skipped 1 of 3 problems whose prompt exceeds --max-prompt-tokens 256" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,flag",
    [(["--batch-size", "0"], "--batch-size"), (["--limit", "0"], "--limit"), (["--k", "0"], "--k"), (["--top-p", "0"], "--top-p"),
     (["--max-new-tokens", "0"], "--max-new-tokens"), (["--model", "runs/missing/checkpoint-100"], "does not exist"),
     (["--threads", "0"], "--threads")],
)  # fmt: skip
def test_eval_bad_flags_name_the_flag(argv, flag):
    import eval as ev

    with pytest.raises(SystemExit) as e:
        ev.main(ev.get_parser().parse_args(["--model", "tiny", "--bench", "lab", *argv]))
    assert flag in str(e.value) and str(e.value).startswith("eval.py:")


def test_eval_names_a_missing_model_before_the_data_and_check_golds_a_bad_file(tmp_path):
    import eval as ev

    with pytest.raises(SystemExit) as e:  # the model's path first: the benchmarks may be a hub download
        ev.main(ev.get_parser().parse_args(["--model", str(tmp_path / "ckpt"), "--bench", str(tmp_path / "nope.jsonl")]))
    assert str(e.value).startswith("eval.py: --model") and "does not exist" in str(e.value)
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(SystemExit) as e:  # a bad file (or an unreachable hub): one line, no traceback
        ev.main(ev.get_parser().parse_args(["--check-golds", str(tmp_path / "blank.jsonl")]))
    assert str(e.value).startswith(f"eval.py: --check-golds {tmp_path / 'blank.jsonl'}") and "no rows" in str(e.value)


def test_eval_out_is_checked_before_the_work(tmp_path, monkeypatch):
    import eval as ev

    monkeypatch.setattr(ev, "run_benchmarks", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    (tmp_path / "file").write_text("x")
    for out, msg in [(tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot write there")]:
        with pytest.raises(SystemExit) as e:
            ev.main(ev.get_parser().parse_args(["--model", "tiny", "--bench", "lab", "--out", str(out)]))
        assert msg in str(e.value) and str(out) in str(e.value)


def test_eval_out_that_fails_after_the_work_is_named_and_keeps_the_old_files(tmp_path, capsys):
    import eval as ev

    out = tmp_path / "ev"
    os.makedirs(out / f"summary.json.tmp-{os.getpid()}")  # summary.json cannot be written (as on a full disk)
    (out / "summary.json").write_text("old")
    with pytest.raises(SystemExit) as e:
        ev.main(ev.get_parser().parse_args(["--model", "tiny", "--bench", "lab", "--limit", "2", "--k", "1", "--max-new-tokens", "8",
                                            "--grade-workers", "0", "--quiet", "--out", str(out)]))  # fmt: skip
    assert str(e.value).startswith(f"eval.py: could not write {out / 'summary.json'}")
    assert (out / "summary.json").read_text() == "old" and "Avg" in capsys.readouterr().out  # the table was printed
    assert len(open(out / "samples.jsonl").readlines()) == 2  # the samples were written whole


def test_inspect_pmi_problem_out_of_range():
    import inspect_pmi

    real = inspect_pmi.load_model
    inspect_pmi.load_model = lambda *a, **k: pytest.fail("the model was loaded (and warm-started) before --problem was checked")
    try:
        with pytest.raises(SystemExit) as e:
            inspect_pmi.main(inspect_pmi.get_parser().parse_args(["--problem", "999", "--no-color"]))
        assert "--problem 999" in str(e.value) and "0 to 199" in str(e.value)
        with pytest.raises(SystemExit) as e:  # the heatmap's path is tried before the work too
            inspect_pmi.main(inspect_pmi.get_parser().parse_args(["--html", ROOT, "--no-color"]))
        assert f"--html {ROOT} is a directory" in str(e.value)
    finally:
        inspect_pmi.load_model = real
    with pytest.raises(SystemExit) as e:  # README's example before `python train.py` ran: one line, no hub traceback
        inspect_pmi.main(inspect_pmi.get_parser().parse_args(["--model", "runs/antisd-tiny-s0/checkpoint-60"]))
    assert "runs/antisd-tiny-s0/checkpoint-60' does not exist" in str(e.value)


def test_a_cache_directory_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".cache").write_text("a file where the cache directory would go")  # (root ignores read-only bits)
    run(tmp_path / "run", "--steps", "1")
    assert "cannot write the cache in .cache/lab" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoint-1").is_dir()


# ---------------------------------------------------------------------------------------
# The terminal.
# ---------------------------------------------------------------------------------------


def test_terminal_gate_column_grpo_header_and_no_transformers_bars(tmp_path, capsys):
    run(tmp_path / "a", "--steps", "2", "--save-every", "1")  # --warmup-steps 1: step 1 is the warmup (lambda 0)
    cap = capsys.readouterr()
    lines = {ln.split("|")[0].strip(): ln for ln in cap.out.splitlines() if ln[:4].strip().isdigit()}
    assert lines["1"].split("|")[7].strip() == "warm" and lines["2"].split("|")[7].strip() == "open"
    assert "Writing model shards" not in cap.out + cap.err  # (two checkpoints were written)
    run(tmp_path / "g", "--steps", "1", "--method", "grpo")
    head = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("model ")][0]
    assert "method grpo no token term" in head and "tau" not in head


@pytest.mark.parametrize("script,flag", [("train.py", "--resume"), ("eval.py", "--bench"), ("inspect_pmi.py", "--problem")])
def test_help_needs_no_torch(script, flag):
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
            f"try: runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout
    assert flag in out and out.strip().endswith("NO TORCH"), out[-300:]


def test_parser_choices_match_the_modules():
    import antisd
    import memory

    p = train.get_parser()
    choices = {a.dest: a.choices for a in p._actions}
    assert tuple(choices["method"]) == antisd.METHODS and tuple(choices["optim_states"]) == memory.AdamW.STATES
    assert tuple(choices["recipe"]) == antisd.RECIPES


def test_eval_table_starts_its_own_line_in_a_log(capsys):
    import eval as ev

    ev.main(ev.get_parser().parse_args(["--model", "tiny", "--bench", os.path.join(ROOT, "tests", "fixtures", "tiny_eval.jsonl"),
                                        "--k", "1", "--max-new-tokens", "4", "--grade-workers", "0"]))  # fmt: skip
    cap = capsys.readouterr()
    assert cap.err.endswith("\n")  # the cleared bar's line ended: the table (stdout) starts on its own line in a log
    assert any(line.startswith("bench ") for line in cap.out.splitlines())


def test_eval_bench_lab_matches_train_held_out_accuracy(tmp_path):
    import eval as ev

    run(tmp_path / "run", "--steps", "1", "--eval-limit", "8", "--eval-k", "2")
    acc = [r for r in records(tmp_path / "run") if "eval_acc" in r][-1]["eval_acc"]
    res = ev.main(ev.get_parser().parse_args(["--model", str(tmp_path / "run" / "checkpoint-1"), "--bench", "lab", "--limit", "8",
                                              "--k", "2", "--max-new-tokens", "24", "--batch-size", "256", "--seed", "10000",
                                              "--grade-workers", "0", "--quiet"]))  # fmt: skip
    assert res["benches"]["lab"]["n"] == 8 and abs(res["Avg"] / 100 - acc) < 1e-9
