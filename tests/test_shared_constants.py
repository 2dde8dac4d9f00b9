"""Constants that live in more than one language must agree: the agent protocol (Python
host, C agent, PROTOCOL.md), the balloon statistics (Python, the native core's C ABI, the
labextension's TypeScript) and the engine names. No VM needed: the sources are read as text."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from supermachine_jupyter import config, engines
from supermachine_jupyter.guest import agent
from supermachine_jupyter.devices import balloon

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_H = (ROOT / "native/guest/agent/protocol.h").read_text()
PROTOCOL_MD = (ROOT / "native/guest/PROTOCOL.md").read_text()
CORE_H = (ROOT / "native/include/supermachine.h").read_text()
MODEL_TS = (ROOT / "labextension/src/model.ts").read_text()


def c_enum(source: str, name: str) -> dict[str, int]:
    body = re.search(rf"enum {name}\s*{{(.*?)}};", source, re.S)
    assert body, f"enum {name} not found"
    return {k: int(v, 0) for k, v in re.findall(r"(\w+)\s*=\s*(0x[0-9A-Fa-f]+|\d+)", body[1])}


def c_define(name: str) -> int:
    match = re.search(rf"#define {name} \(?(\d+)u(?: \* (\d+)u)?\)?", PROTOCOL_H)
    assert match, f"#define {name} not found"
    return int(match[1]) * int(match[2] or 1)


def public(namespace) -> dict[str, int]:
    return {k: v for k, v in vars(namespace).items() if not k.startswith("_")}


def test_frame_types_agree_between_host_agent_and_spec():
    in_c = {k.removeprefix("SM_"): v for k, v in c_enum(PROTOCOL_H, "sm_frame_type").items()}
    assert public(agent.FrameType) == in_c
    in_md = {name: int(code, 16) for code, name in
             re.findall(r"^\| (0x[0-9A-F]{2}) \| `(\w+)` \|", PROTOCOL_MD, re.M)}
    assert in_md == in_c


def test_error_codes_agree_between_host_agent_and_spec():
    in_c = {k.removeprefix("SM_E_"): v for k, v in c_enum(PROTOCOL_H, "sm_error_code").items()}
    assert public(agent.ErrorCode) == in_c
    in_md = {name: int(code) for code, name in
             re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", PROTOCOL_MD, re.M)}
    assert in_md == in_c


def test_framing_limits_agree():
    assert agent.PROTOCOL_VERSION == c_define("SM_PROTOCOL_VERSION")
    assert agent.HEADER_BYTES == c_define("SM_HEADER_BYTES") == agent.HEADER.size + 4
    assert agent.MAX_PAYLOAD_BYTES == c_define("SM_MAX_PAYLOAD_BYTES")
    assert agent.MAX_CHUNK_BYTES == c_define("SM_MAX_CHUNK_BYTES")
    assert agent.INITIAL_WINDOW_BYTES == c_define("SM_INITIAL_WINDOW_BYTES")
    assert agent.MAGIC == bytes([int(x, 16) for x in
                                 re.findall(r"#define SM_MAGIC[01] (0x[0-9A-F]+)", PROTOCOL_H)])
    assert f"at most `MAX_PAYLOAD` = 1 MiB ({agent.MAX_PAYLOAD_BYTES})" in PROTOCOL_MD


def guest_stat_fields() -> list[str]:
    """BalloonStats' guest statistics, in declaration order (after the balloon's size)."""
    names = [f.name for f in dataclasses.fields(balloon.BalloonStats)]
    return names[names.index("actual_mib") + 1:]


def test_balloon_statistics_agree_across_python_c_and_typescript():
    fields = guest_stat_fields()
    assert fields == list(balloon.QEMU_STAT_NAMES)
    # The C ABI: struct members between `present` and `stats_updates`, and the bit indexes.
    struct = re.search(r"typedef struct sm_balloon_stats {(.*?)} sm_balloon_stats;", CORE_H, re.S)
    members = re.findall(r"uint64_t (\w+);", struct[1])
    assert members[members.index("present") + 1:members.index("stats_updates")] == fields
    bits = re.findall(r"SM_BALLOON_STAT_(\w+) = (\d+)", CORE_H)
    assert [name.lower() for name, _ in bits] == fields
    assert [int(index) for _, index in bits] == list(range(len(fields)))
    from supermachine_jupyter.engines import native
    assert list(native.BALLOON_STAT_FIELDS) == fields
    # The labextension reads a subset of them, by the same names.
    interface = re.search(r"interface IBalloonStats {(.*?)}", MODEL_TS, re.S)[1]
    in_ts = re.findall(r"^\s*(\w+)\??:", interface, re.M)
    size_fields = {"target_mib", "actual_mib", "target_pages", "actual_pages"}
    assert set(in_ts) - size_fields <= set(fields) and set(in_ts) & size_fields == size_fields


def test_engine_names_have_one_source():
    assert engines.ENGINE_NAMES is config.ENGINES
