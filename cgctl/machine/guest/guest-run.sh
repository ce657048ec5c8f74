# PID 1 of the micro-VM after switch_root, run by the busybox copied to
# /run/microvm. Runs the job that microvm.py wrote to the results share,
# records its exit status and the kernel log there, then powers off.
bb=/run/microvm/busybox
$bb hostname microvm
$bb ip link set lo up
out="$CGCTL_VM_OUT"
cd / || exit 1
$bb sh "$out/job.sh" </dev/null >/dev/console 2>&1
echo $? >"$out/status.tmp"
$bb dmesg >"$out/dmesg.log"
$bb mv "$out/status.tmp" "$out/status"
$bb sync
$bb reboot -f
