# The pluginctl controller image: non-root, works with a read-only root filesystem.
# The build stage installs everything into one virtual environment, the only thing the final
# stage copies: no layer carries files that a later one deletes.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# No pip in the environment: the base image's pip installs into it (`pip --python`).
RUN python -m venv --without-pip /opt/pluginctl
WORKDIR /src
# The runtime dependencies exactly as locked (`.ci/lock`), each file checked against its hash.
COPY requirements.lock ./
RUN pip --python /opt/pluginctl/bin/python install --require-hashes --only-binary :all: \
        -r requirements.lock
# The package itself, on top: what it needs must be all in the lock file (`pip check`).
COPY pyproject.toml README.md ./
COPY controller ./controller
RUN pip --python /opt/pluginctl/bin/python install --no-deps . \
    && pip --python /opt/pluginctl/bin/python check

FROM python:3.11-slim
# git: the agent (`pluginctl agent`, the workspace sidecar) fetches plugin sources with it.
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --home-dir /var/lib/pluginctl --create-home pluginctl
COPY --from=build /opt/pluginctl /opt/pluginctl
ENV PATH=/opt/pluginctl/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/pluginctl
EXPOSE 8080
ENTRYPOINT ["pluginctl"]
CMD ["run", "--kubernetes", "--listen=0.0.0.0:8080"]
