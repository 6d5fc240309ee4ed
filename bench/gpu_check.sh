#!/usr/bin/env bash
# bench/gpu_check.sh: issue 10's device check in one command: < 8 minutes on one H100 / H200, no network.
#
#   bash bench/fetch_wheels.sh     # once, on a machine that reaches PyPI: the wheels a lent GPU lacks, into .whl/
#   bash bench/gpu_check.sh        # on the GPU machine, from anywhere; results in $OUT (default bench/results/gpu_check/)
#
#   1. installs the wheels under .whl/ if there are any (math-verify and its needs: the lent
#      machines have torch 2.11 and transformers 5.17 but not it) into a temp dir on PYTHONPATH;
#   2. records the card and the versions (nvidia-smi.txt, env.txt);
#   3. runs tests/test_cuda.py (test_cuda.log, test_cuda.xml), at most 200 s;
#   4. runs bench/bench_gpu.py with what is left of a 450 s budget (bench_gpu.json, bench_gpu.log;
#      its time guards skip the sections that would not fit).
# Six files, all of them plain text. Exit status: the CUDA tests' (the bench's numbers are for reading).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
DIR="${OUT:-bench/results/gpu_check}"
mkdir -p "$DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d)
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl; then
        echo "gpu_check: installing the wheels in .whl/ failed" >&2
        exit 2
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi || echo "no nvidia-smi"; } > "$DIR/nvidia-smi.txt" 2>&1
"$PY" - > "$DIR/env.txt" 2>&1 <<'PYEOF'
import importlib.util, platform, subprocess
import torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda, "| transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CUDA unavailable)")
print("math_verify", "yes" if importlib.util.find_spec("math_verify") else "no (bench_gpu stubs grading.py; train.py on real data needs it)")
try:
    print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or "unknown")
except Exception:
    print("commit unknown (no git here: record the commit you sent)")
PYEOF
cat "$DIR/env.txt"
timeout 200 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py --junitxml="$DIR/test_cuda.xml" 2>&1 | tee "$DIR/test_cuda.log"
rc=${PIPESTATUS[0]}
left=$(( ${GPU_CHECK_BUDGET_S:-450} - ($(date +%s) - START) - 30 ))
if [ "$left" -gt 60 ]; then
    timeout $((left + 60)) "$PY" bench/bench_gpu.py --budget-s "$left" --out "$DIR/bench_gpu.json" 2>&1 | tee "$DIR/bench_gpu.log"
else
    echo "gpu_check: no time left for bench_gpu.py (${left}s)" | tee "$DIR/bench_gpu.log"
fi
echo "gpu_check: tests exit status $rc, $(( $(date +%s) - START ))s in all; results in $DIR"
exit "$rc"
