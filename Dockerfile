# The pluginctl controller image: non-root, works with a read-only root filesystem.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controller ./controller
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# git: the agent (`pluginctl agent`, the workspace sidecar) fetches plugin sources with it.
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --home-dir /var/lib/pluginctl --create-home pluginctl
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/pluginctl
EXPOSE 8080
ENTRYPOINT ["pluginctl"]
CMD ["run", "--kubernetes", "--listen=0.0.0.0:8080"]
