# hangon gateway. Build: docker build -t hangon .
# Run:  docker run -p 8765:8765 hangon serve --redis-url redis://redis:6379/0 \
#         --downstream ws://agent:8080/      (without --downstream: the in-process demo agent)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home hangon
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER hangon
ENV HANGON_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
EXPOSE 8765
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=1)" || exit 1
ENTRYPOINT ["hangon"]
CMD ["serve"]
