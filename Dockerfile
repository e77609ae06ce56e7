# smsq: one image for every program; the command picks it (consume, dispatch, serve, ...).
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer consumer
COPY schemas schemas
RUN python -m venv /opt/smsq && /opt/smsq/bin/pip install --no-cache-dir .

FROM python:3.12-slim
COPY --from=build /opt/smsq /opt/smsq
ENV PATH=/opt/smsq/bin:$PATH PYTHONUNBUFFERED=1
# No root at run time; the programs write nothing to disk.
RUN useradd --system --no-create-home --shell /usr/sbin/nologin smsq
USER smsq
WORKDIR /tmp
# smsq stops cleanly on TERM (the default of `docker stop`): batch stored, then exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["smsq"]
CMD ["--help"]
