# syntax=docker/dockerfile:1

# The builder runs the same Debian release as the runtime stage, so the binary
# links against the glibc it will run with.
FROM rust:1.95-slim-bookworm AS build
# make: the allocator (jemalloc) is built from C by its own makefile; the
# image has gcc but not make.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# benches/ only because Cargo.toml declares a bench target there.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY src ./src
# Crates and build artefacts live in cache mounts, so a rebuild compiles only
# what changed. The target dir is not part of the layer: the binary is copied
# out within the same RUN. The dist profile is the release profile (which
# strips the binary) with whole-program LTO.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked \
    && cp target/dist/tether /usr/local/bin/tether

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="tether" \
      org.opencontainers.image.description="Connection-pooling sidecar proxy: short-lived client connections in, a few persistent upstream connections out." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can check it, and files on
# mounted volumes get the same owner in every deployment.
RUN groupadd --gid 10001 tether \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tether

COPY --from=build /usr/local/bin/tether /usr/local/bin/tether
# The trust store of [upstream.tls] ca = ["system"]: the builder's Debian
# bundle, the same release as this stage's, without an apt layer here.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# Owned by root: tether only reads its config.
COPY config/tether.toml /etc/tether/tether.toml

USER 10001:10001
# The listener and the admin server of config/tether.toml.
EXPOSE 8080 9901
# SIGTERM drains: in-flight requests finish, the rest is reset at drain_timeout.
STOPSIGNAL SIGTERM
# Asks the admin server's /healthz at the address the config gives (so a
# mounted config that moves it is followed); no curl needed in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/tether", "health", "--config", "/etc/tether/tether.toml"]
ENTRYPOINT ["/usr/local/bin/tether"]
CMD ["run", "--config", "/etc/tether/tether.toml"]
