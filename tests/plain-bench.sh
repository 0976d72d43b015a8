#!/usr/bin/env bash
# The second harness: iperf3 between two pods on two nodes, written out plainly with ip, ethtool
# and etcdctl, independent of the Rust bench (tests/src/bench), so the two can be checked against
# each other. Run as root from the workspace after `cargo build --release -p overlay-agent`:
#
#   tests/plain-bench.sh CASE UNDERLAY [SECONDS]
#     CASE      host-gw | kernel-vxlan | agent-tc | agent-xdp | agent-tc-nogro
#     UNDERLAY  veth | nic | nic-switch-gro | nic-tnl-tso   (see the case below)
#
# Prints one line: case, underlay, TCP 1 flow Gbit/s, retransmits, receiver sys+softirq CPU s.
# Everything lives in namespaces named pb-*, on 198.19.254.0/24 and 10.244.0.0/16, and is removed
# on exit, pass or fail.
set -euo pipefail

case_=${1:?case: host-gw, kernel-vxlan, agent-tc, agent-xdp or agent-tc-nogro}
underlay=${2:?underlay: veth or nic}
secs=${3:-5}
here=$(cd "$(dirname "$0")/.." && pwd)
agent=${OVERLAY_AGENT_BIN:-$here/target/release/overlay-agent}
tmp=$(mktemp -d /tmp/plain-bench.XXXXXX)
pids=()

cleanup() {
    [ -n "${KEEP_LOGS:-}" ] && { rm -rf /tmp/plain-bench.last; cp -r "$tmp" /tmp/plain-bench.last; }
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in 1 2; do
        [ -x "$agent" ] && netx pb-n$n "$agent" cleanup --pin-root "/sys/fs/bpf/pb-n$n" \
            --iface eth0 >/dev/null 2>&1 || true
    done
    for ns in pb-p1 pb-p2 pb-n1 pb-n2 pb-u; do ip netns del $ns 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap "exit 130" INT TERM

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
# The agent enters only the network namespace (ip netns exec would give it a private /sys and
# so a bpffs of its own), as the agent of a real node shares the host's bpffs.
netx() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }

# The underlay: one bridge, a port per node.
ip netns add pb-u
nsx pb-u ip link add br0 type bridge
nsx pb-u ip addr add 198.19.254.1/24 dev br0
nsx pb-u ip link set br0 up
nsx pb-u ip link set lo up
for n in 1 2; do
    ip netns add pb-n$n
    ip link add p$n netns pb-u type veth peer name eth0 netns pb-n$n
    nsx pb-u ip link set p$n master br0 up
    nsx pb-n$n ip addr add 198.19.254.1$n/24 dev eth0
    nsx pb-n$n ip link set eth0 up
    nsx pb-n$n ip link set lo up
    nsx pb-n$n sysctl -qw net.ipv4.ip_forward=1
done

case $underlay in
veth) ;;
nic)
    for n in 1 2; do
        # A NIC without tunnel offload: everything leaves cut to the MTU, and is coalesced
        # where it is received (GRO on the node's eth0).
        nsx pb-n$n ethtool -K eth0 tso off gso off tx-udp_tnl-segmentation off \
            tx-udp_tnl-csum-segmentation off gro on
        # The switch forwards frames as they come. veth runs GRO on a frame only when the
        # sending end has TSO off (veth_skb_is_eligible_for_gro), so the ports must not
        # claim TSO, or the nodes' GRO never sees a frame.
        nsx pb-u ethtool -K p$n tso off gso off tx-udp_tnl-segmentation off \
            tx-udp_tnl-csum-segmentation off
    done
    ;;
nic-switch-gro)
    for n in 1 2; do
        # The nodes as with nic, but the switch's ports keep veth's TSO and run GRO: the ports
        # merge plain TCP (host-gw) into 64 KB packets that reach the node whole, nothing on
        # the switch knows port 8472 so VXLAN is never merged there, and the nodes' GRO never
        # sees a frame (the ports claim TSO). Not what a NIC does; it shows how much a setup
        # detail moves the ratios.
        nsx pb-n$n ethtool -K eth0 tso off gso off tx-udp_tnl-segmentation off \
            tx-udp_tnl-csum-segmentation off gro on
        nsx pb-u ethtool -K p$n gro on
    done
    ;;
nic-tnl-tso)
    for n in 1 2; do
        # A NIC with TCP and UDP-tunnel segmentation offload: the node hands it whole GSO
        # packets (as to the kernel's VXLAN device)...
        nsx pb-n$n ethtool -K eth0 tso on gso on tx-udp_tnl-segmentation on \
            tx-udp_tnl-csum-segmentation on gro on
        # ...and it puts MTU-sized frames on the wire: the switch port, without TSO, cuts them.
        nsx pb-u ethtool -K p$n tso off gso off tx-udp_tnl-segmentation off \
            tx-udp_tnl-csum-segmentation off
    done
    ;;
*) echo "unknown underlay $underlay" >&2; exit 2 ;;
esac

pod_mtu=1450
case $case_ in
host-gw)
    pod_mtu=1500
    for n in 1 2; do echo "FLANNEL_SUBNET=10.244.$n.1/24" >"$tmp/subnet$n.env"; done
    nsx pb-n1 ip route add 10.244.2.0/24 via 198.19.254.12
    nsx pb-n2 ip route add 10.244.1.0/24 via 198.19.254.11
    ;;
kernel-vxlan)
    # flanneld's vxlan backend: flannel.1 with VNI 1 on port 8472, per peer an FDB entry, a
    # permanent neighbour and an onlink route.
    for n in 1 2; do
        echo "FLANNEL_SUBNET=10.244.$n.1/24" >"$tmp/subnet$n.env"
        nsx pb-n$n ip link add flannel.1 address 02:00:00:00:00:0$n type vxlan id 1 \
            local 198.19.254.1$n dev eth0 dstport 8472 nolearning
        nsx pb-n$n ip link set flannel.1 mtu 1450 up
        nsx pb-n$n ip addr add 10.244.$n.0/32 dev flannel.1
    done
    for pair in "1 2" "2 1"; do
        set -- $pair
        nsx pb-n$1 bridge fdb append 02:00:00:00:00:0$2 dev flannel.1 dst 198.19.254.1$2
        nsx pb-n$1 ip neigh replace 10.244.$2.0 lladdr 02:00:00:00:00:0$2 dev flannel.1 nud permanent
        nsx pb-n$1 ip route replace 10.244.$2.0/24 via 10.244.$2.0 dev flannel.1 onlink
    done
    ;;
agent-tc | agent-xdp | agent-tc-nogro)
    # Background jobs run the commands themselves, not the helper functions (a backgrounded
    # function is a subshell: its pid is not the daemon's, and killing it leaves the daemon).
    ip netns exec pb-u etcd --name pb --data-dir "$tmp/etcd" \
        --listen-client-urls http://198.19.254.1:2379 --advertise-client-urls http://198.19.254.1:2379 \
        --listen-peer-urls http://198.19.254.1:2380 --initial-advertise-peer-urls http://198.19.254.1:2380 \
        --initial-cluster pb=http://198.19.254.1:2380 >"$tmp/etcd.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do
        nsx pb-u etcdctl --endpoints http://198.19.254.1:2379 endpoint health >/dev/null 2>&1 && break
        sleep 0.2
    done
    nsx pb-u etcdctl --endpoints http://198.19.254.1:2379 put /coreos.com/network/config \
        '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}' >/dev/null
    decap=tc
    extra=()
    [ "$case_" = agent-xdp ] && decap=xdp
    [ "$case_" = agent-tc-nogro ] && extra=(--receive-gro=false)
    for n in 1 2; do
        nsenter --net=/run/netns/pb-n$n "$agent" --etcd-endpoints http://198.19.254.1:2379 --iface eth0 \
            --subnet-file "$tmp/subnet$n.env" --pin-root "/sys/fs/bpf/pb-n$n" --decap $decap \
            "${extra[@]}" >"$tmp/agent$n.log" 2>&1 &
        pids+=($!)
    done
    for n in 1 2; do
        for _ in $(seq 100); do [ -s "$tmp/subnet$n.env" ] && break; sleep 0.1; done
        [ -s "$tmp/subnet$n.env" ] || { cat "$tmp/agent$n.log"; exit 1; }
    done
    ;;
*) echo "unknown case $case_" >&2; exit 2 ;;
esac

# A bridge and one pod per node, on the subnet subnet.env names.
for n in 1 2; do
    gw=$(sed -n 's/^FLANNEL_SUBNET=//p' "$tmp/subnet$n.env")
    pod=${gw%.1/*}.2
    eval "pod$n=$pod"
    nsx pb-n$n ip link add cni0 type bridge
    nsx pb-n$n ip addr add "$gw" dev cni0
    nsx pb-n$n ip link set cni0 mtu $pod_mtu up
    ip netns add pb-p$n
    ip link add veth0 netns pb-n$n type veth peer name eth0 netns pb-p$n
    nsx pb-n$n ip link set veth0 master cni0 mtu $pod_mtu up
    nsx pb-p$n ip link set lo up
    nsx pb-p$n ip link set eth0 mtu $pod_mtu up
    nsx pb-p$n ip addr add "$pod/24" dev eth0
    nsx pb-p$n ip route add default via "${gw%/*}"
done

# Wait for the agents to attach to the new bridges (a flow that starts before takes the stack
# and stays on it), then for the path (agents learn each other's lease from etcd).
if [[ $case_ == agent-* ]]; then
    for n in 1 2; do
        for _ in $(seq 100); do grep -q "encap attached" "$tmp/agent$n.log" && break; sleep 0.1; done
    done
fi
for _ in $(seq 50); do nsx pb-p1 ping -c1 -W1 "$pod2" >/dev/null 2>&1 && break; sleep 0.2; done
nsx pb-p1 ping -c1 -W1 "$pod2" >/dev/null

nsx pb-p2 iperf3 -s -1 -D -I "$tmp/iperf.pid"
sleep 0.3
cpu() { awk '/^cpu /{print $4+$7+$8}' /proc/stat; }
before=$(cpu)
nsx pb-p1 iperf3 -c "$pod2" -t "$secs" -J >"$tmp/iperf.json"
after=$(cpu)
hz=$(getconf CLK_TCK)
jq -r --arg c "$case_" --arg u "$underlay" --arg cpu "$(( (after - before) ))" --arg hz "$hz" \
    '"\($c) \($u) tcp1 \(.end.sum_received.bits_per_second / 1e9 * 100 | round / 100) Gbit/s retransmits \(.end.sum_sent.retransmits) cpu(all) \(($cpu|tonumber) / ($hz|tonumber)) s"' \
    "$tmp/iperf.json"
[ -n "${PB_HOLD:-}" ] && sleep "$PB_HOLD"
if [[ $case_ == agent-* ]]; then
    netx pb-n2 "$agent" status --pin-root /sys/fs/bpf/pb-n2 --json 2>/dev/null |
        jq -c '.counters | with_entries(select(.value != 0))' || true
fi
