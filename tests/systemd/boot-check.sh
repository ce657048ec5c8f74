#!/usr/bin/env bash
# The units in systemd/ under a real systemd as PID 1: installs them as systemd/README.md says,
# verifies them, starts the daemon through them and checks what the README promises: socket
# activation and permissions, the delegated cgroup layout, containers and exit statuses that
# survive `systemctl restart cgctld`. Prints each step with its time; exits 1 at the first failure.
#
# Needs root, systemd as PID 1 and a throwaway system: it writes /etc/systemd/system, /usr/local/bin
# and friends. So it runs in the micro-VM's systemd mode; on the host it starts that itself:
#     tests/systemd/boot-check.sh          (= tests/vm/microvm.py --systemd -- tests/systemd/boot-check.sh)
set -Eeuo pipefail
cd "$(dirname "$0")/../.."
checkout=$PWD
if [[ -z ${CGCTL_VM:-} ]]; then
    exec .venv/bin/python tests/vm/microvm.py --systemd --timeout "${CGCTL_SYSTEMD_TIMEOUT:-1200}" \
        -- tests/systemd/boot-check.sh
fi
# An administrator's PATH: the installed wrappers, not the checkout's .venv/bin.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
python=$checkout/.venv/bin/python
service_cgroup=/system.slice/cgctld.service
# Python under emulation is 10-30x slower: each daemon start or CLI call may take a minute.
wait_limit=300

started=${EPOCHREALTIME/./}
step_started=$started
steps=0
seconds() { # microseconds -> seconds with one decimal
    printf '%d.%d' $(($1 / 1000000)) $(($1 / 100000 % 10))
}
step() {
    local now=${EPOCHREALTIME/./}
    ((steps > 0)) && echo "boot-check:   ok in $(seconds $((now - step_started)))s"
    step_started=$now
    steps=$((steps + 1))
    echo "boot-check: [$(seconds $((now - started)))s] $*"
}
fail() {
    trap - ERR
    echo "boot-check: FAILED: $*"
    echo "boot-check: --- systemctl status, journal and cgroups of the daemon's units"
    systemctl status --no-pager --lines=0 cgctld.socket cgctld.service || true
    journalctl -b --no-pager -o short-monotonic -u cgctld.socket -u cgctld.service | tail -n 40 || true
    systemd-cgls --no-pager -u cgctld.service || true
    exit 1
}
# Any unchecked command that fails is a failure too (once, from the main shell, not from $(...)).
trap 'status=$?; ((BASH_SUBSHELL)) || fail "line $LINENO${FUNCNAME:+ (in $FUNCNAME, called from line \
${BASH_LINENO[0]})}: \`$BASH_COMMAND\` exited with status $status"' ERR

cgctl() {
    timeout "$wait_limit" /usr/local/bin/cgctl "$@"
}
# container NAME FIELD...: the fields of NAME's `cgctl inspect NAME --json` object, one a line.
container() {
    local name=$1
    shift
    cgctl inspect "$name" --json | "$python" -c '
import json, sys
record = json.load(sys.stdin)
for field in sys.argv[1:]:
    print(record[field])' "$@"
}
# listed NAME: NAME's object in `cgctl ps --json` as "state pid", or nothing if not listed.
listed() {
    cgctl ps --json | "$python" -c '
import json, sys
for record in json.load(sys.stdin):
    if record["name"] == sys.argv[1]:
        print(record["state"], record["pid"])' "$1"
}
cgroup_of() {
    sed -n 's/^0:://p' "/proc/$1/cgroup"
}
main_pid() {
    systemctl show --property=MainPID --value cgctld.service
}
check_daemon() {
    [[ $(systemctl is-active cgctld.service) == active && $(main_pid) != 0 ]] || fail "cgctld.service is not running"
}
start_failed() {
    fail "$1 failed or took over ${wait_limit}s"
}
start_unit() {
    timeout "$wait_limit" systemctl "$@" || start_failed "systemctl $*"
}
# wait_for DESCRIPTION COMMAND...: poll until COMMAND succeeds, at most $wait_limit seconds.
wait_for() {
    local what=$1 deadline=$((SECONDS + wait_limit))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || fail "gave up after ${wait_limit}s waiting for $what"
        sleep 1
    done
}

step "PID 1 is $(cat /proc/1/comm), systemd $(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')"
[[ $(cat /proc/1/comm) == systemd ]] || fail "PID 1 is not systemd: run through tests/vm/microvm.py --systemd"
for script in cgctl cgctld; do
    [[ -x .venv/bin/$script ]] || fail "$checkout/.venv/bin/$script is missing (scripts/setup installs cgctl)"
done

step "install the units, sysusers.d, tmpfiles.d and /usr/local/bin wrappers (systemd/README.md)"
install -m 0644 systemd/cgctld.service systemd/cgctld.socket /etc/systemd/system/
install -m 0644 -D systemd/cgctl.sysusers.conf /etc/sysusers.d/cgctl.conf
install -m 0644 -D systemd/cgctl.tmpfiles.conf /etc/tmpfiles.d/cgctl.conf
for script in cgctl cgctld; do
    printf '#!/bin/sh\nexec '\''%s/.venv/bin/%s'\'' "$@"\n' "$checkout" "$script" >/usr/local/bin/$script
    chmod 0755 /usr/local/bin/$script
done
systemd-sysusers /etc/sysusers.d/cgctl.conf
getent group cgctl >/dev/null || fail "systemd-sysusers did not create the group cgctl"
systemd-tmpfiles --create /etc/tmpfiles.d/cgctl.conf
[[ $(stat -c '%a %U %G' /run/cgctl /var/lib/cgctl) == $'711 root root\n700 root root' ]] \
    || fail "tmpfiles: $(stat -c '%n %a %U %G' /run/cgctl /var/lib/cgctl | tr '\n' ' ')"

step "systemd-analyze verify: no warning about the units"
# Other units that verify loads (the host's) may draw warnings of their own: only ours count.
verify() {
    local output
    output=$(systemd-analyze "$@" 2>&1) || fail "systemd-analyze $*: $output"
    if grep -i cgctl <<<"$output"; then
        fail "systemd-analyze $* warns about the units (above)"
    fi
}
verify verify /etc/systemd/system/cgctld.socket /etc/systemd/system/cgctld.service
# The rootless pair, as root's `systemctl --user` would load it: %h is /root, %t the runtime dir.
user_units=$(mktemp -d)
cp systemd/user/cgctld.service systemd/user/cgctld.socket "$user_units"
install -D /usr/local/bin/cgctld /root/.local/bin/cgctld
XDG_RUNTIME_DIR=$user_units verify --user verify "$user_units/cgctld.socket" "$user_units/cgctld.service"

step "systemctl start cgctld.socket cgctld.service"
# This test's only change to the units: under emulation the daemon's Python may need more than
# the default 90 s to start.
mkdir -p /etc/systemd/system/cgctld.service.d
printf '[Service]\nTimeoutStartSec=%s\n' "$wait_limit" >/etc/systemd/system/cgctld.service.d/boot-check.conf
systemctl daemon-reload
start_unit start cgctld.socket cgctld.service
check_daemon
[[ $(stat -c '%a %U %G' /run/cgctl/cgctl.sock) == "660 root cgctl" ]] \
    || fail "socket: $(stat -c '%a %U %G' /run/cgctl/cgctl.sock), want 660 root cgctl"

step "cgctl run -d: survivor (sleep) and quick (exit 7)"
cgctl run -d --name survivor --mem 64M -- sleep 100000
cgctl run -d --name quick -- sh -c 'exit 7'
ps_line=$(listed survivor)
read -r state survivor_pid <<<"$ps_line"
[[ ${state:-} == running ]] || fail "cgctl ps --json: survivor is ${state:-not listed}, not running"
kill -0 "$survivor_pid" || fail "survivor's pid $survivor_pid is not alive"
survivor_cgroup=$(cgroup_of "$survivor_pid")
keeper_scope=/system.slice/cgctl-keeper.scope
[[ $survivor_cgroup == "$keeper_scope/survivor" ]] \
    || fail "survivor runs in $survivor_cgroup, not in $keeper_scope/survivor"
[[ "$(container survivor cgroup)" == *"$survivor_cgroup" ]] \
    || fail "inspect survivor: cgroup $(container survivor cgroup), its pid is in $survivor_cgroup"
quick_exited() { [[ $(container quick state) == exited ]]; }
wait_for "quick to exit" quick_exited
echo "boot-check:   survivor pid $survivor_pid in $survivor_cgroup"
# The daemon's unit holds the daemon alone; the keeper sits in a leaf of its delegated scope.
[[ $(cgroup_of "$(main_pid)") == "$service_cgroup" ]] \
    || fail "the daemon is in $(cgroup_of "$(main_pid)"), not $service_cgroup"
keeper_pid=$(pgrep -f 'cgctl.daemon.keeper' | head -1)
[[ $(cgroup_of "$keeper_pid") == "$keeper_scope/cgctl-supervisor" ]] \
    || fail "the keeper is in $(cgroup_of "$keeper_pid"), not $keeper_scope/cgctl-supervisor"
[[ $(systemctl show --property=Delegate --value cgctl-keeper.scope) == yes ]] \
    || fail "cgctl-keeper.scope is not delegated"
controllers=$(cat "/sys/fs/cgroup$keeper_scope/cgroup.subtree_control")
for controller in cpu io memory pids; do
    [[ " $controllers " == *" $controller "* ]] \
        || fail "$controller is not enabled for the containers (subtree_control: $controllers)"
done
[[ $(cat "/sys/fs/cgroup$survivor_cgroup/memory.max") == 67108864 ]] \
    || fail "survivor's memory.max is $(cat "/sys/fs/cgroup$survivor_cgroup/memory.max"), not 64M"

step "systemctl restart cgctld"
old_daemon=$(main_pid)
start_unit restart cgctld.service
check_daemon
[[ $(main_pid) != "$old_daemon" ]] || fail "the daemon's pid is still $old_daemon after the restart"

step "after the restart: survivor runs on, quick's exit code was kept"
kill -0 "$survivor_pid" || fail "survivor (pid $survivor_pid) died with the daemon"
kill -0 "$keeper_pid" || fail "the keeper (pid $keeper_pid) died with the daemon"
[[ $(cgroup_of "$survivor_pid") == "$survivor_cgroup" ]] || fail "survivor moved to $(cgroup_of "$survivor_pid")"
[[ $(cat "/sys/fs/cgroup$survivor_cgroup/memory.max") == 67108864 ]] || fail "survivor lost its memory.max"
[[ "$(listed survivor)" == "running $survivor_pid" ]] \
    || fail "cgctl ps --json: survivor is '$(listed survivor)', want 'running $survivor_pid'"
quick=$(container quick state exit_code | paste -sd ' ')
[[ $quick == "exited 7" ]] || fail "cgctl inspect quick --json: state and exit_code are $quick, want exited 7"

step "a policy in /etc/cgctl/policies.d reaches survivor; systemctl reload cgctld reloads it"
mkdir -p /etc/cgctl/policies.d
printf 'policies:\n  - name: survivors\n    match: {name: survivor}\n    limits: {pids: {max: 77}}\n' \
    >/etc/cgctl/policies.d/10-survivors.yaml
pids_applied() { [[ $(cat "/sys/fs/cgroup$survivor_cgroup/pids.max") == 77 ]]; }
wait_for "the policy's pids.max on survivor" pids_applied
reloads() { cgctl events --since "$1" --until "$(date +%s.%N)" | grep -c ' policy-reload ' || true; }
since=$(date +%s.%N)
timeout "$wait_limit" systemctl reload cgctld.service || fail "systemctl reload cgctld failed"
reloaded() { (($(reloads "$since") >= 1)); }
wait_for "a policy-reload event after systemctl reload" reloaded
[[ $(cgctl policy explain survivor --json | "$python" -c 'import json, sys
print([item["source"] for item in json.load(sys.stdin)["limits"] if item["limit"] == "pids.max"][0])') \
    == 10-survivors.yaml:survivors ]] || fail "cgctl policy explain survivor does not name the policy"
rm /etc/cgctl/policies.d/10-survivors.yaml

step "cgctl kill survivor; cgctl rm -f survivor quick"
cgctl kill survivor
survivor_gone() { ! kill -0 "$survivor_pid" 2>/dev/null; }
wait_for "survivor (pid $survivor_pid) to die" survivor_gone
cgctl rm -f survivor
cgctl rm -f quick
[[ -z "$(listed survivor)$(listed quick)" ]] || fail "cgctl ps --json still lists survivor or quick"

step "socket permissions: nobody is refused, the group cgctl and root get in"
# connect [COMMAND...]: connect to the socket (as COMMAND runs perl): status 0, or 13 for EACCES.
# Perl, as Debian always has it and nobody may not be able to reach the checkout's Python.
connect() {
    "$@" perl -MSocket -e 'socket(my $s, PF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
        connect($s, pack_sockaddr_un("/run/cgctl/cgctl.sock")) and exit 0;
        warn "connect: $!\n"; exit($!{EACCES} ? 13 : 1)'
}
status=0
connect setpriv --reuid=65534 --regid=65534 --clear-groups || status=$?
[[ $status == 13 ]] || fail "nobody connecting to /run/cgctl/cgctl.sock: status $status, want 13 (EACCES)"
connect setpriv --reuid=65534 --regid=65534 --groups=cgctl \
    || fail "nobody in the group cgctl cannot connect to /run/cgctl/cgctl.sock"
connect || fail "root cannot connect to /run/cgctl/cgctl.sock"

step "systemctl stop cgctld; the next cgctl ps starts it again through the socket"
timeout "$wait_limit" systemctl stop cgctld.service
[[ $(systemctl is-active cgctld.service) != active ]] || fail "cgctld.service still active after stop"
[[ $(systemctl is-active cgctld.socket) == active ]] || fail "cgctld.socket went down with the service"
cgctl ps --json >/dev/null || start_failed "cgctl ps, with the socket starting the daemon"
check_daemon

step "done"
echo "boot-check: all $((steps - 1)) steps passed in $(seconds $((${EPOCHREALTIME/./} - started)))s"
