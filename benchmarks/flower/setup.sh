#!/usr/bin/env bash
# Flower's simulation engine (Ray backend) in its own venv, for benchmarks/flower/bench_flower.py.
# Kept apart from fedbus's venv: flwr pins its own protobuf/grpc/ray versions.
#   bash benchmarks/flower/setup.sh        (idempotent; ~1-3 min with a warm pip cache)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# torch pinned to the CPU wheel (constraints.txt); the task code is fedbus's own digits CNN,
# imported from the checkout, so the venv also needs fedbus's small dependencies.
"$venv/bin/pip" install -q --disable-pip-version-check -c "$root/constraints.txt" \
  "flwr[simulation]==1.42.0" torch scikit-learn numpy msgpack zstandard structlog PyYAML
"$venv/bin/python" -c "import flwr, ray; print('flwr', flwr.__version__, 'ray', ray.__version__)"
