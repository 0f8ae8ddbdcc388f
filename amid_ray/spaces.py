"""The search spaces the project ships (`search_spaces/*.yaml`), found by name in any install.

The files live at the top of the repository and are packaged as `amid_ray/search_spaces/`
(pyproject.toml maps the folder into the package). An installed wheel reads them from the
package; a source checkout, installed in editable mode or used as it is (a Ray job's working
directory, `PYTHONPATH`), from the folder beside the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from amid_ray.errors import ConfigError

#: Folder of the shipped search spaces, in the package and in the repository.
FOLDER = "search_spaces"
SUFFIX = ".yaml"


def shipped_folder() -> Path:
    """The folder holding the shipped search spaces in this install."""
    packaged = resources.files(__package__) / FOLDER
    checkout = Path(__file__).resolve().parent.parent / FOLDER
    for folder in (packaged, checkout):
        if isinstance(folder, Path) and folder.is_dir():
            return folder
    raise ConfigError("(install)", FOLDER, str(packaged),
                      f"this install of amid_ray ships no search spaces (nor is {checkout} "
                      "there); reinstall the package")


def shipped_spaces() -> list[str]:
    """Names of the shipped search spaces (file names without `.yaml`), sorted."""
    return sorted(path.stem for path in shipped_folder().glob(f"*{SUFFIX}"))


def shipped_space(name: str) -> Path:
    """The file of the shipped search space `name` (`demo` or `demo.yaml`)."""
    stem = name.removesuffix(SUFFIX)
    path = shipped_folder() / f"{stem}{SUFFIX}"
    if "/" in stem or "\\" in stem or not path.is_file():
        raise ConfigError("--config", "(search space)", name,
                          f"not a shipped search space; shipped: {shipped_spaces()}")
    return path


def config_path(value: str | Path) -> Path:
    """What `--config VALUE` names: an existing file, else a shipped search space by name."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if path.parent == Path("."):
        return shipped_space(str(value))
    raise ConfigError("--config", "(file)", str(value),
                      f"no such configuration file; shipped search spaces: {shipped_spaces()}")
