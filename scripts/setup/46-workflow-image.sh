#!/usr/bin/env bash
# The workflow-engine image for tests/test_workflow_snakemake.py: a Debian 12 root built
# with mmdebstrap from this host's Debian mirror, with python3 and a venv /opt/snakemake
# holding the latest Snakemake and its S3 storage plugin from PyPI, packed with umoci and
# pushed to the test registry (scripts/setup/45-registry.sh) as funnel/snakemake:1.
# The image also carries /opt/snakemake/wheels, the S3 plugin's wheels, and sets
# PIP_NO_INDEX/PIP_FIND_LINKS: snakemake-executor-plugin-tes makes every job run
# `pip install --target ... snakemake-storage-plugin-s3`, which then needs no network.
# Labels org.funnel-hpc.snakemake.version and org.funnel-hpc.snakemake-storage-plugin-s3.version
# tell the test which client versions match. Measured on 2 cores: 0.2 s when already
# pushed; ~1 min from scratch (126 MB compressed, 293 MB unpacked), 2 min with the tools'
# own installation.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

base=/var/lib/funnel-test/registry
ca="$base/tls/cert.pem"
registry=127.0.0.1:5055
ref=funnel/snakemake:1
layout="$base/oci/snakemake"
venv=/opt/snakemake

install_tools() {
  local tries=0
  # another installer may hold the dpkg lock for a while on a fresh machine
  until apt_install mmdebstrap umoci skopeo curl ca-certificates debian-archive-keyring \
      python3-pip; do
    tries=$((tries + 1))
    [ "$tries" -lt 20 ] || { echo "apt_install failed (dpkg locked?)" >&2; exit 1; }
    sleep 15
  done
}

pushed() {  # the registry has funnel/snakemake:1
  curl -sf -o /dev/null --cacert "$ca" \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "https://$registry/v2/${ref%%:*}/manifests/${ref##*:}"
}

host_sources() {  # host_sources FILE: this host's Debian apt sources, for mmdebstrap
  if [ -s /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$1"
  elif grep -qs '^deb .*debian' /etc/apt/sources.list; then
    grep '^deb .*debian' /etc/apt/sources.list >"$1"
  else
    echo "no Debian mirror in /etc/apt/sources.list(.d)" >&2
    exit 1
  fi
}

# download_wheels DIR: Snakemake + the S3 plugin and all they need as wheels in DIR/all
# (sdists built here), and DIR/s3 the S3 plugin's own set. Made by the host's Debian
# python3, the very interpreter of the image (Debian 12's 3.11), so the root's pip installs
# them offline and needs no network or pip set-up inside the chroot.
download_wheels() {
  local dir=$1
  quiet /usr/bin/python3 -m pip wheel --no-cache-dir -w "$dir/all" \
    snakemake snakemake-storage-plugin-s3
  quiet /usr/bin/python3 -m pip download --no-cache-dir --no-index --find-links "$dir/all" \
    -d "$dir/s3" snakemake-storage-plugin-s3
}

quiet() {  # quiet COMMAND...: its output shown only when it fails
  local log status=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log" >&2
    echo "failed ($status): $*" >&2
  fi
  rm -f "$log"
  return "$status"
}

wheel_version() {  # wheel_version DIR NAME: the version of NAME's wheel in DIR
  local file
  file=$(ls "$1"/"$2"-[0-9]*.whl | head -n 1)
  file=${file##*/}
  file=${file#"$2"-}
  echo "${file%%-*}"
}

# build_root DIR WHEELS: the Debian root with the venv (no docs, no apt lists or caches)
build_root() {
  local root=$1 wheels=$2 sources
  sources=$(mktemp)
  host_sources "$sources"
  local trim=()
  for path in doc man info locale lintian linda bug groff; do
    trim+=(--dpkgopt="path-exclude=/usr/share/$path/*")
  done
  # inside: a clean environment (the host's PIP_* and friends stay out)
  local inside="chroot \"\$1\" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root"
  local solvers="\"\$1\"$venv/lib/python3.11/site-packages/pulp/solverdir/cbc"
  # merged-usr hook: usr-is-merged instead of usrmerge, which would pull in all of perl
  quiet mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr "${trim[@]}" \
    --customize-hook="copy-in $wheels /tmp" \
    --customize-hook="$inside python3 -m venv $venv" \
    --customize-hook="$inside $venv/bin/pip install -q --no-index --no-cache-dir \
--find-links /tmp/${wheels##*/}/all snakemake snakemake-storage-plugin-s3" \
    --customize-hook="mv \"\$1\"/tmp/${wheels##*/}/s3 \"\$1\"$venv/wheels" \
    --customize-hook="$inside $venv/bin/pip freeze --all >\"\$1\"$venv/requirements.txt" \
    --customize-hook="rm -rf $solvers/osx $solvers/win" \
    --customize-hook="rm -rf \"\$1\"/tmp/${wheels##*/} \"\$1\"/var/lib/apt/lists/* \
\"\$1\"/var/cache/apt/* \"\$1\"/var/log/* \"\$1\"/etc/resolv.conf \"\$1\"/etc/hostname \
\"\$1\"/root/.cache" \
    bookworm "$root" "$sources"
  rm -f "$sources"
  find "$root/dev" -mindepth 1 -delete  # the sandbox makes its own /dev
}

# pack ROOT LAYOUT SNAKEMAKE S3: ROOT as a one-layer OCI image LAYOUT:1
pack() {
  local root=$1 dest=$2 tarball
  tarball=$(dirname "$dest")/layer.tar
  tar --numeric-owner --sort=name -C "$root" -cf "$tarball" .
  umoci init --layout "$dest"
  umoci new --image "$dest:1"
  umoci raw add-layer --image "$dest:1" "$tarball"
  rm -f "$tarball"
  umoci config --image "$dest:1" --config.cmd /bin/bash --config.workingdir /tmp \
    --config.env "PATH=$venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --config.env PIP_NO_INDEX=1 --config.env "PIP_FIND_LINKS=$venv/wheels" \
    --config.env PIP_DISABLE_PIP_VERSION_CHECK=1 --config.env LANG=C.UTF-8 \
    --config.label "org.funnel-hpc.snakemake.version=$3" \
    --config.label "org.funnel-hpc.snakemake-storage-plugin-s3.version=$4"
  umoci gc --layout "$dest"
}

build_dir=""
build_layout() {
  [ -f "$layout/index.json" ] && return 0
  mkdir -p "$base/oci"
  build_dir=$(mktemp -d "$base/build.XXXXXX")
  trap 'rm -rf "$build_dir"' EXIT  # a failed build leaves no half-made root behind
  local work=$build_dir
  download_wheels "$work/wheels"
  local snakemake s3
  snakemake=$(wheel_version "$work/wheels/all" snakemake)
  s3=$(wheel_version "$work/wheels/all" snakemake_storage_plugin_s3)
  build_root "$work/root" "$work/wheels"
  pack "$work/root" "$work/layout" "$snakemake" "$s3"
  mv "$work/layout" "$layout"
  rm -rf "$work"
  echo "built $layout: snakemake $snakemake, snakemake-storage-plugin-s3 $s3"
}

install_tools
if [ ! -s "$ca" ] || ! curl -sf -o /dev/null --cacert "$ca" "https://$registry/v2/"; then
  bash scripts/setup/45-registry.sh
fi
if ! pushed; then
  build_layout
  skopeo copy -q --dest-tls-verify=false "oci:$layout:1" "docker://$registry/$ref" >/dev/null
fi
echo "workflow image ready: $registry/$ref"
