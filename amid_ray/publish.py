"""The end of a search in MLflow: child runs brought in line with the Train results, the results
written onto the parent run (best settings, trials table, Optuna plots), the best checkpoint
logged and registered in the model registry.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from amid_ray.metrics import BEST_ROUGE_L, ROUGE_L, STEP
from amid_ray.mlflow_runs import TRIAL_ID_TAG, SearchRuns, as_plain_data, is_number
from amid_ray.results import ERROR, FINISHED, STOPPED_EARLY

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

#: The child run status of each trial verdict of `amid_ray.results.trial_verdict` (the others
#: leave the status alone).
TRIAL_RUN_STATUS = {FINISHED: RunStatus.FINISHED, STOPPED_EARLY: RunStatus.KILLED,
                    ERROR: RunStatus.FAILED}

#: Alias given to the registered model version of the search's best checkpoint.
BEST_ALIAS = "best"

#: Artifact folder of the parent run holding the best checkpoint (a Hugging Face model folder).
BEST_MODEL_ARTIFACT = "best_model"


def sync_trial(runs: SearchRuns, trial_id: str, history: Sequence[Mapping[str, Any]],
               trial_status: str) -> None:
    """Make a child run agree with its trial's Train result folder, the source of truth.

    Train runs ahead of Tune: a trial the scheduler stops can finish one more evaluation round
    before it dies, a round Tune never relays. Its points are logged here, and the end status
    corrected to the trial's verdict `trial_status` if that round was the run's last.
    """
    run = runs.find_child(trial_id)
    if run is None:
        return
    runs.log_points(run.info.run_id, [(int(row[STEP]), row) for row in history])
    status = TRIAL_RUN_STATUS.get(trial_status)
    if status is not None and run.info.status != RunStatus.to_string(status):
        runs.end_child(run.info.run_id, status)


def finish_search(runs: SearchRuns, *, best: Mapping[str, Any],
                  trials_table: list[dict[str, Any]], optuna_study: optuna.Study | None,
                  best_model_dir: Path | None, registered_model_name: str) -> ModelVersion | None:
    """Write the search's results onto the parent run and end it FINISHED.

    `best` describes the best trial: its `config` (flat dotted keys or nested) and its ROUGE-L
    (key `ROUGE_L`), plus anything else worth keeping (e.g. `trial_id`, `checkpoint`); all of it
    goes to `best_config.json`, the config's `param_keys` to params `best.<key>`. `trials_table`
    (one dict per trial) becomes `trials.csv`. Plots of `optuna_study` go under `plots/`.
    `best_model_dir` (a Hugging Face model folder) is logged under `best_model/` and registered
    as a new version of `registered_model_name` with alias `best`; returns that version (None
    without a model folder). Children still RUNNING (a driver that died) end with the status
    their logged steps show: FINISHED at `max_steps`, else KILLED.
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
    """End every child still RUNNING with the status its logged steps show."""
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


def register_best_model(runs: SearchRuns, model_dir: Path, name: str,
                        best: Mapping[str, Any]) -> ModelVersion:
    """Log `model_dir` under the parent's `best_model/`, register it, alias it `best`."""
    client, parent_id = runs.client, runs.parent_run_id
    client.log_artifacts(parent_id, str(model_dir), BEST_MODEL_ARTIFACT)
    source = f"{client.get_run(parent_id).info.artifact_uri}/{BEST_MODEL_ARTIFACT}"
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        client.create_registered_model(
            name, description="Best AMiD students of amid-ray searches, by ROUGE-L")
    tags = {TRIAL_ID_TAG: str(best["trial_id"])} if "trial_id" in best else None
    version = client.create_model_version(name, source=source, run_id=parent_id, tags=tags)
    client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    return version


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
