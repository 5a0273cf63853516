"""A real `mlflow server` on loopback (started here, through `arpipe mlflow-server`): a training
run and its evaluation land in it, the UI shows them in headless Chromium, and killing the
server mid-training loses nothing."""

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
from tests.conftest import ENV, REPO, arpipe, deepspeed_command, read_metrics

pytestmark = pytest.mark.slow
SCREENSHOTS = REPO / "runs" / "screenshots"


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow") / "store")
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def tracked_run(server, tmp_path_factory, text_shards):
    """A 2-process DeepSpeed training run and its evaluation, logged to the server."""
    tmp = tmp_path_factory.mktemp("tracked")
    env = {**ENV, "MLFLOW_TRACKING_URI": server.uri}
    config = tmp / "config.yaml"
    config.write_text(f"""
out_dir: {tmp / 'run'}
data: {{path: {text_shards}, block_len: 32, batch_size: 4}}
model: {{name: gpt, n_layer: 2, n_head: 2, d_model: 32}}
train: {{steps: 20, log_every: 5, ckpt_every: 10, eval_every: 10, zero_stage: 2}}
tracking: {{experiment: server-test}}
""")
    subprocess.run(deepspeed_command(2, "--config", config), env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "pipeline", "eval", "--model", tmp / "run", "--data", text_shards,
                    "--samples", "2", "--prompts", "2", "--out", tmp / "eval.json"], env=env, check=True,
                   capture_output=True)
    return json.loads((tmp / "eval.json").read_text())


def test_server_receives_params_metrics_tags_and_artifacts(server, tracked_run):
    client = MlflowClient(server.uri)
    run = client.get_run(tracked_run["run_id"])
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model.name"] == "gpt" and params["data.block_len"] == "32" and params["train.zero_stage"] == "2"
    assert tags["world_size"] == "2" and json.loads(tags["deepspeed_config"])["zero_optimization"]["stage"] == 2
    assert len(tags["git_commit"]) >= 7 and len(tags["manifest_sha256"]) == 64
    loss = client.get_metric_history(run.info.run_id, "train/loss_nats")
    assert [m.step for m in loss] == [5, 10, 15, 20]
    bits = client.get_metric_history(run.info.run_id, "train/loss_bits")
    assert bits[-1].value == pytest.approx(loss[-1].value / 0.6931471805599453)
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 4, key
    val = client.get_metric_history(run.info.run_id, "val/bits_per_byte")
    assert sorted(m.step for m in val) == [10, 20, 20]  # periodic evaluations, then `arpipe eval`
    assert metrics["val/bits_per_byte"] == pytest.approx(tracked_run["bits_per_byte"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "deepspeed.json", "manifest.json", "samples"} <= artifacts
    samples = client.list_artifacts(run.info.run_id, "samples/val-step00000020")
    assert {a.path.rsplit("/", 1)[-1] for a in samples} == {"samples.txt", "completions.txt"}
    assert run.info.status == "FINISHED"


def test_run_page_in_a_real_browser(server, tracked_run):
    chromium = shutil.which("chromium")
    if not chromium:  # CI installs it and sets ARPIPE_REQUIRE_BROWSER=1
        (pytest.fail if os.environ.get("ARPIPE_REQUIRE_BROWSER") == "1" else pytest.skip)(
            "Debian's chromium is not installed (apt-get install chromium)")
    import playwright.sync_api as playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    base = f"{server.uri}/#/experiments/{MlflowClient(server.uri).get_run(tracked_run['run_id']).info.experiment_id}" \
           f"/runs/{tracked_run['run_id']}"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/model-metrics?workflowType=machine_learning", wait_until="domcontentloaded")
        page.locator(".js-plotly-plot").first.wait_for(timeout=90_000)
        for metric in ("train/loss_nats", "train/loss_bits", "val/bits_per_byte"):  # chart legends: "run (train/…)"
            page.get_by_text(f"({metric})").first.wait_for(timeout=30_000)
        try:  # the assistant side panel covers a third of the page
            page.get_by_role("button", name="Close").last.click(timeout=3_000)
        except playwright.Error:
            pass
        page.screenshot(path=str(SCREENSHOTS / "mlflow-run-metrics.png"), full_page=True)

        page.goto(f"{base}/artifacts?workflowType=machine_learning", wait_until="domcontentloaded")
        page.get_by_text("samples", exact=True).first.click(timeout=60_000)
        page.get_by_text("val-step00000020", exact=True).first.click(timeout=30_000)
        page.get_by_text("samples.txt", exact=True).first.click(timeout=30_000)
        page.get_by_text("=== samples 0 ===").first.wait_for(timeout=30_000)  # the file's content is shown
        page.screenshot(path=str(SCREENSHOTS / "mlflow-run-samples.png"), full_page=True)
        browser.close()
    assert (SCREENSHOTS / "mlflow-run-metrics.png").stat().st_size > 10_000
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
