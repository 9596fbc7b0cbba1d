#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, browser tests of the seat-map
# page, unit and integration tests against a real PostgreSQL. Uses the server
# at 127.0.0.1:5432 when one answers (trust auth), otherwise starts a private
# cluster for the run.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh
ensure_cargo
ensure_postgres_binaries
ensure_pgbouncer
ensure_nginx

BIN=$(pg_bin_dir)
PRIVATE_PG=""
cleanup() {
  if [ -n "$PRIVATE_PG" ]; then
    run_pg "$BIN/pg_ctl" -D "$PRIVATE_PG/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PRIVATE_PG"
  fi
}
trap cleanup EXIT

run_pg() {
  # PostgreSQL will not run as root.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ -z "${SEATSYNC_TEST_DATABASE_URL:-}" ]; then
  if [ -z "${SEATSYNC_TEST_PRIVATE_PG:-}" ] && "$BIN/psql" -h 127.0.0.1 -p 5432 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
    export SEATSYNC_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
  else
    PRIVATE_PG=$(mktemp -d /tmp/seatsync-test-pg.XXXXXX)
    PORT=${SEATSYNC_TEST_PG_PORT:-54331}
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PRIVATE_PG"
    run_pg "$BIN/initdb" -D "$PRIVATE_PG/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
    run_pg "$BIN/pg_ctl" -D "$PRIVATE_PG/data" -l "$PRIVATE_PG/server.log" -w -t 60 \
      -o "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=400 -c fsync=off" start >/dev/null
    export SEATSYNC_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
    echo "seatsync: started a private PostgreSQL for the tests on port $PORT" >&2
  fi
fi
echo "seatsync: testing against $SEATSYNC_TEST_DATABASE_URL" >&2

cargo fmt --all -- --check
# --workspace: the root package alone is the default, and the benchmark
# (bench/) is linted too.
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
./deploy/validate.sh
# The seat-map page in a real browser, against replicas of the binary that
# `cargo test` uses as well (same profile and features, so it is built once).
# `fault-injection` lets the supervision tests make a background task fail;
# release builds never have it.
ensure_chromium
ensure_browser_test_deps
cargo build --locked --features fault-injection --bin seatsync
./deploy/schemathesis.sh
SEATSYNC_BIN="$(pwd)/${CARGO_TARGET_DIR:-target}/debug/seatsync" npm --prefix tests/browser test
# Unit tests, then the integration suite (its summary is the last line).
cargo test --locked --features fault-injection --lib --bins --tests
