"""The Dockerfile's essentials, checked by parsing it (no container engine is needed or used).

What this does not prove: that the image builds or runs. It catches what would break one
silently: a stage or build argument renamed, the torch pin drifting from pyproject.toml,
the image running as root, a COPY of a path that does not exist or that .dockerignore drops,
a default CMD the CLI rejects, a health check on the wrong port.
"""

from __future__ import annotations

import fnmatch
import json
import pathlib
import re
import shlex
from typing import NamedTuple

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as vendored by pip
    from pip._vendor import tomli as tomllib

from elasticmoe_worker import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class Instruction(NamedTuple):
    keyword: str
    args: str
    stage: int  # -1 before the first FROM


def parse(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped (no heredocs)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments inside a continued instruction are dropped by Docker too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    out: list[Instruction] = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    return out


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse((REPO / "Dockerfile").read_text())


def _args(instructions: list[Instruction]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, eq, default = ins.args.partition("=")
            found[name.strip()] = default.strip().strip('"') if eq else None
    return found


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(ins.stage for ins in instructions)
    return [ins for ins in instructions if ins.stage == last]


def _exec_form(ins: Instruction) -> list[str]:
    value = json.loads(ins.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{ins.keyword} is not exec form"
    return value


def _one(stage: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in stage if ins.keyword == keyword]
    assert found, f"no {keyword} in the final stage"
    return found[-1]  # the last one wins in Docker


def test_is_multi_stage_and_runtime_copies_from_builder(instructions: list[Instruction]) -> None:
    froms = [ins for ins in instructions if ins.keyword == "FROM"]
    assert len(froms) >= 2, "expected a builder and a runtime stage"
    names = [re.search(r"\bAS\s+(\S+)", ins.args, re.IGNORECASE) for ins in froms]
    assert all(names), "every stage should be named"
    builder = names[0].group(1)
    final = _final_stage(instructions)
    copies_from = [ins for ins in final if ins.keyword == "COPY" and f"--from={builder}" in ins.args]
    assert copies_from, f"the final stage copies nothing from the {builder!r} stage"


def test_base_image_and_torch_are_build_args_defaulting_to_pinned_cpu(instructions: list[Instruction]) -> None:
    args = _args(instructions)
    before_first_from = {ins.args.partition("=")[0] for ins in instructions if ins.keyword == "ARG" and ins.stage == -1}
    assert "BASE_IMAGE" in before_first_from, "FROM can only use BASE_IMAGE if it is declared before the first FROM"
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    for ins in instructions:
        if ins.keyword == "FROM":
            assert ins.args.split()[0] == "${BASE_IMAGE}", f"FROM {ins.args}: expected the BASE_IMAGE build arg"

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (torch_pin,) = [d for d in pyproject["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert torch_pin == "torch==2.13.0"
    assert args["TORCH_SPEC"] == torch_pin, "the image's default torch differs from pyproject.toml's pin"
    assert args["TORCH_INDEX_URL"] == TORCH_CPU_INDEX, "the default image should get the CPU build of torch"
    assert "EXTRA_PIP" in args

    runs = " ".join(ins.args for ins in instructions if ins.keyword == "RUN")
    for name in ("TORCH_SPEC", "TORCH_INDEX_URL", "EXTRAS", "EXTRA_PIP"):
        assert "${" + name + "}" in runs, f"build arg {name} is declared but no RUN uses it"


@pytest.mark.parametrize("variant,package", [("cuda", "cuda-python"), ("ascend", "torch-npu")])
def test_accelerator_build_commands_install_the_packages_extra(variant: str, package: str) -> None:
    """The header's documented build command for a variant passes EXTRAS=<variant>, that extra
    exists in pyproject.toml and brings the variant's package, and the RUN installs `.[EXTRAS]`."""
    text = (REPO / "Dockerfile").read_text()
    command = re.search(rf"#\s+docker build -t elasticmoe:{variant}(.*?)\s\.\n", text, re.DOTALL)
    assert command, f"the Dockerfile's header documents no build command for elasticmoe:{variant}"
    assert f"--build-arg EXTRAS={variant}" in command.group(1), command.group(1)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(rf"{package}\b", req) for req in extras.get(variant, [])), extras.get(variant)
    runs = " ".join(ins.args for ins in parse(text) if ins.keyword == "RUN")
    assert 'pip install ".${EXTRAS:+[${EXTRAS}]}"' in runs, "the package is not installed with its EXTRAS"


def test_runs_as_a_non_root_user(instructions: list[Instruction]) -> None:
    user = _one(_final_stage(instructions), "USER").args
    uid = user.split(":")[0]
    assert uid == "10001", f"USER {user}: expected uid 10001"
    entry = next(i for i, ins in enumerate(instructions) if ins.keyword == "ENTRYPOINT")
    last_user = max(i for i, ins in enumerate(instructions) if ins.keyword == "USER")
    assert last_user < entry


def test_entrypoint_cmd_workdir_and_port(instructions: list[Instruction]) -> None:
    final = _final_stage(instructions)
    assert _exec_form(_one(final, "ENTRYPOINT")) == ["elasticmoe"]
    assert _exec_form(_one(final, "CMD")) == ["serve", "--host", "0.0.0.0"]
    assert _one(final, "WORKDIR").args == "/app"
    assert _one(final, "EXPOSE").args.split() == ["8000"]


def test_default_cmd_is_accepted_by_the_cli_and_listens_on_the_exposed_port(instructions: list[Instruction]) -> None:
    final = _final_stage(instructions)
    args = cli.build_parser().parse_args(_exec_form(_one(final, "CMD")))
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    assert str(args.port) == _one(final, "EXPOSE").args.split()[0].split("/")[0]


def test_healthcheck_asks_health_with_python_on_the_exposed_port(instructions: list[Instruction]) -> None:
    final = _final_stage(instructions)
    check = _one(final, "HEALTHCHECK").args
    cmd = _exec_form(Instruction("CMD", check[check.index("CMD") + len("CMD"):].strip(), 0))
    assert cmd[0] == "python", "slim bases have no curl; the health check must use python"
    port = _one(final, "EXPOSE").args.split()[0].split("/")[0]
    assert f"http://127.0.0.1:{port}/health" in " ".join(cmd)


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` (or a folder holding it); `!` exceptions unsupported."""
    assert not any(p.startswith("!") for p in patterns), "teach _ignored about ! exceptions"
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, p) for p in patterns for prefix in prefixes)


def test_copied_sources_exist_and_are_not_dockerignored(instructions: list[Instruction]) -> None:
    patterns = _dockerignore_patterns()
    sources: list[str] = []
    for ins in instructions:
        if ins.keyword in ("COPY", "ADD") and "--from=" not in ins.args:
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            sources += words[:-1]
    assert sources, "the Dockerfile copies no sources"
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
        assert not _ignored(src, patterns), f"COPY {src}: .dockerignore excludes it"
    for needed in (".git", ".venv"):
        assert _ignored(needed, patterns), f".dockerignore should exclude {needed}"
