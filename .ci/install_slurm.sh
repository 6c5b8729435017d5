#!/usr/bin/env bash
# Install Debian's SLURM (slurmctld, slurmd, client) and munge for the cluster tests
# (tests/slurm_cluster.py: one node on localhost, and two nodes in network namespaces, which need
# iproute2's `ip` and util-linux's nsenter/unshare). Idempotent: does nothing when the binaries are
# already there. Never starts system daemons: the tests start their own, with every path in a temp folder.
set -euo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client iproute2 util-linux)

if command -v munged >/dev/null && command -v slurmctld >/dev/null \
  && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v ip >/dev/null \
  && command -v nsenter >/dev/null && command -v unshare >/dev/null; then
  echo "slurm already installed: $(dpkg-query -W -f '${Version}' slurmctld 2>/dev/null || echo '(not from apt)')"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install_slurm.sh must run as root (apt-get)" >&2
  exit 1
fi

# Keep the packages' postinst from starting daemons (no systemd here): a policy-rc.d that
# exits 101 forbids it. Create one for the install only where the machine has none.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
echo "installed: slurm $(dpkg-query -W -f '${Version}' slurmctld), $(munged --version 2>&1 | head -n1)"
