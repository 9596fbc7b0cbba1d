# Shared by deploy/run.sh and deploy/test.sh: make sure the machine has what
# seatsync needs, installing from Debian's packages where it does not.

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# The PostgreSQL server binaries (initdb, pg_ctl, postgres) from Debian's
# `postgresql` package; the embedded development database and the test
# fallback cluster both start from them.
ensure_postgres_binaries() {
  if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    return 0
  fi
  echo "seatsync: installing PostgreSQL (Debian package 'postgresql')" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql postgresql-client >/dev/null
}

pg_bin_dir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      echo "seatsync: cargo not found; install Rust (https://rustup.rs) first" >&2
      exit 1
    fi
  fi
}

# Debian's `nginx`: the load balancer of deploy/cluster.sh and of the
# integration tests behind nginx (tests/api/nginx.rs). Both run nginx with a
# prefix, pid file and logs of their own, never the system's instance (which
# the package may start on port 80).
ensure_nginx() {
  if [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1; then
    return 0
  fi
  echo "seatsync: installing nginx (Debian package 'nginx')" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq nginx >/dev/null
}

# Debian's `pgbouncer`, for deploy/cluster.sh --pgbouncer.
ensure_pgbouncer() {
  if [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1; then
    return 0
  fi
  echo "seatsync: installing PgBouncer (Debian package 'pgbouncer')" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq pgbouncer >/dev/null
}
