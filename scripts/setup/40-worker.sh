#!/usr/bin/env bash
# Worker test needs: bubblewrap and proot (container drivers that run here), Charliecloud,
# acl (setfacl, for the owner-access test of ACLs), libseccomp2 (the executors' seccomp
# filters, through pyseccomp), gcc and libc6-dev (tests compile static attacker programs),
# podman, and busybox-static unpacked under /var/lib/funnel/rootfs/busybox: a clean tree
# to seed image caches from (`python -m funnel_hpc.worker.images seed`) and the bare-bwrap
# reference of the benchmarks. Tasks never run over it: their images come from registries.
# uidmap: the setuid newuidmap/newgidmap a worker that is not root maps its /etc/subuid
# range with (worker.sandbox_uids.subordinate); useradd gives every new user a range of
# 65536 once /etc/subuid and /etc/subgid exist (SUB_UID_COUNT in /etc/login.defs).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
apt_install bubblewrap proot busybox-static podman charliecloud-runtime acl libseccomp2 \
  gcc libc6-dev uidmap
for file in /etc/subuid /etc/subgid; do
  [ -e "$file" ] || install -m 644 /dev/null "$file"
done
# the test user of 30-slurm.sh (made before these files existed on some machines)
if id funneltest >/dev/null 2>&1; then
  grep -q '^funneltest:' /etc/subuid || usermod --add-subuids 100000-165535 funneltest
  grep -q '^funneltest:' /etc/subgid || usermod --add-subgids 100000-165535 funneltest
fi
rootfs=/var/lib/funnel/rootfs/busybox
# rebuilt when missing, or when tasks of old (the shared root was bound read-write) left
# anything beside bin/ etc/ tmp/ in it
if [ ! -x "$rootfs/bin/busybox" ] || [ "$(ls -A "$rootfs" | tr '\n' ' ')" != "bin etc tmp " ]; then
  tmp=$(mktemp -d /var/lib/funnel-rootfs.XXXXXX)
  mkdir -p "$tmp/bin" "$tmp/tmp" "$tmp/etc"
  cp /bin/busybox "$tmp/bin/busybox"
  "$tmp/bin/busybox" --install -s "$tmp/bin"
  # busybox --install links to the busybox path it was run from: make them relative
  for link in "$tmp"/bin/*; do
    [ -L "$link" ] && ln -sf busybox "$link"
  done
  echo "root:x:0:0:root:/tmp:/bin/sh" >"$tmp/etc/passwd"
  mkdir -p "$(dirname "$rootfs")"
  rm -rf "$rootfs"
  mv "$tmp" "$rootfs"
fi
# the same rootfs as a local podman image (podman may not be able to run it here: see docs/internals.md, "Containers")
if command -v podman >/dev/null && ! podman image exists localhost/busybox:latest 2>/dev/null; then
  tar -C "$rootfs" -c . | podman import - localhost/busybox:latest >/dev/null 2>&1 || true
fi
"$rootfs/bin/busybox" true
echo "worker tools ready: bwrap $(bwrap --version | cut -d' ' -f2), proot, rootfs $rootfs"
