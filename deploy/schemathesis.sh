#!/usr/bin/env bash
# Fuzzes a real replica from its own OpenAPI document (/api/openapi.json)
# with schemathesis: no 5xx, and every answer documented (status code,
# content type, headers, body schema). The replica runs the built binary on
# a database of its own, created and dropped here. Bounded in examples and
# time so it fits the test suite on a small machine: three passes of at
# most SCHEMATHESIS_MAX_TIME seconds each (fuzzing repeats until then).
#
# env: SEATSYNC_TEST_DATABASE_URL (a URL of any database on the server to
#      use; default postgres://postgres@127.0.0.1:5432/postgres),
#      SEATSYNC_BIN (default target/debug/seatsync),
#      SCHEMATHESIS_MAX_EXAMPLES (default 50), SCHEMATHESIS_MAX_TIME (seconds
#      per pass, default 30), SCHEMATHESIS_SEED (for a reproducible run),
#      SCHEMATHESIS_PHASES (default examples,coverage,fuzzing; the schema
#      has no links, so stateful finds nothing to chain),
#      SCHEMATHESIS_CHECKS (default: no 5xx, and status codes, content types,
#      headers and bodies as documented),
#      SCHEMATHESIS_KEEP (a directory to copy the logs and reports to).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

SCHEMATHESIS=schemathesis==4.32.5
TOOLS=${SEATSYNC_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seatsync-tools}
# A venv of its own: validate.sh recreates its venv when its tools are
# missing, which would take schemathesis with it.
VENV="$TOOLS/schemathesis-${SCHEMATHESIS#*==}"
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-50}
MAX_TIME=${SCHEMATHESIS_MAX_TIME:-30}
SEED=${SCHEMATHESIS_SEED:-$RANDOM}
BIN_PATH=$(realpath -m "${SEATSYNC_BIN:-${CARGO_TARGET_DIR:-target}/debug/seatsync}")
ADMIN_URL=${SEATSYNC_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
AUTH_SECRET="schemathesis-secret-0123456789abcdef"
ADMIN_TOKEN="schemathesis-admin-token-0123456789"

if ! "$VENV/bin/schemathesis" --version >/dev/null 2>&1; then
  echo "schemathesis: installing $SCHEMATHESIS into $VENV (PyPI)" >&2
  mkdir -p "$TOOLS"
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    as_root apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check "$SCHEMATHESIS"
fi
[ -x "$BIN_PATH" ] || { echo "schemathesis: $BIN_PATH is missing; cargo build first" >&2; exit 1; }

PSQL="$(pg_bin_dir)/psql"
DB="seatsync_schemathesis_$$_$(date +%s)"
DB_URL="${ADMIN_URL%/*}/$DB"
WORK=$(mktemp -d /tmp/seatsync-schemathesis.XXXXXX)
REPLICA_PID=""
cleanup() {
  if [ -n "$REPLICA_PID" ]; then
    kill "$REPLICA_PID" 2>/dev/null || true
    wait "$REPLICA_PID" 2>/dev/null || true
  fi
  "$PSQL" "$ADMIN_URL" -qAtc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  if [ -n "${SCHEMATHESIS_KEEP:-}" ]; then mkdir -p "$SCHEMATHESIS_KEEP" && cp "$WORK"/* "$SCHEMATHESIS_KEEP"/; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
"$PSQL" "$ADMIN_URL" -qAtc "CREATE DATABASE $DB" >/dev/null

# The abuse limits would answer 429 to a fuzzer at machine speed; they have
# tests of their own.
env -i PATH="$PATH" DATABASE_URL="$DB_URL" AUTH_SECRET="$AUTH_SECRET" ADMIN_TOKEN="$ADMIN_TOKEN" \
  HOST=127.0.0.1 PORT=0 RATE_LIMIT_USER=0 RATE_LIMIT_IP=0 DB_POOL_SIZE=4 RUST_LOG=warn \
  "$BIN_PATH" serve >"$WORK/replica.out" 2>"$WORK/replica.err" &
REPLICA_PID=$!
# METHOD PATH [TOKEN [JSON]]: the body of a 2xx answer, or a failure (no
# curl needed).
http() {
  "$VENV/bin/python" - "$BASE$2" "$@" <<'EOF'
import sys, urllib.request as u
url, method, _, token, body = (sys.argv[1:] + ["", ""])[:5]
headers = {"Content-Type": "application/json"} if body else {}
if token:
    headers["Authorization"] = f"Bearer {token}"
req = u.Request(url, method=method, headers=headers, data=body.encode() or None)
sys.stdout.write(u.urlopen(req, timeout=5).read().decode())
EOF
}
BASE="" READY=""
for _ in $(seq 1 300); do
  BASE=$(sed -n 's/^seatsync listening on //p' "$WORK/replica.out")
  if [ -n "$BASE" ] && http GET /readyz >/dev/null 2>&1; then READY=1; break; fi
  kill -0 "$REPLICA_PID" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$READY" ]; then
  echo "schemathesis: the replica did not become ready within 30 s" >&2
  cat "$WORK/replica.err" >&2
  exit 1
fi
GUEST=$(http POST /api/auth/guest | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["token"])')

# The seat stream never ends by itself: read its 200s for half a second (or
# two events) and check what came; few of them, as each holds a worker.
# Generated ids and seats seldom name a schedule or a seat in its grid;
# mixing in small values reaches the 200/201/409 answers too.
cat >"$WORK/schemathesis.toml" <<'EOF'
# Here, not on the command line, where it would override the stream's own.
request-timeout = 5

[dictionaries.small]
values = [1, 2, 3]

[[operations]]
include-operation-id = "seat_stream"
request-timeout = 0.5
max-stream-events = 2
parameters = { "path.id" = { dictionary = "small", probability = 0.2 } }

[[operations]]
include-operation-id = ["get_schedule", "seat_status"]
parameters = { "path.id" = { dictionary = "small", probability = 0.5 } }

[[operations]]
include-operation-id = "start_booking"
parameters = { "body.scheduleId" = { dictionary = "small", probability = 0.7 }, "body.quantity" = { dictionary = "small", probability = 0.7 }, "body.seats[*].row" = { dictionary = "small", probability = 0.7 }, "body.seats[*].col" = { dictionary = "small", probability = 0.7 } }
EOF

CHECKS=${SCHEMATHESIS_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance}
# One pass: a name, a bearer token, then filters for `schemathesis run`.
pass() {
  local name=$1 token=$2
  shift 2
  echo "schemathesis: pass '$name'" >&2
  local rc=0
  # From $WORK: schemathesis keeps a cache in its working directory. One
  # worker: with two, Python 3.11's ast module raced inside hypothesis once
  # ("AST constructor recursion depth mismatch"), failing a clean run.
  (cd "$WORK" && "$VENV/bin/schemathesis" --config-file "$WORK/schemathesis.toml" run "$BASE/api/openapi.json" \
    --checks "$CHECKS" --max-examples "$MAX_EXAMPLES" --max-time "$MAX_TIME" \
    --phases "${SCHEMATHESIS_PHASES:-examples,coverage,fuzzing}" --workers 1 \
    --seed "$SEED" --generation-database none --no-color \
    -H "Authorization: Bearer $token" \
    --report junit --report-junit-path "$WORK/$name.xml" \
    "$@") >"$WORK/$name.log" 2>&1 || rc=$?
  # The log is long; keep the run's own summary and every failure.
  sed -n '/FAILURES\|ERRORS\|SUMMARY/,$p' "$WORK/$name.log" >&2
  [ "$rc" = 0 ] || FAILED="$FAILED $name"
}
FAILED=""

# 1. Before any schedule exists: every read and booking meets a missing
#    schedule, the 404 paths.
pass no-schedules "$GUEST" --exclude-operation-id create_schedule
# 2. The admin operation with the admin token (the guest token only ever
#    gets 403 there).
pass admin "$ADMIN_TOKEN" --include-operation-id create_schedule
# Generated schedules hardly ever get created (a random string is seldom an
# RFC 3339 time, which the schema does not say), so the next pass gets a
# few: small ids, which generated ids hit often, and grids small enough for
# generated seats to land in.
for grid in '"rows": 2, "cols": 3, "blocked": [{"row": 1, "col": 1}]' '"rows": 1, "cols": 4' '"rows": 5, "cols": 5'; do
  http POST /api/schedules "$ADMIN_TOKEN" "{\"title\": \"fuzz\", \"startsAt\": \"2026-12-24T19:30:00Z\", $grid}" >/dev/null
done
# 3. Everything a guest does, now that schedules exist.
pass guest "$GUEST" --exclude-operation-id create_schedule

# Counts from the JUnit reports: one test case per operation and pass.
"$VENV/bin/python" - "$WORK" "$SEED" "$MAX_EXAMPLES" "$MAX_TIME" <<'EOF'
import glob, re, sys, xml.etree.ElementTree as ET
work, seed, examples, max_time = sys.argv[1:5]
ops = failed = errors = skipped = 0
cases = sum(int(n) for log in glob.glob(f"{work}/*.log")
            for n in re.findall(r"^\s*(\d+) generated", open(log).read(), re.M))
for path in sorted(glob.glob(f"{work}/*.xml")):
    for case in ET.parse(path).getroot().iter("testcase"):
        ops += 1
        if case.find("failure") is not None:
            failed += 1
            print(f"  FAILED {path.rsplit('/', 1)[1][:-4]}: {case.get('name')}", file=sys.stderr)
        elif case.find("error") is not None:
            errors += 1
            print(f"  ERROR  {path.rsplit('/', 1)[1][:-4]}: {case.get('name')}", file=sys.stderr)
        elif case.find("skipped") is not None:
            skipped += 1
print(f"schemathesis: {cases} test cases, {ops} operation runs, {ops - failed - errors - skipped} passed, "
      f"{failed} failed, {errors} errors, {skipped} skipped "
      f"(seed {seed}, --max-examples {examples}, --max-time {max_time} per pass)")
EOF
# What the fuzzing reached beyond the error paths: rows it made.
"$PSQL" "$DB_URL" -qAt -F ' ' -c "SELECT count(*) FILTER (WHERE status = 'PENDING'), \
  count(*) FILTER (WHERE status = 'CONFIRMED'), count(*) FILTER (WHERE status = 'CANCELLED'), \
  (SELECT count(*) FROM schedules) FROM bookings" |
  { read -r pending confirmed cancelled schedules
    echo "schemathesis: the replica holds $schedules schedules and $pending pending, $confirmed confirmed, $cancelled cancelled bookings made by the fuzzer"; }
if [ -n "$FAILED" ]; then
  echo "schemathesis: failing passes:$FAILED (logs above)" >&2
  exit 1
fi
