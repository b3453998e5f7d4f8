#!/usr/bin/env bash
# Image tests need real OCI registries: two docker-registry processes on 127.0.0.1 (TLS,
# self-signed CA): 5055 anonymous, 5056 htpasswd basic auth (funnel / funnel-test-pw).
# Test images built with umoci + skopeo (no daemon) from busybox-static and pushed to both:
# library/busybox:latest (+ :v2s2, Docker media types, on 5055) and funnel/testimage:1.
# OCI layouts stay under $base/oci for benchmarks (umoci unpack). Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

base=/var/lib/funnel-test/registry
ca="$base/tls/cert.pem"
user=funnel
password=funnel-test-pw
anon=127.0.0.1:5055
authed=127.0.0.1:5056

install_tools() {
  local tries=0
  # another installer may hold the dpkg lock for a while on a fresh machine
  until apt_install docker-registry skopeo umoci apache2-utils busybox-static openssl curl; do
    tries=$((tries + 1))
    [ "$tries" -lt 20 ] || { echo "apt_install failed (dpkg locked?)" >&2; exit 1; }
    sleep 15
  done
  [ -x /usr/bin/docker-registry ] || { echo "/usr/bin/docker-registry missing" >&2; exit 1; }
}

make_tls_and_auth() {
  mkdir -p "$base/tls" "$base/auth"
  if [ ! -s "$ca" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=127.0.0.1 \
      -addext subjectAltName=IP:127.0.0.1 \
      -keyout "$base/tls/key.pem" -out "$ca.tmp" 2>/dev/null
    mv "$ca.tmp" "$ca"
  fi
  [ -s "$base/auth/htpasswd" ] || htpasswd -Bbn "$user" "$password" >"$base/auth/htpasswd"
}

# write_config PORT [auth]: the registry's config file
write_config() {
  local port=$1 dir="$base/$1"
  mkdir -p "$dir/data"
  {
    echo "version: 0.1"
    echo "log: {level: warn}"
    echo "storage: {filesystem: {rootdirectory: $dir/data}, delete: {enabled: true}}"
    echo "http:"
    echo "  addr: 127.0.0.1:$port"
    echo "  tls: {certificate: $ca, key: $base/tls/key.pem}"
    if [ "${2:-}" = auth ]; then
      echo "auth: {htpasswd: {realm: funnel-test, path: $base/auth/htpasswd}}"
    fi
  } >"$dir/config.yml"
}

answers() {  # answers PORT: the registry's /v2/ replies (200 or 401)
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$ca" "https://127.0.0.1:$1/v2/" || true)
  [ "$code" = 200 ] || [ "$code" = 401 ]
}

start_registry() {  # start_registry PORT: (re)start it unless it answers
  local port=$1 dir="$base/$1"
  answers "$port" && return 0
  if [ -s "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    kill "$(cat "$dir/pid")" || true
  fi
  # from /, not the checkout it was started from (which may be removed under it)
  (cd / && exec setsid nohup /usr/bin/docker-registry serve "$dir/config.yml" \
    >>"$dir/registry.log" 2>&1 </dev/null) &
  echo $! >"$dir/pid"
  for _ in $(seq 1 150); do
    answers "$port" && return 0
    sleep 0.2
  done
  echo "registry on $port does not answer; see $dir/registry.log" >&2
  exit 1
}

# busybox: /bin/busybox with relative links, /etc/passwd, /etc/group, /tmp (one layer)
build_busybox() {
  local layout="$base/oci/busybox" work
  [ -f "$layout/index.json" ] && return 0
  work=$(mktemp -d "$base/build.XXXXXX")
  umoci init --layout "$work/layout"
  umoci new --image "$work/layout:latest"
  umoci unpack --rootless --image "$work/layout:latest" "$work/bundle"
  local root="$work/bundle/rootfs"
  mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root"
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  "$root/bin/busybox" --install -s "$root/bin"
  for link in "$root"/bin/*; do  # --install links to its own path: make them relative
    [ -L "$link" ] && ln -sf busybox "$link"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
  umoci repack --image "$work/layout:latest" "$work/bundle"
  umoci config --image "$work/layout:latest" --config.cmd sh \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  umoci gc --layout "$work/layout"
  mkdir -p "$base/oci"
  mv "$work/layout" "$layout"
  rm -rf "$work"
}

# testimage: busybox's layer plus a second one (own os-release, /opt/funnel-test, no vi)
build_testimage() {
  local layout="$base/oci/testimage" work
  [ -f "$layout/index.json" ] && return 0
  work=$(mktemp -d "$base/build.XXXXXX")
  cp -a "$base/oci/busybox" "$work/layout"
  umoci tag --image "$work/layout:latest" 1
  umoci rm --image "$work/layout:latest"
  umoci unpack --rootless --image "$work/layout:1" "$work/bundle"
  local root="$work/bundle/rootfs"
  mkdir -p "$root/opt/funnel-test/bin"
  printf 'ID=funnel-test\nNAME="funnel test image"\nPRETTY_NAME="funnel test image 1"\n' >"$root/etc/os-release"
  echo "funnel-test marker" >"$root/opt/funnel-test/marker"
  printf '#!/bin/sh\necho "hello from funnel-test in $(pwd) as $FUNNEL_IMAGE"\n' >"$root/opt/funnel-test/bin/funnel-hello"
  chmod 755 "$root/opt/funnel-test/bin/funnel-hello"
  rm "$root/bin/vi"  # a whiteout in the second layer
  umoci repack --image "$work/layout:1" "$work/bundle"
  umoci config --image "$work/layout:1" \
    --config.env PATH=/opt/funnel-test/bin:/bin --config.env FUNNEL_IMAGE=testimage \
    --config.workingdir /opt/funnel-test
  umoci gc --layout "$work/layout"
  mv "$work/layout" "$layout"
  rm -rf "$work"
}

pushed() {  # pushed HOSTPORT REPO:TAG [creds]: the registry has that manifest
  local creds=() ref=$2
  [ -n "${3:-}" ] && creds=(-u "$3")
  curl -sf -o /dev/null --cacert "$ca" "${creds[@]}" \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
    "https://$1/v2/${ref%%:*}/manifests/${ref##*:}"
}

push() {  # push LAYOUT:TAG HOSTPORT REPO:TAG [creds] [skopeo option...]
  local src=$1 host=$2 ref=$3 creds=${4:-}
  shift 4
  pushed "$host" "$ref" "$creds" && return 0
  local opts=(--dest-tls-verify=false)
  [ -n "$creds" ] && opts+=(--dest-creds "$creds")
  skopeo copy -q "${opts[@]}" "$@" "oci:$src" "docker://$host/$ref" >/dev/null
}

install_tools
make_tls_and_auth
write_config 5055
write_config 5056 auth
start_registry 5055
start_registry 5056
build_busybox
build_testimage
push "$base/oci/busybox:latest" "$anon" library/busybox:latest ""
push "$base/oci/busybox:latest" "$anon" library/busybox:v2s2 "" --format v2s2
push "$base/oci/testimage:1" "$anon" funnel/testimage:1 ""
push "$base/oci/busybox:latest" "$authed" library/busybox:latest "$user:$password"
push "$base/oci/testimage:1" "$authed" funnel/testimage:1 "$user:$password"
echo "registries ready: https://$anon (anonymous), https://$authed ($user); CA certificate $ca"
