# BinaryLM's OpenAI-compatible server (`binarylm serve`) in an image. docs/deployment.md has the details.
#
#   docker build -t binarylm .                    # PyTorch's CPU build: no CUDA libraries, a small image
#   docker build -t binarylm:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
#   docker run --rm -p 8000:8000 --stop-timeout 40 -v "$PWD/runs/demo:/model:ro" \
#       -e BINARYLM_API_KEYS="$KEY" binarylm --checkpoint /model --model-name demo
#
# No model is baked in: the checkpoint (or run directory) is mounted when the container starts.

# An official Python image, 3.11 or newer (Debian-based: the runtime stage uses groupadd/useradd).
# Both stages use the same one, so the virtual environment copied from the first still finds its
# interpreter in the second.
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: one virtual environment holding PyTorch, the `serve` extra and binarylm ------------
FROM ${PYTHON_IMAGE} AS build

# Where PyTorch comes from. The default index has the CPU-only wheels; for a GPU image give one of
# PyTorch's CUDA indexes (.../whl/cu126, .../whl/cu128, ...). The wheels there bring their own CUDA
# runtime, so the base image needs no CUDA, only a host driver recent enough for that CUDA version.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The version `make test` runs on (Makefile); the index chosen above must carry it.
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# PyTorch first, from its own index only. The package's `torch>=2.5` is then already met, so the
# install below never fetches PyPI's default (CUDA) build. This layer changes with the build args
# alone, so editing the source does not download PyTorch again.
RUN python -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# Only what the package needs to build: its metadata (pyproject.toml names README.md) and source.
# The `serve` extra adds FastAPI and uvicorn; no dev, eval or interop extras. (DL3013 asks for pinned
# versions: this installs the project itself, whose requirements pyproject.toml bounds.)
WORKDIR /src
COPY pyproject.toml README.md ./
COPY binarylm ./binarylm
# hadolint ignore=DL3013
RUN pip install ".[serve]"

# ---- runtime: the environment, an unprivileged user, nothing else --------------------------------
FROM ${PYTHON_IMAGE}

# NVIDIA_DRIVER_CAPABILITIES matters only when the container runs with --gpus; it is ignored otherwise.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A numeric user, so that orchestrators that insist on non-root (runAsNonRoot) can verify it.
RUN groupadd --gid 10001 binarylm \
 && useradd --uid 10001 --gid 10001 --no-log-init --create-home --shell /usr/sbin/nologin binarylm

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/binarylm

EXPOSE 8000

# /health needs no API key. The slim image has no curl, so Python asks: a refused connection or an
# error status (the server is still loading the checkpoint, or is gone) exits 1 with a short reason.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.tracebacklimit = 0; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Listening on every interface makes `binarylm serve` insist on API keys (BINARYLM_API_KEYS or
# --api-key-file) unless --no-auth is given. Arguments after the image name replace CMD, so a
# run that adds options names the checkpoint itself: `... binarylm --checkpoint /model --max-batch 8`.
ENTRYPOINT ["binarylm", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--checkpoint", "/model"]
