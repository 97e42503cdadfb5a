#!/usr/bin/env bash
# polygrad's two entry points. Each creates ./.venv (Python 3.11+, pip) on first use.
#   bash run.sh main [ARGS...]   train PPO on CartPole-v1 over several seeds (experiments/control.py)
#   bash run.sh test [ARGS...]   the whole test suite, slow learning tests included, on 2 worker processes
#                                (pytest-xdist; POLYGRAD_TEST_WORKERS=N to change, 0 for one process; pytest ARGS)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
stamp=.venv/.polygrad-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    touch "$stamp"
fi
# XLA:CPU's concurrency-optimised scheduler can stall long vmapped runs on small machines (see README).
export XLA_FLAGS="${XLA_FLAGS:---xla_cpu_enable_concurrency_optimized_scheduler=false}"
what=${1:-}
shift || true
case "$what" in
    main) exec .venv/bin/python -m experiments.control "$@" ;;
    test) exec .venv/bin/python -m pytest -n "${POLYGRAD_TEST_WORKERS:-2}" "$@" ;;
    *) echo "usage: bash run.sh main|test [ARGS...]" >&2; exit 2 ;;
esac
