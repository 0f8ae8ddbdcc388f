"""The import direction, locked: the loss modules need only torch, and the library core (data,
models, evaluation, configuration, the demo) never pulls in Ray, MLflow or Optuna, which only the
worker, search and tracking layers above it use.

One fresh interpreter imports the modules below in order and records what each import adds to
`sys.modules`; a module is charged with everything it adds beyond what was loaded before it, so
the order puts each module after only the modules it may rely on.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Need nothing beyond the standard library.
STDLIB_ONLY = ("amid_ray.errors", "amid_ray.atomic", "amid_ray.taid", "amid_ray.metrics",
               "amid_ray.spaces")
#: Need only torch (imported just before them, so anything else they add is charged to them).
TORCH_ONLY = ("amid_ray.chunked_loss", "amid_ray.losses", "amid_ray.schedule",
              "amid_ray.fused_loss", "amid_ray.sparse_teacher", "amid_ray.sparse_teacher_bound")
#: The rest of the library core: any third-party package but the search and tracking stack.
CORE = ("amid_ray.search_space", "amid_ray.config", "amid_ray.data", "amid_ray.lm_corpus",
        "amid_ray.evaluation", "amid_ray.models", "amid_ray.sgo", "amid_ray.teacher_cache",
        "amid_ray.cache_plan", "amid_ray.sources", "amid_ray.selection", "amid_ray.demo",
        "amid_ray.remote_storage", "amid_ray.preflight")
#: What only the layers above the core (worker, training, search, tracking, CLI) may import.
ABOVE_THE_CORE = ("ray", "mlflow", "optuna")
#: What the loss modules must not pull in: the rest of the stack, transformers included.
NOT_FOR_LOSSES = (*ABOVE_THE_CORE, "transformers", "datasets", "yaml")

RECORDER = """
import importlib, json, sys
steps, loaded = [], set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module(name)
    steps.append([name, sorted(set(sys.modules) - loaded)])
    loaded = set(sys.modules)
print(json.dumps(steps))
"""


@pytest.fixture(scope="module")
def added_by() -> dict[str, list[str]]:
    """For each module in import order, the modules its import added to `sys.modules`."""
    order = [*STDLIB_ONLY, "torch", *TORCH_ONLY, *CORE]
    done = subprocess.run([sys.executable, "-c", RECORDER, *order], capture_output=True,
                          text=True, timeout=300, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def top_level(names: list[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def loaded_once(added_by: dict[str, list[str]], module: str) -> set[str]:
    """Top-level names in `sys.modules` right after `module` was imported (beyond the start)."""
    loaded = set()
    for step, names in added_by.items():
        loaded |= top_level(names)
        if step == module:
            return loaded
    raise KeyError(module)


def is_core(name: str) -> bool:
    return name == "amid_ray" or name in (*STDLIB_ONLY, *TORCH_ONLY, *CORE) or \
        name.startswith("amid_ray.demo.")


@pytest.mark.parametrize("module", STDLIB_ONLY)
def test_helpers_need_only_the_standard_library(added_by, module):
    outside = top_level(added_by[module]) - set(sys.stdlib_module_names) - {"amid_ray"}
    assert not outside, f"{module} imports {sorted(outside)}"


@pytest.mark.parametrize("module", TORCH_ONLY)
def test_loss_modules_need_only_torch(added_by, module):
    assert "torch" in top_level(added_by["torch"])
    added = added_by[module]
    outside = top_level(added) - set(sys.stdlib_module_names) - {"amid_ray"}
    assert not outside, f"{module} imports {sorted(outside)} besides torch"
    ours = [name for name in added if name.startswith("amid_ray.")]
    assert set(ours) <= {*STDLIB_ONLY, *TORCH_ONLY}, f"{module} imports {ours}"
    assert not loaded_once(added_by, module) & set(NOT_FOR_LOSSES)


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_nothing_from_the_layers_above(added_by, module):
    added = added_by[module]
    above = top_level(added) & set(ABOVE_THE_CORE)
    assert not above, f"{module} imports {sorted(above)}, which only the layers above may use"
    ours = [name for name in added if name.startswith("amid_ray") and not is_core(name)]
    assert not ours, f"{module} imports {ours}, which sit above the library core"
