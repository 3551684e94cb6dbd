# tokenbroker: one image for the HTTP API (`serve`) and the proxy (`proxy`).
# Build: docker build -t tokenbroker .   Run: see compose.yaml and README "Deploying several replicas".
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A system user without a login shell owns nothing but its working folder.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/tokenbroker \
        --create-home --shell /usr/sbin/nologin tokenbroker

WORKDIR /src
COPY pyproject.toml README.md hatch_build.py ./
COPY src ./src
RUN pip install '.[server,postgres,redis]' && rm -rf /src

# The configuration is mounted here (read-only); it holds ${VAR} references, the secrets
# come from the environment.
ENV TOKENBROKER_CONFIG=/etc/tokenbroker/tokenbroker.yaml
USER 10001:10001
WORKDIR /var/lib/tokenbroker
EXPOSE 8750

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8750/livez', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["tokenbroker"]
CMD ["serve", "--config", "/etc/tokenbroker/tokenbroker.yaml"]
