#!/usr/bin/env bash
# Offline checks of what ships for deployment: k8s/ against the Kubernetes
# schemas and rendered through kustomize, the nginx configs with `nginx -t`,
# the compose file, the Grafana dashboard and the Dockerfile. Nothing here
# talks to a cluster or a container engine. Tools it lacks are installed
# (PyPI into a venv, Debian packages) under $SEATSYNC_TOOLS_DIR, outside the
# work tree so fresh clones on the same machine reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

TOOLS=${SEATSYNC_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seatsync-tools}
# A Kubernetes version the pinned kubernetes-validate bundles schemas for;
# old enough that the manifests also suit clusters a few releases behind.
export K8S_SCHEMA_VERSION=${K8S_SCHEMA_VERSION:-1.30.0}
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
mkdir -p "$TOOLS"
WORK=$(mktemp -d /tmp/seatsync-validate.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

apt_updated=""
apt_update_once() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq >/dev/null
    apt_updated=1
  fi
}

# A Debian package unpacked under $TOOLS: no root, no services started, the
# system's own packages untouched.
unpack_deb() {
  local pkg=$1 dir="$TOOLS/deb-$1"
  if [ ! -d "$dir" ]; then
    echo "validate: unpacking Debian package '$pkg' into $dir" >&2
    (cd "$WORK" && { apt-get download -qq "$pkg" >/dev/null 2>&1 || { apt_update_once && apt-get download -qq "$pkg" >/dev/null; }; } \
      && dpkg -x "$WORK"/"$pkg"_*.deb "$WORK/deb-$pkg") && mv "$WORK/deb-$pkg" "$dir"
  fi
  echo "$dir"
}

# --- Python with PyYAML and kubernetes-validate ---------------------------
VENV="$TOOLS/venv"
if ! "$VENV/bin/python" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
  echo "validate: installing $KUBERNETES_VALIDATE into $VENV (PyPI)" >&2
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    apt_update_once
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check "$KUBERNETES_VALIDATE" pyyaml
fi
PY="$VENV/bin/python"
CHECK="$PY deploy/validate.py"

# --- k8s: every manifest, schema and policy --------------------------------
$CHECK k8s k8s

# --- kustomize ------------------------------------------------------------
# Prefer kubectl's built-in kustomize. Where kubectl is missing, Debian's
# kubernetes-client (kubectl 1.20, kustomize v2) is unpacked; it renders the
# kustomization.yaml fields used here identically to kustomize v5.
KUBECTL=""
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  KUBECTL=kubectl
elif dir=$(unpack_deb kubernetes-client 2>/dev/null) && "$dir/usr/bin/kubectl" kustomize --help >/dev/null 2>&1; then
  KUBECTL="$dir/usr/bin/kubectl"
fi
if [ -n "$KUBECTL" ]; then
  version=$("$KUBECTL" version --client 2>/dev/null | sed -n 's/^Kustomize Version: /kustomize /p')
  [ -n "$version" ] || version="kubectl $("$KUBECTL" version --client --short 2>/dev/null | head -n1 | sed 's/^Client Version: //'), built-in kustomize"
  "$KUBECTL" kustomize k8s/ >"$WORK/rendered.yaml"
  $CHECK kustomize k8s "$WORK/rendered.yaml" "kubectl kustomize (${version})"
else
  $CHECK kustomize-fallback k8s
fi

# --- nginx ----------------------------------------------------------------
NGINX=""
if command -v nginx >/dev/null 2>&1; then
  NGINX=nginx
else
  dir=$(unpack_deb nginx)
  NGINX="$dir/usr/sbin/nginx"
fi
nginx_test() {
  local conf=$1 prefix="$WORK/nginx"
  mkdir -p "$prefix/logs"
  # Upstream server names must resolve when nginx loads a config; the compose
  # service names exist only inside compose's network, so test a copy with
  # them pointed at 127.0.0.1. Everything else is tested as shipped.
  sed -E 's/^(\s*server\s+)seatsync-[0-9]+(:[0-9]+)/\1127.0.0.1\2/' "$conf" >"$prefix/site.conf"
  cat >"$prefix/nginx.conf" <<EOF
pid $prefix/nginx.pid;
error_log $prefix/logs/error.log;
events {}
http {
    access_log off;
    client_body_temp_path $prefix/client_body;
    proxy_temp_path $prefix/proxy;
    fastcgi_temp_path $prefix/fastcgi;
    uwsgi_temp_path $prefix/uwsgi;
    scgi_temp_path $prefix/scgi;
    include $prefix/site.conf;
}
EOF
  if ! "$NGINX" -t -q -p "$prefix" -e "$prefix/logs/error.log" -c "$prefix/nginx.conf" >"$prefix/out" 2>&1; then
    echo "FAILED nginx -t on $conf:" >&2
    cat "$prefix/out" >&2
    exit 1
  fi
}
nginx_test deploy/nginx/seatsync.conf
nginx_test deploy/nginx/compose.conf
echo "nginx: deploy/nginx/seatsync.conf and deploy/nginx/compose.conf pass nginx -t ($("$NGINX" -v 2>&1 | sed 's/^nginx version: //'))"
$CHECK nginx-drift deploy/nginx/seatsync.conf deploy/nginx/compose.conf

# --- compose, Grafana, Dockerfile -----------------------------------------
$CHECK compose deploy/compose.yaml
$CHECK grafana deploy/grafana/seatsync-dashboard.json
$CHECK dockerfile deploy/Dockerfile .dockerignore

echo "validate: all deployment checks passed"
