#!/usr/bin/env bash
# The GPU check of bench/gpu_check.py: the benchmarks and the gpu preset's study, one report
# (gpu_check/gpu_check.md and .json). On a GPU machine: bench/gpu_check.sh (~15 min);
# on a CPU: bench/gpu_check.sh --cpu-tiny (a minute or two).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec python3 bench/gpu_check.py "$@"
