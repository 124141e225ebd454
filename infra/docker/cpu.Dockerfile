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
# The CPU wheel of the pinned torch (PyPI's default torch wheel is the CUDA one), then the
# rest of the pins.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; [torch] = [d for d in deps if d.startswith('torch==')]; print(torch + '+cpu')" > /tmp/torch.txt \
 && pip install -r /tmp/torch.txt --extra-index-url https://download.pytorch.org/whl/cpu \
 && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('torch')))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY illada illada
COPY pipelines pipelines
COPY configs configs
# illada's requires-python names the Python its CPU CI runs (3.11); the code runs on 3.12.
RUN pip install --no-deps --ignore-requires-python -e . \
 && illada --help > /dev/null
