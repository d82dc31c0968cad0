"""Shared fixtures: tiny checkpoints written once per session by the project's own
`make-model`, so no test touches the network."""

from __future__ import annotations

import os
import pathlib

# Same as the CLI: tests share 2 cores with the servers they start (see elasticmoe_worker.cli).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from elasticmoe_worker import modelgen

FAMILIES = ("qwen3_moe", "deepseek_v2", "mixtral")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("models")
    return {f: modelgen.make_model(f, "tiny", root / f, progress=False) for f in FAMILIES}
