"""The README's two set-up commands are what newcomers and CI run: `.ci/run` must run exactly the
test command, and `.ci/test-deps` (which that command calls) must either provide what the tests
need beyond pip or stop with one line that says what to install."""
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)[:2]


def test_ci_runs_exactly_the_readme_test_command():
    demo, tests = readme_commands()
    assert "demo" in demo and "pytest" in tests
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [tests]


def test_test_deps_says_in_one_line_what_to_install_when_it_cannot(tmp_path):
    """A machine without chromium and redis-server, not root, no sudo: exit 1, one line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("id", "echo", "true"):  # the script's own needs, nothing else on PATH
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    (bin_dir / "id").unlink()
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")  # not root
    (bin_dir / "id").chmod(0o755)
    result = subprocess.run(["/bin/bash", str(ROOT / ".ci" / "test-deps")], capture_output=True,
                            text=True, env={"PATH": str(bin_dir)}, timeout=30)
    if Path("/usr/bin/chromium").exists():
        expected = ["redis-server"]
    else:
        expected = ["chromium", "redis-server"]
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(f"apt-get install" in lines[0] and n in lines[0]
                                   for n in expected), result.stderr
    assert result.stdout == ""


def test_test_deps_is_quiet_when_everything_is_there():
    result = subprocess.run(["bash", str(ROOT / ".ci" / "test-deps")], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""
