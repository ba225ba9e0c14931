# updraft in a container: a build stage with the Rust toolchain, then a small
# runtime image holding only the binary, its config and CA certificates.
#
#   docker build -t updraft .
#   docker run --security-opt seccomp=deploy/seccomp-io-uring.json \
#       -p 5140:5140 -p 5141:5141/udp -p 9598:9598 \
#       -v updraft-data:/var/lib/updraft updraft
#
# Docker's default seccomp profile refuses io_uring: without the profile
# above, updraft starts on epoll (io = "auto") and says so in one line.
# Mount your own config over /etc/updraft/updraft.toml. The base images can
# be replaced (a mirror, an air-gapped registry) with
# --build-arg BUILD_IMAGE=... --build-arg RUNTIME_IMAGE=...
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin updraft \
    && strip target/release/updraft

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && useradd --system --home-dir /var/lib/updraft --shell /usr/sbin/nologin updraft \
    && mkdir -p /var/lib/updraft /etc/updraft \
    && chown updraft:updraft /var/lib/updraft
COPY --from=build /src/target/release/updraft /usr/bin/updraft
COPY deploy/docker.toml /etc/updraft/updraft.toml
USER updraft
VOLUME /var/lib/updraft
EXPOSE 5140/tcp 5141/udp 9598/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/updraft"]
CMD ["run", "--config", "/etc/updraft/updraft.toml"]
