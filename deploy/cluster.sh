#!/usr/bin/env bash
# A local cluster in one command, as production runs it:
#   PostgreSQL (a private one under .seatsync/cluster/ unless DATABASE_URL is
#   set), optionally PgBouncer in transaction mode, N replicas of the release
#   binary on free ports, and nginx in front, configured by the shipped
#   deploy/nginx/seatsync.conf (only the upstream servers and the listen port
#   replaced). Creates a demo showing, prints its URL and the admin token,
#   and stops everything it started on Ctrl-C or SIGTERM.
#
# usage: deploy/cluster.sh [--replicas N] [--pgbouncer] [--port PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

REPLICAS=3
USE_PGBOUNCER=""
PORT=8080
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) REPLICAS=${2:?--replicas needs a number}; shift 2 ;;
    --replicas=*) REPLICAS=${1#*=}; shift ;;
    --pgbouncer) USE_PGBOUNCER=1; shift ;;
    --port) PORT=${2:?--port needs a number}; shift 2 ;;
    --port=*) PORT=${1#*=}; shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "cluster: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$REPLICAS" in ''|*[!0-9]*|0) echo "cluster: --replicas must be a positive number" >&2; exit 2 ;; esac
case "$PORT" in ''|*[!0-9]*) echo "cluster: --port must be a number" >&2; exit 2 ;; esac

ensure_cargo
ensure_nginx
[ -z "${DATABASE_URL:-}" ] && ensure_postgres_binaries
[ -n "$USE_PGBOUNCER" ] && ensure_pgbouncer
command -v curl >/dev/null 2>&1 || {
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq curl >/dev/null
}
NGINX=/usr/sbin/nginx
[ -x "$NGINX" ] || NGINX=$(command -v nginx)
PGBOUNCER=/usr/sbin/pgbouncer
[ -x "$PGBOUNCER" ] || PGBOUNCER=$(command -v pgbouncer || true)

DIR=$PWD/.seatsync/cluster
mkdir -p "$DIR"
# Another cluster.sh on this work tree would share the data directory.
exec 9>"$DIR/lock"
if ! flock -n 9; then
  echo "cluster: another deploy/cluster.sh is running on $DIR" >&2
  exit 1
fi

echo "cluster: building the release binary" >&2
cargo build --release --locked --bin seatsync
SEATSYNC=$PWD/target/release/seatsync

run_pg() {
  # PostgreSQL refuses to run as root.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The first port from $1 up that nothing listens on.
free_port() {
  local p=$1
  while port_in_use "$p"; do p=$((p + 1)); done
  echo "$p"
}

# --- stopping what was started, in reverse order --------------------------
NGINX_PID=""
REPLICA_PIDS=()
PGBOUNCER_PID=""
PG_DATA=""
cleanup() {
  trap - EXIT INT TERM
  echo "cluster: stopping" >&2
  local pids=()
  [ -n "$NGINX_PID" ] && pids+=("$NGINX_PID")
  pids+=("${REPLICA_PIDS[@]}")
  # nginx first, so no new request reaches a replica that is stopping; the
  # replicas end their streams and finish in-flight requests (10 s at most).
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$PGBOUNCER_PID" ]; then
    kill -TERM "$PGBOUNCER_PID" 2>/dev/null || true
    wait "$PGBOUNCER_PID" 2>/dev/null || true
  fi
  if [ -n "$PG_DATA" ]; then
    run_pg "$(pg_bin_dir)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
  echo "cluster: stopped (logs in $DIR)" >&2
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- PostgreSQL ------------------------------------------------------------
if [ -n "${DATABASE_URL:-}" ]; then
  DIRECT_URL=$DATABASE_URL
  echo "cluster: using DATABASE_URL" >&2
else
  BIN=$(pg_bin_dir)
  PG_DATA_DIR=$DIR/pg
  if [ ! -s "$PG_DATA_DIR/PG_VERSION" ]; then
    mkdir -p "$PG_DATA_DIR"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DATA_DIR"
    chmod 700 "$PG_DATA_DIR"
    run_pg "$BIN/initdb" -D "$PG_DATA_DIR" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  touch "$DIR/postgres.log"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR/postgres.log"
  PGPORT=$(free_port 54400)
  # Replicas x (DB_POOL_SIZE 16 + 1 listener), with room for psql and PgBouncer.
  run_pg "$BIN/pg_ctl" -D "$PG_DATA_DIR" -l "$DIR/postgres.log" -w -t 60 \
    -o "-p $PGPORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=$((REPLICAS * 17 + 50))" \
    start >/dev/null
  PG_DATA=$PG_DATA_DIR
  if [ "$("$BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -Atc "select 1 from pg_database where datname = 'seatsync'")" != 1 ]; then
    "$BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -qc "CREATE DATABASE seatsync" >/dev/null
  fi
  DIRECT_URL="postgres://postgres@127.0.0.1:$PGPORT/seatsync"
  echo "cluster: PostgreSQL on 127.0.0.1:$PGPORT (data in $PG_DATA_DIR)" >&2
fi

# --- PgBouncer (transaction mode) ------------------------------------------
POOL_URL=$DIRECT_URL
if [ -n "$USE_PGBOUNCER" ]; then
  # postgres[ql]://user[:password]@host[:port]/dbname[?...]
  re='^postgres(ql)?://([^:@/]+)(:([^@/]*))?@([^:/?]+)(:([0-9]+))?/([^?]+)'
  if ! [[ $DIRECT_URL =~ $re ]]; then
    echo "cluster: --pgbouncer needs DATABASE_URL as postgres://user[:password]@host[:port]/dbname" >&2
    exit 2
  fi
  DB_USER=${BASH_REMATCH[2]} DB_PASS=${BASH_REMATCH[4]} DB_HOST=${BASH_REMATCH[5]}
  DB_PORT=${BASH_REMATCH[7]:-5432} DB_NAME=${BASH_REMATCH[8]}
  BDIR=$DIR/pgbouncer
  mkdir -p "$BDIR"
  BPORT=$(free_port 64320)
  {
    echo "[databases]"
    echo "$DB_NAME = host=$DB_HOST port=$DB_PORT dbname=$DB_NAME user=$DB_USER${DB_PASS:+ password=$DB_PASS}"
    echo
    echo "[pgbouncer]"
    echo "listen_addr = 127.0.0.1"
    echo "listen_port = $BPORT"
    echo "unix_socket_dir ="
    # Local only; the server-side login uses the credentials above.
    echo "auth_type = any"
    echo "pool_mode = transaction"
    echo "max_client_conn = 1000"
    echo "default_pool_size = 20"
    echo "ignore_startup_parameters = extra_float_digits"
    echo "logfile = $BDIR/pgbouncer.log"
    echo "pidfile = $BDIR/pgbouncer.pid"
  } >"$BDIR/pgbouncer.ini"
  as_user=()
  if [ "$(id -u)" = 0 ]; then
    chown -R postgres:postgres "$BDIR"
    as_user=(-u postgres)
  fi
  # Not through runuser: $! must be PgBouncer itself, to stop it.
  "$PGBOUNCER" -q "${as_user[@]}" "$BDIR/pgbouncer.ini" &
  PGBOUNCER_PID=$!
  for _ in $(seq 100); do port_in_use "$BPORT" && break; sleep 0.1; done
  port_in_use "$BPORT" || { echo "cluster: PgBouncer did not start; see $BDIR/pgbouncer.log" >&2; exit 1; }
  POOL_URL="postgres://$DB_USER${DB_PASS:+:$DB_PASS}@127.0.0.1:$BPORT/$DB_NAME"
  echo "cluster: PgBouncer (transaction mode) on 127.0.0.1:$BPORT; replicas pool through it, LISTEN direct" >&2
fi

# --- replicas ---------------------------------------------------------------
rand_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }
# Shared by every replica: a token issued by one is accepted by all.
AUTH_SECRET=$(rand_hex 32)
ADMIN_TOKEN=$(rand_hex 16)
# Migrate once up front (serve would too, under an advisory lock) so a
# migration problem stops here with one message.
DATABASE_URL=$DIRECT_URL "$SEATSYNC" migrate >"$DIR/migrate.log" 2>&1 ||
  { cat "$DIR/migrate.log" >&2; exit 1; }
rm -f "$DIR"/replica-*.log
ADDRS=()
for i in $(seq 1 "$REPLICAS"); do
  log=$DIR/replica-$i.log
  env DATABASE_URL="$POOL_URL" LISTEN_DATABASE_URL="$DIRECT_URL" \
    AUTH_SECRET="$AUTH_SECRET" ADMIN_TOKEN="$ADMIN_TOKEN" \
    HOST=127.0.0.1 PORT=0 RUST_LOG="${RUST_LOG:-info}" \
    "$SEATSYNC" serve >"$log" 2>&1 &
  REPLICA_PIDS+=($!)
  addr=""
  for _ in $(seq 300); do
    addr=$(sed -n 's|^seatsync listening on http://||p' "$log" | head -n 1)
    [ -n "$addr" ] && break
    kill -0 "$!" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "cluster: replica $i did not start:" >&2; tail -n 20 "$log" >&2; exit 1; }
  ADDRS+=("$addr")
done
for i in "${!ADDRS[@]}"; do
  for _ in $(seq 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://${ADDRS[$i]}/readyz")" = 200 ] && break
    sleep 0.1
  done
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://${ADDRS[$i]}/readyz")" = 200 ] ||
    { echo "cluster: replica $((i + 1)) not ready; see $DIR/replica-$((i + 1)).log" >&2; exit 1; }
done
echo "cluster: $REPLICAS replicas ready on ${ADDRS[*]}" >&2

# --- nginx ----------------------------------------------------------------
if port_in_use "$PORT"; then
  echo "cluster: port $PORT is in use; pick another with --port" >&2
  exit 1
fi
NDIR=$DIR/nginx
rm -rf "$NDIR"
mkdir -p "$NDIR/logs"
# Workers drop to `nobody` when started as root and need their temp paths.
chmod 755 "$NDIR"
awk -v servers="${ADDRS[*]}" -v port="$PORT" '
  { code = $0; sub(/#.*/, "", code) }
  code ~ /^[ \t]*upstream[ \t]/ { up = 1; done = 0; k = 0 }
  up && code ~ /^[ \t]*}/ { up = 0 }
  up && code ~ /^[ \t]*server[ \t]/ {
    if (!done) {
      sub(/;[ \t]*$/, "", code); n = split(code, f, /[ \t]+/); params = ""
      for (j = 1; j <= n; j++) if (f[j] != "" && f[j] != "server" && ++k > 1) params = params " " f[j]
      m = split(servers, s, " ")
      for (j = 1; j <= m; j++) printf "    server %s%s;\n", s[j], params
      done = 1
    }
    next
  }
  code ~ /^[ \t]*listen[ \t]/ { printf "    listen 127.0.0.1:%s;\n", port; next }
  { print }
' deploy/nginx/seatsync.conf >"$NDIR/site.conf"
cat >"$NDIR/nginx.conf" <<EOF
worker_processes 2;
pid $NDIR/nginx.pid;
error_log $NDIR/logs/error.log warn;
events { worker_connections 4096; }
http {
    log_format seatsync '\$remote_addr [\$time_local] "\$request" \$status \$body_bytes_sent '
                        '\$request_time upstream=\$upstream_addr upstream_status=\$upstream_status '
                        'id=\$req_id';
    access_log $NDIR/logs/access.log seatsync;
    client_body_temp_path $NDIR/client_body;
    proxy_temp_path $NDIR/proxy;
    fastcgi_temp_path $NDIR/fastcgi;
    uwsgi_temp_path $NDIR/uwsgi;
    scgi_temp_path $NDIR/scgi;
    include $NDIR/site.conf;
}
EOF
"$NGINX" -t -q -p "$NDIR" -e "$NDIR/logs/error.log" -c "$NDIR/nginx.conf"
# In the foreground (of this script), so its pid is the master's.
"$NGINX" -p "$NDIR" -e "$NDIR/logs/error.log" -c "$NDIR/nginx.conf" -g 'daemon off;' &
NGINX_PID=$!
BASE="http://127.0.0.1:$PORT"
for _ in $(seq 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$BASE/healthz")" = 200 ] && break
  sleep 0.1
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$BASE/healthz")" = 200 ] ||
  { echo "cluster: nginx does not answer; see $NDIR/logs/error.log" >&2; exit 1; }

# --- a demo showing, through nginx ------------------------------------------
starts_at=$(date -u -d '+7 days' +%Y-%m-%dT19:30:00Z)
created=$(curl -s -X POST "$BASE/api/schedules" \
  -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' \
  -d "{\"title\": \"Demo showing\", \"startsAt\": \"$starts_at\", \"rows\": 10, \"cols\": 20, \"blocked\": [{\"row\": 1, \"col\": 1}, {\"row\": 1, \"col\": 20}]}")
SCHEDULE=$(printf '%s' "$created" | sed -n 's/.*"id": *\([0-9][0-9]*\).*/\1/p')
[ -n "$SCHEDULE" ] || { echo "cluster: creating the demo showing failed: $created" >&2; exit 1; }

cat <<EOF

seatsync cluster: $REPLICAS replicas behind nginx${USE_PGBOUNCER:+, PgBouncer in transaction mode}
  seat map      $BASE/schedules/$SCHEDULE
  API           $BASE/api/schedules
  admin token   $ADMIN_TOKEN
  replicas      ${ADDRS[*]}
  logs          $DIR
Ctrl-C stops everything.
EOF

# Until Ctrl-C/SIGTERM, or until a process dies (then everything stops).
set +e
wait -n "$NGINX_PID" "${REPLICA_PIDS[@]}" ${PGBOUNCER_PID:+"$PGBOUNCER_PID"}
status=$?
echo "cluster: a process exited (status $status); see the logs in $DIR" >&2
exit 1
