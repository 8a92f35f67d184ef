# syntax=docker/dockerfile:1
# Multi-stage build: compile with the Rust toolchain (the registry and the
# target folder in BuildKit cache mounts, so a source change rebuilds only
# rabbit-guard, not its dependencies), run on distroless as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
COPY src ./src
COPY examples ./examples
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin rabbit-guard \
    && cp target/release/rabbit-guard /rabbit-guard

# glibc and libgcc only: rabbit-guard uses rustls, no OpenSSL.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /rabbit-guard /usr/local/bin/rabbit-guard
COPY config/default.toml config/example.toml config/container.toml /etc/rabbit-guard/
# container.toml on top of default.toml: the admin endpoint on every
# interface, manual control with the token in /etc/rabbit-guard/secrets/.
ENV RUN_MODE=container
USER nonroot
# The admin endpoint (metrics, /healthz, /readyz, /breakers).
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["rabbit-guard", "status", "--ready", "--admin", "http://127.0.0.1:9090"]
ENTRYPOINT ["rabbit-guard"]
CMD ["run", "--config", "/etc/rabbit-guard/default.toml"]
