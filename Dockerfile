# moeserve's OpenAI-compatible server on a GPU (README.md, "Docker").
#
#   docker build -t moeserve .
#   docker run --gpus all -p 8000:8000 -v /models:/models moeserve --model /models/NAME
#
# Arguments after the image name go to `moeserve serve` (see `moeserve serve --help`); without --model it
# serves the embedded default model.

# CUDA 13 runtime libraries, NVRTC included: cupy (the gpu-cuda13 extra) compiles the szp kernels with it at
# first use. CUDA 13 because PyPI's torch 2.13.0 wheel for Linux x86_64 is built for it: torch, cupy and this
# image must share one CUDA major version.
FROM nvidia/cuda:13.0.0-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MOESERVE_CACHE_DIR=/var/cache/moeserve

# libgomp1: the OpenMP runtime of the szp CPU codec and the CPU GEMM (C++ extensions). gcc and python3.11-dev stay in the
# image: triton (a dependency of torch's CUDA wheels, which runs the MoE blocks' grouped expert GEMM) builds
# its kernel launchers with a C compiler against Python's headers the first time it runs a kernel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

# One version inside pyproject.toml's range, in its own layer so that code changes do not download it again.
# On PyPI the torch 2.13.0 wheel for Linux x86_64 is the CUDA 13 build: it brings its own CUDA libraries as
# wheels, so it needs only the host's NVIDIA driver (recent enough for CUDA 13).
RUN pip install torch==2.13.0

WORKDIR /opt/moeserve
COPY . .
# The szp CPU codec and the CPU GEMM are compiled here: a C++ compiler for this step only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && pip install '.[gpu-cuda13]' \
    && apt-get purge -y --auto-remove g++ \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 moeserve \
    && mkdir -p "$MOESERVE_CACHE_DIR" \
    && chown moeserve "$MOESERVE_CACHE_DIR"

# Compressed expert stores are cached here (keyed by checkpoint and policy); mount a volume on it to keep
# them across container restarts.
USER moeserve
WORKDIR /home/moeserve
EXPOSE 8000

# Loading a large checkpoint and compressing its experts can take minutes; failures before that do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://localhost:8000/health', timeout=4).status != 200)"]

# Host and port are part of the entrypoint, not CMD: `docker run IMAGE --model ...` replaces CMD, and the
# server's own default host (127.0.0.1) would not be reachable through -p. A later --port still wins.
ENTRYPOINT ["moeserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
