"""bench/bench_gpu.py --preset tiny: the GPU benchmark's code paths on CPU, as one command (CI smoke)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_tiny_preset_runs_every_section_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), "--preset", "tiny", "--out", str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(out))
    S = res["sections"]
    assert set(S) == {"sampler", "step:antisd", "step:long", "step:grpo", "longest"}, S.keys()
    for rows in ("8", "16"):
        r = S["sampler"][rows]
        assert r["ours"]["tok_per_s"] > 0 and r["generate"]["tok_per_s"] > 0 and r["speedup"] > 0
        assert r["ours"]["attention"] == "mirror" and r["ours"]["graph_buckets"] == []  # the engine's CPU defaults (CUDA: flex + graphs)
    for k in ("step:antisd", "step:grpo"):
        s = S[k]
        assert s["step"] == 2 and s["rollouts"] == 16 and s["step_time"] > 0
        assert s["reward_mean"] == 0.25  # one correct rollout per group of 4: the teacher prompt holds a real peer
        assert abs(s["t_sample"] + s["t_score"] + s["t_update"] - s["step_time"]) < 0.5 * s["step_time"]
    assert S["step:antisd"]["lam"] == 0.5 and S["step:grpo"]["lam"] == 0.0  # AntiSD's gate opened after 1 warmup step
    assert S["step:long"]["step"] == 1 and S["step:long"]["rollouts"] == 4 and S["step:long"]["new_tokens"] == 32
    assert S["longest"]["probe_ok"] is True
    assert res["torch"] and "total_s" in res
    assert "sampler, tiny" in p.stdout and "step:antisd" in p.stdout  # the printed table
