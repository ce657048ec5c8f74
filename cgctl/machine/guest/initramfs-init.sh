#!/bin/busybox sh
# PID 1 of the micro-VM's initramfs. Builds the guest's root (the host's root,
# read-only over 9p, under a tmpfs overlay), mounts a pure cgroup v2 hierarchy
# with every controller enabled, then switch_roots into guest-run.sh; or, with
# CGCTL_VM_INIT=systemd, into the host's systemd, which mounts cgroup2 itself and
# runs the job as microvm-job.service.
# Parameters come from the kernel command line as environment variables:
#   CGCTL_VM_OUT      host path of the read-write results share (same path in the guest)
#   CGCTL_VM_MODULES  host path of the unpacked kernel's lib/modules
#   CGCTL_VM_INIT     "systemd" for microvm.py --systemd
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "microvm init: $*" >/dev/console
    reboot -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1
while read -r module; do
    insmod "/modules/$module" || fail "insmod $module failed"
done </modules/order

mkdir -p /mnt/host /mnt/rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /mnt/host \
    || fail "cannot mount the host's root over 9p"
mount -t tmpfs -o mode=0755 overlay-rw /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot \
    || fail "cannot mount the overlay root"

mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount -t mqueue mqueue /newroot/dev/mqueue
mount -t tmpfs -o mode=0755 run /newroot/run
# systemd, as PID 1, mounts cgroup2 itself with its own options and manages the controllers.
if [ "$CGCTL_VM_INIT" != systemd ]; then
    mount -t cgroup2 -o nsdelegate cgroup2 /newroot/sys/fs/cgroup || fail "cannot mount cgroup2"
    for controller in $(cat /newroot/sys/fs/cgroup/cgroup.controllers); do
        echo "+$controller" >/newroot/sys/fs/cgroup/cgroup.subtree_control \
            || fail "cannot enable the $controller controller"
    done
fi

mkdir -p "/newroot$CGCTL_VM_OUT" /newroot/lib/modules
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "/newroot$CGCTL_VM_OUT" \
    || fail "cannot mount the results share"
mount --bind "/newroot$CGCTL_VM_MODULES" /newroot/lib/modules

mkdir -p /newroot/run/microvm
cp /bin/busybox /guest-run.sh /newroot/run/microvm/
umount /proc /sys /dev
if [ "$CGCTL_VM_INIT" = systemd ]; then
    # Runtime units: they last this boot only and leave the host's /etc alone.
    units=/newroot/run/systemd/system
    mkdir -p $units/microvm-job.service.d /newroot/run/tmpfiles.d
    cp /microvm-job.target /microvm-job.service $units/
    cp /guest-job-done.sh /newroot/run/microvm/
    printf '[Service]\nEnvironment=CGCTL_VM_OUT=%s\n' "$CGCTL_VM_OUT" >$units/microvm-job.service.d/out.conf
    # The guest's /tmp is the host's under the overlay, as in the default mode (checkouts and
    # the results share may live there): keep it rather than let the boot empty it (tmp.conf).
    echo 'd /tmp 1777 root root -' >/newroot/run/tmpfiles.d/tmp.conf
    # The host may be a container: its marker would make systemd ignore the kernel command line.
    rm -f /newroot/.dockerenv
    exec switch_root /newroot /lib/systemd/systemd
fi
exec switch_root /newroot /run/microvm/busybox sh /run/microvm/guest-run.sh
