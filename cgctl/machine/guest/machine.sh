#!/bin/sh
# The job of a `cgctl machine` VM (cgctl/machine/instance.py): run by guest-run.sh as the VM's only
# job, it mounts the persistent disk at /var/lib/cgctl and the shared host paths, serves a shell on
# the second serial port, and runs `cgctl daemon` (restarted if it dies) until the host writes a
# line to the control port; then it stops the daemon, which stops the containers and records
# their exits, unmounts the disk and returns, and guest-run.sh powers the VM off.
# From the host, in the environment (job.sh):
#   CGCTL_VM_OUT             the share holding this job and the API's token
#   CGCTL_MACHINE_SHARES     "TAG=PATH ..." host paths shared read-write at the same path
#   CGCTL_MACHINE_API        guest TCP port of the API (qemu forwards a host loopback port to it)
#   CGCTL_MACHINE_METRICS    guest TCP port of /metrics (likewise)
set -u
say() { echo "cgctl machine: $*" >&2; }
fail() {
    say "$*"
    exit 1
}

hostname cgctl-machine
modprobe -a virtio_net virtio_console ext4 || fail "cannot load the network, console or ext4 modules"
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 || fail "cannot configure eth0"

# The disk: e2fsck -p replays the journal of a machine killed hard and fixes what is safe to fix
# (exit 1: it fixed something; 2 and up: it needs a human).
e2fsck -p /dev/vda >&2
[ $? -le 1 ] || fail "the disk /dev/vda needs repair: run e2fsck on the machine's disk.img by hand"
mkdir -p /var/lib/cgctl
mount -t ext4 -o noatime /dev/vda /var/lib/cgctl || fail "cannot mount the disk /dev/vda"

for pair in $CGCTL_MACHINE_SHARES; do
    tag=${pair%%=*} path=${pair#*=}
    mkdir -p "$path"
    # cache=mmap: what the host changes shows at once (no attribute or page cache to go stale).
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap "$tag" "$path" \
        || fail "cannot mount the shared $path"
done

# A root shell for `cgctl machine shell`, on the serial port that qemu connects to shell.sock.
(while :; do setsid -c sh -l <>/dev/ttyS1 >&0 2>&0; sleep 1; done) &

control=
for port in /sys/class/virtio-ports/*; do
    [ "$(cat "$port/name")" = cgctl.control ] && control=/dev/${port##*/}
done
[ -n "$control" ] || fail "no cgctl.control virtio port"
(
    read -r _ <"$control"
    touch /run/cgctl-machine.stop
    kill -TERM "$(cat /run/cgctl-machine.pid)"
) &

while [ ! -e /run/cgctl-machine.stop ]; do
    cgctl daemon --tcp "10.0.2.15:$CGCTL_MACHINE_API" --token-file "$CGCTL_VM_OUT/token" \
        --metrics "10.0.2.15:$CGCTL_MACHINE_METRICS" --stop-containers --stop-timeout 10 &
    echo $! >/run/cgctl-machine.pid
    wait $!
    status=$?
    [ -e /run/cgctl-machine.stop ] && break
    say "the daemon exited with status $status; starting it again in 1 s"
    sleep 1
done
sync
umount /var/lib/cgctl || say "cannot unmount /var/lib/cgctl; the journal will be replayed at the next start"
