"""The end of a search in MLflow: child runs brought in line with the Train results, the results
written onto the parent run (best settings and metrics, trials table, Optuna plots), the best
checkpoint logged as a `transformers` text-generation model of the parent run and registered in
the model registry, so that `mlflow.transformers.load_model("models:/<name>@best")` gives a
pipeline and `mlflow.pyfunc.load_model(...).predict(["<prompt>"])` the generated answers.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from amid_ray.config import flatten_dotted
from amid_ray.metrics import BEST_ROUGE_L, ROUGE_L, STEP, VAL_LOSS
from amid_ray.mlflow_runs import (
    BEST_STEP,
    TRIAL_ID_TAG,
    SearchRuns,
    as_plain_data,
    is_number,
    trial_config,
)
from amid_ray.results import ERROR, FINISHED, STOPPED_EARLY

if TYPE_CHECKING:
    import optuna
    from huggingface_hub import ModelCard

logger = logging.getLogger(__name__)

#: Alias given to the registered model version of the search's best checkpoint.
BEST_ALIAS = "best"

#: Name of the logged model holding the best checkpoint, an output of the parent run.
BEST_MODEL_NAME = "best_model"
#: Packages a served best model needs, pinned to the versions that trained it.
MODEL_PACKAGES = ("transformers", "torch")


def trial_ending(verdict: str,
                 history: Sequence[Mapping[str, Any]]) -> tuple[int, int | None] | None:
    """The child run ending of a trial verdict of `amid_ray.results.trial_verdict`: a
    `RunStatus` and, for a trial stopped early, the last step of its Train `history` (the
    `stopped_at_step` of `SearchRuns.end_child`). None for a trial that has not ended."""
    if verdict == FINISHED:
        return RunStatus.FINISHED, None
    if verdict == STOPPED_EARLY:
        return RunStatus.FINISHED, max((int(row[STEP]) for row in history), default=0)
    if verdict == ERROR:
        return RunStatus.FAILED, None
    return None


def sync_trial(runs: SearchRuns, trial_id: str, history: Sequence[Mapping[str, Any]],
               trial_status: str) -> None:
    """Make a child run agree with its trial's Train result folder, the source of truth.

    Train runs ahead of Tune: a trial the scheduler stops can finish one more evaluation round
    before it dies, a round Tune never relays. Its points are logged here, and the run's ending
    corrected to the trial's verdict `trial_status` (`trial_ending`) if that round was the run's
    last. A trial that has not ended keeps its run as it is.
    """
    run = runs.find_child(trial_id)
    if run is None:
        return
    runs.log_points(run.info.run_id, [(int(row[STEP]), row) for row in history])
    ending = trial_ending(trial_status, history)
    if ending is not None and runs.ending_of(run) != (RunStatus.to_string(ending[0]), ending[1]):
        runs.end_child(run.info.run_id, ending[0], stopped_at_step=ending[1])


def finish_search(runs: SearchRuns, *, best: Mapping[str, Any],
                  trials_table: list[dict[str, Any]], optuna_study: optuna.Study | None,
                  best_model_dir: Path | None, registered_model_name: str) -> ModelVersion | None:
    """Write the search's results onto the parent run and end it FINISHED.

    `best` describes the best trial: its `config` (flat dotted keys or nested) and its ROUGE-L
    (key `ROUGE_L`), plus anything else worth keeping (e.g. `trial_id`, `checkpoint`); all of it
    goes to `best_config.json`, the config's `param_keys` to params `best.<key>`. `trials_table`
    (one dict per trial) becomes `trials.csv`. Plots of `optuna_study` go under `plots/`.
    The parent also gets the best trial's headline metrics (`best_trial_metrics`).
    `best_model_dir` (a Hugging Face model folder) is logged as a `transformers` model of the
    parent run (`log_best_model`) and registered as a new version of `registered_model_name`
    with alias `best`; returns that version (None without a model folder). Children still
    RUNNING (a driver that died and a search that ended without them) end with the status their
    logged steps show: FINISHED at `max_steps`, else KILLED.
    """
    parent_id = runs.parent_run_id
    end_running_children(runs)
    _log_best(runs, best)
    runs.log_values(parent_id, {"num_trials": len(trials_table)})
    with tempfile.TemporaryDirectory(prefix="amid-ray-report-") as tmp:
        report = Path(tmp)
        write_trials_csv(trials_table, report / "trials.csv")
        runs.client.log_artifact(parent_id, str(report / "trials.csv"))
        if optuna_study is not None:
            plots = report / "plots"
            plots.mkdir()
            write_study_plots(optuna_study, plots)
            runs.client.log_artifacts(parent_id, str(plots), "plots")
    version = None
    if best_model_dir is not None:
        version = register_best_model(runs, best_model_dir, registered_model_name, best)
    runs.client.set_terminated(parent_id, status=RunStatus.to_string(RunStatus.FINISHED))
    return version


def end_running_children(runs: SearchRuns) -> None:
    """End every child still RUNNING with the status its logged steps show: FINISHED at
    `max_steps`, else KILLED (the search ended without its trial)."""
    for run in runs.children("attributes.status = 'RUNNING'"):
        finished = runs.last_step(run.info.run_id) >= runs.max_steps
        runs.end_child(run.info.run_id, RunStatus.FINISHED if finished else RunStatus.KILLED,
                       inferred=True)


def _log_best(runs: SearchRuns, best: Mapping[str, Any]) -> None:
    parent_id = runs.parent_run_id
    runs.client.log_text(parent_id, json.dumps(as_plain_data(best), indent=2) + "\n",
                         "best_config.json")
    best_params = runs.searched_params(best.get("config", {}))
    runs.log_missing_params(runs.client.get_run(parent_id),
                            {f"best.{key}": value for key, value in best_params.items()})
    if is_number(best.get(ROUGE_L)):
        runs.log_values(parent_id, {BEST_ROUGE_L: best[ROUGE_L]})
    if "trial_id" in best:
        runs.client.set_tag(parent_id, "best_trial_id", str(best["trial_id"]))
        runs.log_values(parent_id, best_trial_metrics(runs, str(best["trial_id"])))


def best_trial_metrics(runs: SearchRuns, trial_id: str) -> dict[str, float]:
    """The headline metrics of a trial read off its child run's curves, for the parent run's
    columns: its best ROUGE-L (`rougeL`), the step of it (`best_step`, the first on a tie) and
    the dev loss at that step (`val_loss`, if logged there). {} without a ROUGE-L curve."""
    run = runs.find_child(trial_id)
    if run is None:
        return {}
    history = {key: {point.step: point.value
                     for point in runs.client.get_metric_history(run.info.run_id, key)}
               for key in (ROUGE_L, VAL_LOSS)}
    rouge = history[ROUGE_L]
    if not rouge:
        return {}
    best_value = max(rouge.values())
    step = min(step for step, value in rouge.items() if value == best_value)
    metrics = {ROUGE_L: best_value, BEST_STEP: step}
    if step in history[VAL_LOSS]:
        metrics[VAL_LOSS] = history[VAL_LOSS][step]
    return metrics


def register_best_model(runs: SearchRuns, model_dir: Path, name: str,
                        best: Mapping[str, Any]) -> ModelVersion:
    """Log `model_dir` as the parent run's `transformers` model (`log_best_model`), register it
    as a new version of `name`, alias it `best`."""
    client, parent_id = runs.client, runs.parent_run_id
    logged = log_best_model(runs, model_dir, best)
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        client.create_registered_model(
            name, description="Best AMiD students of amid-ray searches, by ROUGE-L")
    tags = {TRIAL_ID_TAG: str(best["trial_id"])} if "trial_id" in best else None
    # A database registry looks the logged model up through MLflow's global tracking URI.
    with _use_tracking_uri(runs.tracking_uri):
        version = client.create_model_version(name, source=f"models:/{logged.model_id}",
                                              run_id=parent_id, tags=tags,
                                              model_id=logged.model_id)
    client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    return version


def log_best_model(runs: SearchRuns, model_dir: Path, best: Mapping[str, Any]) -> LoggedModel:
    """Log the Hugging Face model folder `model_dir` as a `transformers` text-generation model,
    an output of the parent run named `best_model`, as `mlflow.transformers.log_model` does but
    with this search's client rather than MLflow's global tracking URI and active run.

    Its pyfunc takes prompts (in the training data's format) and returns the generated answer
    alone, up to the best trial's `eval.max_new_tokens` new tokens by greedy decoding; the
    predict params `max_new_tokens`, `do_sample` and `return_full_text` change that. The
    model is loaded into memory once to be saved (MLflow 3.17 cannot log a checkpoint folder of
    transformers 5 without loading it).
    """
    import mlflow.transformers

    from amid_ray.models import load_causal_lm

    client, parent_id = runs.client, runs.parent_run_id
    config = best.get("config", {})
    trial_id = str(best.get("trial_id", "best"))
    logged = client.create_logged_model(
        runs.experiment_id, name=BEST_MODEL_NAME, source_run_id=parent_id,
        params=runs.searched_params(config),
        tags={TRIAL_ID_TAG: trial_id} if "trial_id" in best else None)
    try:
        max_new_tokens = flatten_dotted(trial_config(runs.base_config, config, trial_id))[
            "eval.max_new_tokens"]
        model, tokenizer = load_causal_lm(model_dir)
        description = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                            run_id=parent_id, model_id=logged.model_id)
        with tempfile.TemporaryDirectory(prefix="amid-ray-model-") as tmp:
            local = Path(tmp) / "model"
            mlflow.transformers.save_model(
                {"model": model, "tokenizer": tokenizer}, str(local), task="text-generation",
                mlflow_model=description, signature=generation_signature(max_new_tokens),
                pip_requirements=[pinned_requirement(name) for name in MODEL_PACKAGES],
                model_card=_model_card(runs, best))
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(parent_id, [LoggedModelOutput(logged.model_id, step=0)])
    return client.get_logged_model(logged.model_id)


def generation_signature(max_new_tokens: int) -> ModelSignature:
    """A text-generation signature: a prompt in, the generated text out, with the generation
    settings a caller may pass as predict params and their defaults (greedy, the answer only)."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]), outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, max_new_tokens),
                            ParamSpec("do_sample", DataType.boolean, False),
                            ParamSpec("return_full_text", DataType.boolean, False)]))


def pinned_requirement(package: str) -> str:
    """`package==<installed version>`, without a local version label (torch's `+cpu`), which
    PyPI does not serve."""
    return f"{package}=={installed_version(package).split('+')[0]}"


def _model_card(runs: SearchRuns, best: Mapping[str, Any]) -> ModelCard:
    """The model's README: where it comes from (also spares MLflow looking one up on the Hub)."""
    from huggingface_hub import ModelCard

    rouge = best.get(ROUGE_L)
    score = f", best dev ROUGE-L {rouge:.2f}" if is_number(rouge) else ""
    trial = f"trial `{best['trial_id']}`" if "trial_id" in best else "the best trial"
    return ModelCard(
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        "tags: [amid-ray, knowledge-distillation]\n---\n"
        f"# Best student of the amid-ray search `{runs.search_dir.name}`\n\n"
        f"The checkpoint of {trial}{score}. Its configuration is the `config.yaml` of the "
        "trial's MLflow run. Prompts go in the format of the training data (for instruction "
        "data, the Alpaca template `amid_ray.data.build_prompt` writes).\n")


def write_trials_csv(trials_table: list[dict[str, Any]], path: Path) -> None:
    """One row per trial; the columns are every key seen, in the order first seen."""
    columns = list(dict.fromkeys(key for row in trials_table for key in row))
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(trials_table)


def _study_plots() -> dict[str, Callable[..., Any]]:
    from optuna.visualization import matplotlib as optuna_plots

    return {
        "optimization_history.png": optuna_plots.plot_optimization_history,
        "param_importances.png": optuna_plots.plot_param_importances,
        "parallel_coordinate.png": optuna_plots.plot_parallel_coordinate,
    }


def _plot_target(study: optuna.Study) -> dict[str, Any]:
    """Plot arguments for a multi-objective study: its first objective (none for one objective)."""
    if len(study.directions) == 1:
        return {}
    name = study.metric_names[0] if study.metric_names else "objective 0"
    return {"target": lambda trial: trial.values[0], "target_name": name}


def write_study_plots(study: optuna.Study, folder: Path) -> list[str]:
    """PNG plots of the study (history, importances, parallel coordinates) into `folder`.

    A multi-objective study is plotted against its first objective. A plot Optuna cannot draw
    (fewer than 2 complete trials, or e.g. importances it fails to compute) is skipped with a
    note in the log and in `skipped.txt`. Returns the names of the files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from optuna.trial import TrialState

    notes, written = [], []
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        notes.append("all plots: the study has fewer than 2 complete trials")
    else:
        for filename, plot in _study_plots().items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    figure = plot(study, **_plot_target(study)).figure
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                notes.append(f"{filename}: {type(error).__name__}: {error}")
                continue
            figure.savefig(folder / filename, bbox_inches="tight", dpi=100)
            plt.close(figure)
            written.append(filename)
    for note in notes:
        logger.warning("study plot skipped: %s", note)
    if notes:
        (folder / "skipped.txt").write_text("\n".join(notes) + "\n")
    return written
