# hangon gateway. Build: docker build -t hangon .
# Run:  docker run --rm hangon keygen > hangon.env     (the keys that seal stored state)
#       docker run -p 8765:8765 --env-file hangon.env -e HANGON_REDIS_URL=redis://redis:6379/0 hangon
#       (every option is also a HANGON_* variable; see docs/configuration.md)
# Three gateways behind HAProxy: deploy/compose.yaml.
# The install steps are those CI runs outside Docker: pip wheel, then pip install the wheels.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home hangon
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
USER hangon
ENV HANGON_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
EXPOSE 8765
# /healthz answers while the process runs; balancers should check /readyz instead, which
# fails while the gateway drains or cannot reach Redis.
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HANGON_PORT', '8765'), timeout=1)" || exit 1
# SIGTERM drains: /readyz fails, clients are closed with 1012 over --drain-period (10 s)
# and the process exits 0. Give it a stop timeout above that (docker stop -t 30,
# Kubernetes terminationGracePeriodSeconds: 30).
STOPSIGNAL SIGTERM
ENTRYPOINT ["hangon"]
CMD ["serve"]
