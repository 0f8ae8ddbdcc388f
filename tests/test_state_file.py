"""Trainer state saved without pickle: what goes in comes back (types, dtypes, values), and the
files hold no pickle."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from amid_ray.state_file import load_state, save_state


def test_an_optimizer_and_rng_state_round_trip_exactly(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"step": 7, "history": [{"rougeL": 1.5, "val_loss": math.inf}],
             "optimizer": optimizer.state_dict(), "python": random.getstate(),
             "numpy": np.random.get_state()[1].tolist(), "torch": torch.get_rng_state(),
             "nothing": None, "flag": True}
    save_state(state, tmp_path / "trainer_state")
    back = load_state(tmp_path / "trainer_state")

    assert back["step"] == 7 and back["nothing"] is None and back["flag"] is True
    assert back["history"] == [{"rougeL": 1.5, "val_loss": math.inf}]
    assert torch.equal(back["torch"], state["torch"]) and back["torch"].dtype == torch.uint8
    assert back["numpy"] == state["numpy"]
    version, internal, gauss = back["python"]  # tuples come back as lists
    random.setstate((version, tuple(internal), gauss))
    assert random.getstate() == state["python"]
    # Int-keyed per-parameter state keeps its keys, so a fresh optimizer accepts it.
    assert set(back["optimizer"]["state"]) == {0, 1}
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    for key, saved in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], saved)


def test_the_files_are_json_and_safetensors_only(tmp_path):
    save_state({"weights": torch.ones(2, 2), "ids": [1, 2]}, tmp_path / "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    text = (tmp_path / "state.json").read_text()
    assert json.loads(text) == {"weights": {"__tensor__": "0"}, "ids": [1, 2]}


def test_an_object_that_is_not_plain_data_is_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot save a object"):
        save_state({"bad": object()}, tmp_path / "state")
