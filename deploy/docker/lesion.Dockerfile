# syntax=docker/dockerfile:1
#
# RetinalGPT lesion image: lesion detection and the screening assessment over gRPC (`python -m services.lesion`).
# Build context: the repo root.
#
#   docker build -f deploy/docker/lesion.Dockerfile -t retinalgpt-lesion .
#   docker compose build lesion
#
# One Dockerfile per service. The builder stage is the same in each (BuildKit caches it by
# content, so the five builds share its layers); the runtime stage adds the service's
# settings, port, health check and entry point.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- builder: /opt/venv with the package, its dependencies and the generated gRPC code ----
# The same stage in every service's Dockerfile (tests/test_deploy_static.py checks it).
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Runtime dependencies first, read from pyproject.toml alone: a source change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
# grpcio-tools (a dev dependency) goes into the builder's system Python, never /opt/venv. It
# must not be newer than the runtime: grpc stubs refuse an older grpcio, protobuf code an older
# protobuf (pinning protobuf to the venv's bounds the protoc that grpcio-tools bundles).
RUN grpc="$(/opt/venv/bin/python -c 'import grpc; print(grpc.__version__)')" \
 && protobuf="$(/opt/venv/bin/python -c 'import google.protobuf as p; print(p.__version__)')" \
 && pip install --no-cache-dir "grpcio-tools<=${grpc}" "protobuf==${protobuf}"
# README.md: pyproject.toml names it as the package description.
COPY README.md ./
COPY protos ./protos
COPY shared ./shared
COPY services ./services
COPY training ./training
COPY cli ./cli
# Generated before `pip install .` (a non-editable install copies protos/ as it is); the import
# (-I: the installed package, not /src) fails the build, not the service, on a version mismatch.
RUN python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/retinal/v1/*.proto \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/python -I -c "import protos.retinal.v1.analysis_pb2_grpc, services, shared"

# ---- runtime: no compiler, no grpcio-tools, no dev extra ----
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric uid/gid (Kubernetes' runAsNonRoot verifies it). /var/lib/retinal holds
# results; a named volume mounted there (docker-compose.yml) starts with this ownership.
RUN groupadd --system --gid 10001 retinal \
 && useradd --system --uid 10001 --gid retinal --create-home --home-dir /home/retinal \
      --shell /usr/sbin/nologin retinal \
 && install -d -o retinal -g retinal /var/lib/retinal
COPY --from=builder /opt/venv /opt/venv
# Not /src: `python -m` puts the working directory first on sys.path; the code must come from
# the installed package.
WORKDIR /home/retinal
USER 10001:10001

# gRPC on 50052; Prometheus /metrics on 9452 (the same host).
ENV RETINAL_LESION_HOST=0.0.0.0 \
    RETINAL_LESION_PORT=50052
EXPOSE 50052 9452
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -m shared.healthcheck grpc "127.0.0.1:${RETINAL_LESION_PORT}"
CMD ["python", "-m", "services.lesion"]
