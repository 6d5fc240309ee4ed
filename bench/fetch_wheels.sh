#!/usr/bin/env bash
# bench/fetch_wheels.sh: the wheels bench/gpu_check.sh installs on a lent GPU machine (it has no
# network), downloaded here into .whl/ at the repository root (git-ignored via info/exclude).
# The lent H200s carry torch 2.11 and transformers 5.17 (requirements.txt allows it) but not
# math-verify, which grading.py imports. Pure-Python wheels, a few hundred KB.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
ls -l .whl
