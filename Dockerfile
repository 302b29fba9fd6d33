# syntax=docker/dockerfile:1
#
# Hivecell node daemon for x86_64 and arm64 servers (Debian 12, Python 3.11), with CPU or CUDA torch from PyTorch's
# own wheels. For NVIDIA Jetson boxes use Dockerfile.l4t instead: PyPI's and PyTorch's aarch64 wheels are not built
# for Jetson's integrated GPU.
#
# Build (the context is the repository root; .dockerignore keeps node state, venvs and caches out of it):
#
#   docker build -t hivecell:cpu .                                   CPU torch from https://download.pytorch.org/whl/cpu
#   docker build --build-arg TORCH_VARIANT=cuda -t hivecell:cuda .   the default torch wheel from PyPI: the CUDA build
#                                                                    on x86_64 (NVIDIA libraries come as pip wheels)
#   docker buildx build --platform linux/amd64,linux/arm64 -t hivecell:cpu .      both architectures
#
#   TORCH_VERSION (default 2.13.0, the version CI tests with) picks the release. TORCH_INDEX_URL overrides the index
#   the variant chooses, e.g. https://download.pytorch.org/whl/cu126 for a CUDA build pinned to one CUDA release, or
#   for CUDA on arm64 servers (Grace), where PyPI's default aarch64 wheel may be a CPU build depending on the release.
#
# Run:
#
#   docker run -d --name hivecell --restart unless-stopped --stop-timeout 30 \
#       --network host -v hivecell:/var/lib/hivecell hivecell:cpu
#   docker run ... --gpus all hivecell:cuda                          CUDA image (needs the NVIDIA Container Toolkit)
#
#   --network host      mDNS discovery (`_hivecell._tcp.local.`, UDP multicast to 224.0.0.251:5353) reaches the other
#                       nodes of the LAN only from the host's network namespace. On a user-defined bridge network
#                       (several nodes on one machine, CI) the containers discover each other on that bridge; publish
#                       the port with `-p 4001:4001` for peers outside it.
#   -v hivecell:...     the node's Ed25519 key (node.key, mode 0600) and its LMDB store live in /var/lib/hivecell.
#                       Keep that volume: a new volume is a new node with a new peer id. A named volume inherits the
#                       owner (uid 10001) from the image; a bind mount must be `chown 10001:10001` first.
#   --stop-timeout 30   `docker stop` sends SIGTERM, on which the daemon puts a running job back in the queue (without
#                       using up an attempt), stops its Workers and exits 0. Docker's default of 10 s before SIGKILL
#                       can be short for that under load; a job cut off by SIGKILL is re-run once on the next start.
#
# First start: `hivecell run` creates the key and the store when the home has none, so no separate init step is
# needed; `docker exec hivecell hivecell status` shows the peer id and the addresses, and the owner commands run the
# same way (`docker exec -it hivecell hivecell jobs list`).
#
# Worker sandbox: a Worker tries to drop its network with unshare(2); Docker's default seccomp profile refuses that to
# a process without CAP_SYS_ADMIN, so in a container the drop does not happen (it is best-effort). Memory and CPU
# limits (setrlimit) still apply.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm


# ---------------------------------------------------------------------------------------------------------------------
# builder: wheels for every dependency except torch, and our own wheel. The runtime stage never sees a compiler.
# ---------------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive

# Versions are left to the base image's Debian 12 repositories: the base image tag is the pin, and exact pins would
# break on every point release. fastecdsa 2.3.2 (pinned by libp2p) is an sdist that compiles C code against GMP
# (gcc and libgmp-dev; the Python headers come with the python image); python-baseconv and varint are pure-Python
# sdists that need no compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential \
        libgmp-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Dependency wheels first, from pyproject.toml alone, so that editing the code does not rebuild them. torch is taken
# out of the list (the runtime stage installs it from the index TORCH_VARIANT picks). --prefer-binary keeps pip on
# the newest release that has a wheel for this platform rather than compiling a newer sdist.
COPY pyproject.toml ./
RUN python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if re.match(r'[A-Za-z0-9._-]+', d).group(0).lower() != 'torch'))" \
        > /tmp/requirements.txt \
    && cat /tmp/requirements.txt \
    && pip wheel --no-cache-dir --prefer-binary --use-pep517 --wheel-dir /wheels -r /tmp/requirements.txt \
    && if ls /wheels/torch-*.whl > /dev/null 2>&1; then echo 'a torch wheel got into /wheels' >&2; exit 1; fi

# Then our own wheel, without dependencies (they are all in /wheels already).
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .


# ---------------------------------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HIVECELL_HOME=/var/lib/hivecell

# Run-time library of fastecdsa's C extension (GMP). Versions: see the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libgmp10 \
    && rm -rf /var/lib/apt/lists/*

# torch first: the largest layer, and the one that changes least. cpu: PyTorch's CPU index, which also serves torch's
# own dependencies (sympy, networkx, jinja2, fsspec, filelock, typing-extensions), so no CUDA wheel can slip in; its
# versions carry a local label (2.13.0+cpu), which `torch==2.13.0` matches. cuda: the default index, whose x86_64
# torch is the CUDA build with NVIDIA's runtime libraries as nvidia-* wheels. The installed version is then written to
# a constraints file that PIP_CONSTRAINT applies to every later pip install, in this image and in images built FROM it.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
RUN case "${TORCH_VARIANT}" in \
        cpu) index_url="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
        cuda) index_url="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not '${TORCH_VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "${index_url}" "torch==${TORCH_VERSION}" \
    && mkdir -p /etc/hivecell \
    && printf 'torch==%s\n' "$(python -c 'import importlib.metadata as m; print(m.version("torch"))')" \
        > /etc/hivecell/pip-constraints.txt \
    && cat /etc/hivecell/pip-constraints.txt
ENV PIP_CONSTRAINT=/etc/hivecell/pip-constraints.txt

# Our wheelhouse, installed as is: --no-index (nothing from PyPI), --no-deps (the wheelhouse is the complete,
# already-resolved dependency set, torch aside). `pip check` then proves the result is consistent, torch included
# (pyproject.toml's torch floor against the installed build). Then a smoke test that needs no GPU: the entry point,
# the CLI, the LMDB store and the libp2p host (which loads fastecdsa's GMP extension).
RUN --mount=type=bind,from=builder,source=/wheels,target=/tmp/wheels \
    pip install --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl \
    && pip check \
    && hivecell --version \
    && python -c "import hivecell.node.cli, hivecell.node.store, hivecell.mesh.host"

# A fixed uid, so that volumes and bind mounts can be prepared on the host (the same uid as Dockerfile.l4t). The
# home is created here, owned by the user and mode 0700, before VOLUME: a new named volume is initialised from it.
RUN groupadd --gid 10001 hivecell \
    && useradd --no-log-init --uid 10001 --gid 10001 \
        --home-dir /var/lib/hivecell --no-create-home --shell /usr/sbin/nologin hivecell \
    && install -d -m 0700 -o hivecell -g hivecell /var/lib/hivecell

VOLUME ["/var/lib/hivecell"]
WORKDIR /var/lib/hivecell
# Numeric, so that `docker run` and Kubernetes can tell it is not root without reading /etc/passwd.
USER 10001

# libp2p TCP. mDNS is UDP 5353 multicast (see the top of this file).
EXPOSE 4001/tcp

# `hivecell status` exits 0 when the daemon of $HIVECELL_HOME runs (5 when not); it does not import torch, so it is
# quick. Docker reads any non-zero code as unhealthy but documents only 1, hence `|| exit 1`. The start period covers
# key and store creation and the warm Worker importing torch.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["/bin/sh", "-c", "hivecell status || exit 1"]

# The daemon stops cleanly on SIGTERM (docker stop) and SIGINT.
ENTRYPOINT ["hivecell"]
CMD ["run", "--listen", "/ip4/0.0.0.0/tcp/4001"]

# Labels last: VCS_REF and BUILD_DATE change on every build and would otherwise invalidate the cached layers above.
ARG PYTHON_IMAGE
ARG HIVECELL_VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="hivecell" \
      org.opencontainers.image.description="Hivecell Mesh node daemon for x86_64 and arm64 servers: federated learning on a peer-to-peer mesh of edge boxes" \
      org.opencontainers.image.version="${HIVECELL_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Hivecell Mesh" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}" \
      io.hivecell.torch-variant="${TORCH_VARIANT}" \
      io.hivecell.torch-version="${TORCH_VERSION}"
