# segapp's runtime image: one process tree (uWSGI master, its workers, nginx) answering HTTP on port 8080, with the same
# uwsgi/ and nginx/ files as `make serve`. Built by `make image` (deploy/build-image), which supplies:
#   BASE          debian:bookworm-slim, or the same Debian release made from Debian's packages (debootstrap) when
#                 Docker Hub cannot be reached
#   build/image/  the Python packages as wheels and sources, downloaded on the host: pip needs no network here
#                 (apt reaches Debian's mirror; the host's extra CA certificates are installed first, for a
#                 TLS-intercepting proxy)
ARG BASE=debian:bookworm-slim

# --- builder: the runtime virtual environment, uWSGI compiled against Debian's Python
FROM ${BASE} AS builder
# build-image removes this stage's image once the runtime image is made
LABEL io.segapp.stage=builder
COPY build/image/ca-certificates/ /usr/local/share/ca-certificates/
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates python3 python3-venv python3-dev gcc libc6-dev \
 && update-ca-certificates
# segapp's wheel carries segapp/models (package_data): the demonstration models and, when `make models` fetched it,
# the person model (MediaPipe's selfie segmentation, Apache-2.0).
COPY build/image/wheels/ /wheels/
# Only the packages `make serve` runs with: no TensorFlow, no test or bench tools; then pip itself goes.
RUN python3 -m venv /opt/segapp/venv \
 && /opt/segapp/venv/bin/pip install --no-index --find-links /wheels --no-compile 'segapp[serve]' \
 && /opt/segapp/venv/bin/pip uninstall -y pip setuptools \
 && find /opt/segapp/venv -name '__pycache__' -prune -exec rm -rf {} +

# --- runtime
FROM ${BASE}
ARG BASE
COPY build/image/ca-certificates/ /usr/local/share/ca-certificates/
# libpython3.11: uWSGI embeds the interpreter. nginx: Debian's, as on a server.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 libpython3.11 nginx \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc /usr/share/man /var/log/nginx/* \
 && useradd --system --uid 10001 --gid nogroup --home-dir /nonexistent --no-create-home segapp
COPY --from=builder /opt/segapp/venv /opt/segapp/venv
COPY uwsgi/ /opt/segapp/uwsgi/
COPY nginx/ /opt/segapp/nginx/
# nginx/render.py reads API keys files with segapp/keys.py (standard library only) under the system python3: beside it.
COPY segapp/keys.py /opt/segapp/nginx/keys.py
COPY web/ /opt/segapp/web/

# Everything the stack writes goes to the run folder: mount a tmpfs or an emptyDir there, and the root can be read-only.
# nginx's access log goes to stderr with uWSGI's (the container's log): in the run folder it would grow with every request.
# The request lines are JSON (nginx's and the app's, one each, the same request_id) for the platform's log collector.
ENV VENV=/opt/segapp/venv \
    SEGAPP_RUN_DIR=/run/segapp \
    SEGAPP_ADDRESS=0.0.0.0 \
    SEGAPP_PORT=8080 \
    SEGAPP_DRAIN_SECONDS=0 \
    SEGAPP_NGINX_ACCESS_LOG=/dev/stderr \
    SEGAPP_LOG_FORMAT=json \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN mkdir -p /run/segapp && chmod 1777 /run/segapp
VOLUME /run/segapp
USER 10001:65534
EXPOSE 8080
WORKDIR /opt/segapp
# uwsgi/serve: SIGTERM (docker stop) drains for SEGAPP_DRAIN_SECONDS, then uWSGI lets requests in flight finish and
# stops its workers and nginx; workers default to the CPUs the container may use (its cgroup quota).
ENTRYPOINT ["/opt/segapp/uwsgi/serve"]
# Over HTTPS when the container is given a certificate (plain HTTP would be redirected), not verified: this
# container's own server, by address.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/opt/segapp/venv/bin/python", "-c", "import os, ssl, urllib.request; tls = os.environ.get('SEGAPP_TLS_CERT'); urllib.request.urlopen(('https' if tls else 'http') + '://127.0.0.1:8080/readyz', timeout=2, context=ssl._create_unverified_context())"]

ARG VERSION=unknown
ARG MODEL_VERSION=unknown
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="segapp" \
      org.opencontainers.image.description="U-Net image segmentation: uWSGI workers behind nginx, one process tree" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT AND Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}" \
      io.segapp.model.version="${MODEL_VERSION}"
