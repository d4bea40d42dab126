# The bot image: slim Python, a non-root user, SQLite on a volume.
#   docker build -t inpaint-bot .
#   docker run --env-file .env -v inpaint-data:/data inpaint-bot
FROM python:3.11-slim AS bot

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATABASE_PATH=/data/bot.sqlite3

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin bot \
    && mkdir -p /data && chown bot:bot /data

WORKDIR /app
COPY pyproject.toml README.md bot.py ./
COPY services ./services
COPY cogs ./cogs
RUN pip install .

USER bot
VOLUME ["/data"]
CMD ["python", "bot.py"]

# The GPU worker: a CUDA PyTorch base image with the [worker] extra. Weights are never downloaded: mount your
# model folder and point MODEL_PATH at it.
#   docker build --target worker -t inpaint-worker .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro \
#     -e MODEL_PATH=/models/sdxl-inpainting -e SAFETY_CHECKER_PATH=/models/safety-checker \
#     -e WORKER_KEY=change-me inpaint-worker
# The base image must carry torch 2.13.0 (the version the [worker] extra pins), so pip keeps its CUDA build.
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${TORCH_IMAGE} AS worker

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HOST=0.0.0.0 \
    PORT=8000

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin worker
WORKDIR /app
COPY pyproject.toml README.md bot.py ./
COPY services ./services
COPY cogs ./cogs
RUN pip install '.[worker]'

USER worker
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8000\")}/health')"
CMD ["python", "-m", "services.worker"]
