# syntax=docker/dockerfile:1
# The training side: `slsg train / evaluate / calibrate / export` on an NVIDIA GPU.
# Build from the repository root:  docker build -f docker/trainer.Dockerfile -t slsg-trainer .
#
# The project needs Python 3.11 exactly, which the CUDA base images do not carry (nvidia/cuda
# ships the distribution's Python, pytorch/pytorch its own conda one). PyTorch's Linux x86-64
# wheels are CUDA builds that bring the CUDA runtime and cuDNN as nvidia-* wheels, so a slim
# Python 3.11 base plus those wheels is a complete CUDA training image; the host only needs the
# NVIDIA driver and the NVIDIA Container Toolkit.

FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
# another CUDA flavour, e.g. https://download.pytorch.org/whl/cu126 (empty = PyPI's default CUDA build)
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY slsg ./slsg
COPY service ./service
COPY training ./training
RUN pip install ".[train]"

# a non-root user; compose runs the container as the host user (TRAINER_UID) so files
# written to the bind-mounted runs/ and model_repository/ belong to them
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin slsg \
 && mkdir -p /workspace && chown slsg:slsg /workspace
USER slsg
WORKDIR /workspace
ENTRYPOINT ["slsg"]
CMD ["--help"]
