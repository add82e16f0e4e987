# syntax=docker/dockerfile:1.7
#
# The samtrain image: one binary for every role (coordinator, worker, and the
# CLI that submits and watches jobs), with the libtorch and CUDA libraries
# of the PyPI torch wheel it is built against. The Helm chart in helm/samtrain
# runs it; docs/deploy.md says how to build and push it:
#
#   DOCKER_BUILDKIT=1 docker build -t samtrain:0.1.0 .
#
# The CUDA libraries come from the wheel (nvidia/* packages), so the runtime
# needs no CUDA base image; only the NVIDIA driver (libcuda), which the
# NVIDIA container toolkit mounts into GPU pods. The same image runs on
# CPU-only nodes.

# Keep TORCH_VERSION equal to scripts/setup.sh's: tch 0.26 expects 2.13.0.
ARG TORCH_VERSION=2.13.0
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ------------------------------------------------------------------ build ---
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
ARG TORCH_VERSION

# protoc for the gRPC code, a C++ compiler for tch's libtorch wrapper,
# Python for the torch wheel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        protobuf-compiler g++ python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# libtorch: the PyPI torch wheel (the CUDA build), in a venv, as
# scripts/setup.sh installs it (about 2.7 GB to download).
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --disable-pip-version-check "torch==${TORCH_VERSION}"

WORKDIR /src
COPY . .

# .cargo/config.toml points LIBTORCH at ./.libtorch, as in a clone after
# scripts/setup.sh.
RUN ln -sfn "$(/opt/venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" .libtorch

# `nccl`: CUDA tensors of multi-GPU jobs go over NCCL (libnccl from the
# nvidia-nccl wheel, loaded at run time).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features nccl --bin samtrain \
    && install -D -m 0755 target/release/samtrain /out/bin/samtrain

# The shared libraries the binary loads: torch/lib, and the lib folders of
# the nvidia/* wheels (CUDA runtime, cuBLAS, cuDNN, NCCL...). Their relative
# layout is kept because libtorch_cuda's RPATH is $ORIGIN/../../nvidia/*/lib.
RUN site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && cd "$site" \
    && mkdir -p /out/lib \
    && cp -a --parents torch/lib /out/lib/ \
    && find nvidia -mindepth 1 -maxdepth 3 -type d -name lib -exec cp -a --parents {} /out/lib/ \;

# ---------------------------------------------------------------- runtime ---
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

# CA certificates for object stores over HTTPS; tini as PID 1 forwards
# SIGTERM so that a stopping worker revokes its etcd lease.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /out/lib /opt/samtrain/lib
COPY --from=build /out/bin/samtrain /usr/local/bin/samtrain

# The loader finds libtorch and the CUDA libraries (NCCL included, which is
# loaded at run time by name) through ld.so.cache instead of
# LD_LIBRARY_PATH. The build fails here if a library the binary links is
# missing.
RUN find /opt/samtrain/lib -type d -name lib | sort >/etc/ld.so.conf.d/samtrain.conf \
    && ldconfig \
    && ! ldd /usr/local/bin/samtrain | grep 'not found' \
    && samtrain --version

# A fixed, unprivileged user: the chart runs pods as 10001 with
# runAsNonRoot, and mounts its scratch volume at the home folder.
RUN groupadd --system --gid 10001 samtrain \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/samtrain \
        --create-home --shell /usr/sbin/nologin samtrain
USER 10001:10001
WORKDIR /var/lib/samtrain
ENV HOME=/var/lib/samtrain \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# gRPC and health of the coordinator, health of a worker, the collective
# backend: the chart's defaults and the binary's.
EXPOSE 7070 7071 7072 29500

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/samtrain"]
CMD ["--help"]
