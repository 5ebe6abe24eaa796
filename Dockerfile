# The triage binary in a small image. Build: docker compose build triage
# (or docker build -t triage:local .).

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
# --locked: the image is built from exactly the dependencies CI tested.
RUN cargo build --release --locked -p triage-cli \
    && cp target/release/triage /usr/local/bin/triage

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 triage \
    && mkdir /data && chown triage /data
COPY --from=build /usr/local/bin/triage /usr/local/bin/triage
# mimalloc gives memory freed back to the system after 100 ms instead of
# 1 s: a projection rebuild of 1M events then peaked at 66.7-75.7 MB in
# seven runs instead of 79-88 MB, a few percent slower (see README,
# Benchmarks).
ENV MIMALLOC_PURGE_DELAY=100
USER triage
WORKDIR /data
ENTRYPOINT ["triage"]
CMD ["demo"]
