"""The package: `pip install .` into a fresh venv gives a `hermes-green` command that works from
any directory, with its package data, and runs the demo; pyproject's dependencies are
requirements.txt's runtime part; `--version` prints the version.

The venv is made from this interpreter and sees this environment's packages through a `.pth`
file (`venv --system-site-packages` would show the base interpreter's, not this venv's), and
pip runs with `--no-index --no-build-isolation`: nothing is downloaded, the declared
dependencies are still resolved (a missing one fails the install), and it takes a few seconds.
The sources are copied first, so the build leaves nothing in the clone."""
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from hermes_green import __version__
from tests.support import ROOT, run_cli


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the package installed; returns its bin directory."""
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    src.mkdir()
    shutil.copytree(ROOT / "hermes_green", src / "hermes_green",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True)
    (Path(purelib.stdout.strip()) / "_test_env.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                             "-q", "--no-index", "--no-build-isolation", str(src)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return venv / "bin"


def run_installed(bindir: Path, cwd: Path, *args: str, timeout: float = 60):
    return subprocess.run([str(bindir / "hermes-green"), *args], capture_output=True, text=True,
                          cwd=str(cwd), timeout=timeout)


def test_pip_install_gives_a_command_that_works_from_another_directory(installed, tmp_path):
    version = run_installed(installed, tmp_path, "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"hermes-green {__version__}")
    check = run_installed(installed, tmp_path, "check", "--help")
    assert check.returncode == 0 and "--config" in check.stdout, check.stderr
    where = subprocess.run([str(installed / "python"), "-c", "import hermes_green.status, "
                            "pathlib; print(pathlib.Path(hermes_green.__file__).parent)"],
                           capture_output=True, text=True, cwd=str(tmp_path), check=True)
    package = Path(where.stdout.strip())
    assert package.is_relative_to(installed.parent), "imported from the venv, not the clone"
    assert (package / "static" / "status.html").is_file()  # package data came along


def test_the_installed_command_patches_first_checks_a_config_and_fails_in_one_line(
        installed, tmp_path):
    (tmp_path / "ok.yaml").write_text("gateway: {data_dir: ./data}\n")
    ok = run_installed(installed, tmp_path, "check", "--config", "ok.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok   runtime: gevent")  # the entry point monkey-patched first
    assert (tmp_path / "data").is_dir()  # relative to the working directory
    (tmp_path / "c.yaml").write_text("gateway: {busy_mode: sometimes}\n")
    result = run_installed(installed, tmp_path, "check", "--config", "c.yaml")
    assert result.returncode == 2  # a user error: one line, no traceback
    assert result.stderr.strip().splitlines() == [
        "hermes-green: gateway.busy_mode: input should be 'queue', 'interrupt', 'merge' or 'steer'"]


def test_the_installed_demo_runs_from_another_directory(installed, tmp_path):
    result = run_installed(installed, tmp_path, "demo", "--seconds", "3", timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_pyproject_dependencies_are_the_runtime_part_of_requirements():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    runtime = [line.strip() for line in lines[:next(i for i, line in enumerate(lines)
                                                    if line.startswith("# Tests"))]
               if line.strip() and not line.startswith("#")]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == runtime
    assert project["scripts"] == {"hermes-green": "hermes_green.__main__:run"}


def test_version_from_a_clone():
    result = run_cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"hermes-green {__version__}")
