#!/usr/bin/env bash
# Make a host `haproxy` available for the edge tests (tests/fixtures/haproxy.py), without starting one.
#
# Idempotent: when `haproxy` is on PATH it only prints where. Otherwise, as root with apt, it installs
# Debian's haproxy package (the same 2.6 the serving base image carries) with a policy-rc.d that refuses
# service starts (the machine's own when it already refuses them), so the package leaves no daemon
# running: the tests start their own, by PID.
# Prints the binary's path. Exit status: 0 ready; 3 cannot install here (not root, no apt, apt failed).
set -euo pipefail

say() { echo "haproxy_setup: $*" >&2; }
LOCK="${TMPDIR:-/tmp}/lifecycle-haproxy-setup.lock"
exec 9>"$LOCK"
flock 9  # two test sessions at once: the second waits, then finds it installed

if ! command -v haproxy >/dev/null; then
  [ "$(id -u)" = 0 ] || { say "haproxy missing and not root: cannot install it"; exit 3; }
  command -v apt-get >/dev/null || { say "haproxy missing and no apt-get"; exit 3; }
  say "installing haproxy"
  policy=/usr/sbin/policy-rc.d
  if [ -e "$policy" ]; then
    # Someone else's (container images carry one): use it as it is when it refuses starts too.
    rc=0; "$policy" haproxy start >/dev/null 2>&1 || rc=$?
    [ "$rc" = 101 ] || { say "$policy exists and allows service starts: not touching it"; exit 3; }
  else
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends haproxy >&2; then
    apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends haproxy >&2 \
      || { say "apt-get install haproxy failed"; exit 3; }
  fi
fi
command -v haproxy
