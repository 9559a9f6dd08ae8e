"""services.common.logs.kv: one parseable key=value line per event."""

from __future__ import annotations

import shlex

import pytest

from services.common.logs import kv


def test_plain_values_are_not_quoted() -> None:
    assert kv("job_done", job_id="j1", seconds=1.5, frames=16, ok=True) == \
        "event=job_done job_id=j1 seconds=1.5 frames=16 ok=True"


def test_event_only() -> None:
    assert kv("started") == "event=started"


@pytest.mark.parametrize("value", ["abc", "a-b_c.d/e:f", "127.0.0.1:50051", "dpmsolver++", "j-0001", 0, -3, 2.5])
def test_values_without_special_characters_stay_bare(value: object) -> None:
    assert kv("e", v=value) == f"event=e v={value}"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("a red ball", '"a red ball"'),
        ("tab\there", '"tab\\there"'),
        ('say "hi"', '"say \\"hi\\""'),
        ('"', '"\\""'),
        ("a=b", '"a=b"'),
        ("line1\nline2", '"line1\\nline2"'),
        ("back\\slash and space", '"back\\\\slash and space"'),
        ("", '""'),
        (" ", '" "'),
    ],
)
def test_special_values_are_quoted_and_escaped(value: str, expected: str) -> None:
    assert kv("e", v=value) == f"event=e v={expected}"


def test_empty_value_is_quoted() -> None:
    assert kv("e", reason="", other=None) == 'event=e reason="" other=None'


def test_a_newline_never_splits_the_line() -> None:
    line = kv("rpc_failed", reason="first\nsecond\nthird", prompt='a "quoted" = thing')
    assert "\n" not in line


@pytest.mark.parametrize("value", ["a red ball", 'say "hi" = ok', "x=1 y=2", "", "multi word value"])
def test_quoted_values_read_back_as_one_field(value: str) -> None:
    line = kv("e", prompt=value, job_id="j1")
    tokens = shlex.split(line, posix=True)
    assert tokens == ["event=e", f"prompt={value}", "job_id=j1"]
