"""services.common.auth: loading keys, reading them from call metadata, checking them."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.auth import ApiKeyError, ApiKeyInterceptor, load_api_keys, presented_key


def test_keys_from_a_file_and_the_environment(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text("# the web team\nalpha\n\n  beta  \n")
    assert load_api_keys(str(file), "gamma, delta,,") == {"alpha", "beta", "gamma", "delta"}
    assert load_api_keys("", None) == frozenset()              # keys off
    assert load_api_keys("", "solo") == {"solo"}


@pytest.mark.parametrize("content, words", [(None, "cannot read"), ("# only a comment\n\n", "holds no key")])
def test_a_named_file_that_gives_no_key_is_an_error_not_keys_off(tmp_path: Path, content: str | None,
                                                                 words: str) -> None:
    file = tmp_path / "keys"
    if content is not None:
        file.write_text(content)
    with pytest.raises(ApiKeyError, match=words):
        load_api_keys(str(file))


def test_keys_with_spaces_inside_are_refused() -> None:
    with pytest.raises(ApiKeyError, match="single tokens"):
        load_api_keys("", "two words")


@pytest.mark.parametrize("metadata, key", [
    ([("authorization", "Bearer abc")], "abc"),
    ([("authorization", "bearer   abc ")], "abc"),
    ([("x-api-key", "xyz")], "xyz"),
    ([("authorization", "Basic Zm9v"), ("x-api-key", "xyz")], "xyz"),
    ([("authorization", "Bearer ")], None),
    ([("user-agent", "grpc")], None),
    ([("x-api-key-bin", b"\x00")], None),
    (None, None),
])
def test_the_key_a_call_presents(metadata, key) -> None:
    assert presented_key(metadata) == key


def test_the_interceptor_needs_a_key_and_checks_every_one() -> None:
    with pytest.raises(ApiKeyError):
        ApiKeyInterceptor([])
    interceptor = ApiKeyInterceptor(["first", "second"])
    assert interceptor._valid("second") and interceptor._valid("first")
    assert not interceptor._valid("secon") and not interceptor._valid("") and not interceptor._valid("second ")
