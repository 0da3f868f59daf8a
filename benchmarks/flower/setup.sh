#!/usr/bin/env bash
# Flower in its own venv (benchmarks/flower/.venv), kept apart from fedbus's: flwr pins its own
# protobuf/grpc (and, for simulation, ray) versions.
#   bash benchmarks/flower/setup.sh          simulation engine (Ray) + torch: bench_flower.py,
#                                            bench_links.py --cases 10:digits
#   bash benchmarks/flower/setup.sh grpc     legacy gRPC only (flwr + numpy): bench_wire.py
# Idempotent; ~1 min for grpc, ~1-3 min for the simulation set with a warm pip cache.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
if [ "${1:-}" = "grpc" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check "flwr==1.42.0" numpy
  "$venv/bin/python" -c "import flwr; print('flwr', flwr.__version__)"
  exit 0
fi
# torch pinned to the CPU wheel (constraints.txt); the task code is fedbus's own digits CNN,
# imported from the checkout, so the venv also needs fedbus's small dependencies.
"$venv/bin/pip" install -q --disable-pip-version-check -c "$root/constraints.txt" \
  "flwr[simulation]==1.42.0" torch scikit-learn numpy msgpack zstandard structlog PyYAML
"$venv/bin/python" -c "import flwr, ray; print('flwr', flwr.__version__, 'ray', ray.__version__)"
