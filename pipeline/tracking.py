"""MLflow tracking from rank 0 only.

Only rank 0 talks to MLflow, so tracking load does not grow with the number of processes and
ranks never race to create experiments. The run id is kept in checkpoints and exports, so a
resumed run and the evaluation of its model land in the same MLflow run.

Metrics never cost the training loop a round trip: `log_metrics` appends to a buffer that a
background thread sends with `log_batch` every `flush_every` seconds. If the tracking server
goes away, the thread warns once, keeps the metrics and sends them when the server is back. At
the end, whatever could not be sent within `close_timeout` is written to a JSONL file that
`arpipe mlflow-import FILE` sends later. Training never fails or hangs because of tracking
after the run was created.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

from pipeline import ArpipeError
from pipeline.log import LOG

DEFAULT_STORE = "mlruns"  # sqlite:///mlruns/mlflow.db and mlruns/artifacts, under the working directory
BATCH = 1000  # MLflow's limit of metrics per log_batch


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
                 flush_every: float = 10.0, close_timeout: float = 30.0):
        self.active, self.run_id, self.uri = active, run_id, resolve_uri(uri)
        self.fallback, self.flush_every, self.close_timeout = fallback, flush_every, close_timeout
        self.pending: list = []  # metrics not yet sent
        self.lock = threading.Lock()  # guards `pending` (held briefly: the training loop takes it)
        self.client_lock = threading.Lock()  # one client call at a time (sender thread, main thread)
        self.down = False  # the last call failed; we warned once
        self.experiment_id = None
        if not active:
            return
        # our sender retries; the client's own retries with backoff would only delay that
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)
        try:
            if run_id:
                self.experiment_id = self.client.get_run(run_id).info.experiment_id
                self.client.update_run(run_id, status="RUNNING")
            else:
                self.experiment_id = self._experiment(experiment)
                self.run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        except Exception as e:
            raise ArpipeError(f"MLflow at {self.uri} is unreachable ({type(e).__name__}); start it, or unset "
                              f"MLFLOW_TRACKING_URI / tracking.uri for the embedded sqlite store") from None
        self.stop = threading.Event()
        self.sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self.sender.start()

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):  # artifacts beside the db, not under whatever cwd
            location = Path(self.uri[len("sqlite:///"):]).parent.joinpath("artifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    @property
    def url(self) -> str:
        base = self.uri if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        """A client call; True if it worked. The first failure of an outage warns once."""
        if not self.active:
            return False
        try:
            with self.client_lock:
                fn(*args, **kwargs)
        except Exception as e:  # tracking must never kill training
            if not self.down:
                LOG.warning("MLflow %s failed (%s: %s); training goes on, metrics are kept and resent",
                            what, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
            self.down = True
            return False
        if self.down:
            LOG.warning("MLflow is reachable again")
            self.down = False
        return True

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._call("log params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._call("set tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Buffered: returns at once, the sender thread delivers."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self.lock:
            self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]

    def _send_some(self) -> bool:
        """Send up to one batch of pending metrics; False if the server did not take them."""
        with self.lock:
            batch = self.pending[:BATCH]
        if not batch:
            return True
        if not self._call("log metrics", self.client.log_batch, self.run_id, metrics=batch):
            return False
        with self.lock:
            del self.pending[: len(batch)]
        return True

    def _send_loop(self):
        while not self.stop.wait(self.flush_every):
            while self.pending and self._send_some():
                pass

    def flush(self, timeout: float = 10.0) -> bool:
        """Send everything now (before a checkpoint, at the end); True if nothing is left. During
        an outage it returns at once (the sender keeps trying) unless this is the final flush."""
        if not self.active or (self.down and not self.stop.is_set()):
            return not self.pending
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            if not self._send_some():
                time.sleep(0.5)
        return not self.pending

    def last_step(self, key: str) -> int:
        """The highest step at which `key` was logged (0 if none, or MLflow cannot say)."""
        if not self.active:
            return 0
        try:
            with self.client_lock:
                return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
        except Exception:
            return 0

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._call("log text", self.client.log_text, self.run_id, text, name)

    def close(self, status: str = "FINISHED") -> None:
        """Send what is left (waiting up to close_timeout for a server that is down), else write
        it to the fallback file, then mark the run finished."""
        if not self.active:
            return
        self.stop.set()
        self.sender.join()
        if not self.flush(self.close_timeout) and self.fallback:
            with open(self.fallback, "a") as f:
                for m in self.pending:
                    f.write(json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value,
                                        "timestamp": m.timestamp, "step": m.step}) + "\n")
            LOG.warning("MLflow unreachable: %d metrics written to %s; send them later with "
                        "`arpipe mlflow-import %s --tracking-uri %s`", len(self.pending), self.fallback,
                        self.fallback, self.uri)
        self._call("end run", self.client.set_terminated, self.run_id, status)


def import_metrics(path: str | Path, uri: str | None) -> int:
    """`arpipe mlflow-import`: send metrics a run could not deliver (its fallback JSONL)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_uri(uri))
    by_run: dict[str, list] = {}
    for line in Path(path).read_text().splitlines():
        m = json.loads(line)
        by_run.setdefault(m["run_id"], []).append(Metric(m["key"], m["value"], m["timestamp"], m["step"]))
    for run_id, metrics in by_run.items():
        for i in range(0, len(metrics), BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + BATCH])
    return sum(map(len, by_run.values()))


def serve(store: Path, host: str, port: int, workers: int = 1) -> None:
    """`arpipe mlflow-server`: an MLflow tracking server with a sqlite backend and local artifacts.

    Loopback only unless --host says otherwise. One worker and no job runner: the server then
    starts in ~20 s and ~0.5 GB instead of ~50 s and ~2.4 GB on a small machine."""
    store.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{(store / 'mlflow.db').absolute()}",
               "--artifacts-destination", str((store / "artifacts").absolute()),
               "--host", host, "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    LOG.info("MLflow server on http://%s:%d (store %s); clients: export MLFLOW_TRACKING_URI=http://%s:%d",
             host, port, store, host, port)
    os.execvpe(command[0], command, env)


