"""Device rules and the eBPF program they compile to, checked by a small interpreter on the host.

The interpreter knows exactly the instruction forms devices.program emits and refuses any
other, so the program's logic is proven here without a kernel; the kernel's verifier and its
verdicts on real device nodes are tested in the micro-VM (tests/integration/test_device_program.py).
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest

from cgctl.cgroup.devices import DEFAULT_RULES, Rule, program, rule_for

BLOCK, CHAR = 1, 2
MKNOD, READ, WRITE = 1, 2, 4
MASK64 = (1 << 64) - 1
CTX = "ctx"  # r1 on entry: a pointer to struct bpf_cgroup_dev_ctx
# opcode: (uses src, uses offset, uses imm); fields a form does not use must be 0, as the verifier wants.
FORMS = {
    0x61: (True, True, False),  # ldxw dst, [src + off]
    0xB7: (False, False, True),  # mov dst, imm
    0xBF: (True, False, False),  # mov dst, src
    0x57: (False, False, True),  # and dst, imm
    0x77: (False, False, True),  # rsh dst, imm
    0x55: (False, True, True),  # jne dst, imm, +off
    0x5D: (True, True, False),  # jne dst, src, +off
    0x95: (False, False, False),  # exit
}


def run(code: bytes, device_type: int, access: int, major: int, minor: int) -> int:
    """The program's verdict on one request (what the kernel would run on open or mknod)."""
    ctx = struct.pack("<III", access << 16 | device_type, major, minor)
    registers: dict[int, int | str] = {1: CTX}

    def value(register: int) -> int:
        content = registers.get(register)
        assert isinstance(content, int), f"r{register} read before it was set"
        return content

    pc = 0
    while True:
        assert 0 <= pc < len(code) // 8, "the program ran off its end"
        opcode, dst_src, offset, imm = struct.unpack_from("<BBhi", code, pc * 8)
        dst, src = dst_src & 0xF, dst_src >> 4
        assert opcode in FORMS, f"instruction {pc}: opcode {opcode:#x} is not one the program should use"
        uses_src, uses_offset, uses_imm = FORMS[opcode]
        assert (uses_src or src == 0) and (uses_offset or offset == 0) and (uses_imm or imm == 0), pc
        assert dst <= 10 and (opcode != 0x95 or dst == 0), pc
        pc += 1
        if opcode == 0x61:
            assert registers.get(src) == CTX and offset in (0, 4, 8), "loads come from the context only"
            registers[dst] = struct.unpack_from("<I", ctx, offset)[0]
        elif opcode == 0xB7:
            registers[dst] = imm & MASK64
        elif opcode == 0xBF:
            registers[dst] = value(src)
        elif opcode == 0x57:
            registers[dst] = value(dst) & imm & MASK64
        elif opcode == 0x77:
            registers[dst] = value(dst) >> imm
        elif opcode in (0x55, 0x5D):
            assert offset >= 0, "jumps go forward only: no loops"
            if value(dst) != (imm & MASK64 if opcode == 0x55 else value(src)):
                pc += offset
        else:
            return value(0)


def reference(rules: tuple[Rule, ...], device_type: int, access: int, major: int, minor: int) -> int:
    """The rules' meaning, stated directly."""
    letters = {letter for bit, letter in ((MKNOD, "m"), (READ, "r"), (WRITE, "w")) if access & bit}
    for rule in rules:
        if (
            rule.kind in ("a", {BLOCK: "b", CHAR: "c"}[device_type])
            and letters <= set(rule.access)
            and rule.major in (None, major)
            and rule.minor in (None, minor)
        ):
            return 1
    return 0


DISK = Rule("b", 254, 0, "rw")


@pytest.mark.parametrize(
    ("rules", "device_type", "access", "major", "minor", "verdict"),
    [
        (DEFAULT_RULES, CHAR, READ, 1, 3, 1),  # /dev/null
        (DEFAULT_RULES, CHAR, READ | WRITE, 1, 3, 1),
        (DEFAULT_RULES, CHAR, READ, 1, 9, 1),  # urandom
        (DEFAULT_RULES, CHAR, READ | WRITE, 5, 2, 1),  # ptmx
        (DEFAULT_RULES, CHAR, READ | WRITE, 136, 5, 1),  # /dev/pts/5
        (DEFAULT_RULES, CHAR, READ, 1, 1, 0),  # /dev/mem
        (DEFAULT_RULES, CHAR, READ, 4, 0, 0),  # tty0
        (DEFAULT_RULES, CHAR, READ | WRITE, 10, 200, 0),  # /dev/net/tun
        (DEFAULT_RULES, BLOCK, READ, 8, 0, 0),  # sda
        (DEFAULT_RULES, BLOCK, READ, 1, 3, 0),  # a block device with /dev/null's numbers
        (DEFAULT_RULES, BLOCK, MKNOD, 8, 0, 1),  # creating the node is allowed, opening it is not
        (DEFAULT_RULES, CHAR, MKNOD, 10, 200, 1),
        (DEFAULT_RULES, CHAR, MKNOD | READ, 10, 200, 0),  # no rule holds both
        ((*DEFAULT_RULES, DISK), BLOCK, READ | WRITE, 254, 0, 1),
        ((*DEFAULT_RULES, DISK), BLOCK, READ, 254, 0, 1),
        ((*DEFAULT_RULES, DISK), BLOCK, MKNOD, 254, 0, 1),  # by the default mknod rule
        ((*DEFAULT_RULES, DISK), BLOCK, READ, 254, 1, 0),  # another partition
        ((*DEFAULT_RULES, DISK), CHAR, READ, 254, 0, 0),
        ((DISK,), BLOCK, MKNOD, 254, 0, 0),  # the disk rule alone does not grant mknod
        ((DISK,), BLOCK, READ | WRITE, 254, 0, 1),
        ((), CHAR, READ, 1, 3, 0),  # no rules: nothing at all
        ((Rule("a", None, None, "rwm"),), BLOCK, READ | WRITE | MKNOD, 8, 0, 1),
        ((Rule("a", 1, None, "r"),), BLOCK, READ, 1, 7, 1),
        ((Rule("a", 1, None, "r"),), CHAR, WRITE, 1, 7, 0),
    ],
)
def test_program_verdicts(
    rules: tuple[Rule, ...], device_type: int, access: int, major: int, minor: int, verdict: int
) -> None:
    assert run(program(rules), device_type, access, major, minor) == verdict


@pytest.mark.parametrize("rules", [DEFAULT_RULES, (*DEFAULT_RULES, DISK), (DISK, Rule("c", None, 3, "w"))])
def test_program_agrees_with_the_rules_on_every_combination(rules: tuple[Rule, ...]) -> None:
    code = program(rules)
    for device_type, access, major, minor in itertools.product(
        (BLOCK, CHAR), range(1, 8), (0, 1, 5, 8, 136, 254), (0, 1, 3, 5, 9)
    ):
        expected = reference(rules, device_type, access, major, minor)
        assert run(code, device_type, access, major, minor) == expected, (device_type, access, major, minor)


def test_program_is_whole_instructions_ending_in_deny_and_exit() -> None:
    code = program(DEFAULT_RULES)
    assert len(code) % 8 == 0
    assert 8 * 8 < len(code) < 64 * 8  # a few dozen instructions
    assert code[-16:] == struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    assert program([]) == program(()) and len(program([])) == 8 * 8  # prologue and deny only


def test_default_rules_are_exactly_the_documented_ones() -> None:
    assert [str(rule) for rule in DEFAULT_RULES] == [
        "a *:* m",
        "c 1:3 rwm",
        "c 1:5 rwm",
        "c 1:7 rwm",
        "c 1:8 rwm",
        "c 1:9 rwm",
        "c 5:0 rwm",
        "c 5:1 rwm",
        "c 5:2 rwm",
        "c 136:* rwm",
    ]


def test_rule_for_a_device_node() -> None:
    assert rule_for("/dev/null") == Rule("c", 1, 3, "rwm")
    assert rule_for("/dev/null", "r") == Rule("c", 1, 3, "r")


def test_rule_for_anything_else_names_the_path_and_what_it_is(tmp_path: Path) -> None:
    regular = tmp_path / "disk.img"
    regular.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^{regular}: not a device node: it is a regular file$"):
        rule_for(str(regular))
    with pytest.raises(ValueError, match=rf"^{tmp_path}: not a device node: it is a directory$"):
        rule_for(str(tmp_path))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/missing: no such device node"):
        rule_for(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("kind", "major", "access", "complaint"),
    [("x", 1, "r", "kind"), ("c", 1, "rx", "access"), ("c", 1, "", "access"), ("c", -1, "r", "-1")],
)
def test_bad_rules_are_refused(kind: str, major: int, access: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        Rule(kind, major, 0, access)
