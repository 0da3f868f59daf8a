# fedbus developer entry points. `make demo` and `make test` are the README's two commands:
# each sets up everything it needs on a fresh Debian machine (as root) and is idempotent.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# docker-compose: only `docker-compose config` (validates generated compose files; no daemon).
# chromium: the dashboard test drives a headless browser.
# ejabberd: a second MQTT 5 broker (mod_mqtt) the bus contract also runs on (docs/broker.md);
# about 10 s to install (43 packages, measured on bookworm).
APT_PACKAGES := mosquitto mosquitto-clients redis-server shellcheck docker-compose chromium ejabberd
STAMP := $(VENV)/.installed

.PHONY: setup system venv demo test test-under-load lint typecheck pytest bench clean deploy-check deploy-check-arm64 deploy-clean

setup: system $(STAMP)

# Brokers, checkers and the browser the dashboard test drives come from Debian; only installed
# when missing.
system:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto mosquitto-clients"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/*/ejabberd-*/ebin/mod_mqtt.beam >/dev/null 2>&1 || missing="$$missing ejabberd"; \
	if [ -n "$$missing" ]; then \
	  echo "installing with apt:$$missing (about 1.5 minutes on a fresh Debian 12; quiet until done)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  case "$$missing" in *ejabberd*) \
	    : "the tests start their own; Debian's service would take port 1883 (mod_mqtt)"; \
	    $$SUDO systemctl disable --now ejabberd >/dev/null 2>&1 || $$SUDO service ejabberd stop >/dev/null 2>&1 || true;; esac; \
	fi

# torch's CPU build comes from PyTorch's own index: PyPI's x86_64 torch is the CUDA build (a
# 5.2 GB .venv against 1.5 GB). Where that index cannot be reached within seconds, torch comes
# from whatever this machine's pip is configured with; the last line says which build it got.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PIP := $(BIN)/pip install -qq --disable-pip-version-check -c constraints.txt
$(STAMP): pyproject.toml constraints.txt
	@echo "installing fedbus and its Python packages into $(VENV) (torch among them: a few minutes on a fresh machine)"
	@$(PYTHON) -m venv $(VENV)
	@if timeout 10 $(PYTHON) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)' \
	    "$(TORCH_CPU_INDEX)" >/dev/null 2>&1; then \
	  echo "torch: the CPU build from $(TORCH_CPU_INDEX)"; \
	  $(PIP) --index-url "$(TORCH_CPU_INDEX)" torch || echo "torch: $(TORCH_CPU_INDEX) failed; using this machine's pip configuration"; \
	else \
	  echo "torch: $(TORCH_CPU_INDEX) cannot be reached; using this machine's pip configuration"; \
	fi
	@$(PIP) -e ".[trainer,redis,dev,security,plot,metrics]"
	@$(BIN)/python -c 'import torch; cuda = torch.version.cuda; print(f"torch {torch.__version__} installed: " + (f"the CUDA {cuda} build (a ~5 GB .venv; for the CPU build: make clean, then make setup where $(TORCH_CPU_INDEX) can be reached)" if cuda else "the CPU build"))'
	@touch $(STAMP)

# The run leaves runs/digits/<run-id>/ (metrics, models, logs); the charts go in its plots/.
demo: setup
	$(BIN)/fedbus run examples/digits/manifest.yaml
	$(BIN)/fedbus plot digits

lint: setup
	$(BIN)/ruff check fedbus strategies tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The suite includes the docker/systemd deployment checks (tests/deploy, docs/deploy.md):
# they skip where no Docker daemon can start (fail in CI), FEDBUS_DEPLOY=0 skips them.
pytest: setup
	$(BIN)/pytest -q

test: lint pytest

# `make test` beside a CPU hog it starts and stops itself (HOGS busy loops, default 2): the
# suite must wait on conditions, not race the clock, on a machine busy with other work.
HOGS ?= 2
test-under-load: setup
	@hogs=""; trap 'kill $$hogs 2>/dev/null || true' EXIT INT TERM; \
	for _ in $$(seq $(HOGS)); do yes >/dev/null & hogs="$$hogs $$!"; done; \
	echo "test-under-load: $(HOGS) busy loops (pids$$hogs) beside the suite"; \
	status=0; $(MAKE) --no-print-directory test || status=$$?; \
	kill $$hogs 2>/dev/null || true; \
	echo "test-under-load: busy loops stopped; make test exited $$status"; exit $$status

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Deployment checks (docs/deploy.md), as root on Debian: a private dockerd (installs docker.io
# and debootstrap when missing), base images built locally from debootstrap, cached in .deploy/.
# `make test` runs them with a small digits job; this runs the example's full size
# (10 trainers x 20 rounds, final accuracy 0.9443) and the systemd check.
deploy-check: setup
	FEDBUS_DEPLOY_FULL=1 $(BIN)/pytest -q -s -m deploy tests/deploy

# arm64 (Raspberry Pi / Jetson userland) under qemu-user: about 20 minutes on 2 cores (plus 10
# for the first debootstrap, cached in .deploy/).
deploy-check-arm64: setup
	FEDBUS_DEPLOY_ARM64=1 $(BIN)/pytest -q -s tests/deploy/test_arm64.py

# The cached Debian rootfs tarballs and base images (1.2 GB).
deploy-clean:
	rm -rf .deploy
