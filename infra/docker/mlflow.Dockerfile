# The MLflow tracking server (infra/k8s/mlflow.yaml): PostgreSQL backend through psycopg,
# artifacts on S3 through boto3. The mlflow version is pyproject.toml's, so clients and
# server agree; psycopg is the one the lineage tests run the server with.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t $REGISTRY/illada-mlflow:0.1.0 .
FROM python:3.12-slim-bookworm

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; pins = p['dependencies'] + p['optional-dependencies']['dev']; print('\n'.join(d for d in pins if d.split('==')[0] in ('mlflow', 'psycopg[binary]')))" > /tmp/requirements.txt \
 && echo "boto3==1.43.117" >> /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && mlflow --version

RUN useradd --create-home --uid 1000 mlflow
USER mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
