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
