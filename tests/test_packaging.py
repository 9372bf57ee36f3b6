"""The wheel carries every sub-package: built with `pip wheel`, installed into a fresh venv
that sees the project's dependencies but not the repo, it imports each package and runs
each job's --help. (The editable install of `make test` puts the repo root on sys.path,
which hides a package that pyproject forgets.)"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_directory_is_listed_in_pyproject():
    on_disk = sorted(
        ".".join(p.parent.relative_to(REPO).parts)
        for top in ("model", "pipeline")
        for p in (REPO / top).rglob("__init__.py")
    )
    assert on_disk == sorted(PACKAGES)


@pytest.mark.slow
def test_wheel_installs_and_every_job_runs_without_the_repo(tmp_path):
    # Built from a copy of the tree as git sees it: a build/ folder left in the repo by an
    # earlier build would hand setuptools the files a broken package list forgets.
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(wheels), "-q"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("satloc-*.whl")

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    fresh_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies from this venv, as a plain path: .pth files there (the editable
    # install's, which adds the repo) are not processed for a directory named in a .pth.
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(fresh_site), str(wheel), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert installed.returncode == 0, installed.stderr

    # The jobs run from a copy outside the repo: the path they add is that copy's parent.
    jobs = tmp_path / "app" / "jobs"
    shutil.copytree(REPO / "jobs", jobs)
    code = "import importlib, sys\nfor name in sys.argv[1:]: print(importlib.import_module(name).__file__)"
    imported = subprocess.run([python, "-c", code, *PACKAGES], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert all(line.startswith(str(fresh_site)) for line in imported.stdout.split()), imported.stdout
    for job in sorted(jobs.glob("*.py")):
        done = subprocess.run([python, str(job), "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0 and "usage:" in done.stdout, f"{job.name}: {done.stderr[-2000:]}"
