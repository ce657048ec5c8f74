# ExecStopPost= of microvm-job.service (microvm.py --systemd): records the job's exit status as
# the default mode's shell reports it (128 + the signal's number if a signal killed it) and the
# kernel log on the results share; the unit's SuccessAction=/FailureAction= then ends the VM.
bb=/run/microvm/busybox
out="$CGCTL_VM_OUT"
case "$EXIT_CODE" in
exited) status=$EXIT_STATUS ;;
killed | dumped) status=$((128 + $($bb kill -l "$EXIT_STATUS"))) ;;
*)
    echo "microvm: the job did not run: $SERVICE_RESULT" >/dev/console
    status=125
    ;;
esac
echo "$status" >"$out/status.tmp"
$bb dmesg >"$out/dmesg.log"
$bb mv "$out/status.tmp" "$out/status"
$bb sync
