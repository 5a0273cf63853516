"""MLflow tracking: the run from rank 0, system metrics from one process per node.

Rank 0 creates and logs the run, so tracking load does not grow with the number of processes
and ranks never race to create experiments; local rank 0 of each other node only adds its
node's system metrics to that run. The run id is kept in checkpoints and exports, so a resumed
run and the evaluation of its model land in the same MLflow run.

Metrics never cost the training loop a round trip: `log_metrics` appends to a buffer that a
background thread sends with `log_batch` every `flush_every` seconds. If the tracking server
goes away, the thread warns once, keeps the metrics and sends them when the server is back. At
the end, whatever could not be sent within `close_timeout` is written to a JSONL file that
`arpipe mlflow-import FILE` sends later. Training never fails or hangs because of tracking
after the run was created.

What the MLflow UI shows of a run comes from MLflow's own conventions, so it reads like any other
MLflow project: a name that says what the run is (`run_name`), the standard source, user and git
tags (`source_tags`: the runs table's Source and User columns), the shard set as the run's input
datasets (`log_shards`: the Dataset column), the export as an MLflow 3 logged model, registered on
request (`log_model`: the Models tab and the model registry) and every node's CPU, memory, disk,
network and GPUs (`SystemMetrics`: the System metrics tab).
"""

import getpass
import json
import os
import re
import shlex
import socket
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


def run_name(label: str, model_name: str, parameters: int, modality: str) -> str:
    """'demo · gpt 931K · text': the config (or what else names the run), the model, its size, the modality."""
    size = str(parameters)
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= scale:
            size = f"{parameters / scale:.3g}{unit}"
            break
    return f"{label} · {model_name} {size} · {modality}"


def command_line() -> str:
    """This process's command as a user would type it, e.g. `python -m pipeline.train --config X`."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = f"python -m {spec.name.removesuffix('.__main__')}" if spec else Path(sys.argv[0]).name
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # added by the deepspeed launcher
    return " ".join([head, *map(shlex.quote, args)])


def source_tags(source: str) -> dict:
    """MLflow's standard tags for a new run: the runs table shows `source` (its last path part) as
    Source, the user as User, and links the git commit. The full command goes in `command`."""
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import (MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL,
                                          MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER)

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    code = str(Path(__file__).parent)  # the code that runs, wherever the working directory is
    git = {MLFLOW_GIT_COMMIT: git_utils.get_git_commit(code), MLFLOW_GIT_BRANCH: git_utils.get_git_branch(code),
           MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(code)}
    return {MLFLOW_SOURCE_NAME: source, MLFLOW_SOURCE_TYPE: "JOB" if "SLURM_JOB_ID" in os.environ else "LOCAL",
            MLFLOW_USER: user, "command": command_line(), **{k: v for k, v in git.items() if v}}


def node_id() -> str:
    """'node1-gpu007': this node's index in the job (Slurm, torchrun or the deepspeed launcher; 0
    for one node) and its name, so nodes stay apart even when they share a host name."""
    env = os.environ
    index = next((env[k] for k in ("SLURM_NODEID", "GROUP_RANK", "CROSS_RANK") if k in env), "0")
    host = env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    return f"node{index}-{host}"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker:
    """One MLflow run. With `active=False` (ranks other than 0) every method does nothing.

    `tags` are set on a run this creates (e.g. `source_tags`). With `attach=True` it logs into a
    run another process owns (system metrics of the other nodes): it neither resumes nor ends it."""

    def __init__(self, uri: str | None, experiment: str | None, *, run_id: str | None = None,
                 run_name: str | None = None, tags: dict | None = None, active: bool = True,
                 attach: bool = False, fallback: Path | None = None, flush_every: float = 10.0,
                 close_timeout: float = 30.0):
        self.active, self.run_id, self.run_name, self.uri = active, run_id, run_name, resolve_uri(uri)
        self.attach, self.tags = attach, tags or {}
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
                info = self.client.get_run(run_id).info
                if not attach:
                    self.client.update_run(run_id, status="RUNNING")
            else:
                info = self.client.create_run(self._experiment(experiment), run_name=run_name, tags=tags).info
        except Exception as e:
            if attach:  # the owner created the run: this process's extras are not worth failing for
                LOG.warning("MLflow at %s is unreachable (%s): this process logs nothing", self.uri, type(e).__name__)
                self.active = False
                return
            raise ArpipeError(f"MLflow at {self.uri} is unreachable ({type(e).__name__}); start it, or unset "
                              f"MLFLOW_TRACKING_URI / tracking.uri for the embedded sqlite store") from None
        self.run_id, self.run_name, self.experiment_id = info.run_id, info.run_name, info.experiment_id
        self.started = info.start_time / 1000  # seconds since the epoch
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

    def log_shards(self, shards, contexts: dict[str, str]) -> None:
        """The shard set as the run's input datasets, one per split: `{"train": "training"}` logs
        `PARENT/NAME/train` with the manifest's digest, the shard directory as source and the
        split's counts (items, tokens, bytes, chunks, shards) as profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        if not self.active:
            return
        digest = shards.manifest_sha256[:12]
        parent_and_name = "/".join(shards.dir.rstrip("/").split("/")[-2:])  # a path or a URL (s3://…)
        source_type = shards.dir.split("://")[0] if "://" in shards.dir else "local"
        inputs = [DatasetInput(Dataset(name=f"{parent_and_name}/{split}", digest=digest,
                                       source_type=source_type, source=json.dumps({"uri": shards.dir}),
                                       profile=json.dumps(shards.manifest["splits"].get(split, {}))),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
                  for split, context in contexts.items()]
        self._call("log datasets", self.client.log_inputs, self.run_id, datasets=inputs)

    def log_model(self, export: Path, name: str, step: int, register: str | None = None) -> str | None:
        """The export directory as an MLflow 3 logged model of this run (its files, unchanged, are
        the model's artifacts: `mlflow artifacts download --artifact-uri models:/ID` gives back a
        directory `arpipe eval`/`sample` load), registered as a new version of `register` if given.
        The model carries the run's `tags` (user, source, git). Returns the model id, or None if
        MLflow could not take it (warned, training goes on)."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        if not self.active:
            return None
        try:
            with self.client_lock:
                model = self.client.create_logged_model(self.experiment_id, name=re.sub(r"[/:.%\"']", "-", name),
                                                        source_run_id=self.run_id, tags=self.tags, model_type="arpipe")
                self.client.log_model_artifacts(model.model_id, str(export))
                self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
                self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
                if register:  # MLflow's own way: creates the name if new, links version and logged model
                    import mlflow

                    mlflow.set_tracking_uri(self.uri)  # the registry resolves models:/ID with the global URI
                    version = mlflow.register_model(f"models:/{model.model_id}", register, await_registration_for=0)
                    LOG.info("registered %s as version %s of model %r", export, version.version, register)
        except Exception as e:  # a model that did not reach MLflow must not fail a finished training
            LOG.warning("MLflow could not log the model %s (%s: %s); it is in %s", name, type(e).__name__,
                        (str(e).splitlines() or [""])[0][:200], export)
            return None
        return model.model_id

    def close(self, status: str = "FINISHED") -> None:
        """Send what is left (waiting up to close_timeout for a server that is down), else write
        it to the fallback file, then mark the run finished (unless attached to another's run)."""
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
        if not self.attach:
            self._call("end run", self.client.set_terminated, self.run_id, status)


class SystemMetrics:
    """This node's CPU, memory, disk, network and (with NVML) GPU use, sampled by MLflow's own
    monitors every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10) and logged as
    `system/<node_id>/…` at step = seconds since the run started. One per node, from its local
    rank 0: rank 0 passes its Tracker; another node's local rank 0 passes `run_id` and gets a
    light client of its own (attached; nothing but these metrics, buffered like rank 0's)."""

    def __init__(self, tracker: Tracker, run_id: str | None = None):
        from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        node = node_id()
        self.owns_tracker = not tracker.active
        if self.owns_tracker:  # metrics this node cannot send go to a file of its own, for mlflow-import
            fallback = tracker.fallback and tracker.fallback.with_stem(f"{tracker.fallback.stem}-{node}")
            tracker = Tracker(tracker.uri, None, run_id=run_id, attach=True, fallback=fallback,
                              flush_every=tracker.flush_every, close_timeout=tracker.close_timeout)
        self.tracker, self.prefix, self.thread = tracker, f"system/{node}/", None
        if not tracker.active:
            return
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            self.monitors.append(GPUMonitor())
        except Exception:  # no nvidia-ml-py, no driver or no GPU
            pass
        self.interval = MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)
        self.thread.start()

    def _sample(self) -> dict:
        metrics = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        return metrics

    def _log_sample(self) -> bool:
        try:
            metrics = self._sample()
        except Exception as e:  # a sensor that fails must not take training with it
            LOG.warning("system metrics stopped (%s: %s)", type(e).__name__, e)
            return False
        self.tracker.log_metrics({self.prefix + k: v for k, v in metrics.items()},
                                 round(time.time() - self.tracker.started))
        return True

    def _loop(self):
        self._sample()  # psutil measures CPU use since this thread's previous call: the first is void
        while True:
            stopping = self.stop.wait(self.interval)
            if not self._log_sample() or stopping:  # a last sample at close: even a short run has one
                return

    def close(self) -> None:
        if self.thread:
            self.stop.set()
            self.thread.join()
        if self.owns_tracker:
            self.tracker.close()


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


