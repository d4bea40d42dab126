# Two images from one Dockerfile (compose.yaml builds and runs both: docker compose up -d --build):
#
#   the bot, the default (the LAST stage):  docker build -t inpaint-bot .
#     docker run -d --env-file .env -v inpaint-data:/data -p 8765:8765 inpaint-bot
#     (with PAINTER_PUBLIC_URL in .env: the address users' browsers reach the published painter port at)
#   the GPU worker:                          docker build --target worker -t inpaint-worker .
#     docker run --gpus all -p 127.0.0.1:8000:8000 -v /srv/models:/models:ro \
#       -e MODEL_PATH=/models/sdxl-inpainting -e SAFETY_CHECKER_PATH=/models/safety-checker \
#       -e WORKER_KEY=change-me inpaint-worker
#     the same image as a Ray Serve application (README "Scale out with Ray Serve"; Ray's object store is in
#     /dev/shm): docker run --gpus all --shm-size=8g ... inpaint-worker serve run deploy/serve.yaml
#
# Every ARG used in a FROM line is declared here, before the first FROM: an ARG declared after a FROM belongs to
# that stage and can't be used by a later FROM.
#
# TORCH_IMAGE: the worker's base, an official PyTorch CUDA runtime image. It must carry torch 2.13.0, the version
# pyproject's [worker] extra pins, so that pip keeps the image's CUDA build instead of installing another torch
# (the build stops with a message if it doesn't). torch 2.13 is built for CUDA 12.6 and 13.0 (13.2 experimental).
# The default, CUDA 13.0, needs an NVIDIA driver of the 580 series or newer; with an older driver build on the
# CUDA 12.6 image instead:
#   docker build --target worker --build-arg TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime \
#     -t inpaint-worker .
# NOT VERIFIED: this tag follows PyTorch's naming (<torch>-cuda<X.Y>-cudnn<N>-runtime) and its CUDA matrix for
# 2.13, but it was chosen on a machine with no Docker engine and no access to Docker Hub: it has never been pulled
# or built here. If the pull fails, pick the 2.13.0 runtime tag that Docker Hub lists for your CUDA version.
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime


# ---- the GPU worker (python -m services.worker): docker build --target worker -t inpaint-worker . -------------
# Weights are never downloaded: mount your model folders (read-only) and point MODEL_PATH and SAFETY_CHECKER_PATH
# at them.
FROM ${TORCH_IMAGE} AS worker

# PIP_BREAK_SYSTEM_PACKAGES: recent PyTorch images install torch into the system Python of their Ubuntu base,
# which may be marked "externally managed" (PEP 668); inside this image that's the Python we mean to add to.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HUB_OFFLINE=1 \
    HOST=0.0.0.0 \
    PORT=8000

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin worker

WORKDIR /app
COPY pyproject.toml README.md bot.py ./
COPY services ./services
COPY cogs ./cogs
# the Ray Serve application's config (`serve run deploy/serve.yaml`: README "Scale out with Ray Serve")
COPY deploy ./deploy
# python3, not python: every PyTorch image has python3 (the newer ones may have no `python`). First make sure the
# base image's torch is the pinned one with CUDA, then install; afterwards torch must still be that CUDA build.
RUN python3 -c "import sys, tomllib, torch; \
pins = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['worker']; \
want = next(p.split('==', 1)[1] for p in pins if p.startswith('torch==')); \
have = torch.__version__.split('+')[0]; \
sys.exit(None if have == want and torch.version.cuda else \
f'TORCH_IMAGE carries torch {torch.__version__} (CUDA {torch.version.cuda}), but the [worker] extra pins ' \
f'torch=={want}: build with --build-arg TORCH_IMAGE=pytorch/pytorch:{want}-cuda<X.Y>-cudnn9-runtime')" \
    && (python3 -m pip --version || python3 -m ensurepip) \
    && python3 -m pip install '.[worker,cluster]' \
    && python3 -c "import torch; assert torch.version.cuda, 'pip replaced the CUDA torch of TORCH_IMAGE'"

USER worker
EXPOSE 8000
# Generous start period: /health answers only once the model is loaded and warmed up.
HEALTHCHECK --interval=15s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=5)"]
CMD ["python3", "-m", "services.worker"]


# ---- the bot (python bot.py): the last stage, so the default of docker build -t inpaint-bot . ----------------
# Slim Python, a non-root user, SQLite on the /data volume. The mask painter listens on 0.0.0.0:8765 inside the
# container: publish it (-p 8765:8765) and set PAINTER_PUBLIC_URL to the address users' browsers reach it at
# (otherwise painter links point at http://0.0.0.0:8765).
FROM python:3.11-slim AS bot

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATABASE_PATH=/data/bot.sqlite3 \
    PAINTER_HOST=0.0.0.0 \
    PAINTER_PORT=8765

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin bot \
    && mkdir -p /data && chown bot:bot /data

WORKDIR /app
COPY pyproject.toml README.md bot.py ./
COPY services ./services
COPY cogs ./cogs
RUN pip install .

USER bot
VOLUME ["/data"]
EXPOSE 8765
CMD ["python", "bot.py"]
