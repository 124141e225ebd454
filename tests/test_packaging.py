"""Installing illada as users do: a wheel (not an editable checkout) carries the presets and
configs and runs the quickstart, and installing beside another torch keeps that torch."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: setuptools leaves build/ in the tree it builds from.
    source = out / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([*PIP, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)], check=True, capture_output=True, timeout=600)
    [built] = out.glob("illada-*.whl")
    return built


def test_the_wheel_ships_presets_configs_and_tasks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"illada/{p.relative_to(REPO)}" for p in (REPO / "configs").rglob("*.yaml")}
    assert "illada/configs/model/tiny.yaml" in shipped and "illada/configs/quickstart.yaml" in shipped
    assert shipped <= names, shipped - names
    assert "illada/eval/tasks/illada_toy_mc.yaml" in names and "illada/eval/tasks/toy_mc.jsonl" in names


def test_the_quickstart_runs_from_a_non_editable_install(wheel, tmp_path):
    """The installed package alone (outside the checkout, which is not on the path): its
    presets and quickstart config are package data. A smaller corpus keeps it quick. Where
    torch is not installed (the data-only install of `make test-py312`) the data pipeline
    runs and the training half stops with the one line naming the extra."""
    target = tmp_path / "site"
    subprocess.run([*PIP, "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True, timeout=600)
    overrides = [
        'data.sources.0.paths=["${root}/raw/stdlib/[a-c]*.py"]',
        "data.dedup.fuzzy.enabled=false",
        "train.steps=4",
        "train.optim.warmup_steps=1",
        "train.optim.decay_steps=2",
        "train.checkpoint.interval=4",
    ]
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [sys.executable, "-m", "illada.cli", "quickstart", "--root", str(tmp_path / "run"), "--num-cpus", "2", *overrides]
    probe = subprocess.run([sys.executable, "-c", "import illada; print(illada.__file__)"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.stdout.startswith(str(target)), probe.stdout + probe.stderr
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert f"illada pipeline run {target}/illada/configs/quickstart.yaml --root {tmp_path}/run --stage pack" in done.stdout, done.stderr[-4000:]
    assert (tmp_path / "run" / "pack" / "manifest.json").exists()
    if importlib.util.find_spec("torch") is None:
        assert done.returncode == 2
        assert done.stderr.strip().splitlines()[-1] == "illada: error: this command needs torch, which is not installed: pip install 'illada[train]'"
    else:
        assert done.returncode == 0, done.stderr[-4000:]
        assert f"checkpoint: {tmp_path}/run/checkpoints/step_00000004" in done.stdout
    # The hints it printed run as printed (overrides included), where what they need is installed.
    hints = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in done.stdout.splitlines() if line.startswith(("re-run one stage:", "train further:"))}
    runnable = hints.keys() if importlib.util.find_spec("torch") else ["re-run one stage"]
    for name in runnable:
        hint = subprocess.run([sys.executable, "-m", "illada.cli", *shlex.split(hints[name])[1:]], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
        assert hint.returncode == 0, f"{hints[name]}\n{hint.stderr[-4000:]}"
    if "train further" in runnable:
        assert (tmp_path / "run" / "checkpoints" / "step_00000008").is_dir()


def fake_torch_wheel(folder: Path, version: str) -> Path:
    """A wheel named torch at `version`: what pip sees of a container's own torch."""
    dist = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f"__version__ = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: illada-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist}/RECORD"])
    path = folder / f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_installing_beside_another_torch_keeps_it(tmp_path):
    """A venv that already holds torch 2.6.0 (a GPU image's, say): installing illada[train]
    would install nothing named torch (pip's own resolver, asked for a report)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", "--no-deps", str(fake_torch_wheel(tmp_path, "2.6.0"))], check=True, timeout=600)
    report = tmp_path / "report.json"
    done = subprocess.run([*pip, "install", "--quiet", "--dry-run", "--report", str(report), f"{REPO}[train]"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    planned = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "megatron-core" in planned  # the resolution did cover the training stack
    assert "torch" not in planned and not any(name.startswith("nvidia-") for name in planned), sorted(planned)
