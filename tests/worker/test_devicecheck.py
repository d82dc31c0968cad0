"""The device check (scripts/device-check.sh → elasticmoe_worker.devicecheck) run with
`--backend cpu`: the same checks a GPU machine runs, so the script is known to work before it
meets one. The two-device run (serve --devices 2, a scale 1->2->1 under load) is `slow`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from elasticmoe_worker import backends

REPO = pathlib.Path(__file__).resolve().parents[2]


def _device_check(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "device-check.sh"), *args], capture_output=True, text=True,
                          timeout=timeout_s, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})


def _summary(out: str) -> dict[str, str]:
    """check name -> PASS/FAIL/SKIP, from the summary lines."""
    lines = [line for line in out.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    return {line.split(" ", 1)[1].split(":", 1)[0]: line.split(" ", 1)[0] for line in lines}


def test_device_check_on_cpu_one_device(tmp_path) -> None:
    out = _device_check("--backend", "cpu", "--presets", "tiny", "--families", "mixtral", "--cpu-devices", "1",
                        "--workdir", str(tmp_path))
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert _summary(out.stdout) == {"zero-copy attach": "PASS", "greedy mixtral tiny devices=1": "PASS",
                                    "greedy mixtral tiny devices=2": "SKIP", "scale 1->2->1": "SKIP"}


@pytest.mark.slow
def test_device_check_on_cpu_two_devices(tmp_path) -> None:
    out = _device_check("--backend", "cpu", "--presets", "tiny", "--families", "mixtral", "--cpu-devices",
                        "2", "--workdir", str(tmp_path), timeout_s=1200)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert set(_summary(out.stdout).values()) == {"PASS"}, out.stdout
    assert "scale 1->2->1 mixtral tiny" in _summary(out.stdout)


def test_device_check_without_the_backend_fails_saying_what_is_missing() -> None:
    if backends.backend_available("cuda"):
        pytest.skip("cuda is available here")
    out = _device_check(timeout_s=120)  # the script's default backend: cuda
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"FAIL backend cuda: not usable here: {backends.unavailable_reason('cuda')}" in out.stdout


def test_device_check_option_errors_name_the_option() -> None:
    out = _device_check("--presets", "tiny,huge", timeout_s=120)
    assert out.returncode == 2 and "--presets: got 'tiny,huge'; expected a comma-separated subset of tiny, small" \
        in out.stderr, out.stderr
