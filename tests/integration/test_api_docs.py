"""docs/api.md's examples, run as a reader would run them: every ```bash block that starts with `curl`
and every ```python block, in the doc's order, against a real gateway (HTTP on a free port) in front of
real stage servers. A ```text block right after an example is its expected output (`...` = anything).

Addresses: bash blocks get $T2V_HTTP, $T2V_GRPC and $VIDEO_ID (the id the first create example
returned) from the environment; in python blocks the `t2v up` addresses written in the doc are
replaced by the test gateway's. The examples under "API keys" run against a second gateway that
has the key the doc uses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from services.common.config import REPO_ROOT
from tests.conftest import RunningStage, start_gateway, stop_gateway

pytestmark = pytest.mark.slow

DOC = REPO_ROOT / "docs" / "api.md"
DOC_HTTP, DOC_GRPC = "http://127.0.0.1:50080", "127.0.0.1:50050"
DOC_KEY = "k-1234"
FENCE = re.compile(r"^```([\w+-]*)\n(.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Example:
    language: str
    code: str
    expected: str | None
    section: str
    line: int

    @property
    def name(self) -> str:
        return f"api.md:{self.line}:{self.language}"


def examples(text: str) -> list[Example]:
    """The runnable blocks of the doc, each with the output block that follows it (if any)."""
    fences = list(FENCE.finditer(text))
    found = []
    for index, fence in enumerate(fences):
        language, code = fence[1], fence[2]
        runnable = (language == "bash" and code.lstrip().startswith("curl")) or language == "python"
        if not runnable:
            continue
        expected = None
        if index + 1 < len(fences):
            after = fences[index + 1]
            if after[1] == "text" and not text[fence.end():after.start()].strip():
                expected = after[2]
        headings = re.findall(r"^#{2,3} (.+)$", text[:fence.start()], re.M)
        found.append(Example(language, code, expected, headings[-1] if headings else "",
                             text.count("\n", 0, fence.start()) + 1))
    return found


EXAMPLES = examples(DOC.read_text())


def matches(expected: str, actual: str) -> bool:
    """doctest's ELLIPSIS: ``...`` in ``expected`` stands for any text, newlines included."""
    pattern = ".*?".join(re.escape(part) for part in expected.strip().split("..."))
    return re.fullmatch(pattern, actual.replace("\r\n", "\n").strip(), re.S) is not None


@dataclass
class Setting:
    gateway: RunningStage
    keyed: RunningStage
    workdir: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def setting(text_encoder_stage: RunningStage, denoiser_stage: RunningStage, decoder_stage: RunningStage,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setting]:
    stages = (text_encoder_stage.address, denoiser_stage.address, decoder_stage.address)
    gateway = start_gateway(*stages, http_port=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("T2V_API_KEYS", DOC_KEY)
        keyed = start_gateway(*stages, http_port=0)
    env = {**os.environ, "T2V_HTTP": gateway.http_url, "T2V_GRPC": gateway.address, "HF_HUB_OFFLINE": "1"}
    yield Setting(gateway, keyed, tmp_path_factory.mktemp("api-docs"), env)
    stop_gateway(keyed)
    stop_gateway(gateway)


def test_the_doc_has_examples_of_every_kind() -> None:
    assert sum(e.language == "bash" for e in EXAMPLES) >= 8 and sum(e.language == "python" for e in EXAMPLES) >= 5
    assert all(e.expected is not None for e in EXAMPLES if e.language == "python")
    assert {e.section for e in EXAMPLES} >= {"Create a video", "Download it", "Errors", "API keys", "From Python",
                                            "gRPC API"}


def wait_completed(base: str, video_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/v1/videos/{video_id}", timeout=30) as response:
            if json.load(response)["status"] in ("completed", "failed"):
                return
        time.sleep(0.1)
    raise AssertionError(f"video {video_id} of the doc's create example did not finish in {timeout} s")


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_the_example_runs_and_prints_what_the_doc_says(setting: Setting, example: Example) -> None:
    keyed = example.section == "API keys"
    base = (setting.keyed if keyed else setting.gateway).http_url
    if example.language == "bash":
        command = ["bash", "-c", "set -euo pipefail\n" + example.code]
        env = {**setting.env, "T2V_HTTP": base}
    else:
        code = example.code.replace(DOC_HTTP, base).replace(DOC_GRPC, setting.gateway.address)
        command, env = [sys.executable, "-c", code], setting.env
    done = subprocess.run(command, cwd=setting.workdir, env=env, capture_output=True, text=True, timeout=180)
    where = f"{example.name} (section {example.section!r})"
    assert done.returncode == 0, f"{where} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    if example.expected is not None:
        assert matches(example.expected, done.stdout), (
            f"{where} printed\n{done.stdout}\nbut the doc says\n{example.expected}")
    if example.language == "bash" and "VIDEO_ID" not in setting.env:
        try:
            answer: Any = json.loads(done.stdout)
        except ValueError:
            return
        if isinstance(answer, dict) and answer.get("object") == "video":
            setting.env["VIDEO_ID"] = answer["id"]            # what the reader copies from the create answer
            wait_completed(base, answer["id"])
