#!/bin/sh
# CRIU's action script for cgctl checkpoint/restore (see checkpoint.py). CRIU runs it at every step
# with CRTOOLS_SCRIPT_ACTION set; a non-zero exit aborts the dump or restore.
case "$CRTOOLS_SCRIPT_ACTION" in
pre-dump | post-dump | pre-restore | post-restore)
	[ -n "$CGCTL_HOOK" ] || exit 0
	CGCTL_HOOK_ACTION=$CRTOOLS_SCRIPT_ACTION "$CGCTL_HOOK" </dev/null
	status=$?
	[ "$status" -eq 0 ] || echo "cgctl: the $CRTOOLS_SCRIPT_ACTION hook $CGCTL_HOOK exited $status" >&2
	exit "$status"
	;;
network-unlock)
	# CRIU before 4.1 names its nftables lock table after the dumped init's host pid and, after a
	# restore under another pid, looks for the wrong one and leaves the lock in place
	# (checkpoint-restore/criu#2550): remove it from the restored network namespace.
	if [ -n "$CGCTL_DUMPED_INIT_PID" ] && [ -n "$CRTOOLS_INIT_PID" ] && command -v nft >/dev/null; then
		nsenter --net="/proc/$CRTOOLS_INIT_PID/ns/net" nft delete table inet "CRIU-$CGCTL_DUMPED_INIT_PID" 2>/dev/null
	fi
	exit 0
	;;
esac
exit 0
