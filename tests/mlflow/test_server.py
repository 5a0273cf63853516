"""A real `mlflow server` on loopback (started here, through `arpipe mlflow-server`): a training
run on two nodes and an evaluation land in it as MLflow users know runs (names, source, user,
git, datasets, logged and registered model, system metrics per node), the UI shows them in
headless Chromium, and killing the server mid-training loses nothing."""

import getpass
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from pipeline.train.dist import free_port
from tests.conftest import ENV, REPO, read_metrics

pytestmark = pytest.mark.slow
SCREENSHOTS = REPO / "runs" / "screenshots"
REGISTERED = "server-test-model"  # the tracked run's --register


class MlflowServer:
    def __init__(self, store):
        self.store, self.port = store, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout=180):
        self.log = open(self.store.parent / f"server-{self.port}.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "mlflow-server", "--store", str(self.store),
                                      "--port", str(self.port)], env=ENV, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.store.parent / f"server-{self.port}.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not answer in {timeout} s")

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def sh(command: list, uri: str) -> None:
    result = subprocess.run(command, env={**ENV, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow") / "store")
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def tracked_run(server, tmp_path_factory, text_shards):
    """A training run on two "nodes" (two torchrun agents on this host, one process each) that
    registers its model, then `arpipe eval --experiment`, both logged to the server."""
    tmp = tmp_path_factory.mktemp("tracked")
    env = {**ENV, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    config = tmp / "tiny-text.yaml"
    config.write_text(f"""
out_dir: {tmp / 'run'}
data: {{path: {text_shards}, block_len: 32, batch_size: 4}}
model: {{name: gpt, n_layer: 2, n_head: 2, d_model: 32}}
train: {{steps: 20, log_every: 5, ckpt_every: 10, eval_every: 10, zero_stage: 2}}
tracking: {{experiment: server-test}}
""")
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               "-m", "pipeline.train", "--config", str(config), "--register", REGISTERED],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in range(2)]
    for node in nodes:
        output = node.communicate(timeout=600)[0]
        assert node.returncode == 0, output[-5000:]
    sh([sys.executable, "-m", "pipeline", "eval", "--model", tmp / "run", "--data", text_shards, "--samples", "2",
        "--prompts", "2", "--experiment", "server-eval", "--out", tmp / "eval.json"], server.uri)
    export = tmp / "run" / "export"
    return {"export": export, "run_id": json.loads((export / "model.json").read_text())["run_id"],
            "eval": json.loads((tmp / "eval.json").read_text())}


def test_server_receives_params_metrics_tags_and_artifacts(server, tracked_run):
    client = MlflowClient(server.uri)
    run = client.get_run(tracked_run["run_id"])
    params, tags = run.data.params, run.data.tags
    assert params["model.name"] == "gpt" and params["data.block_len"] == "32" and params["train.zero_stage"] == "2"
    assert tags["world_size"] == "2" and json.loads(tags["deepspeed_config"])["zero_optimization"]["stage"] == 2
    assert len(tags["manifest_sha256"]) == 64
    loss = client.get_metric_history(run.info.run_id, "train/loss_nats")
    assert [m.step for m in loss] == [5, 10, 15, 20]
    bits = client.get_metric_history(run.info.run_id, "train/loss_bits")
    assert bits[-1].value == pytest.approx(loss[-1].value / 0.6931471805599453)
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 4, key
    val = client.get_metric_history(run.info.run_id, "val/bits_per_byte")
    assert sorted(m.step for m in val) == [10, 20]  # periodic and final evaluation (`arpipe eval` went elsewhere)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "deepspeed.json", "manifest.json"} <= artifacts
    assert run.info.status == "FINISHED"


def test_run_has_a_name_source_user_git_and_datasets(server, tracked_run, text_shards):
    """What fills the runs table's Run Name, Source, User and Dataset columns."""
    from pipeline.export import load_export
    from pipeline.tracking import run_name

    run = MlflowClient(server.uri).get_run(tracked_run["run_id"])
    model, _, _ = load_export(tracked_run["export"])
    size = sum(p.numel() for p in model.parameters())
    assert run.info.run_name == run_name("tiny-text", "gpt", size, "text") == f"tiny-text · gpt {size / 1e3:.3g}K · text"
    tags = run.data.tags
    assert tags["mlflow.source.name"].endswith("tiny-text.yaml") and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] == getpass.getuser()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert "-m pipeline.train --config" in tags["command"] and f"--register {REGISTERED}" in tags["command"]

    manifest = text_shards / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    prefix = f"{text_shards.parent.name}/{text_shards.name}"
    assert set(inputs) == {f"{prefix}/train", f"{prefix}/val"}
    for split, context in (("train", "training"), ("val", "validation")):
        dataset = inputs[f"{prefix}/{split}"]
        assert {t.key: t.value for t in dataset.tags} == {"mlflow.data.context": context}
        assert dataset.dataset.digest == digest and json.loads(dataset.dataset.source) == {"uri": str(text_shards)}
        profile = json.loads(dataset.dataset.profile)
        assert profile == json.loads(manifest.read_text())["splits"][split] and profile["tokens"] > 0


def test_every_node_logs_system_metrics(server, tracked_run):
    """Rank 0 and the other node's local rank 0 (a client of its own) both log CPU and memory."""
    client = MlflowClient(server.uri)
    keys = [k for k in client.get_run(tracked_run["run_id"]).data.metrics if k.startswith("system/")]
    nodes = sorted({k.split("/")[1] for k in keys})
    assert [n.split("-")[0] for n in nodes] == ["node0", "node1"], keys
    for node in nodes:
        for metric in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            history = client.get_metric_history(tracked_run["run_id"], f"system/{node}/{metric}")
            assert history and all(m.value > 0 for m in history if metric.startswith("system_memory")), metric


def test_export_is_the_runs_logged_and_registered_model(server, tracked_run, tmp_path):
    """The export is an MLflow 3 logged model of the run, version 1 of --register's name, and what
    `mlflow artifacts download` gives back loads in arpipe with the same exact likelihood."""
    import torch

    from pipeline.export import load_export

    client = MlflowClient(server.uri)
    run = client.get_run(tracked_run["run_id"])
    models = client.search_logged_models([run.info.experiment_id])
    assert [(m.name, m.source_run_id, str(m.status)) for m in models] == \
        [("tiny-text-gpt", run.info.run_id, "READY")]
    assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]
    assert models[0].tags["mlflow.user"] == getpass.getuser()
    [version] = client.search_model_versions(f"name='{REGISTERED}'")
    assert (str(version.version), version.run_id) == ("1", run.info.run_id)

    out = tmp_path / "downloaded"
    sh([sys.executable, "-m", "mlflow", "artifacts", "download", "--artifact-uri", f"models:/{REGISTERED}/1",
        "--dst-path", out], server.uri)
    export = tracked_run["export"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in export.iterdir())
    for path in export.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    original, _, _ = load_export(export)
    loaded, _, meta = load_export(out)
    x = torch.randint(0, meta["vocab_size"], (3, *meta["shape"]))
    assert torch.equal(loaded.log_prob(x), original.log_prob(x))


def test_eval_with_experiment_logs_a_named_run_there(server, tracked_run):
    client = MlflowClient(server.uri)
    result = tracked_run["eval"]
    run = client.get_run(result["run_id"])
    training = client.get_run(tracked_run["run_id"])
    assert run.info.run_id != training.info.run_id
    assert client.get_experiment(run.info.experiment_id).name == "server-eval"
    assert run.info.run_name == f"eval val · {training.info.run_name}"
    assert run.data.tags["mlflow.source.name"] == "arpipe eval" and run.data.tags["mlflow.user"] == getpass.getuser()
    assert [{t.key: t.value for t in i.tags}["mlflow.data.context"] for i in run.inputs.dataset_inputs] == ["evaluation"]
    assert run.data.metrics["val/bits_per_byte"] == pytest.approx(result["bits_per_byte"])
    samples = client.list_artifacts(run.info.run_id, "samples/val-step00000020")
    assert {a.path.rsplit("/", 1)[-1] for a in samples} == {"samples.txt", "completions.txt"}


def test_ui_in_a_real_browser(server, tracked_run):
    """The pages a user opens, with screenshots in runs/screenshots/: the runs table with filled
    Dataset, Source and User columns, metrics, system metrics of both nodes, the logged model in
    the run and the experiment, the registered model, and the eval run's samples."""
    chromium = shutil.which("chromium")
    if not chromium:  # CI installs it and sets ARPIPE_REQUIRE_BROWSER=1
        (pytest.fail if os.environ.get("ARPIPE_REQUIRE_BROWSER") == "1" else pytest.skip)(
            "Debian's chromium is not installed (apt-get install chromium)")
    import playwright.sync_api as playwright

    client = MlflowClient(server.uri)
    run = client.get_run(tracked_run["run_id"])
    eval_run = client.get_run(tracked_run["eval"]["run_id"])
    experiment = f"{server.uri}/#/experiments/{run.info.experiment_id}"
    mode = "?workflowType=machine_learning"  # "Model training" mode, not the GenAI landing page
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.set_default_timeout(120_000)  # a loaded 2-core machine renders slowly; nothing here waits forever
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def wait_for(*texts: str):  # visible ones: the SPA keeps hidden copies of earlier pages' charts
            for text in texts:
                page.get_by_text(text).filter(visible=True).first.wait_for()

        def screenshot(name: str) -> str:
            page.screenshot(path=str(SCREENSHOTS / name), animations="disabled")  # the pages scroll inside a panel
            return page.inner_text("body")

        def visit(url: str, *texts: str, shot: str | None) -> str:
            """Open url, wait until every text is on the page, close the assistant, show the last
            text (pages scroll inside a panel, so a full-page screenshot does not), screenshot."""
            page.goto(url, wait_until="domcontentloaded")
            wait_for(*texts)
            try:  # the assistant side panel covers a third of the page
                page.get_by_role("button", name="Close").last.click(timeout=3_000)
            except playwright.Error:
                pass
            page.get_by_text(texts[-1]).filter(visible=True).first.evaluate("e => e.scrollIntoView()")  # no wait for stable charts
            return screenshot(shot) if shot else page.inner_text("body")

        visit(f"{experiment}/runs{mode}", run.info.run_name, shot=None)
        page.get_by_role("button", name="Columns").click()
        page.get_by_text("User", exact=True).last.click()  # the User column is hidden by default
        page.keyboard.press("Escape")
        wait_for(getpass.getuser())
        table = screenshot("mlflow-runs.png")
        row = table[table.index(run.info.run_name):]
        for text in ("/train", "Training", "tiny-text.yaml", getpass.getuser(), REGISTERED):
            assert text in row, (text, row[:500])

        visit(f"{experiment}/runs/{run.info.run_id}/model-metrics{mode}", "(train/loss_nats)", "(train/loss_bits)",
              "bits_per_byte", shot="mlflow-run-metrics.png")  # charts below the fold render when scrolled to
        visit(f"{experiment}/runs/{run.info.run_id}/system-metrics{mode}", "system/node1-", "system/node0-", shot=None)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 6")  # node0's charts drawn
        system = screenshot("mlflow-run-system-metrics.png")
        assert system.count("cpu_utilization_percentage") >= 2 and system.count("system_memory_usage_megabytes") >= 2
        overview = visit(f"{experiment}/runs/{run.info.run_id}{mode}", "tiny-text-gpt", "Logged models",
                         shot="mlflow-run-overview.png")
        for text in ("/train", "Training", "tiny-text.yaml", getpass.getuser(), REGISTERED):
            assert text in overview, text
        visit(f"{experiment}/models{mode}", "tiny-text-gpt", "Ready", run.info.run_name,
              shot="mlflow-experiment-models.png")
        visit(f"{server.uri}/#/models/{REGISTERED}", "Version 1", shot="mlflow-registered-model.png")

        visit(f"{server.uri}/#/experiments/{eval_run.info.experiment_id}/runs/{eval_run.info.run_id}/artifacts{mode}",
              "samples", shot=None)
        page.get_by_text("samples", exact=True).first.click()
        page.get_by_text("val-step00000020", exact=True).first.click()
        page.get_by_text("samples.txt", exact=True).first.click()
        page.get_by_text("=== samples 0 ===").first.wait_for()  # the file's content is shown
        screenshot("mlflow-run-samples.png")
        browser.close()
    assert not errors, errors


def test_server_outage_during_training_loses_no_metrics(tmp_path, train_config):
    srv = MlflowServer(tmp_path / "store")
    srv.start()
    run = tmp_path / "run"
    steps = 1500
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--config", str(train_config), "tracking.uri=null",
                             f"train.steps={steps}", "train.log_every=10", "train.ckpt_every=500",
                             "tracking.flush_every=0.5", "tracking.close_timeout=180", f"out_dir={run}"],
                            env={**ENV, "MLFLOW_TRACKING_URI": srv.uri}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        while len(read_metrics(run)) < 100:
            assert proc.poll() is None
            time.sleep(0.1)
        srv.kill()
        killed_at = len(read_metrics(run))
        time.sleep(3)
        assert len(read_metrics(run)) > killed_at + 20, "training must go on while the server is down"
        srv.start()
        back_at = len(read_metrics(run))
        output = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.kill()
    assert proc.returncode == 0, output[-3000:]
    assert output.count("MLflow log metrics failed") == 1  # warned once
    assert "MLflow is reachable again" in output
    srv.start()
    client = MlflowClient(srv.uri)
    run_id = json.loads((run / "export" / "model.json").read_text())["run_id"]
    history = client.get_metric_history(run_id, "train/loss_nats")
    assert sorted({m.step for m in history}) == list(range(10, steps + 1, 10))
    assert any(killed_at < m.step <= back_at for m in history)  # logged while the server was down
    srv.kill()
