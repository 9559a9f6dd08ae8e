"""The generated code committed in t2v/v1/ must match what scripts/gen_protos.py writes today."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
COMMITTED = REPO_ROOT / "t2v" / "v1"
HINT = "the generated code in t2v/v1/ is stale; run `make protos` and commit the result"


def _load_gen_protos() -> ModuleType:
    path = REPO_ROOT / "scripts" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("gen_protos_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("protos")
    return _load_gen_protos().generate(out_dir=out)


def test_protos_exist() -> None:
    assert sorted(PROTO_ROOT.rglob("*.proto")), "no .proto files under protos/"


def test_generator_writes_three_files_per_proto(generated: list[Path]) -> None:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    assert len(generated) == 3 * len(protos)
    names = {p.name for p in generated}
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert proto.stem + suffix in names


def test_committed_code_is_not_stale(generated: list[Path]) -> None:
    problems = []
    for path in generated:
        committed = COMMITTED / path.name
        if not committed.is_file():
            problems.append(f"{committed.relative_to(REPO_ROOT)} is missing")
        elif committed.read_bytes() != path.read_bytes():
            problems.append(f"{committed.relative_to(REPO_ROOT)} differs from the generated file")
    assert not problems, HINT + ":\n  " + "\n  ".join(problems)


def test_no_leftover_generated_files(generated: list[Path]) -> None:
    expected = {p.name for p in generated}
    leftovers = sorted(p.name for p in COMMITTED.glob("*_pb2*.py*") if p.name not in expected)
    assert not leftovers, f"{leftovers} in t2v/v1/ match no .proto in protos/; delete them or run `make protos`"


def test_every_proto_has_committed_pb2() -> None:
    missing = []
    for proto in sorted(PROTO_ROOT.rglob("*.proto")):
        rel = proto.relative_to(PROTO_ROOT).with_suffix("")
        pb2 = REPO_ROOT / rel.parent / f"{rel.name}_pb2.py"
        if not pb2.is_file():
            missing.append(str(pb2.relative_to(REPO_ROOT)))
    assert not missing, f"{missing} not committed; run `make protos`"
