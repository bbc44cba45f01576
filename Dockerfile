# stampd in a container: a wheel built in the first stage, installed into a virtual environment in a slim runtime
# that runs as an unprivileged user. Build: docker build -t stampd:0.1.0 .
# The image holds no configuration, keys or records: mount the configuration at /etc/stampd/stampd.toml (with
# the keys or the HSM client it names) and keep /var/lib/stampd (SQLite records) on a volume.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels . \
 && python -m venv /opt/stampd \
 && /opt/stampd/bin/pip install --no-cache-dir --no-index --find-links /wheels stampd

FROM ${PYTHON_IMAGE} AS runtime
# tzdata: /usr/share/zoneinfo/leap-seconds.list, the leap-second table clock.leap_seconds_file reads by default.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 stampd \
 && useradd --system --uid 10001 --gid stampd --home-dir /var/lib/stampd --shell /usr/sbin/nologin stampd \
 && install --directory --owner stampd --group stampd --mode 0700 /var/lib/stampd \
 && install --directory --owner stampd --group stampd --mode 0750 /etc/stampd
COPY --from=build /opt/stampd /opt/stampd
ENV PATH=/opt/stampd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STAMPD_CONFIG=/etc/stampd/stampd.toml
USER 10001:10001
WORKDIR /var/lib/stampd
VOLUME ["/var/lib/stampd"]
EXPOSE 3180
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:3180/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["stampd"]
CMD ["serve", "-c", "/etc/stampd/stampd.toml", "--listen", "0.0.0.0:3180"]
