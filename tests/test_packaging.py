"""`pip install .` (a real, non-editable wheel) gives both import packages and the console script.

The rest of the suite runs against the editable install (`pip install -e .`); this module proves
the other half. The folders are `worker/elasticmoe_worker/` and `operator/elasticmoe_operator/`; the import names are
`elasticmoe_worker` and `elasticmoe_operator` (a package called `operator` would shadow the
standard library), so the mapping in pyproject.toml is easy to break: a subpackage missing from
its explicit package list installs fine editable and fails only after `pip install .`.

The wheel is built with build isolation, as `pip install .` builds it, from a copy of the
sources (an in-tree build would leave `build/` behind, whose stale files end up in later
wheels). It is installed without dependencies into a throwaway venv that borrows the running
environment's site-packages through a `.pth` file, so the check takes seconds, not minutes.
"""

from __future__ import annotations

import configparser
import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as vendored by pip
    from pip._vendor import tomli as tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "worker", "operator")


def _run(cmd: list[str], *, cwd: pathlib.Path, **kw) -> subprocess.CompletedProcess[str]:
    # cwd is always explicit: a `python -m`/`-c` child puts its cwd first on sys.path.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--progress-bar", "off"]
    _run([*pip_wheel, "--wheel-dir", str(out), str(src)], cwd=out)
    wheels = list(out.glob("elasticmoe-*.whl"))
    assert len(wheels) == 1, f"expected one elasticmoe wheel in {out}, found {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel_path: pathlib.Path) -> set[str]:
    with zipfile.ZipFile(wheel_path) as zf:
        return set(zf.namelist())


def _dist_info_file(wheel_path: pathlib.Path, name: str) -> str:
    with zipfile.ZipFile(wheel_path) as zf:
        (path,) = [n for n in zf.namelist() if n.split("/")[0].endswith(".dist-info") and n.endswith("/" + name)]
        return zf.read(path).decode()


def test_wheel_has_both_packages_and_no_top_level_operator(wheel_names: set[str]) -> None:
    top_level = {name.split("/")[0] for name in wheel_names}
    assert "elasticmoe_worker/__init__.py" in wheel_names
    assert "elasticmoe_operator/__init__.py" in wheel_names
    assert "operator" not in top_level, "the wheel ships a top-level `operator` package, shadowing the stdlib"
    assert "worker" not in top_level
    unexpected = {t for t in top_level if not t.endswith(".dist-info")} - {"elasticmoe_worker", "elasticmoe_operator"}
    assert not unexpected, f"unexpected top-level entries in the wheel: {sorted(unexpected)}"


def test_package_dirs_are_the_two_import_packages() -> None:
    assert set(PACKAGE_DIRS) == {"elasticmoe_worker", "elasticmoe_operator"}
    # Each folder is named as its package imports, under the design card's top-level folder:
    # what a reader, an IDE or an import-graph tool sees is what Python imports.
    assert PACKAGE_DIRS["elasticmoe_worker"] == "worker/elasticmoe_worker"
    assert PACKAGE_DIRS["elasticmoe_operator"] == "operator/elasticmoe_operator"


@pytest.mark.parametrize("package", sorted(PACKAGE_DIRS))
def test_wheel_has_every_module_of_the_source_folder(package: str, wheel_names: set[str]) -> None:
    folder = PACKAGE_DIRS[package]
    root = REPO / folder
    expected = {
        f"{package}/{path.relative_to(root).as_posix()}"
        for path in root.rglob("*")
        if path.is_file() and (path.suffix == ".py" or path.name == "py.typed") and "__pycache__" not in path.parts
    }
    assert expected, f"no modules found under {root}"
    missing = sorted(expected - wheel_names)
    assert not missing, (
        f"modules under {folder}/ missing from the wheel (add their packages to "
        f"[tool.setuptools] packages in pyproject.toml): {missing}"
    )


def test_wheel_declares_the_console_script_and_the_torch_pin(wheel_path: pathlib.Path) -> None:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_dist_info_file(wheel_path, "entry_points.txt"))
    assert entry_points["console_scripts"]["elasticmoe"].strip() == "elasticmoe_worker.cli:main"
    metadata = _dist_info_file(wheel_path, "METADATA").splitlines()
    requires = [line for line in metadata if line.startswith("Requires-Dist:")]
    assert "Requires-Dist: torch==2.13.0" in requires, requires
    # the accelerator images install these extras (Dockerfile EXTRAS)
    assert 'Requires-Dist: cuda-python<13,>=12.6; extra == "cuda"' in requires, requires
    assert 'Requires-Dist: torch-npu<2.14,>=2.13; extra == "ascend"' in requires, requires


def test_installed_wheel_runs_the_cli_and_imports_both_packages(
    wheel_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = _run([str(python), "-c", where], cwd=tmp_path).stdout.strip()
    # Dependencies come from the running environment. Its .pth files are not processed from a
    # path listed here, so its editable install of this repo stays invisible.
    borrowed = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (pathlib.Path(purelib) / "_borrowed_deps.pth").write_text("\n".join(borrowed) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--progress-bar", "off", str(wheel_path)], cwd=tmp_path)

    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    cli = _run([str(env_dir / "bin" / "elasticmoe"), "--help"], env=env, cwd=tmp_path)
    for command in ("serve", "make-model", "bench"):
        assert command in cli.stdout

    probe = (
        "import json, operator, sys, elasticmoe_worker, elasticmoe_operator\n"
        "print(json.dumps({'worker': elasticmoe_worker.__file__, 'operator_pkg': elasticmoe_operator.__file__,\n"
        "    'stdlib_operator': hasattr(operator, 'itemgetter'), 'torch_loaded': 'torch' in sys.modules}))\n"
    )
    found = json.loads(_run([str(python), "-c", probe], env=env, cwd=tmp_path).stdout)
    for key in ("worker", "operator_pkg"):
        assert pathlib.Path(found[key]).is_relative_to(pathlib.Path(purelib)), (
            f"{key} imported from {found[key]}, not from the installed wheel in {purelib}"
        )
    assert found["stdlib_operator"], "`import operator` no longer gives the standard library module"
    assert not found["torch_loaded"], "importing elasticmoe_operator (or elasticmoe_worker's __init__) loaded torch"


def test_operator_folder_does_not_shadow_the_stdlib_from_the_repo_root() -> None:
    # `python -c`/`-m` put the current directory first on sys.path. -S (no site) so nothing
    # imports the stdlib module before the repository root is on the path.
    probe = "import operator; print(operator.__file__); operator.itemgetter"
    found = _run([sys.executable, "-S", "-c", probe], cwd=REPO).stdout.strip()
    assert not pathlib.Path(found).resolve().is_relative_to(REPO), f"`import operator` from the repo root gave {found}"
