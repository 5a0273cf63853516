"""A real S3 API on 127.0.0.1: moto's server (`moto_server` from moto[server]), started once per
test session with one bucket. Its request log lets tests count what readers ask the store."""

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from pipeline.train.dist import free_port
from tests.conftest import ENV

BUCKET = "arpipe-test"
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP/')  # werkzeug's access log, maybe coloured


class S3Server:
    def __init__(self, endpoint: str, log: Path, env: dict):
        self.endpoint, self.log = endpoint, log
        self.env = env  # the AWS_* variables (and a cache directory) for processes the tests start
        self.process_env = {**ENV, **env}

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def mark(self) -> int:
        """A position in the request log; `requests(since=…)` counts from there."""
        return self.log.stat().st_size

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        """(method, path) of every request the server answered since `since`. The server logs a
        request after answering it, so wait until the log stops growing."""
        size = -1
        while size != self.mark():
            size = self.mark()
            time.sleep(0.3)
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [m.groups() for m in REQUEST.finditer(text)]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not listen on port {port} within {seconds} s")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    work = tmp_path_factory.mktemp("s3")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "ARPIPE_CACHE": str(work / "cache")}
    log = work / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, server)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            fs = fsspec.filesystem("s3")
            fs.mkdir(BUCKET)
            yield S3Server(endpoint, log, env)
            type(fs).clear_instance_cache()  # its handles point at this server
    finally:
        server.kill()
        server.wait()
