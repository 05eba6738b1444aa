# The WebWaka Realtime server (server-stub), for running it in a container.
#
# NOT BUILT HERE: the project's sandbox has no Docker. Kept deliberately simple; see
# docs/server.md. Build from the repository root:
#   docker build -t webwaka-server-stub .
#   docker run -p 3000:3000 -v webwaka-data:/data -e JWT_SECRET=... webwaka-server-stub

# --- build ---------------------------------------------------------------------
# The server needs Rust 1.94 (socketioxide); the SDK crates build with 1.88.
FROM rust:1.94-bookworm AS build
WORKDIR /src
# SQLite is compiled in (rusqlite "bundled"): only a C compiler is needed, which the
# rust image has.
COPY . .
RUN cargo build --release --locked -p webwaka-server-stub \
 && cp target/release/webwaka-server-stub /usr/local/bin/webwaka-server-stub

# --- run -----------------------------------------------------------------------
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /data --create-home webwaka
COPY --from=build /usr/local/bin/webwaka-server-stub /usr/local/bin/webwaka-server-stub
USER webwaka
WORKDIR /data
# Listen on every interface inside the container; production mode requires JWT_SECRET.
ENV WS_HOST=0.0.0.0 \
    WS_PORT=3000 \
    DATA_DIR=/data \
    WEBWAKA_MODE=production \
    LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 3000
# SIGTERM (docker stop) shuts down gracefully: WebSockets get 1001, storage is flushed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/webwaka-server-stub"]
