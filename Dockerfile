# syntax=docker/dockerfile:1
# Yanray's image: the bot and the CUDA build of torch on a slim Python base.
#
# The project is installed the way the README installs it (a virtual environment, pip and
# pyproject.toml); from PyPI the Linux x86_64 torch wheel is the CUDA build and carries the CUDA
# libraries itself, so the host needs only the NVIDIA driver and container toolkit, no CUDA image.
# Two stages: the build stage holds the compilers (for a dependency without a wheel), the final
# stage only the finished environment. It runs as an unprivileged user; the data folder (/data)
# and the model cache (/data/models) are volumes (docker-compose.yml).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/yanray && /opt/yanray/bin/pip install --upgrade pip
# torch in a layer of its own: the largest download (about 3 GB with its CUDA libraries), and
# the one that changes least; the same version scripts/install.sh pins. PyPI's CUDA build has
# no kernels for GPUs older than Turing (Maxwell, Pascal such as the P102-100, Volta); for
# those, build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
RUN /opt/yanray/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY errors/ errors/
COPY bot/ bot/
COPY engine/ engine/
COPY adapters/ adapters/
COPY storage/ storage/
COPY evals/ evals/
RUN /opt/yanray/bin/pip install "torch==${TORCH_VERSION}" .

FROM ${PYTHON_IMAGE}
# Compiled decode (YANRAY_COMPILE) needs a C compiler at run time: Triton builds its CUDA
# launcher with one. The image leaves it out to stay small, so decode runs eagerly; build with
# `--build-arg YANRAY_COMPILE=auto` to add gcc (about 170 MB) and turn compiled decode on.
ARG YANRAY_COMPILE=off
RUN if [ "$YANRAY_COMPILE" != off ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi
# /data and /data/models exist and belong to the user, so fresh named volumes mounted there do too
RUN groupadd --system --gid 10001 yanray \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/yanray yanray \
 && mkdir -p /data/models \
 && chown -R yanray:yanray /data
COPY --from=build /opt/yanray /opt/yanray
ENV PATH=/opt/yanray/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    YANRAY_DATA_DIR=/data \
    HF_HOME=/data/models/huggingface \
    YANRAY_HTTP_LISTEN=0.0.0.0:8089 \
    YANRAY_COMPILE=${YANRAY_COMPILE}
USER 10001:10001
WORKDIR /home/yanray
EXPOSE 8089
ENTRYPOINT ["yanray"]
CMD ["run"]
