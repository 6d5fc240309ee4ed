"""runs.py: the run directory train.py writes, who may write it, and where a resume starts.

    OUT/metrics.jsonl      one JSON record per step, plus eval records (lines written whole)
    OUT/samples.jsonl      a rollout with its per-token u every --sample-every steps
    OUT/args.json          the run's flags (also inside every checkpoint)
    OUT/checkpoint-<k>/    HF model + trainer_state.pt; written as .tmp-checkpoint-<k>, then renamed
    OUT/.lock              held while a run writes here (flock: the kernel frees it when the process dies)
    OUT/STOP               create it to stop the run at the end of the current step (the run removes it)

The rules (issue 16), each a function below:
- `open_dir`: one live run per directory (the lock), and a fresh run never mixes with or
  destroys an earlier one: a directory holding another run's files is refused unless
  --overwrite, which deletes those files and only those (a caller's own files, e.g. study.py's
  train.log, stay).
- `resume_point`: the newest checkpoint that is complete. A corrupt one (a cut-off
  model.safetensors or trainer_state.pt) is named, renamed to checkpoint-<k>.corrupt (kept, never
  deleted) and the one before it is used. Names that are not checkpoint-<int> (checkpoint-best,
  a user's copy) are not the run's and are ignored, by resume and by pruning.
- `truncate_log`: on resume, metrics.jsonl and samples.jsonl are cut back to the checkpoint's
  step: the steps after it run again and would otherwise be logged twice.
- `prune`: only the run's own checkpoint-<int> at or below the step just saved are deleted.
- `Log` and `write_failed`: a write that fails (disk full above all) says "no space left",
  leaves no temp dir and no half line.
- `Stop`: Ctrl-C, SIGTERM (timeout, docker stop, a cluster's preemption) and OUT/STOP all mean
  "finish this step, save, exit non-zero" (exit codes in `Stop.EXIT`).
- `scoped`: train.main gives back its signal handlers and its lock however it ends (an error,
  a full disk), so an in-process caller (tests, study.py) keeps a working Ctrl-C and can rerun.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import shutil
import signal
import socket
import time
import zipfile

CKPT = re.compile(r"checkpoint-(\d+)")  # the run's own checkpoints (fullmatch)
OWN = re.compile(r"checkpoint-\d+(\.corrupt\d*)?")  # ... and those set aside as corrupt
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "args.json", "STOP")  # + checkpoint-* and .tmp-* dirs


def checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, path) of the run's checkpoint-<int> directories, oldest first."""
    if not os.path.isdir(out):
        return []
    found = [(int(m.group(1)), os.path.join(out, d)) for d in os.listdir(out) if (m := CKPT.fullmatch(d))]
    return sorted(p for p in found if os.path.isdir(p[1]))


def run_files(out: str) -> list[str]:
    """Names in `out` that a train.py run wrote (what makes a directory 'used')."""
    if not os.path.isdir(out):
        return []
    ours = lambda d: d in RUN_FILES or OWN.fullmatch(d) or d.startswith((".tmp-checkpoint-", ".tp-init"))  # noqa: E731
    return sorted(d for d in os.listdir(out) if ours(d))


# ---------------------------------------------------------------------------------------
# One live run per directory.
# ---------------------------------------------------------------------------------------

_HELD: dict[str, object] = {}  # realpath of a lock file -> its open file, for this process's own runs


def lock(out: str) -> None:
    """Hold OUT/.lock (an exclusive flock) for this process, or exit naming who holds it.

    The kernel drops the lock when the process ends, however it ends (kill -9 included), so a
    stale .lock file never blocks a resume.
    """
    try:
        os.makedirs(out, exist_ok=True)
        path = os.path.realpath(os.path.join(out, ".lock"))
        f = open(path, "a+")
    except OSError as e:
        raise SystemExit(f"train.py: --out {out}: cannot write there ({e.strerror or e}); pick another --out") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"train.py: {out} is in use by a live run ({who}); wait for it to end, or pick another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD[path] = f


def holder(out: str) -> str | None:
    """Who holds OUT/.lock ("pid ... on ... since ..."), or None when no live run does. Takes
    nothing: a probe for messages (a resume that finds no checkpoint in a live run's directory)."""
    path = os.path.join(out, ".lock")
    if not os.path.isfile(path) or os.path.realpath(path) in _HELD:
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def unlock(out: str) -> None:
    f = _HELD.pop(os.path.realpath(os.path.join(out, ".lock")), None)
    if f is not None:
        f.close()  # closing the file releases the flock; the .lock file itself may stay


def open_dir(out: str, *, resume: bool, overwrite: bool) -> None:
    """Lock `out` for this run; a fresh run refuses a directory holding another run's files
    (unless overwrite: those files are deleted first)."""
    lock(out)
    used = run_files(out)
    if resume or not used:
        return
    if not overwrite:
        unlock(out)
        hint = "--resume continues it" if checkpoints(out) else "it has no checkpoint to resume (it stopped before its first save)"
        shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
        raise SystemExit(f"train.py: {out} already holds a run ({shown}): {hint}; --overwrite deletes it and starts over; or pick another --out")
    for d in used:
        p = os.path.join(out, d)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    print(f"--overwrite: deleted the earlier run's {', '.join(used)} in {out}")


# ---------------------------------------------------------------------------------------
# Where a resume starts: the newest complete checkpoint.
# ---------------------------------------------------------------------------------------


def _check_safetensors(path: str) -> str | None:
    """A .safetensors file is an 8-byte header length, a JSON header, then the tensor bytes
    whose extent the header gives: a cut-off file is shorter than that."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            return f"{path}: cut off inside its header ({size} bytes)"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return f"{path}: unreadable header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path}: {size} bytes where its header says {8 + n + end} (cut off)"
    return None


def check_checkpoint(path: str) -> str | None:
    """None when the checkpoint is complete, else what is wrong, naming the file. Reads file
    headers only (never the tensors), so it is cheap at any model size."""
    ts = os.path.join(path, "trainer_state.pt")
    if not os.path.isfile(ts):
        return f"{ts}: missing"
    try:  # torch.save writes a zip archive; a cut-off one has lost its central directory
        zipfile.ZipFile(ts).close()
    except (zipfile.BadZipFile, OSError) as e:
        return f"{ts}: unreadable ({e})"
    for name in ("config.json", "args.json"):
        try:
            with open(os.path.join(path, name)) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            return f"{os.path.join(path, name)}: unreadable ({e})"
    weights = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded weights: every shard the index names must be there
        try:
            names = set(json.load(open(index))["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            return f"{index}: unreadable ({e})"
        if missing := sorted(names - set(weights)):
            return f"{path}: missing {', '.join(missing)} (named by model.safetensors.index.json)"
    if not weights:
        return f"{path}: no model .safetensors file"
    for w in weights:
        if why := _check_safetensors(os.path.join(path, w)):
            return why
    return None


def resume_point(out: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest complete checkpoint or None, [(corrupt newer checkpoint, what is wrong)])."""
    bad = []
    for _, path in reversed(checkpoints(out)):
        why = check_checkpoint(path)
        if why is None:
            return path, bad
        bad.append((path, why))
    return None, bad


def set_aside(bad: list[tuple[str, str]], used: str) -> None:
    """Rename corrupt checkpoints to checkpoint-<k>.corrupt (kept, out of resume's and pruning's way)."""
    for path, why in bad:
        dest = path + ".corrupt"
        i = 1
        while os.path.exists(dest):
            dest, i = f"{path}.corrupt{i}", i + 1
        os.replace(path, dest)
        print(f"resume: {why}; {os.path.basename(path)} moved to {os.path.basename(dest)} (kept), resuming from {os.path.basename(used)}")


def truncate_log(path: str, step: int) -> int:
    """Keep the records of steps <= `step` (all written before checkpoint-<step>; a step logs,
    evaluates, then saves), drop later ones and a cut-off last line. Rewritten atomically.
    Returns how many lines were dropped."""
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = int(rec.get("step", 0)) <= step
            except (ValueError, TypeError, AttributeError):
                ok = False  # a half line (a full disk, a kill mid-write of an older version)
            if ok:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


def prune(out: str, step: int, keep_last: int) -> None:
    """Delete the run's older checkpoints: checkpoint-<int> at or below `step`, all but the
    newest `keep_last` (0 keeps all). Anything else in `out` is never touched."""
    if keep_last <= 0:
        return
    own = [p for s, p in checkpoints(out) if s <= step]
    for p in own[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Writes that fail: say why, leave nothing half-written.
# ---------------------------------------------------------------------------------------


def _no_space(e: BaseException, out: str) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain, or (torch.save and safetensors wrap the
    OSError into their own errors, e.g. "unexpected pos ...") almost no free space left."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(out).free < 16 * 2**20
    except OSError:
        return False


def write_failed(what: str, e: BaseException, out: str, *, cleanup: str | None = None) -> str:
    """The one-line message for a failed write of `what` (and remove the temp dir `cleanup`)."""
    full = _no_space(e, out)  # before the cleanup frees the space again
    if cleanup:
        shutil.rmtree(cleanup, ignore_errors=True)
    if full:
        free = shutil.disk_usage(out).free / 2**20 if os.path.isdir(out) else 0.0
        return (f"train.py: no space left on device writing {what} in {out} ({free:.0f} MiB free once the partial write was "
                f"removed); free some space (or lower --keep-last) and continue with --resume --out {out}")
    return f"train.py: could not write {what} in {out}: {type(e).__name__}: {e}"


def write_json(path: str, obj) -> None:
    """Write `obj` as JSON to `path` atomically (a temp file, then one rename); a failed write
    (disk full) leaves the old file as it was, no temp file, and ends the run with write_failed's message."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise SystemExit(write_failed(os.path.basename(path), e, os.path.dirname(path) or ".")) from e


class Log:
    """An append-only JSONL file whose lines are written whole. A write that fails (disk full)
    is cut back to the last whole line and ends the run with write_failed's message, so no
    reader ever meets a half line. The file is opened for each line (a few per step), so no
    descriptor outlives a run that ends by an exception. path None: a no-op (ranks other than 0)."""

    def __init__(self, path: str | None):
        self.path = path

    def write(self, rec: dict) -> None:
        if self.path is None:
            return
        data = memoryview((json.dumps(rec) + "\n").encode())
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data) :]  # a short write leaves the rest for the next call
            except OSError as e:
                os.ftruncate(fd, end)
                out = os.path.dirname(self.path) or "."
                raise SystemExit(write_failed(os.path.basename(self.path), e, out)) from e
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------
# Stopping: signals and the STOP file.
# ---------------------------------------------------------------------------------------


class Stop:
    """Why the run stops early: SIGINT (Ctrl-C), SIGTERM, or the file OUT/STOP, seen at the end
    of a step (`requested()`); the loop then saves and the process exits with EXIT[reason].

    Under torchrun, Ctrl-C reaches every worker (and the agent forwards it once more); the agent
    kills the workers 30 s later, so a step longer than that cannot finish: stop such runs with
    `touch OUT/STOP` instead. A repeated signal changes nothing (kill -9 stops at once; the run
    then resumes from its last checkpoint).
    """

    EXIT = {None: 0, "SIGINT": 130, "SIGTERM": 143, "STOP": 75}  # 128 + signal; 75 = EX_TEMPFAIL
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, out: str):
        self.reason: str | None = None
        self.file = os.path.join(out, "STOP")
        self._old = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        _STOPS.append(self)

    def _on_signal(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            # os.write, not print: a handler may run in the middle of another print
            os.write(2, f"\n{self.reason}: finishing this step, then saving a checkpoint and exiting\n".encode())

    def requested(self) -> bool:
        if self.reason is None and os.path.exists(self.file):
            self.reason = "STOP"
        return self.reason is not None

    def close(self) -> None:
        """Restore the previous handlers; remove the STOP file that was obeyed."""
        for s, h in self._old.items():
            signal.signal(s, h)
        if self in _STOPS:
            _STOPS.remove(self)
        if self.reason == "STOP":
            try:
                os.remove(self.file)
            except FileNotFoundError:
                pass


_STOPS: list[Stop] = []  # the Stop objects whose handlers are installed in this process


def _after_fork_in_child() -> None:
    """A process forked from a training run (grading.py's worker pool) gets the handlers the run
    replaced: "finish the step" means nothing there, and a pool must be able to SIGTERM a stuck
    worker (a Python-level handler would only set a flag, and the pool would wait for ever). It
    also lets go of the run's lock: a worker that outlives the run must not keep --out locked."""
    for stop in reversed(_STOPS):
        for s, h in stop._old.items():
            signal.signal(s, h)
    _STOPS.clear()
    for f in _HELD.values():
        f.close()
    _HELD.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def scoped(main):
    """Decorator for train.main: whatever way it ends, the Stops it made are closed (their signal
    handlers restored, an obeyed OUT/STOP removed) and the run-directory locks it took are released."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        handlers = {s: signal.getsignal(s) for s in Stop.SIGNALS}
        locks, stops = set(_HELD), list(_STOPS)
        try:
            return main(*args, **kwargs)
        finally:
            for stop in [st for st in _STOPS if st not in stops]:
                stop.close()  # (also removes an obeyed OUT/STOP: a save that then failed must not stop the resume)
            for s, h in handlers.items():
                signal.signal(s, h)
            _STOPS[:] = stops
            for path in set(_HELD) - locks:
                _HELD.pop(path).close()

    return wrapper
