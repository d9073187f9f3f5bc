#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it runs): on a machine with one NVIDIA GPU, after
# `make venv`, from the repository's root. Prints one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV:-.venv}/bin/python" -m benchmarks.gpu_check "$@"
