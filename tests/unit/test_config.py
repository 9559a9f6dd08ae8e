"""services.common.config: flags, then T2V_* environment variables, then dataclass defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from services.common.config import ServerConfig, describe, parse_config, setting


@dataclass(frozen=True)
class DemoConfig(ServerConfig):
    batch_size: int = setting(4, "requests per batch")
    ratio: float = setting(0.5, "a fraction")
    enabled: bool = setting(False, "turn the feature on")
    label: str = setting("plain", "a name")


OWN_FIELDS = ("batch_size", "ratio", "enabled", "label")
ENV_NAMES = ("T2V_BATCH_SIZE", "T2V_RATIO", "T2V_ENABLED", "T2V_LABEL")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for f in dataclasses.fields(DemoConfig):
        monkeypatch.delenv("T2V_" + f.name.upper(), raising=False)


def parse(argv: list[str]) -> DemoConfig:
    return parse_config(DemoConfig, argv, prog="demo", description="a demo service")


def test_defaults_without_flags_or_env() -> None:
    config = parse([])
    assert config == DemoConfig()
    assert (config.batch_size, config.ratio, config.enabled, config.label) == (4, 0.5, False, "plain")
    assert config.port == 0 and config.host == "127.0.0.1"


def test_flags_are_parsed_to_field_types() -> None:
    config = parse(["--batch-size", "8", "--ratio", "0.25", "--enabled", "true", "--label", "two words",
                    "--port", "5000", "--grace-seconds", "1.5"])
    assert config.batch_size == 8 and isinstance(config.batch_size, int)
    assert config.ratio == 0.25 and isinstance(config.ratio, float)
    assert config.enabled is True
    assert config.label == "two words"
    assert config.port == 5000
    assert config.grace_seconds == 1.5
    assert config.address == "127.0.0.1:5000"


def test_env_wins_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2V_BATCH_SIZE", "16")
    monkeypatch.setenv("T2V_RATIO", "0.75")
    monkeypatch.setenv("T2V_ENABLED", "true")
    monkeypatch.setenv("T2V_LABEL", "from-env")
    monkeypatch.setenv("T2V_MAX_MESSAGE_MB", "2")
    config = parse([])
    assert (config.batch_size, config.ratio, config.enabled, config.label) == (16, 0.75, True, "from-env")
    assert isinstance(config.batch_size, int) and isinstance(config.ratio, float)
    assert config.max_message_bytes == 2 * 1024 * 1024


def test_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2V_BATCH_SIZE", "16")
    monkeypatch.setenv("T2V_ENABLED", "true")
    monkeypatch.setenv("T2V_LABEL", "from-env")
    config = parse(["--batch-size", "2", "--enabled", "false", "--label", "from-flag"])
    assert config.batch_size == 2
    assert config.enabled is False
    assert config.label == "from-flag"


def test_flag_zero_still_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2V_BATCH_SIZE", "16")
    monkeypatch.setenv("T2V_LABEL", "from-env")
    config = parse(["--batch-size", "0", "--label", ""])
    assert config.batch_size == 0
    assert config.label == ""


@pytest.mark.parametrize("text, expected", [("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                            ("on", True), ("false", False), ("0", False), ("no", False),
                                            ("Off", False), (" true ", True)])
def test_bool_env_parsing(monkeypatch: pytest.MonkeyPatch, text: str, expected: bool) -> None:
    monkeypatch.setenv("T2V_ENABLED", text)
    assert parse([]).enabled is expected


def test_bool_env_false_overrides_a_true_default(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass(frozen=True)
    class OnByDefault(ServerConfig):
        enabled: bool = setting(True, "on unless told otherwise")

    monkeypatch.setenv("T2V_ENABLED", "0")
    assert parse_config(OnByDefault, [], prog="demo", description="d").enabled is False


@pytest.mark.parametrize("env, value", [("T2V_BATCH_SIZE", "many"), ("T2V_RATIO", "half"),
                                        ("T2V_ENABLED", "maybe"), ("T2V_PORT", "80.5")])
def test_bad_env_value_exits_with_usage(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                        env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit) as info:
        parse([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: demo" in err
    assert env in err and value in err


@pytest.mark.parametrize("argv", [["--batch-size", "many"], ["--enabled", "maybe"], ["--no-such-flag", "1"]])
def test_bad_flag_exits_with_usage(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    assert "usage: demo" in capsys.readouterr().err


def test_help_lists_every_flag_and_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "a demo service" in out
    for f in dataclasses.fields(DemoConfig):
        assert "--" + f.name.replace("_", "-") in out
        assert "T2V_" + f.name.upper() in out, f"--help does not name T2V_{f.name.upper()}"
    for env in ENV_NAMES:
        assert env in out
    assert "requests per batch" in out
    assert "default 4" in out and "default plain" in out


def test_config_is_frozen() -> None:
    config = parse([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 9  # type: ignore[misc]


def test_describe_prints_every_field() -> None:
    config = parse(["--batch-size", "7", "--label", "x"])
    line = describe(config)
    assert "\n" not in line
    pairs = dict(item.split("=", 1) for item in line.split(" "))
    names = [f.name for f in dataclasses.fields(DemoConfig)]
    assert list(pairs) == names
    for name in names:
        value = str(getattr(config, name))
        assert pairs[name] == (value or '""')       # an unset path (e.g. --tls-cert) shows as ""
    assert pairs["batch_size"] == "7" and pairs["enabled"] == "False" and pairs["label"] == "x"
