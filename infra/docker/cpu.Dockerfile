# CPU-only data nodes (the data pipeline's Ray workers): the CPU build of torch, Ray and
# illada at the versions pinned in pyproject.toml; no CUDA. From the repository root:
#
#   docker build -f infra/docker/cpu.Dockerfile -t $REGISTRY/illada-cpu:0.1.0 .
#
# PYTHON_MINOR must equal gpu.Dockerfile's: the two images join one Ray cluster.
ARG PYTHON_MINOR=3.12
FROM python:${PYTHON_MINOR}-slim-bookworm

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# KubeRay's probes call wget; the cluster launcher's file sync uses rsync.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget rsync \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/illada
COPY pyproject.toml README.md ./
COPY illada illada
COPY pipelines pipelines
COPY configs configs
# The data stack only (illada[data]): the pipeline's workers need no torch.
RUN pip install ".[data]" \
 && illada --help > /dev/null
