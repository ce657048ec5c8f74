#!/bin/busybox sh
# PID 1 of the micro-VM's initramfs. Builds the guest's root (the host's root,
# read-only over 9p, under a tmpfs overlay), mounts a pure cgroup v2 hierarchy
# with every controller enabled, then switch_roots into guest-run.sh.
# Parameters come from the kernel command line as environment variables:
#   CGCTL_VM_OUT      host path of the read-write results share (same path in the guest)
#   CGCTL_VM_MODULES  host path of the unpacked kernel's lib/modules
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
mount -t cgroup2 -o nsdelegate cgroup2 /newroot/sys/fs/cgroup || fail "cannot mount cgroup2"
for controller in $(cat /newroot/sys/fs/cgroup/cgroup.controllers); do
    echo "+$controller" >/newroot/sys/fs/cgroup/cgroup.subtree_control \
        || fail "cannot enable the $controller controller"
done

mkdir -p "/newroot$CGCTL_VM_OUT" /newroot/lib/modules
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "/newroot$CGCTL_VM_OUT" \
    || fail "cannot mount the results share"
mount --bind "/newroot$CGCTL_VM_MODULES" /newroot/lib/modules

mkdir -p /newroot/run/microvm
cp /bin/busybox /guest-run.sh /newroot/run/microvm/
umount /proc /sys /dev
exec switch_root /newroot /run/microvm/busybox sh /run/microvm/guest-run.sh
