"""The two ways to install agree: pyproject.toml (pip) and environment.yml (conda)."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def conda_env():
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def conda_pip_section():
    (pip,) = [d["pip"] for d in conda_env()["dependencies"] if isinstance(d, dict)]
    return pip


def norm(req: str):
    r = Requirement(req)
    return r.name.lower(), str(r.specifier), str(r.marker or "")


def test_environment_yml_lists_what_pyproject_lists():
    declared = pyproject()["dependencies"] + pyproject()["optional-dependencies"]["dev"]
    pip = conda_pip_section()
    assert "-e ." in pip  # the pip section installs the package itself
    assert sorted(norm(r) for r in pip if r != "-e .") == sorted(norm(r) for r in declared)


def test_conda_part_is_python_and_pip_only():
    conda = [d for d in conda_env()["dependencies"] if isinstance(d, str)]
    assert sorted(c.split("=")[0] for c in conda) == ["pip", "python"]


def test_torch_has_a_lower_bound_only():
    (torch,) = [norm(r) for r in pyproject()["dependencies"] if norm(r)[0] == "torch"]
    assert torch[1].startswith(">=") and "," not in torch[1]  # a GPU user's own CUDA torch is kept


@pytest.mark.slow
def test_pip_accepts_the_conda_pip_section(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(r if r != "-e ." else f"-e {ROOT}" for r in conda_pip_section()))
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "-r", str(reqs)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_ci_runs_the_readme_test_command():
    ci, readme = (ROOT / ".ci" / "run").read_text(), (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make demo" in readme


def test_the_wheel_carries_the_cpu_kernels_source(tmp_path):
    """QuantLinear compiles minquant/kernels/cpu_kernels.c on first use: an installed package needs it."""
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(ROOT / "minquant", src / "minquant", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("minquant-*.whl")
    assert "minquant/kernels/cpu_kernels.c" in zipfile.ZipFile(wheel).namelist()
