#!/usr/bin/env bash
# Make this machine able to build and run lifecycle serving images, without a registry.
#
# Idempotent: every step checks first and does nothing when its result is already there, so the test
# fixture (tests/fixtures/docker.py) runs it at the start of every session.
#   1. docker.io + debootstrap from Debian (apt-get update first, only when something is missing);
#   2. a dockerd in the background when `docker info` fails (log: $DOCKERD_LOG);
#   3. the base image $LIFECYCLE_BASE_IMAGE (default lifecycle-base:bookworm) when that tag is missing
#      or was built with another package list (its label org.lifecycle.base-include records it):
#      debootstrap --variant=minbase bookworm with python3, venv, pip, CA certificates and haproxy (the
#      edge in front of docker targets, tasks/haproxy.py), trimmed, then `docker import` (there is no
#      registry to pull a python image from).
# Exit status: 0 ready; 3 docker cannot run on this machine (not root, no apt, daemon does not start);
# 1 the base image could not be built (debootstrap or import failed: a real error, not a skip).
set -euo pipefail

BASE_IMAGE="${LIFECYCLE_BASE_IMAGE:-lifecycle-base:bookworm}"
SUITE="${LIFECYCLE_BASE_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/lifecycle-dockerd.log}"
# Debian's 20.10 client: /usr/local/bin/docker on these machines is a 28.x client without buildx.
DOCKER=/usr/bin/docker
LOCK="${TMPDIR:-/tmp}/lifecycle-docker-setup.lock"
# What the base image holds beyond minbase; changing this list rebuilds the image on the next run.
INCLUDE="python3,python3-venv,python3-pip,ca-certificates,haproxy"

say() { echo "docker_setup: $*" >&2; }
cannot() { say "$*"; exit 3; }
fail() { say "$*"; exit 1; }  # docker runs here, but building the base image failed: a real error

exec 9>"$LOCK"
flock 9  # two test sessions at once: the second waits, then finds everything done

if [ ! -x "$DOCKER" ] || ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  [ "$(id -u)" = 0 ] || cannot "docker.io/debootstrap missing and not root: cannot install them"
  command -v apt-get >/dev/null || cannot "docker.io/debootstrap missing and no apt-get"
  say "installing docker.io and debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || cannot "apt-get update failed"
  apt-get install -y -qq --no-install-recommends docker.io debootstrap iptables ca-certificates >&2 \
    || cannot "apt-get install docker.io debootstrap failed"
fi

if ! "$DOCKER" info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || cannot "no docker daemon answers and not root: cannot start dockerd"
  say "starting dockerd (log: $DOCKERD_LOG)"
  setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null 9>&- &  # 9>&-: the daemon must not hold our lock
  for _ in $(seq 1 150); do
    "$DOCKER" info >/dev/null 2>&1 && break
    sleep 0.2
  done
  "$DOCKER" info >/dev/null 2>&1 || cannot "dockerd did not start; last log lines: $(tail -n 5 "$DOCKERD_LOG" | tr '\n' ' ')"
fi

built_with="$("$DOCKER" image inspect -f '{{index .Config.Labels "org.lifecycle.base-include"}}' "$BASE_IMAGE" 2>/dev/null || true)"
if [ "$built_with" != "$INCLUDE" ]; then
  [ "$(id -u)" = 0 ] || cannot "base image $BASE_IMAGE missing or without $INCLUDE, and not root: debootstrap needs root"
  # On tmpfs when there is room: dpkg fsyncs every file it unpacks, which makes a disk-backed
  # debootstrap several times slower.
  scratch="${TMPDIR:-/tmp}"
  if [ -d /dev/shm ] && [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt 1500000 ]; then
    scratch=/dev/shm
  fi
  root="$(mktemp -d "$scratch/lifecycle-rootfs.XXXXXX")"
  trap 'rm -rf "$root"' EXIT
  say "building $BASE_IMAGE with debootstrap ($SUITE from $MIRROR)"
  debootstrap --variant=minbase --include="$INCLUDE" \
    "$SUITE" "$root" "$MIRROR" >&2 || fail "debootstrap failed"
  # What a server never needs: package caches and lists, docs, man pages, translations.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*.log
  tar -C "$root" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1' --change 'CMD ["python3"]' \
    --change "LABEL org.lifecycle.base-include=$INCLUDE" \
    --message "debootstrap --variant=minbase $SUITE + $INCLUDE" \
    - "$BASE_IMAGE" >/dev/null || fail "docker import failed"
  say "built $BASE_IMAGE ($("$DOCKER" image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes)"
fi
echo "$BASE_IMAGE"
