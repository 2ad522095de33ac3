# The letstalk-rt server in a container: `letstalk serve` on 0.0.0.0:8080 with the bundled model (docs/server.md,
# "In a container").
#
#   docker build -t letstalk-rt .                                      # torch from PyPI: the CUDA build (GPU or CPU)
#   docker build -t letstalk-rt:cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .  # CPU only, smaller
#   docker run --rm --network host -e LETSTALK_API_KEY="$KEY" letstalk-rt                 # add --gpus all on a GPU host
#   docker run --rm --network host -e LETSTALK_API_KEY="$KEY" letstalk-rt --max-sessions 6 --drain-seconds 60
#
# Arguments after the image name are `letstalk serve` options. Behind a package mirror or with no internet at all,
# pip's own variables pass through as build arguments: --build-arg PIP_INDEX_URL=https://mirror/simple, or
# --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://host:8000/ for a folder of wheels
# (scripts/docker_check.sh builds that way and streams a session through the container).

ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# tini as PID 1: it passes `docker stop`'s SIGTERM on (the server's gentle shutdown, --drain-seconds) and reaps the
# encoder processes of live streams. espeak-ng: the voice of text sessions (`say`, /v1/renders with text).
# APT_EXTRA: more Debian packages, e.g. g++ for `serve --compile` (torch.compile builds C++ kernels on a CPU; a BASE
# whose Python is Debian's needs python3-dev too, for Python.h).
ARG APT_EXTRA=
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini espeak-ng $APT_EXTRA \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv "$VIRTUAL_ENV"

# pip's settings, for a mirror or a folder of wheels; unset unless given (a build argument is seen by RUN as an
# environment variable, and pip reads these).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_TRUSTED_HOST

# torch first, in its own layer: the largest, and unchanged when the code changes. PyPI's Linux build carries CUDA
# and runs on a CPU as well; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gives the CPU build alone.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

COPY pyproject.toml README.md /src/
COPY letstalk_rt /src/letstalk_rt
COPY server /src/server
COPY client_examples/browser /src/client_examples/browser
RUN pip install "/src[engine]" && rm -rf /src \
    && python -c "import letstalk_rt.server; print('letstalk-rt', letstalk_rt.__version__)"

# Not root. Recordings and uploaded avatars are kept only where asked (--recordings-dir, --avatar-dir): /data is
# this user's, for a volume (-v letstalk-data:/data).
RUN useradd --create-home --uid 10001 letstalk && mkdir /data && chown letstalk /data
USER letstalk
WORKDIR /home/letstalk

EXPOSE 8080
# The port opens once the model has warmed up (about a minute on a small CPU); /health answers 503 while the server
# drains (--drain-seconds). With --port other than 8080, publish that port and give the check your own --health-cmd.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import ssl, urllib.request as r\ntry:\n    r.urlopen('http://127.0.0.1:8080/health', timeout=4)\nexcept Exception:  # HTTPS (--tls-cert), its certificate for clients to check\n    r.urlopen('https://127.0.0.1:8080/health', timeout=4, context=ssl._create_unverified_context())"]
ENTRYPOINT ["tini", "--", "letstalk", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD []
