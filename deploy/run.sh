#!/usr/bin/env bash
# Runs seatsync. Without DATABASE_URL it starts its own private PostgreSQL
# cluster under .seatsync/ and prints the seat-map URL to open.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh
ensure_cargo
ensure_postgres_binaries
exec cargo run --release -- "$@"
