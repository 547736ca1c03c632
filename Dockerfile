# donations: the service on a slim Python, as a non-root user. Give it DATABASE_URL; without one it
# starts an embedded PostgreSQL in DONATIONS_DATA_DIR (mount a volume there to keep the data).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/donations
COPY pyproject.toml README.md ./
COPY donations ./donations
COPY sql ./sql
RUN pip install . && rm -rf /srv/donations/build

RUN useradd --create-home --uid 10001 donations
USER donations
WORKDIR /home/donations
# made here, as the service's user: a volume mounted on it then keeps that owner (Docker would
# otherwise create the mount point as root and the embedded PostgreSQL could not start)
RUN mkdir -p /home/donations/data

ENV HOST=0.0.0.0 \
    PORT=8080 \
    DONATIONS_DATA_DIR=/home/donations/data \
    LOG_FORMAT=json
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/healthz', timeout=2)"

# SIGTERM lets requests in flight finish, then closes the pool (and any embedded server).
STOPSIGNAL SIGTERM
CMD ["donations", "serve"]
