#!/bin/sh
# Runs inside the VMs of `cargo xtask test`'s tier 4 and `cargo xtask vm` (xtask/src/vm.rs writes
# it into the guest's writable directory and boots `vng --exec 'sh DIR/guest.sh DIR'`).
#
# The guest sees the host's / read-only (9p) and DIR writable. vng's own exit status and
# console are no use here (it exits 255 without udev on the host, and the console mixes the
# kernel's messages in), so everything goes to DIR/log, which the host reads while it grows:
#
#   ##xtask-vm## kernel VERSION
#   ##xtask-vm## begin ID
#   ...the command's output...
#   ##xtask-vm## end ID rc=RC secs=SECS
#   ...
#   ##xtask-vm## done
#
# A run without its `end` line (or a log without `done`) means the guest died or was stopped.
#
# DIR/plan has one run per line: `ID TIMEOUT_SECS WORKDIR PROGRAM ARGS...`, split at spaces
# (no field contains one; TIMEOUT_SECS 0 means none).

dir=$1
exec >>"$dir/log" 2>&1 </dev/null
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The host's environment does not reach the guest: DIR/env carries what the tests read
# (OVERLAY_TEST_SLOWDOWN, RUST_BACKTRACE, ...), as `export NAME='value'` lines.
[ -f "$dir/env" ] && . "$dir/env"
echo "##xtask-vm## kernel $(uname -r)"
# The agent and the tests pin under /sys/fs/bpf.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
while read -r id timeout_secs workdir program args; do
    echo "##xtask-vm## begin $id"
    start=$(date +%s)
    # $args unquoted on purpose: one word per argument.
    # shellcheck disable=SC2086
    (cd "$workdir" && exec timeout -k 10 "$timeout_secs" "$program" $args) </dev/null
    rc=$?
    echo "##xtask-vm## end $id rc=$rc secs=$(($(date +%s) - start))"
done <"$dir/plan"
dmesg >"$dir/dmesg" 2>&1
echo "##xtask-vm## done"
sync
