# The engine's image, for `engine deploy k8s --image` (and for running anything else of the engine in a container).
#
# CPU (the default base):
#   docker build -t REGISTRY/engine:0.1.0 .
# CUDA (a CUDA runtime base; the transfer engine's CUDA wheel instead of the CPU one, as the README says):
#   docker build -t REGISTRY/engine:0.1.0-cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 \
#       --build-arg EXTRAS= --build-arg GPU_PACKAGES=mooncake-transfer-engine .
# Stage backends (ONNX Runtime, OpenVINO; TensorRT on the CUDA variant): add them to EXTRAS, e.g.
#   --build-arg EXTRAS=backends,tensorrt
#
# The install is the README's: the same system libraries (RDMA verbs, NUMA, mosquitto, graphviz) and
# `pip install torch==2.13.0 -e '.[mooncake]'`. The image runs as user `engine` (uid 10001), which the rendered
# pods' fsGroup matches.

ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG EXTRAS=mooncake
ARG GPU_PACKAGES=
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH

# A CUDA base has no Python 3.11: take the distribution's.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libibverbs1 librdmacm1 libnuma1 mosquitto graphviz \
    && if ! command -v python3.11 >/dev/null; then \
           apt-get install -y --no-install-recommends python3.11 python3.11-venv; fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && useradd --create-home --uid 10001 engine

WORKDIR /opt/engine
COPY pyproject.toml README.md ./
COPY engine engine
COPY nodes nodes
COPY configs configs
COPY graphs graphs
RUN pip install torch==2.13.0 -e ".${EXTRAS:+[$EXTRAS]}" \
    && if [ -n "$GPU_PACKAGES" ]; then pip install $GPU_PACKAGES; fi \
    && engine --version

USER engine
CMD ["engine", "--help"]
