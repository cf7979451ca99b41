# Reranker service image. CPU by default:
#   docker build -t reranker-service:0.1.0 .
# CUDA (torch's CUDA wheels carry the CUDA runtime; the host needs only the NVIDIA driver and container toolkit):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t reranker-service:0.1.0-cuda .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Three layers, each rebuilt only when its input changes. torch first, from the index that decides CPU or CUDA
# (the pin is pyproject.toml's: 2.13.0+cpu or +cuXXX satisfies `torch==2.13.0`, so the lock step keeps it).
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
# Every other dependency at the version CI tests: only a change of a lock rebuilds this layer.
# Then the tracing extra (OpenTelemetry) at the dev lock's versions: the OTEL_* variables turn traces on in the image.
COPY requirements.lock requirements-dev.lock /tmp/
RUN pip install --no-deps -r /tmp/requirements.lock \
    && pip install --constraint /tmp/requirements-dev.lock opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp
# The project's code, in a prefix of its own, so that the final stage ships it as a small layer over the venv's.
WORKDIR /src
COPY . .
RUN pip install --no-deps --target /opt/app /src

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/app/.cache/huggingface \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TQDM_DISABLE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RERANKER_MODEL=/home/app/model/bge-reranker-base \
    RERANKER_HOST=0.0.0.0 \
    RERANKER_PORT=50051 \
    RERANKER_REST_PORT=6009 \
    RERANKER_METRICS_PORT=9090
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /home/app/model /home/app/.cache/huggingface \
    && chown -R app:app /home/app
# The same split: the dependencies' layer stays cached (and pulled once) while the code's layer changes.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/app /opt/app
WORKDIR /home/app
# The weights live outside the image: mount the model directory at the legacy path (see README "Docker"). No VOLUME:
# it would leave an anonymous volume behind every container that runs without the mount.
USER 10001:10001
# gRPC, the legacy REST bridge, Prometheus metrics
EXPOSE 50051 6009 9090
# start-period covers loading and warm-up; health answers NOT_SERVING until the model is ready.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "server.healthcheck", "--timeout", "3"]
# Exec form: the server is PID 1 and gets SIGTERM itself, so `docker stop` drains in-flight requests.
ENTRYPOINT ["python", "-m", "server"]
