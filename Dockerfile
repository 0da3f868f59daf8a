# fedbus runtime images, amd64 and arm64 (python:3.11-slim is multi-arch). Used by compose.yaml.
#   docker build --target base -t fedbus:dev .              # numpy only: checkpointer, numpy tasks
#   docker build --target trainer -t fedbus-trainer:dev .   # + CPU torch: nodes loading a torch task
#   docker buildx build --platform linux/amd64,linux/arm64 --target trainer ...
# torch is pinned by constraints.txt and comes from the PyTorch CPU index: PyPI's torch is a
# CUDA build (several GB with its nvidia packages) on amd64, and on arm64 too (2.13.0, measured).
# Build arguments (defaults are the public images; the deployment check overrides them because
# its machine reaches no registry, docs/deploy.md):
#   PYTHON_IMAGE  an image with python 3.11, `python` and `pip` on PATH (python:3.11-slim)
#   TORCH_INDEX   a package index with CPU torch and its dependencies (PEP 503)
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE} AS base

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
# redis: the checkpointer and store keep their data there when the manifest says so.
RUN pip install --constraint constraints.txt ".[redis]"

# Secrets generated next to the examples never enter an image (.dockerignore); compose mounts
# each node's own password or certificate at run time.
COPY examples ./examples

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/fedbus --create-home \
        --shell /usr/sbin/nologin fedbus
USER fedbus

CMD ["fedbus", "--help"]

# Trainers: the same image plus torch and scikit-learn.
FROM base AS trainer
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
USER root
# torch first, from the CPU index, at the version constraints.txt pins (as PyTorch's own
# instructions install it); then the trainer extra, whose torch requirement it satisfies.
RUN pip install --index-url "$TORCH_INDEX" "$(grep -E '^torch==' constraints.txt)" \
 && pip install --constraint constraints.txt ".[trainer]"
USER fedbus
