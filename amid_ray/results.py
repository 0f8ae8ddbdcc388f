"""What a search produced, read back from its folder: a record per trial, the best trial by
ROUGE-L, its export to `best/`, the trials table, the summary, and an Optuna study for plots.

A trial's outcome comes from its Ray Train run folder (`trials/<trial_id>`), not from Tune's
metrics, which can be stale after a resume; Tune's trial states tell an error from an early stop.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray.train
from ray.tune import ExperimentAnalysis

from amid_ray.atomic import atomic_folder
from amid_ray.config import RunConfig, point_config
from amid_ray.metrics import ROUGE_L, STEP, VAL_LOSS
from amid_ray.preflight import redact_uri
from amid_ray.remote_storage import (
    STORAGE_URI_FILE,
    download_checkpoint,
    is_uri,
    join,
    read_bytes,
    resolve,
)
from amid_ray.sampling import optuna_distribution
from amid_ray.search_space import PRESET_KEY, SearchSpec
from amid_ray.selection import LEVEL, Interval, bootstrap_interval, paired_difference
from amid_ray.train_snapshot import SNAPSHOT
from amid_ray.training import TrainOutcome, read_outcome
from amid_ray.worker import DEV_SCORES_FILE

#: Folder of the search folder holding each trial's Ray Train run, named by trial id.
TRIALS_DIR = "trials"
#: Folder of the search folder holding the best checkpoint (a Hugging Face model folder).
BEST_DIR = "best"

#: How a trial ended (see `trial_verdict`).
FINISHED = "finished"
STOPPED_EARLY = "stopped early"
ERROR = "error"
NOT_STARTED = "not started"


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]
    status: str  # a verdict of `trial_verdict`
    best_rougeL: float | None
    best_val_loss: float | None
    best_step: int | None
    steps: int | None
    best_checkpoint: str | None
    #: Every evaluation round's metrics, from the Train run folder.
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def table_row(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "history"}


def trial_verdict(tune_status: str, steps: int | None, max_steps: int) -> str:
    """How a trial ended, from Tune's status and the last step its Train run reported.

    ERROR when Tune says so; NOT_STARTED before the first report; FINISHED once `max_steps` is
    reached (even if Tune stopped it: Train runs ahead of Tune); STOPPED_EARLY when Tune ended
    it sooner; otherwise Tune's status in lower case (e.g. "running" in an interrupted search).
    """
    if tune_status == "ERROR":
        return ERROR
    if steps is None:
        return NOT_STARTED
    if steps >= max_steps:
        return FINISHED
    return STOPPED_EARLY if tune_status == "TERMINATED" else tune_status.lower()


def trial_record(trial_id: str, params: dict[str, Any], tune_status: str,
                 outcome: TrainOutcome | None, max_steps: int) -> TrialRecord:
    """One trial's record from its Train outcome (None: it never reported)."""
    history = outcome.history if outcome else []
    steps = history[-1].get(STEP) if history else None
    best = outcome.best_metrics if outcome else {}
    return TrialRecord(
        trial_id=trial_id,
        params=params,
        status=trial_verdict(tune_status, steps, max_steps),
        best_rougeL=best.get(ROUGE_L),
        best_val_loss=best.get(VAL_LOSS),
        best_step=best.get(STEP),
        steps=steps,
        best_checkpoint=outcome.best_checkpoint if outcome else None,
        history=history,
    )


def search_uri(search_dir: Path) -> str | None:
    """The URI a search folder mirrors (storage at a URI: `remote_storage`), else None."""
    record = Path(search_dir) / STORAGE_URI_FILE
    return record.read_text().strip() if record.is_file() else None


def trials_root(search_dir: Path) -> str:
    """Where the search's trials keep their Ray Train runs: `<search>/trials`, in the object
    store for a search whose storage is a URI."""
    uri = search_uri(search_dir)
    return join(uri, TRIALS_DIR) if uri else str(Path(search_dir) / TRIALS_DIR)


def collect_trials(search_dir: Path, max_steps: int) -> list[TrialRecord]:
    """Every trial of the search, in the order Tune created them."""
    analysis = ExperimentAnalysis(str(search_dir))
    trials = sorted(analysis.trials, key=lambda trial: creation_index(trial.experiment_tag))
    root = trials_root(search_dir)
    return [trial_record(trial.trial_id, dict(trial.config), trial.status,
                         _train_outcome(join(root, trial.trial_id)), max_steps)
            for trial in trials]


def _train_outcome(train_dir: str) -> TrainOutcome | None:
    filesystem, path = resolve(train_dir)
    if not filesystem.get_file_info(f"{path}/{SNAPSHOT}").is_file:
        # Ray Train writes its record once a run has reported: none, no outcome
        return None
    return read_outcome(ray.train.Result.from_path(train_dir))


def creation_index(experiment_tag: str) -> int:
    """A trial's 1-based creation index, which starts Tune's experiment tag ("3_amid.alpha=…");
    0 for a tag without one."""
    head = str(experiment_tag).split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def best_trial(records: list[TrialRecord]) -> TrialRecord | None:
    """The trial with the highest best ROUGE-L among those with a checkpoint (on a tie, the one
    created first), or None when no trial has one."""
    scored = [r for r in records if r.best_rougeL is not None and r.best_checkpoint]
    return max(scored, key=lambda r: r.best_rougeL) if scored else None


def export_best(record: TrialRecord, search_dir: Path) -> Path:
    """Copy the trial's best checkpoint to `<search_dir>/best`, replacing the one there.

    The copy is built beside it and swapped in (`atomic.atomic_folder`): a crash at any point
    leaves the old complete folder or the new one (after `atomic.recover_folder`, which the
    next export runs first).
    """
    target = search_dir / BEST_DIR
    if is_uri(record.best_checkpoint):  # a search mirrored to object storage
        return download_checkpoint(record.best_checkpoint, target)
    with atomic_folder(target) as staging:
        shutil.copytree(record.best_checkpoint, staging, dirs_exist_ok=True)
    return target


def effective_settings(base: RunConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The AMiD and learning-rate settings a trial ran with (a preset resolved into them)."""
    run = point_config(base.to_dict(), params, source="trial point")
    amid = run.amid
    return {"preset": amid.preset, "alpha": amid.alpha, "lam": amid.lam,
            "divergence": amid.divergence, "order": amid.order, "lr": run.train.lr}


def format_trials_table(base: RunConfig, records: list[TrialRecord]) -> str:
    """One line per trial: its effective settings, best ROUGE-L and dev loss, steps, verdict."""
    header = (f"{'trial':<12} {'method':<6} {'alpha':>7} {'lam':>5} {'div':<3} {'ord':<3} "
              f"{'lr':>8} {ROUGE_L:>7} {VAL_LOSS:>9} {'steps':>5}  status")
    lines = [header, "-" * len(header)]
    for r in records:
        s = effective_settings(base, r.params)
        rouge = f"{r.best_rougeL:.2f}" if r.best_rougeL is not None else "-"
        loss = f"{r.best_val_loss:.4f}" if r.best_val_loss is not None else "-"
        lines.append(
            f"{r.trial_id:<12} {s['preset'] or 'amid':<6} {s['alpha']:>7.3g} {s['lam']:>5.3g} "
            f"{s['divergence']:<3} {s['order']:<3} {s['lr']:>8.2e} {rouge:>7} {loss:>9} "
            f"{r.steps if r.steps is not None else '-':>5}  {r.status}"
        )
    return "\n".join(lines)


def study_from_trials(spec: SearchSpec, records: list[TrialRecord]) -> optuna.Study | None:
    """An Optuna study of the sampled trials with a ROUGE-L, for the history, importance and
    parallel-coordinates plots; None if there is none. Baselines are left out: their values
    (e.g. kd's lam = 0) can lie outside the sampled ranges."""
    distributions = {p.key: optuna_distribution(p) for p in spec.params}
    study = optuna.create_study(direction="maximize")
    for record in records:
        params = {k: v for k, v in record.params.items() if k in distributions}
        if PRESET_KEY in record.params or not params or record.best_rougeL is None:
            continue
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params},
            value=record.best_rougeL,
        ))
    return study if study.trials else None


# --------------------------------------------------------------------------- confidence


def dev_scores(record: TrialRecord) -> list[float] | None:
    """Per-dev-item ROUGE-L of a trial's best checkpoint (None where it was not recorded)."""
    if not record.best_checkpoint:
        return None
    checkpoint = record.best_checkpoint.rstrip("/").rsplit("/", 1)[0]
    try:  # a local folder or a URI alike (pyarrow raises FileNotFoundError for both)
        text = read_bytes(join(checkpoint, DEV_SCORES_FILE))
    except FileNotFoundError:
        return None
    return json.loads(text)[ROUGE_L]


@dataclass(frozen=True)
class Rival:
    """A trial the winner is compared with, and the paired interval of (winner - rival)."""

    role: str
    trial_id: str
    difference: Interval


@dataclass(frozen=True)
class Confidence:
    """How sure the search can be of its best trial: its ROUGE-L interval over dev items, and
    paired comparisons with the runner-up and the best baseline (`amid_ray.selection`)."""

    items: int
    best: Interval
    rivals: tuple[Rival, ...]

    def lines(self, best_id: str) -> list[str]:
        level = f"{LEVEL:.0%}"
        lines = [f"best trial {best_id}: ROUGE-L {self.best} ({level} bootstrap interval over "
                 f"{self.items} dev items)"]
        for rival in self.rivals:
            verdict = ("distinguishable" if rival.difference.excludes_zero
                       else "NOT distinguishable: within the noise of the dev set")
            lines.append(f"  vs {rival.role} {rival.trial_id}: difference {rival.difference}: "
                         f"{verdict}")
        return lines

    def summary(self) -> dict[str, Any]:
        return {"rougeL_interval": [self.best.low, self.best.high], "dev_items": self.items,
                **{f"distinguishable_from_{r.role.replace(' ', '_').replace('-', '_')}":
                   r.difference.excludes_zero for r in self.rivals}}


def selection_confidence(records: list[TrialRecord], best: TrialRecord | None
                         ) -> Confidence | None:
    """The best trial's interval and its paired comparisons, from the per-item scores of each
    trial's best checkpoint (None when the best trial has none)."""
    scores = {r.trial_id: dev_scores(r) for r in records}
    if best is None or not scores[best.trial_id]:
        return None
    mine = scores[best.trial_id]
    comparable = [r for r in records if r is not best and r.best_rougeL is not None
                  and scores[r.trial_id] and len(scores[r.trial_id]) == len(mine)]
    ranked = sorted(comparable, key=lambda r: r.best_rougeL, reverse=True)
    baselines = [r for r in ranked if PRESET_KEY in r.params]
    rivals = []
    for role, pool in (("runner-up", ranked), ("best baseline", baselines)):
        if pool:
            rival = pool[0]
            rivals.append(Rival(role, rival.trial_id,
                                paired_difference(mine, scores[rival.trial_id])))
    return Confidence(len(mine), bootstrap_interval(mine), tuple(rivals))


@dataclass
class SearchOutcome:
    search_dir: Path
    records: list[TrialRecord]
    best: TrialRecord | None
    #: The exported best checkpoint (`<search_dir>/best`), None before it is exported.
    best_dir: Path | None
    best_settings: dict[str, Any] | None
    tracking_uri: str | None
    table: str
    confidence: Confidence | None = None

    def summary(self) -> dict[str, Any]:
        """The search in one JSON-able dict (the last line `amid-ray tune` prints). A search
        stored at a URI is named by it, with `local_copy` the folder its driver worked in."""
        uri = search_uri(self.search_dir)
        where = {"search_dir": str(self.search_dir)} if uri is None else {
            "search_dir": uri, "local_copy": str(self.search_dir)}
        best_dir = None if self.best_dir is None else (
            str(self.best_dir) if uri is None else join(uri, BEST_DIR))
        return {
            "best_checkpoint": best_dir,
            "best_config": self.best_settings,
            "best_trial": self.best.trial_id if self.best else None,
            ROUGE_L: self.best.best_rougeL if self.best else None,
            **(self.confidence.summary() if self.confidence else {}),
            "num_trials": len(self.records),
            "tracking_uri": self.tracking_uri and redact_uri(self.tracking_uri),
            **where,
        }

    def best_details(self) -> dict[str, Any]:
        """The best trial as the search's tracking records it ({} without one)."""
        if self.best is None:
            return {}
        return {"trial_id": self.best.trial_id, "config": self.best.params,
                "settings": self.best_settings, ROUGE_L: self.best.best_rougeL,
                "checkpoint": self.best.best_checkpoint}


def read_results(run: RunConfig, search_dir: Path, tracking_uri: str | None) -> SearchOutcome:
    """The search's results as its folder holds them now (`best_dir`: an exported `best/`)."""
    records = collect_trials(search_dir, run.train.max_steps)
    best = best_trial(records)
    exported = search_dir / BEST_DIR
    confidence = selection_confidence(records, best)
    table = format_trials_table(run, records)
    if confidence is not None:
        table += "\n\n" + "\n".join(confidence.lines(best.trial_id))
    return SearchOutcome(
        search_dir=search_dir,
        records=records,
        best=best,
        best_dir=exported if best is not None and exported.is_dir() else None,
        best_settings=effective_settings(run, best.params) if best else None,
        tracking_uri=tracking_uri,
        table=table,
        confidence=confidence,
    )
