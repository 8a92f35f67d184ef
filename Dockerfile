# Multi-stage build: compile with the Rust toolchain, run on a slim Debian
# image as an unprivileged user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
COPY benches ./benches
RUN cargo build --release --locked --bin rabbit-guard

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home rabbitguard
COPY --from=build /src/target/release/rabbit-guard /usr/local/bin/rabbit-guard
COPY config /etc/rabbit-guard
USER rabbitguard
ENTRYPOINT ["rabbit-guard"]
CMD ["run", "--config", "/etc/rabbit-guard/default.toml"]
