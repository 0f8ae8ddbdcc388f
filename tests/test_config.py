"""Run configuration and search-space validation: errors name file, key, value, what is allowed."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest

from amid_ray.config import ConfigError, config_from_dict, load_config, point_config
from amid_ray.sampling import DefineByRun
from amid_ray.search_space import grid_points

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip():
    run = config_from_dict({})
    assert run.train.lr == 5e-4 and run.amid.order == "pr" and run.models.teacher == "demo"
    assert config_from_dict(run.to_dict()).to_dict() == run.to_dict()


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("train:\n  lr: -1\n", "train.lr", "must be > 0"),
        ("train:\n  lr: fast\n", "train.lr", "must be a number"),
        ("train:\n  batch_sise: 4\n", "train.batch_sise", "did you mean 'batch_size'?"),
        ("amid:\n  order: pq\n", "amid.order", "must be one of ('pr', 'qr', 'rp', 'rq'"),
        ("amid:\n  lam: 1.0\n  order: pr\n", "amid.lam", "identically 0"),
        ("amid:\n  preset: fkl\n", "amid.preset", "must be one of"),
        ("data:\n  train: nowhere.jsonl\n", "data.train", "no such file or folder"),
        ("data:\n  max_length: 64\n  max_prompt_length: 64\n", "data.max_prompt_length",
         "must be below max_length (64)"),
        ("trian: {}\n", "trian", "did you mean 'train'?"),
        ("models:\n  student: derive\n", "models.student_layers", "needs a non-empty list"),
        ("train:\n  lm_weight: 1.0\n", "train.lm_weight", "needs data.lm_corpus"),
        ("train:\n  lr: .inf\n", "train.lr", "must be a finite number"),
        ("train:\n  weight_decay: .nan\n", "train.weight_decay", "must be a finite number"),
        ("train:\n  max_grad_norm: .inf\n", "train.max_grad_norm", "must be a finite number"),
        ("name: ..\n", "name", "must be a folder name"),
        ("name: a/b\n", "name", "must be a folder name"),
        ("name: ''\n", "name", "must be a folder name"),
        ("train:\n  lr: 1.0e-3\ntrain:\n  lr: 2.0e-3\n", "(file)", "'train' is given twice"),
        ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "(file)", "'lr' is given twice (first on line 2)"),
        ("train: [1\n", "(file)", "not valid YAML"),
    ],
)
def test_config_errors_name_file_key_value_and_allowed(tmp_path, text, key, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert error.key == key
    assert str(path) in str(error) and message in str(error)


def test_an_lm_corpus_without_a_weight_is_refused(tmp_path):
    (tmp_path / "owt.txt").write_text("Some text.\n")
    path = write(tmp_path, "data:\n  lm_corpus: owt.txt\n")
    with pytest.raises(ConfigError, match="data.lm_corpus.*unused while train.lm_weight is 0"):
        load_config(path)
    run = load_config(path, ["train.lm_weight=1.0"])
    assert run.data.lm_corpus == str(tmp_path / "owt.txt")


def test_overrides_and_relative_paths(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    path = write(tmp_path, "data:\n  train: train.jsonl\n")
    run = load_config(path, ["train.lr=2e-4", "amid.divergence=ab", "eval.greedy=true"])
    assert run.data.train == str((tmp_path / "train.jsonl").resolve())
    assert run.train.lr == 2e-4 and run.amid.divergence == "ab" and run.eval.greedy is True
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["train.lr"])


def test_presets_are_resolved_into_the_fields_at_parse_time():
    # The preset wins over the file's own fields; the label stays.
    run = config_from_dict({"amid": {"preset": "srkl", "alpha": 3.0, "order": "pr"}})
    assert (run.amid.preset, run.amid.alpha, run.amid.lam, run.amid.order) == (
        "srkl", -1.0, 0.9, "qr")
    assert run.amid.settings().as_kwargs() == {
        "alpha": -1.0, "lam": 0.9, "divergence": "kl", "order": "qr", "ab_alpha": 0.2,
        "ab_beta": 0.7, "detach_assistant": False, "cross_entropy": False,
    }
    assert config_from_dict(run.to_dict()).amid == run.amid


def test_amid_fields_are_checked_by_the_loss_rules():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"amid": {"divergence": "ab", "ab_alpha": 0.0}}, "f.yaml")
    assert caught.value.key == "amid.ab_alpha" and "non-zero" in str(caught.value)


SPACE = {
    "num_samples": 6,
    "baselines": ["kd", "taid"],
    "params": {
        "amid.ab_alpha": {"type": "uniform", "low": 0.1, "high": 0.9,
                          "when": {"amid.divergence": "ab"}},
        "amid.divergence": {"type": "categorical", "values": ["kl", "ab"]},
        "amid.alpha": {"type": "uniform", "low": -5.0, "high": 3.0},
        "amid.lam": {"type": "uniform", "low": 0.05, "high": 0.95},
        "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3},
    },
}


def test_define_by_run_gives_baselines_first_then_conditional_samples():
    run = config_from_dict({"search": SPACE})
    spec = run.search_spec
    assert spec.keys.index("amid.divergence") < spec.keys.index("amid.ab_alpha")
    space = DefineByRun(spec, run.to_dict())
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    points = []
    for _ in range(12):
        trial = study.ask()
        extra = space(trial)
        points.append(extra or dict(trial.params))
        study.tell(trial, 0.0)
    assert [p["amid.preset"] for p in points[:2]] == ["kd", "taid"]
    for point in points[2:]:
        assert -5.0 <= point["amid.alpha"] <= 3.0 and 1e-4 <= point["train.lr"] <= 1e-3
        assert ("amid.ab_alpha" in point) == (point["amid.divergence"] == "ab")
    assert {p["amid.divergence"] for p in points[2:]} == {"kl", "ab"}
    base = config_from_dict({"search": SPACE}).to_dict()
    run = point_config(base, points[3], source="trial x")
    assert run.amid.alpha == points[3]["amid.alpha"] and run.search is None


@pytest.mark.parametrize(
    ("params", "key", "message"),
    [
        ({"amid.lam": {"type": "categorical", "values": [0.0, 0.5]},
          "amid.order": {"type": "categorical", "values": ["pr", "qr"]}},
         "search.params", "identically zero loss"),
        ({"amid.lam": {"type": "uniform", "low": 0.0, "high": 0.5}}, "search.params",
         "identically zero loss"),
        ({"amid.alpha": {"type": "uniform", "low": 1.0, "high": -1.0}}, "search.params.amid.alpha",
         "must be below high"),
        ({"train.lr": {"type": "loguniform", "low": 0.0, "high": 1e-3}},
         "search.params.train.lr.low", "must be > 0"),
        ({"amid.order": {"type": "categorical", "values": ["pq"]}}, "search.params.amid.order",
         "does not make a valid run"),
        # Every value and both ends of every range are checked, not one point.
        ({"amid.divergence": {"type": "categorical", "values": ["kl", "js"]}},
         "search.params.amid.divergence", "does not make a valid run"),
        ({"train.kd_ratio": {"type": "uniform", "low": 0.5, "high": 1.5}},
         "search.params.train.kd_ratio", "must be in [0, 1]"),
        ({"train.lr": {"type": "uniform", "low": -0.01, "high": 0.03}},
         "search.params.train.lr", "must be > 0"),
        ({"amid.ab_beta": {"type": "uniform", "low": 0.1, "high": 0.9,
                           "when": {"amid.divergence": "ab"}}},
         "search.params.amid.ab_beta.when", "must name another searched parameter"),
        ({"amid.alpha": {"type": "grid", "values": [-1, 0]},
          "amid.lam": {"type": "uniform", "low": 0.1, "high": 0.9}}, "search.params",
         "cannot be mixed"),
        ({"train.lr": {"type": "normal"}}, "search.params.train.lr.type", "must be one of"),
        ({"amid.divergence": {"type": "categorical", "values": ["kl"]},
          "amid.ab_alpha": {"type": "uniform", "low": 0.1, "high": 0.9,
                            "when": {"amid.divergence": "ab"}}},
         "search.params.amid.ab_alpha.when", "can never hold"),
        ({"amid.alpha": {"type": "uniform", "low": -1.0, "high": 1.0},
          "amid.lam": {"type": "uniform", "low": 0.1, "high": 0.9, "when": {"amid.alpha": 0.5}}},
         "search.params.amid.lam.when", "continuous range"),
    ],
)
def test_search_space_errors(params, key, message):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"amid": {"order": "qr"}, "search": {"params": params}}, "space.yaml")
    assert caught.value.key == key and message in str(caught.value)
    assert str(caught.value).startswith("space.yaml: ")


def test_grid_points_cover_the_product_after_the_baselines():
    run = config_from_dict({"search": {"baselines": ["abkd"], "params": {
        "amid.alpha": {"type": "grid", "values": [-3.0, 0.0, 0.5]},
        "amid.order": {"type": "grid", "values": ["pr", "rq"]},
    }}})
    points = grid_points(run.search_spec)
    assert points[0] == {"amid.preset": "abkd"}
    assert len(points) == 1 + 6
    assert {(p["amid.alpha"], p["amid.order"]) for p in points[1:]} == {
        (a, o) for a in (-3.0, 0.0, 0.5) for o in ("pr", "rq")}


@pytest.mark.parametrize("name", ["demo", "paper_gpt2", "default", "baselines"])
def test_shipped_search_spaces_are_valid(name, tiny_world):
    # Paths in the GPU files point at a user's checkpoints: stand the tiny world in for them.
    overrides = [] if name == "demo" else [
        f"models.teacher={tiny_world['teacher']}", f"models.student={tiny_world['student']}",
        f"data.train={tiny_world['train']}", f"data.dev={tiny_world['dev']}",
        *([f"data.lm_corpus={tiny_world['corpus']}"] if name == "paper_gpt2" else []),
    ]
    run = load_config(ROOT / "search_spaces" / f"{name}.yaml", overrides)
    spec = run.search_spec
    if name == "paper_gpt2":
        assert spec.is_grid and len(grid_points(spec)) == 6 + 7 * 2 * 4
        # The published 0.1B/1.5B run (docs/RECIPE.md): 20 epochs of 437 steps, one
        # evaluation per epoch on all 1000 dev items, adaptive SGO from tau = 0, LM loss 1.
        assert (run.train.max_steps, run.eval.every, run.eval.num_examples) == (8740, 437, 1000)
        assert (run.sgo.enabled, run.sgo.init_threshold, run.train.lm_weight) == (True, 0.0, 1.0)
        assert (run.amid.alpha, run.amid.lam, run.amid.divergence) == (0.5, 0.5, "ab")
    if name == "baselines":
        assert spec.baselines == ("kd", "rkl", "skl", "srkl", "taid", "abkd")


def test_smollm2_cpu_profile_reads_the_shared_data_and_the_pypi_teacher(instruct_dir):
    run = load_config(ROOT / "search_spaces" / "smollm2_cpu.yaml")
    assert (run.models.teacher, run.models.student) == ("smollm2", "derive")
    assert run.models.student_layers == list(range(0, 30, 3))
    assert Path(run.data.train) == (instruct_dir / "dolly_dev.jsonl").resolve()
    assert Path(run.data.dev) == (instruct_dir / "dolly_valid.jsonl").resolve()
    assert run.search_spec.baselines == ("kd", "srkl")
    # Its space is one where the cached teacher is faithful (kl only): the cache is on.
    assert (run.cache.enabled, run.cache.top_k, run.amid.divergence) == (True, 256, "kl")
    assert "amid.divergence" not in run.search_spec.keys


def test_a_named_model_source_is_not_taken_for_a_path():
    run = config_from_dict({"models": {"teacher": "smollm2", "student": "derive",
                                       "student_layers": [0]}})
    assert run.models.teacher == "smollm2"
    with pytest.raises(ConfigError, match="no such file or folder"):
        config_from_dict({"models": {"teacher": "smollm3"}})


def test_config_errors_survive_pickling():
    error = ConfigError("space.yaml", "train.lr", -1, "must be > 0")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ConfigError and str(copy) == str(error) and copy.key == "train.lr"


def test_a_file_that_is_not_utf8_is_named_in_the_error(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"space.yaml: \(file\) = .*not UTF-8 text"):
        load_config(path)


@pytest.mark.parametrize(("search", "key", "message"), [
    ({"baselines": "srkl"}, "search.baselines", "must be a list of preset names"),
    ({"baselines": {"kd": 1}}, "search.baselines", "must be a list of preset names"),
    ({"scheduler": 0}, "search.scheduler", "must be null, 'asha'"),
    ({"scheduler": True}, "search.scheduler", "must be null, 'asha'"),
    ({"num_samples": 0}, "search.num_samples", "must be an integer >= 1"),
])
def test_search_section_shapes_that_used_to_be_misread(search, key, message):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"search": search}, "space.yaml")
    assert caught.value.key == key and message in str(caught.value)


def test_a_preset_carries_its_authors_recipe(tmp_path):
    corpus = tmp_path / "owt.txt"
    corpus.write_text("Some text.\n")
    base = {"sgo": {"enabled": False}, "train": {"lm_weight": 1.0},
            "data": {"lm_corpus": str(corpus)}}
    # DistiLLM's SRKL: adaptive SGO (published settings) and the LM loss on the run's corpus.
    srkl = config_from_dict(base | {"amid": {"preset": "srkl"}})
    assert (srkl.sgo.enabled, srkl.sgo.scheme, srkl.sgo.init_threshold,
            srkl.sgo.replay_schedule) == (True, "adaptive", 0.0, "decreasing")
    assert (srkl.train.lm_weight, srkl.data.lm_corpus) == (1.0, str(corpus))
    # KD: no student generation and no LM loss, whatever the run had.
    kd = config_from_dict(base | {"sgo": {"enabled": True}, "amid": {"preset": "kd"}})
    assert (kd.sgo.enabled, kd.train.lm_weight, kd.data.lm_corpus) == (False, 0.0, None)
    # GKD: on-policy mixing with probability 0.5.
    gkd = config_from_dict({"amid": {"preset": "gkd"}})
    assert (gkd.sgo.enabled, gkd.sgo.scheme, gkd.sgo.mixed_alpha) == (True, "mixed", 0.5)
    assert (gkd.amid.order, gkd.amid.lam, gkd.amid.alpha) == ("js", 0.1, -1.0)
    # Without a corpus a recipe's LM loss cannot run: the run keeps none.
    assert config_from_dict({"amid": {"preset": "abkd"}}).train.lm_weight == 0.0
    # The run's learning rate stays (a search compares objectives at the rates it searches).
    assert config_from_dict({"train": {"lr": 2e-3}, "amid": {"preset": "kd"}}).train.lr == 2e-3
    # A trial point with a preset gets the recipe too.
    point = point_config(config_from_dict(base).to_dict(), {"amid.preset": "kd"}, "trial")
    assert (point.sgo.enabled, point.train.lm_weight) == (False, 0.0)


def test_sgo_and_taid_sections_are_checked():
    with pytest.raises(ConfigError, match="sgo.replay_capacity = 4: must hold at least one batch"):
        config_from_dict({"sgo": {"enabled": True, "replay_capacity": 4},
                          "train": {"batch_size": 8}})
    with pytest.raises(ConfigError, match="sgo.scheme = 'online'"):
        config_from_dict({"sgo": {"scheme": "online"}})
    with pytest.raises(ConfigError, match=r"taid.t_end = 0.3: must be a number in \(0, 1\]"):
        config_from_dict({"taid": {"t_start": 0.4, "t_end": 0.3}})


def test_max_steps_has_a_finite_ceiling():
    assert config_from_dict({"train": {"max_steps": 10**9}}).train.max_steps == 10**9
    for steps in (10**9 + 1, 10**25):
        with pytest.raises(ConfigError) as caught:
            config_from_dict({"train": {"max_steps": steps}}, "run.yaml")
        assert caught.value.key == "train.max_steps" and caught.value.value == steps
        assert str(caught.value).endswith("must be <= 1000000000")


@pytest.mark.parametrize("field", ["search_spec", "source"])
def test_internal_fields_are_not_sections(field):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({field: {"params": {}}}, "run.yaml")
    assert caught.value.key == field and "unknown section" in str(caught.value)
    assert repr(field) not in str(caught.value).split("known: ")[1]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("resources.storage", "", "must name a folder or URI"),
    ("resources.storage", "  ", "must name a folder or URI"),
    ("resources.address", "", "null (or no address) starts a local Ray"),
    ("cache.dir", "", "must name a folder"),
])
def test_empty_texts_are_refused_instead_of_meaning_the_current_folder(key, value, message):
    section, field = key.split(".")
    with pytest.raises(ConfigError) as caught:
        config_from_dict({section: {field: value}}, "run.yaml")
    assert (caught.value.key, caught.value.value) == (key, value)
    assert message in str(caught.value)


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n"])
def test_an_empty_file_is_refused_under_what_the_command_needs(tmp_path, text):
    path = write(tmp_path, text)
    for needs in ("models.teacher", "search"):
        with pytest.raises(ConfigError) as caught:
            load_config(path, needs=needs)
        assert (caught.value.source, caught.value.key, caught.value.value) == (str(path), needs,
                                                                              None)
        assert "the file is empty (or holds only comments)" in str(caught.value)
    # Without `needs` an empty file stands for the defaults, as before.
    assert load_config(path).to_dict() == config_from_dict({}, str(path)).to_dict()
    assert load_config(write(tmp_path, "name: x\n"), needs="models.teacher").name == "x"


def test_an_invalid_inner_point_blames_the_parameter_whose_value_is_invalid():
    # The first parameter (amid.alpha) is fine; data.max_length = 64 cannot hold the default
    # 256-token prompt, whatever the others are.
    params = {"amid.alpha": {"type": "uniform", "low": -5.0, "high": 1.0},
              "data.max_length": {"type": "categorical", "values": [64, 512]}}
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"search": {"params": params}}, "space.yaml")
    assert (caught.value.key, caught.value.value) == ("search.params.data.max_length", 64)
    assert "must be below max_length (64)" in str(caught.value)


def test_an_inner_point_invalid_only_as_a_whole_is_named_whole():
    # Each value is valid with the others at their base values (max_steps 200, warm-up 0), but
    # the middle point, max_steps (2 + 6) // 2 = 4 with warm-up (3 + 5) // 2 = 4, is not.
    params = {"train.max_steps": {"type": "int", "low": 2, "high": 6},
              "train.warmup_steps": {"type": "int", "low": 3, "high": 5}}
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"search": {"params": params}}, "space.yaml")
    assert caught.value.key == "search.params"
    assert caught.value.value == {"train.max_steps": 4, "train.warmup_steps": 4}
    assert "train.warmup_steps = 4: must be below max_steps (4)" in str(caught.value)
