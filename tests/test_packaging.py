"""The shipped search spaces: found by name in this checkout, and packaged in the wheel so that
a non-editable install (`pip install .`, as the Docker image does) finds them too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

from amid_ray.config import ConfigError, read_yaml
from amid_ray.spaces import config_path, shipped_space, shipped_spaces

ROOT = Path(__file__).resolve().parents[1]
REPO_SPACES = ROOT / "search_spaces"
#: What `pip wheel .` reads from the checkout.
BUILD_INPUTS = ("pyproject.toml", "README.md", "amid_ray", "search_spaces")


def test_every_search_space_in_the_repository_is_shipped_by_name():
    files = sorted(path.name for path in REPO_SPACES.iterdir())
    # Only *.yaml is packaged: anything else in the folder would be missing from installs.
    assert files and all(name.endswith(".yaml") for name in files)
    assert shipped_spaces() == [name.removesuffix(".yaml") for name in files]
    for name in shipped_spaces():
        assert shipped_space(name).read_bytes() == (REPO_SPACES / f"{name}.yaml").read_bytes()
        assert isinstance(read_yaml(shipped_space(name)).get("search"), dict)


def test_a_space_is_named_with_or_without_its_suffix():
    assert shipped_space("demo") == shipped_space("demo.yaml")
    assert shipped_space("demo").name == "demo.yaml"


def test_an_unknown_name_lists_the_shipped_spaces():
    with pytest.raises(ConfigError, match="not a shipped search space") as caught:
        shipped_space("dmeo")
    assert caught.value.value == "dmeo"
    assert all(name in str(caught.value) for name in ("demo", "paper_gpt2", "baselines"))
    with pytest.raises(ConfigError, match="not a shipped search space"):
        shipped_space("../pyproject")


def test_config_takes_an_existing_file_before_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_path("demo") == shipped_space("demo")
    Path("demo").write_text("name: mine\n")
    assert config_path("demo") == Path("demo")
    assert config_path(REPO_SPACES / "paper_gpt2.yaml") == REPO_SPACES / "paper_gpt2.yaml"
    with pytest.raises(ConfigError, match="no such configuration file") as caught:
        config_path("spaces/missing.yaml")
    assert "paper_gpt2" in str(caught.value)


def test_the_listed_packages_are_every_package_of_the_source_tree():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"amid_ray.search_spaces": "search_spaces"}
    found = find_packages(str(ROOT), include=["amid_ray*"])
    assert sorted(setuptools["packages"]) == sorted([*found, "amid_ray.search_spaces"])


def _copy_build_inputs(destination: Path) -> Path:
    destination.mkdir()
    for name in BUILD_INPUTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, destination / name)
    return destination


def _run(command: list[str], **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


SHOW_SPACES = """
import json, amid_ray, amid_ray.spaces as spaces
print(json.dumps({"package": amid_ray.__file__, "names": spaces.shipped_spaces(),
                  "demo": str(spaces.shipped_space("demo")),
                  "demo_text": spaces.shipped_space("demo").read_text()}))
"""

LOAD_DEMO = """
import json, amid_ray
from amid_ray.config import load_config
from amid_ray.spaces import config_path
run = load_config(config_path("demo"))
print(json.dumps({"package": amid_ray.__file__, "name": run.name,
                  "searched": run.search_spec.keys}))
"""


@pytest.mark.slow
def test_the_wheel_ships_the_search_spaces_and_its_install_finds_them(tmp_path):
    """Build the wheel offline from a copy of the checkout, install it into a bare folder and
    find the demo space from there (the checkout out of reach: cwd elsewhere, no site
    packages in the first interpreter, so no editable install either)."""
    source = _copy_build_inputs(tmp_path / "source")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(tmp_path / "dist"), str(source)])
    (wheel,) = (tmp_path / "dist").glob("amid_ray-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for path in REPO_SPACES.glob("*.yaml"):
            assert archive.read(f"amid_ray/search_spaces/{path.name}") == path.read_bytes()
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "amid_ray").rglob("__init__.py")}
    assert {f"{package}/__init__.py" for package in packages} <= names

    target = tmp_path / "installed"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
          "--target", str(target), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    shown = json.loads(_run([sys.executable, "-S", "-c", SHOW_SPACES], cwd=elsewhere, env=env))
    assert Path(shown["package"]).is_relative_to(target)
    assert Path(shown["demo"]) == target / "amid_ray" / "search_spaces" / "demo.yaml"
    assert shown["names"] == sorted(p.stem for p in REPO_SPACES.glob("*.yaml"))
    assert shown["demo_text"] == (REPO_SPACES / "demo.yaml").read_text()

    # With the dependencies (site packages) back: the demo reads as a search configuration.
    loaded = json.loads(_run([sys.executable, "-c", LOAD_DEMO], cwd=elsewhere, env=env))
    assert Path(loaded["package"]).is_relative_to(target)
    demo = read_yaml(REPO_SPACES / "demo.yaml")
    assert loaded["name"] == demo["name"]
    assert loaded["searched"] == list(demo["search"]["params"])
    help_text = _run([str(target / "bin" / "amid-ray"), "tune", "--help"], cwd=elsewhere, env=env)
    assert "--config" in help_text
