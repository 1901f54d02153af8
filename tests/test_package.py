"""One installed name: everything imports as `bulkscore`, nothing as a generic `jobs` or `workers`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_outside_the_repository_only_bulkscore_imports(tmp_path):
    done = python(
        "import bulkscore, bulkscore.jobs.cli, bulkscore.workers.contract; print(bulkscore.run.__name__)", tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "run"
    for name in ("jobs", "workers"):
        done = python(f"import {name}", tmp_path)
        assert done.returncode == 1 and f"No module named '{name}'" in done.stderr


def test_a_folder_of_the_users_own_jobs_and_workers_changes_nothing(tmp_path):
    """A user's jobs/ and workers/ (common in ML repositories) first on the path shadow nothing."""
    for name in ("jobs", "workers"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name}')\n")
    done = python("import bulkscore.jobs.cli, bulkscore.workers.scoring; print('ok')", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_wheel_installs_one_top_level_name(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the repository
    shutil.copytree(REPOSITORY, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("bulkscore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"bulkscore"}
    assert "bulkscore/jobs/cli.py" in names and "bulkscore/workers/tiles.py" in names
    assert "bulkscore/jobs/data/unit_conversions.jsonl" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "bulkscore = bulkscore.jobs.cli:cli" in zipfile.ZipFile(wheel).read(entry_points).decode()
