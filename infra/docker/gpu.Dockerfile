# GPU training nodes (and the head of a training cluster): NGC PyTorch, which brings CUDA,
# cuDNN, NCCL, a torch built for them, Transformer Engine and Apex, plus illada[train,data]
# (megatron-core, Ray) at the versions pinned in pyproject.toml. From the repository root:
#
#   docker build -f infra/docker/gpu.Dockerfile -t $REGISTRY/illada-gpu:0.1.0 .
#
# Every image of one Ray cluster must have the same Python minor version (Ray refuses
# mixed ones): NGC PyTorch images from 25.01 on ship 3.12, and cpu.Dockerfile uses the
# same PYTHON_MINOR. The build fails if the NGC tag's Python is another.
ARG NGC_TAG=26.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}
ARG PYTHON_MINOR=3.12

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    # Megatron's recommendation for overlapping TP communication with compute.
    CUDA_DEVICE_MAX_CONNECTIONS=1

# KubeRay's probes call wget; the cluster launcher's file sync uses rsync.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget rsync \
 && rm -rf /var/lib/apt/lists/*

RUN python -c "import sys; v = '%d.%d' % sys.version_info[:2]; assert v == '${PYTHON_MINOR}', f'this NGC image has Python {v}, not ${PYTHON_MINOR}: pick another NGC_TAG or change PYTHON_MINOR here and in cpu.Dockerfile'"

WORKDIR /opt/illada
COPY pyproject.toml README.md ./
COPY illada illada
COPY pipelines pipelines
COPY configs configs
# illada asks for torch as a range (pyproject.toml), which NGC's torch satisfies: pip keeps
# it, and Transformer Engine built against it. The check fails the build if it was replaced.
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch-before \
 && pip install ".[train,data]" \
 && python -c "import torch; assert torch.__version__ == open('/tmp/torch-before').read().strip(), 'pip replaced the image torch'" \
 && python -c "import megatron.core, transformer_engine, ray; print('megatron-core', megatron.core.__version__, '| ray', ray.__version__)" \
 && illada --help > /dev/null

# Ray's default user-facing ports: GCS, dashboard (jobs), client.
EXPOSE 6379 8265 10001
