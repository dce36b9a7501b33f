# syntax=docker/dockerfile:1
#
# Switchyard container image: a release build in the official Rust image, run on distroless
# (glibc and libgcc, no shell, no package manager) as the unprivileged user 65532.
#
#   docker build -t switchyard .
#   docker run --rm -p 8001:8001 switchyard                  # demo: 3 simulated engines in-process
#   docker run --rm -p 8001:8001 switchyard \
#       --static-backends http://10.0.0.1:8000,http://10.0.0.2:8000 --static-models my-model
#
# The entrypoint is `switchyard serve --host 0.0.0.0 --policies-dir /etc/switchyard/policies`;
# arguments are appended to it (other `serve` flags, not those two again: mount your own
# policies over /etc/switchyard/policies instead). Other subcommands:
#   docker run --rm --entrypoint /usr/local/bin/switchyard switchyard check --policies-dir /etc/switchyard/policies

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Everything the build reads (see .dockerignore): the manifest and lock file, src/, benches/
# (declared targets), and policies/ (compiled into the binary once they are built in).
COPY . .
# The release profile keeps line tables (62 MB binary); the image drops them and keeps the
# symbols, so backtraces still name functions (15 MB). --build-arg CARGO_PROFILE_RELEASE_STRIP=none
# keeps everything.
ARG CARGO_PROFILE_RELEASE_STRIP=debuginfo
# Cached registry and target directory: a rebuild after a source edit is incremental. The cache
# is not part of the image, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
    && install -D -m 0755 target/release/switchyard /out/switchyard

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="switchyard" \
      org.opencontainers.image.description="LLM router with hot-reloaded TOML and Rhai routing policies"
COPY --from=builder /out/switchyard /usr/local/bin/switchyard
COPY --chown=0:0 policies/ /etc/switchyard/policies/
# Logs go to stdout without ANSI colour codes.
ENV NO_COLOR=1
USER 65532:65532
WORKDIR /etc/switchyard
EXPOSE 8001
ENTRYPOINT ["/usr/local/bin/switchyard", "serve", "--host", "0.0.0.0", "--policies-dir", "/etc/switchyard/policies"]
