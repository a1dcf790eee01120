"""The MLflow mirror of a sweep: one parent run per sweep, one nested run per trial.

The trial folder is the source of truth (see ``docs/records.md``); MLflow is a dashboard written from it by the
sweep driver after each trial ends. Workers never touch MLflow, so a local sqlite store needs no server. Every run
is found again by a tag (``shiftbench.sweep_hash`` for the parent, ``shiftbench.trial_hash`` for a trial), so
mirroring is idempotent: rerunning a sweep reuses its parent run and leaves trials that are already mirrored as
they are. A trial run is marked complete (tag ``shiftbench.mirrored``) only after everything is logged; a run left
incomplete by a crash is deleted and written afresh, because logging its metrics again would duplicate their
history.

Several drivers may share one store (one ``--out``, or ``MLFLOW_TRACKING_URI``). A sqlite store is created and
checked by ``mlflow_store.ensure_store`` (never half-built, rebuilt if damaged); finding, replacing and writing the
run of one trial (or sweep) happens under a lock file keyed by its hash, so an incomplete run seen while holding
that lock is never one that a live driver on this machine is still writing; and calls that sqlite refuses with
"database is locked" are retried.

MLflow is imported inside the functions that use it: importing it costs about a second.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import re
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from .locks import FileLock
from .mlflow_store import LOCK_DIR, StoreState, ensure_store, sqlite_file
from .records import CHECKPOINT, FAILED, FINAL, SPEC, read_failed, read_final, read_results, read_spec

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

DB_NAME = "mlflow.db"
"""The default store inside a sweep's output folder."""
ARTIFACTS_DIR = "mlartifacts"
"""Where the runs' artifacts go inside the output folder (never the current directory)."""
DEFAULT_EXPERIMENT = "shiftbench"
MAX_ARTIFACT_BYTES = 50 * 2**20
"""Trial files larger than this (e.g. a big ``model.pt``) stay in the trial folder only."""

TAG_SWEEP_HASH = "shiftbench.sweep_hash"
TAG_TRIAL_HASH = "shiftbench.trial_hash"
TAG_MIRRORED = "shiftbench.mirrored"
TAG_STATUS = "shiftbench.status"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
"""The experiment tag MLflow 3's UI reads to open an experiment as model training or as GenAI."""
EXPERIMENT_KIND = "custom_model_development"
"""Its value for model training (the UI's other main value is ``genai_development``)."""
LOCKED_PATIENCE_S = 300.0
"""How long a call refused with "database is locked" is retried before the error is let through."""
DATASET_RACE_TRIES = 3
"""How often a dataset input is logged when another writer keeps inserting the same dataset first."""

_SKIPPED_FILES = {CHECKPOINT}
"""Trial files that are never mirrored: the checkpoint is working state, not a result."""
_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call
_PARAMS_TAGS_PER_BATCH = 100  # likewise for params and tags together
_MAX_KEY = 250
_MAX_TAG_VALUE = 5000  # MLflow allows 8000; stay clear of it
_MAX_DIGEST = 36  # MLflow's dataset digest column holds at most 36 characters
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")


def tracking_uri(out_dir: str | os.PathLike[str]) -> str:
    """The MLflow store for a sweep's output folder.

    Args:
        out_dir: the sweep's output folder.

    Returns:
        ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute out_dir>/mlflow.db``. MLflow 3 no longer accepts
        the plain file store without being told to; sqlite needs no server.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return "sqlite:///" + (Path(out_dir).resolve() / DB_NAME).as_posix()


def ui_command(out_dir: str | os.PathLike[str]) -> str:
    """The shell command that opens the MLflow UI on a sweep's store.

    Args:
        out_dir: the sweep's output folder.

    Returns:
        ``mlflow ui --backend-store-uri <uri>``, the URI quoted for the shell.
    """
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri(out_dir))}"


def quiet_mlflow() -> None:
    """Silence MLflow's chatter in this process: database creation notes and SQLAlchemy deprecation warnings.

    Call after importing mlflow (its import configures its loggers). ``MLFLOW_LOGGING_LEVEL``, if set, wins.
    """
    import warnings

    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # MLflow's sqlalchemy store uses a loader strategy that SQLAlchemy 2.1 deprecates; nothing for us to act on.
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy", module=r"mlflow\.")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys; an empty dict stays a leaf so that it is still shown.

    Args:
        tree: the nested mapping.
        prefix: prepended to every key (used in the recursion).

    Returns:
        ``{"hparams.lr": 0.001, ...}``.
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def param_value(value: Any) -> str:
    """A value as an MLflow param or tag: scalars with ``str``, containers and None as compact JSON.

    Non-ASCII characters stay as they are (``["0°","15°"]``, not ``["0\\u00b0",...]``): the UI shows values as
    plain text.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str, ensure_ascii=False)


def run_name(spec: Mapping[str, Any]) -> str:
    """The readable run name of a trial: ``<method>-<dataset>-te<envs>-h<hparams_seed>-s<seed>``.

    Args:
        spec: the resolved trial spec (``spec.json``'s ``"spec"``).

    Returns:
        e.g. ``irm-colored_digits-te2-h3-s0``; several test environments are joined by ``_`` (``te0_1``).
    """
    envs = "_".join(str(e) for e in spec.get("test_envs") or []) or "none"
    return f"{spec.get('method')}-{spec.get('dataset')}-te{envs}-h{spec.get('hparams_seed')}-s{spec.get('seed')}"


def _key(name: str) -> str:
    """A param, metric or tag key MLflow accepts: unknown characters become ``_``, at most 250 characters."""
    return _BAD_KEY_CHARS.sub("_", name)[:_MAX_KEY]


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marking the cut."""
    if len(text) <= limit:
        return text
    marker = "...[truncated]"
    return text[: limit - len(marker)] + marker


def _max_param_length() -> int:
    """The longest param value the installed MLflow accepts (6000 characters in MLflow 3, 500 in old ones)."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:  # pragma: no cover - older MLflow
        return 500
    return int(MAX_PARAM_VAL_LENGTH)


def _numeric(value: Any) -> float | None:
    """A metric value, or None for anything that is not a number (strings, lists, None)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size`` entries."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_locked(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) is sqlite's "database is locked" / "database table is locked".

    sqlite answers a writer that would deadlock with another one at once, whatever its busy timeout, so MLflow
    lets these through; the whole transaction was rolled back and the call can be made again.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if "database is locked" in text or "database table is locked" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def _lost_dataset_race(error: BaseException) -> bool:
    """Whether ``error`` is MLflow's dataset insert failing on its unique key (another writer inserted it first)."""
    text = str(error)
    return "UNIQUE constraint failed: datasets." in text or ("duplicate key" in text and "datasets" in text)


def _retry(call: Callable[..., Any], *args: Any, patience: float = LOCKED_PATIENCE_S, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, retried with jittered backoff while sqlite says the database is locked."""
    deadline = time.monotonic() + patience
    delay = 0.05
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as e:
            if not _is_locked(e) or time.monotonic() >= deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 2.0)


class _RetryingClient:
    """An ``MlflowClient`` whose every method is retried on "database is locked" (see ``_retry``)."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return _retry(attr, *args, **kwargs)

        return call


def _mtime_ms(path: Path) -> int:
    """The modification time of ``path`` in milliseconds since the epoch, as MLflow counts time."""
    return int(path.stat().st_mtime * 1000)


class Tracker:
    """The MLflow mirror of one sweep's output folder, created once by the sweep driver.

    Creating it makes sure a sqlite store is complete (``mlflow_store.ensure_store``: built safely, or rebuilt if
    damaged) and creates the experiment (get-or-create) before any trial starts: experiments created concurrently
    by several processes send runs to the Default experiment.

    Args:
        out_dir: the sweep's output folder; holds the default sqlite store and the artifacts.
        experiment_name: the MLflow experiment that receives the sweep's runs.
        max_artifact_bytes: trial files larger than this are not copied into MLflow.

    Attributes:
        uri: the tracking URI (see ``tracking_uri``).
        client: the ``MlflowClient`` on that store (its calls retried on "database is locked").
        experiment_id: the experiment's id.
        store: what ``ensure_store`` found and did for a sqlite store (None for a server or another database).
        lock_dir: the lock files of this store's runs: beside a sqlite file, else in ``out_dir``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        experiment_name: str = DEFAULT_EXPERIMENT,
        max_artifact_bytes: int = MAX_ARTIFACT_BYTES,
    ):
        from mlflow import MlflowClient

        quiet_mlflow()

        self.out_dir = Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri(self.out_dir)
        self.max_artifact_bytes = max_artifact_bytes
        db = sqlite_file(self.uri)
        self.store: StoreState | None = ensure_store(db) if db else None
        self.lock_dir = (db.parent if db else self.out_dir) / LOCK_DIR
        self._lock_prefix = db.name if db else "mlflow"
        # The client, not mlflow.set_tracking_uri: no process-wide state for other code to trip over.
        self.client: MlflowClient = _RetryingClient(MlflowClient(tracking_uri=self.uri))  # type: ignore[assignment]
        self.experiment_id = self._experiment(experiment_name)

    def _run_lock(self, key: str) -> FileLock:
        """The lock held while the run tagged with hash ``key`` is found, replaced or written.

        Hashes share 256 lock files by their first two hex digits: a bounded number of files beside a long-lived
        store, at the price of now and then waiting for an unrelated run's write.
        """
        return FileLock(self.lock_dir / f"{self._lock_prefix}.run-{key[:2].lower()}.lock")

    def _experiment(self, name: str) -> str:
        """The id of experiment ``name``, created with its artifacts in ``out_dir`` unless a server stores them."""
        from mlflow.exceptions import MlflowException

        from .errors import UserError

        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            # A tracking server stores artifacts where it is told to; any store this process writes itself (sqlite,
            # another database) would otherwise put them under the current directory. The location is fixed here,
            # once for every sweep that will share the experiment: a sqlite store shared by several sweeps (not the
            # one in this --out) keeps them beside itself, so no sweep's runs land in another sweep's folder.
            location = None
            if not self.uri.startswith(("http:", "https:", "databricks")):
                db = sqlite_file(self.uri)
                home = db.parent if db is not None and db != self.out_dir / DB_NAME else self.out_dir
                location = (home / ARTIFACTS_DIR).as_uri()
            try:
                return self.client.create_experiment(
                    name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
                )
            except MlflowException:
                experiment = self.client.get_experiment_by_name(name)  # another process won the race
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise UserError(
                f"MLflow experiment {name!r} is deleted in {self.uri}; restore it (mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}) or choose another experiment name"
            )
        if TAG_EXPERIMENT_KIND not in experiment.tags:  # made before the tag existed; a kind someone chose stays
            self.client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return experiment.experiment_id

    def _find(self, tag: str, value: str) -> list[Run]:
        """Active runs of this experiment whose ``tag`` equals ``value``, oldest first."""
        from mlflow.entities import ViewType

        quoted = value.replace("'", "\\'")
        return list(
            self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{tag}` = '{quoted}'",
                run_view_type=ViewType.ACTIVE_ONLY,
                order_by=["attributes.start_time ASC"],
            )
        )

    def _log(
        self,
        run_id: str,
        metrics: Sequence[Any] = (),
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Params, tags and metrics in as few ``log_batch`` calls as MLflow's per-call limits allow."""
        from mlflow.entities import Param, RunTag

        limit = _max_param_length()
        entities: list[Any] = [Param(_key(k), _clip(param_value(v), limit)) for k, v in (params or {}).items()]
        entities += [RunTag(k, _clip(str(v), _MAX_TAG_VALUE)) for k, v in (tags or {}).items()]
        for chunk in _chunks(entities, _PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(
                run_id,
                params=[e for e in chunk if isinstance(e, Param)],
                tags=[e for e in chunk if isinstance(e, RunTag)],
                synchronous=True,
            )
        for chunk in _chunks(list(metrics), _METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk, synchronous=True)

    # ------------------------------------------------------------------------------------------------ sweeps

    def start_sweep(self, sweep_hash: str, sweep_spec: Mapping[str, Any]) -> str:
        """The parent run of a sweep, created on the first call and reused (set running again) on reruns.

        Args:
            sweep_hash: the sweep's content hash.
            sweep_spec: the resolved sweep spec; logged as params (flattened) and as ``sweep.json``.

        Returns:
            The parent run's id.
        """
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        with self._run_lock(sweep_hash):  # two drivers of one sweep starting together make one parent, not two
            found = self._find(TAG_SWEEP_HASH, sweep_hash)
            if found:
                run_id = found[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            name = f"sweep-{sweep_hash[:12]}"
            run = self.client.create_run(
                self.experiment_id, tags={TAG_SWEEP_HASH: sweep_hash, MLFLOW_RUN_NAME: name}, run_name=name
            )
            run_id = run.info.run_id
            self._log(run_id, params=flatten(sweep_spec))
            self.client.log_dict(run_id, {"hash": sweep_hash, "spec": dict(sweep_spec)}, "sweep.json")
            return run_id

    def end_sweep(self, parent_run_id: str, summary: Mapping[str, Any], status: str = "FINISHED") -> None:
        """Log a sweep's summary on its parent run and end it.

        Args:
            parent_run_id: from ``start_sweep``.
            summary: numbers become metrics (e.g. ``trials_done``, ``trials_failed``); anything else becomes a
                tag ``shiftbench.summary.<key>``.
            status: the parent run's final status (``FINISHED``, ``FAILED`` or ``KILLED``).
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics, tags = [], {}
        for key, value in flatten(summary).items():
            number = _numeric(value)
            if number is None:
                tags[f"shiftbench.summary.{_key(key)}"] = param_value(value)
            else:
                metrics.append(Metric(_key(key), number, now, 0))
        self._log(parent_run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(parent_run_id, status=status, end_time=now)

    # ------------------------------------------------------------------------------------------------ trials

    def mirror_trial(self, trial_dir: str | os.PathLike[str], parent_run_id: str | None = None) -> str:
        """Mirror one finished trial folder to its MLflow run; idempotent.

        A run already mirrored with the trial's current status is returned as it is (its parent tag is updated if
        ``parent_run_id`` differs). A run left incomplete by a crash, or mirrored with another status (a failed
        trial that has since been rerun), is deleted and written afresh. All of it happens under the trial's run
        lock, which every writer of that trial's run holds while writing: an incomplete run found here belongs to
        no live driver on this machine.

        Args:
            trial_dir: the trial folder, with ``spec.json`` and ``final.json`` or ``failed.json``.
            parent_run_id: the sweep's parent run (``start_sweep``); the trial run is nested under it.

        Returns:
            The trial run's id.

        Raises:
            ValueError: the trial has neither ``final.json`` nor ``failed.json`` (it has not ended).
        """
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        trial = Path(trial_dir)
        if (trial / FINAL).exists():
            end_file, status = trial / FINAL, "done"
        elif (trial / FAILED).exists():
            end_file, status = trial / FAILED, "failed"
        else:
            raise ValueError(f"trial {trial} has not ended: no {FINAL} or {FAILED}")
        meta = read_spec(trial)
        trial_hash = str(meta["hash"])

        with self._run_lock(trial_hash):
            runs = self._find(TAG_TRIAL_HASH, trial_hash)
            keep = next((run for run in runs if run.data.tags.get(TAG_MIRRORED) == status), None)
            for run in runs:  # incomplete (its writer died), outdated, or a duplicate from a driver without locks
                if run is not keep:
                    self.client.delete_run(run.info.run_id)
            if keep is None:
                return self._write_trial(trial, meta, end_file, status, parent_run_id)
            if parent_run_id and keep.data.tags.get(MLFLOW_PARENT_RUN_ID) != parent_run_id:
                self.client.set_tag(keep.info.run_id, MLFLOW_PARENT_RUN_ID, parent_run_id)
            return keep.info.run_id

    def _write_trial(
        self, trial: Path, meta: Mapping[str, Any], end_file: Path, status: str, parent_run_id: str | None
    ) -> str:
        """Create the trial's run and log everything; the ``shiftbench.mirrored`` tag goes last.

        Metric timestamps are the trial's own: the run starts ``max(elapsed)`` before the end marker was written
        and each record is stamped ``start + elapsed``, so MLflow's relative-time axis shows training time.
        """
        from mlflow.entities import Metric
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        spec: Mapping[str, Any] = meta.get("spec", {})
        end = read_final(trial) if status == "done" else read_failed(trial)
        records = read_results(trial)
        end_ms = _mtime_ms(end_file)
        elapsed = [e for e in (_numeric(r.get("elapsed")) for r in records) if e is not None and math.isfinite(e)]
        start_ms = end_ms - int(max(elapsed) * 1000) if elapsed else _mtime_ms(trial / SPEC)

        name = run_name(spec)
        tags = {
            TAG_TRIAL_HASH: str(meta["hash"]),
            TAG_STATUS: status,
            "shiftbench.code_version": str(meta.get("code_version", "")),
            "shiftbench.data_version": str(meta.get("data_version", "")),
            "shiftbench.dataset": str(spec.get("dataset", "")),
            "shiftbench.method": str(spec.get("method", "")),
            "shiftbench.task": str(meta.get("task", "")),
            "shiftbench.env_names": param_value(meta.get("env_names", [])),
            MLFLOW_RUN_NAME: name,
        }
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if status == "done" and end.get("attestation"):  # the envelope itself is among the artifacts
            tags["shiftbench.attestation_sha256"] = str(end["attestation"])
            from .attest.vsa import mlflow_tags  # signer identity; a host's outcome once countersigned

            tags.update(mlflow_tags(trial))
        if status == "failed":
            tags["shiftbench.failure_reason"] = str(end.get("reason", ""))
            tags["shiftbench.failed_step"] = str(end.get("step", ""))

        # One value per (key, step): the final record overrides the history at its step rather than repeating it.
        values: dict[tuple[str, int], tuple[float, int]] = {}
        for record in records:
            self._collect(values, record, start_ms, end_ms)
        if status == "done" and isinstance(end.get("record"), Mapping):
            self._collect(values, end["record"], start_ms, end_ms)
        metrics = [Metric(key, value, ts, step) for (key, step), (value, ts) in values.items()]

        tags = {k: _clip(v, _MAX_TAG_VALUE) for k, v in tags.items()}
        run = self.client.create_run(self.experiment_id, start_time=start_ms, tags=tags, run_name=name)
        run_id = run.info.run_id
        params = flatten(spec)
        params.setdefault("task", meta.get("task", ""))
        self._log(run_id, metrics=metrics, params=params)
        self._log_dataset(run_id, meta)
        self._log_files(run_id, trial)
        self.client.set_tag(run_id, TAG_MIRRORED, status)  # written last: the run is complete
        self.client.set_terminated(run_id, status="FINISHED" if status == "done" else "FAILED", end_time=end_ms)
        return run_id

    @staticmethod
    def _collect(
        values: dict[tuple[str, int], tuple[float, int]], record: Mapping[str, Any], start_ms: int, end_ms: int
    ) -> None:
        """Add a record's numeric entries (except ``step``) to ``values`` at the record's step."""
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        elapsed = _numeric(record.get("elapsed"))
        ts = start_ms + int(elapsed * 1000) if elapsed is not None and math.isfinite(elapsed) else end_ms
        for key, value in flatten(record).items():
            number = _numeric(value)
            if key != "step" and number is not None:
                values[(_key(key), step)] = (number, ts)

    def _log_dataset(self, run_id: str, meta: Mapping[str, Any]) -> None:
        """The trial's dataset as an MLflow input (context ``training``), its data version as the digest.

        MLflow's digest column holds 36 characters, so the digest is the version's first 36; the full version is
        in the source's tags (and the run tag ``shiftbench.data_version``).
        """
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        spec = meta.get("spec", {})
        version = str(meta.get("data_version") or "unknown")
        source = CodeDatasetSource(
            tags={
                "shiftbench.dataset": str(spec.get("dataset", "")),
                "shiftbench.data_version": version,
                "shiftbench.dataset_options": param_value(spec.get("dataset_options", {})),
                "shiftbench.env_names": param_value(meta.get("env_names", [])),
            }
        )
        dataset = MetaDataset(source, name=str(spec.get("dataset", "dataset")), digest=version[:_MAX_DIGEST])
        entity = Dataset(**dataset.to_dict())
        inputs = [DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])]
        for attempt in range(DATASET_RACE_TRIES):
            try:
                self.client.log_inputs(run_id, inputs)
                return
            except Exception as e:
                # MLflow looks the dataset up, then inserts it: two drivers logging the same dataset into one
                # experiment at once can both miss it, and the later insert fails on the unique key. The row now
                # exists, so the next try finds it and only links it to this run.
                if not _lost_dataset_race(e) or attempt == DATASET_RACE_TRIES - 1:
                    raise

    def _log_files(self, run_id: str, trial: Path) -> None:
        """Copy the trial's files (spec, records, end marker, predictions, model, ...) as the run's artifacts."""
        for path in sorted(trial.rglob("*")):
            rel = path.relative_to(trial)
            if (
                not path.is_file()
                or path.name in _SKIPPED_FILES
                or any(part.startswith((".", "tmp")) or ".tmp" in part for part in rel.parts)
                or rel.parts[0] == ARTIFACTS_DIR or rel.name.startswith(DB_NAME)  # `train`'s store lives here
                or path.stat().st_size > self.max_artifact_bytes
            ):
                continue
            parent = rel.parent.as_posix()
            self.client.log_artifact(run_id, str(path), artifact_path=None if parent == "." else parent)
