# fedbus runtime images, amd64 and arm64 (python:3.11-slim is multi-arch). Used by compose.yaml.
#   docker build --target base -t fedbus:dev .              # aggregator, relay, ...: numpy only
#   docker build --target trainer -t fedbus-trainer:dev .   # trainers: + CPU torch
#   docker buildx build --platform linux/amd64,linux/arm64 --target trainer ...
# torch is pinned by constraints.txt and comes, on amd64, from the PyTorch CPU index: from PyPI
# alone an x86_64 install pulls several GB of CUDA wheels no container here uses. arm64 PyPI
# wheels are CPU-only already.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # `fedbus serve` imports the task named in the manifest (examples.digits.task:make_task).
    PYTHONPATH=/app

WORKDIR /app

# Dependencies first, so editing code does not reinstall them. README.md* may be absent.
COPY pyproject.toml constraints.txt README.md* ./
COPY fedbus ./fedbus
COPY strategies ./strategies
RUN pip install --constraint constraints.txt .

# Secrets generated next to the examples never enter an image (.dockerignore); compose mounts
# each node's own password or certificate at run time.
COPY examples ./examples

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/fedbus --create-home \
        --shell /usr/sbin/nologin fedbus
USER fedbus

CMD ["fedbus", "--help"]

# Trainers: the same image plus torch and scikit-learn.
FROM base AS trainer
ARG TARGETARCH
USER root
RUN extra=""; \
    if [ "${TARGETARCH:-amd64}" = "amd64" ]; then \
        extra="--extra-index-url https://download.pytorch.org/whl/cpu"; \
    fi; \
    pip install $extra --constraint constraints.txt ".[trainer]"
USER fedbus
