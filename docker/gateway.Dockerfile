# syntax=docker/dockerfile:1
# The inspection gateway: FastAPI + Triton client + ONNX Runtime, no torch.
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t slsg-gateway .
# Run (Triton backend):            docker run -p 8080:8000 -e SLSG_TRITON_URL=triton:8001 slsg-gateway

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# only the shared core and the gateway (the .dockerignore leaves out the local Triton harness)
COPY pyproject.toml README.md ./
COPY slsg ./slsg
COPY service ./service
RUN pip install ".[serve]" \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SLSG_HOST=0.0.0.0 \
    SLSG_PORT=8000 \
    SLSG_BACKEND=triton \
    SLSG_TRITON_URL=triton:8001
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin slsg \
    && mkdir -p /var/lib/slsg && chown slsg:slsg /var/lib/slsg
# the gateway writes only inspection records, under SLSG_DATA_DIR (mount a volume there); with the
# embedded backend mount a repository at /srv/slsg/model_repository
ENV SLSG_DATA_DIR=/var/lib/slsg
WORKDIR /srv/slsg
USER slsg
EXPOSE 8000
# liveness only; readiness (Triton reachable, a model loaded) is /readyz, for load balancers
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SLSG_PORT', '8000'), timeout=2)" || exit 1
ENTRYPOINT ["slsg"]
CMD ["serve", "--backend", "triton"]
