# syntax=docker/dockerfile:1
#
# Chitin's container image: a multi-stage build (the Rust toolchain never reaches the runtime
# image), a small Debian runtime, a non-root user, the state directory as a volume. Run the
# container with a read-only root filesystem (compose.yaml does). What the sandbox needs from
# the container runtime is in docs/operations.md ("Containers"): without user namespaces,
# seccomp and landlock, Chitin refuses to run tools rather than running them unconfined.
#
#   docker build -t chitin .
#   docker run --rm chitin --version

# 1.90 or later: rustc links with LLD on x86_64 Linux, which lays the gateway's start code out
# together (build.rs, release/text-order.txt: about 16 MiB less idle memory); with an older
# toolchain the image builds and runs the same, with that layout left out.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions of Cargo.lock. The cache mounts only speed up
# rebuilds; the binaries are copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p chitin -p chitin-audit \
 && install -D -m 0755 target/release/chitin /out/chitin \
 && install -D -m 0755 target/release/chitin-sandbox-launch /out/chitin-sandbox-launch \
 && install -D -m 0755 target/release/chitin-fs-helper /out/chitin-fs-helper \
 && install -D -m 0755 target/release/chitin-audit-verify /out/chitin-audit-verify

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: model providers and chat platforms over TLS; tini: a PID 1 that forwards
# SIGTERM/SIGHUP and reaps; the rest of /usr and /etc is what sandboxed tools see.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 chitin \
 && useradd --system --uid 10001 --gid chitin --home-dir /var/lib/chitin \
      --no-create-home --shell /usr/sbin/nologin chitin \
 && install -d -m 0700 -o chitin -g chitin /var/lib/chitin /var/lib/chitin-workspace
COPY --from=build /out/ /usr/local/bin/
# The state directory (config, policies, secrets, audit log, state.db); the workspace is
# "chitin-workspace" next to it by default.
ENV CHITIN_HOME=/var/lib/chitin
USER 10001:10001
WORKDIR /var/lib/chitin
VOLUME ["/var/lib/chitin", "/var/lib/chitin-workspace"]
EXPOSE 18789
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/chitin"]
CMD ["gateway"]
