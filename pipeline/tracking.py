"""MLflow tracking from rank 0 only.

Only rank 0 talks to MLflow, so tracking load does not grow with the number of processes and
ranks never race to create experiments. The run id is kept in checkpoints and exports, so a
resumed run and the evaluation of its model land in the same MLflow run.

Metrics are buffered and sent with `log_batch` (one round trip per flush, not per metric). A
tracking failure warns once and never stops training: unsent metrics stay buffered and go out
at the next successful flush; whatever is still unsent at the end is written to a JSONL file
next to the run's outputs.
"""

import json
import os
import time
from pathlib import Path

from pipeline.log import LOG

DEFAULT_STORE = "mlruns"  # sqlite:///mlruns/mlflow.db and mlruns/artifacts, under the working directory


def resolve_uri(uri: str | None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else an embedded sqlite file."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path(DEFAULT_STORE, 'mlflow.db').absolute()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).absolute()}"  # independent of later cwd changes
    return uri


def ui_command(uri: str) -> str:
    """The command that shows this store in the MLflow UI."""
    if uri.startswith("http"):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker:
    """One MLflow run. With `active=False` (ranks other than 0) every method does nothing."""

    def __init__(self, uri: str | None, experiment: str, *, run_id: str | None = None,
                 run_name: str | None = None, active: bool = True, fallback: Path | None = None,
                 flush_every: float = 10.0):
        self.active, self.run_id, self.uri = active, run_id, resolve_uri(uri)
        self.fallback, self.flush_every = fallback, flush_every
        self.buffer: list = []
        self.last_flush = time.monotonic()
        self.warned = False
        self.experiment_id = None
        if not active:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # an outage must not stall a step for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)
        if run_id:
            self.experiment_id = self.client.get_run(run_id).info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = None
                if self.uri.startswith("sqlite:"):  # artifacts beside the db, not under whatever cwd
                    location = Path(self.uri[len("sqlite:///"):]).parent.joinpath("artifacts").as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = exp.experiment_id
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id

    @property
    def url(self) -> str:
        base = self.uri if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def _guard(self, what: str, fn, *args, **kwargs) -> bool:
        """Call an MLflow client method; True if it worked. Failures warn once."""
        if not self.active:
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as e:  # tracking must never kill training
            if not self.warned:
                LOG.warning("MLflow %s failed (%s: %s); training goes on, metrics are kept and retried",
                            what, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
                self.warned = True
            return False

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                 for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._guard("log params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._guard("set tags", self.client.log_batch, self.run_id,
                    tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if time.monotonic() - self.last_flush >= self.flush_every:
            self.flush()

    def flush(self) -> bool:
        if not self.active or not self.buffer:
            return True
        self.last_flush = time.monotonic()
        was_down = self.warned
        while self.buffer:
            if not self._guard("log metrics", self.client.log_batch, self.run_id, metrics=self.buffer[:1000]):
                return False
            del self.buffer[:1000]
        if was_down:
            LOG.info("MLflow is reachable again; buffered metrics were sent")
            self.warned = False
        return True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._guard("log text", self.client.log_text, self.run_id, text, name)

    def close(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        if not self.flush() and self.fallback:
            with open(self.fallback, "a") as f:
                for m in self.buffer:
                    f.write(json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value,
                                        "timestamp": m.timestamp, "step": m.step}) + "\n")
            LOG.warning("MLflow unreachable: %d metrics written to %s", len(self.buffer), self.fallback)
        self._guard("end run", self.client.set_terminated, self.run_id, status)
