# fedbus runtime image: aggregator and trainers (CPU torch). Used by compose.yaml.
#   docker build -t fedbus:dev .
# torch comes from the PyTorch CPU index and is pinned by constraints.txt; from PyPI alone an
# x86_64 install pulls several GB of CUDA wheels no container here uses.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # `fedbus serve` imports the task named in the manifest (examples.digits.task:make_task).
    PYTHONPATH=/app

WORKDIR /app

# Dependencies first, so editing code does not reinstall torch. README.md* may be absent.
COPY pyproject.toml constraints.txt README.md* ./
COPY fedbus ./fedbus
COPY strategies ./strategies
RUN pip install \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        --constraint constraints.txt \
        ".[trainer]"

COPY examples ./examples

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/fedbus --create-home \
        --shell /usr/sbin/nologin fedbus
USER fedbus

CMD ["fedbus", "--help"]
