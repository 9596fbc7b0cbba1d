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

# Debian's `pgbouncer`: the integration tests put it, in transaction mode,
# between replicas and PostgreSQL (DB_STATEMENTS=unnamed must work there).
ensure_pgbouncer() {
  if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
    return 0
  fi
  echo "seatsync: installing PgBouncer (Debian package 'pgbouncer')" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq pgbouncer >/dev/null
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

# Debian's Chromium for the browser tests (playwright-core drives it; no
# browser is ever downloaded).
ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then
    return 0
  fi
  echo "seatsync: installing Chromium (Debian packages 'chromium', 'chromium-driver')" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
}

# Node 20+ (the browser tests use node's built-in test runner) and the
# browser tests' npm packages, installed from the committed lock file.
ensure_browser_test_deps() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "seatsync: installing Node.js (Debian packages 'nodejs', 'npm')" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  if [ "$major" -lt 20 ]; then
    echo "seatsync: the browser tests need Node.js 20 or newer (found $(node --version))" >&2
    exit 1
  fi
  if [ ! -d tests/browser/node_modules ]; then
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
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
