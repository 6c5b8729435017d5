#!/usr/bin/env bash
# Network namespaces for the two-node SLURM cluster test (tests/slurm_cluster.py, TwoNodeCluster):
# one namespace per host, joined by a bridge that lives in the controller's namespace. Every address
# exists only inside these namespaces, so the cluster's traffic never leaves this machine and nothing
# of the host's own network changes. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
#
#   .ci/slurm_netns.sh up PREFIX DIR CTL NODE...   namespaces PREFIX-CTL (bridge, 10.200.0.1) and
#                                                  PREFIX-NODE (10.200.0.11, .12, ...); writes DIR/hosts
#   .ci/slurm_netns.sh run PREFIX DIR HOST CMD...  CMD in PREFIX-HOST, with hostname HOST and DIR/hosts
#                                                  as /etc/hosts (both private to CMD and its children)
#   .ci/slurm_netns.sh down PREFIX                 stop what still runs in PREFIX-*, delete them
set -euo pipefail

SUBNET=10.200.0
BRIDGE=br0

up() {
  local prefix=$1 dir=$2 ctl=$3
  shift 3
  local ns=$prefix-$ctl
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link add "$BRIDGE" type bridge
  ip -n "$ns" addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip -n "$ns" link set "$BRIDGE" up
  printf '127.0.0.1 localhost\n%s.1 %s\n' "$SUBNET" "$ctl" >"$dir/hosts"
  local i=11 node
  for node in "$@"; do
    ip netns add "$prefix-$node"
    ip -n "$prefix-$node" link set lo up
    # Both ends are made inside the namespaces: no interface ever appears in the host's.
    ip -n "$ns" link add "v$i" type veth peer name eth0 netns "$prefix-$node"
    ip -n "$ns" link set "v$i" master "$BRIDGE" up
    ip -n "$prefix-$node" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$prefix-$node" link set eth0 up
    printf '%s.%s %s\n' "$SUBNET" "$i" "$node" >>"$dir/hosts"
    i=$((i + 1))
  done
}

run() {
  local prefix=$1 dir=$2 host=$3
  shift 3
  # Not `ip netns exec`: it mounts a fresh /sys, without the cgroup tree slurmd's plugins read.
  # unshare --mount makes the bind mount of /etc/hosts private to the command and its children, and
  # --uts the hostname, which Lightning and gloo resolve to find the node's address.
  exec nsenter --net="/run/netns/$prefix-$host" unshare --mount --uts -- \
    sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' \
    sh "$dir/hosts" "$host" "$@"
}

down() {
  local prefix=$1 ns pid
  for ns in $(ip netns list | awk '{print $1}'); do
    [[ $ns == "$prefix"-* ]] || continue
    # Normally empty (the test stopped its daemons); anything left is the test's own.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns"
  done
}

case ${1:-} in
  up | run | down)
    command=$1
    shift
    "$command" "$@"
    ;;
  *)
    echo "usage: $0 up PREFIX DIR CTL NODE... | run PREFIX DIR HOST CMD... | down PREFIX" >&2
    exit 2
    ;;
esac
