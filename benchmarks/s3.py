"""Shards in object storage: the training stream reading from a real S3 API on 127.0.0.1
(moto_server, started here) against the same shards on local disk, in the same run, and the
requests a training epoch makes.

  stream           tokens/s of Batches(TokenStream(…)) as the trainer uses it (one process, no
                   DataLoader worker), from s3:// and from the local copy, interleaved
  requests/epoch   GETs of tars the moto server logged while a stream read one epoch of the train
                   split (and the next epoch's first window): one ranged GET per chunk read

Loopback has no network latency (a GET costs ≈ 10 ms of moto's Python), so the ratio says what
the reader costs here, not what a remote store would; there each GET adds its round trip.

    python benchmarks/s3.py [--repeats 3] [--work DIR]
"""

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import common
from common import Row, rate
from shard import stdlib_docs
from stream import measure, text_shards

BUCKET = "bench"


@contextmanager
def moto_server(work: Path):
    """A moto_server on a free loopback port, its request log in work/moto.log; the AWS_*
    variables point s3fs (in this process and the stream's workers) at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = work / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      ARPIPE_CACHE=str(work / "cache"))
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield log
    finally:
        server.kill()
        server.wait()


def tar_gets(log: Path, since: int, prefix: str) -> int:
    time.sleep(0.5)  # the server logs a request after answering it
    with open(log, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return sum(1 for line in text.splitlines() if f"GET /{BUCKET}/{prefix}/" in line and ".tar" in line)


def stream(where: str, block_len: int, batch_size: int):
    from pipeline.data.shards import Shards
    from pipeline.data.stream import Batches, TokenStream

    batches = Batches(TokenStream(Shards(where), "train", block_len, batch_size, seed=0))
    next(batches)  # the first window is read outside the measurement

    def fn():
        batch = next(batches)
        return batch.numel(), batch.shape[0]
    return fn


def epoch_requests(url: str, log: Path, prefix: str) -> tuple[int, int]:
    """(GETs of tars, chunks read) while one stream reads epoch 0 and epoch 1's first window."""
    from pipeline.data.shards import Shards
    from pipeline.data.stream import Batches, TokenStream

    since = log.stat().st_size
    batches = Batches(TokenStream(Shards(url), "train", 1024, 16, seed=0))
    source = batches.stream.sources[0]
    while batches.stream.states[0][0]["epoch"] == 0:  # worker 0's state of its only source
        next(batches)
    chunks = len(source.chunks)
    return tar_gets(log, since, prefix), chunks + min(chunks, source.window_size)


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    args = common.parse(p, argv)
    common.single_core()
    work = common.work_dir(args)
    local = text_shards(work, stdlib_docs(work, args.tiny), "document", 1 if args.tiny else 8)
    seconds = 0.2 if args.tiny else 3.0
    rows = []
    with moto_server(work) as log:
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)
        fs.put(str(local), f"{BUCKET}/text", recursive=True)
        url = f"s3://{BUCKET}/text"
        gets, reads = epoch_requests(url, log, "text")  # first: no other stream may be reading
        variants = {"s3": stream(url, 1024, 16), "local": stream(str(local), 1024, 16)}
        runs = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, fn in variants.items():
                runs[k].append(measure(fn, seconds))
        speed = {k: sorted(t / s for s, t, _ in r)[len(r) // 2] for k, r in runs.items()}
        rows.append(Row("stream from s3:// (loopback moto_server), rows of 1024, batch 16",
                        rate(speed["s3"], 1, "tok"), f"local disk: {rate(speed['local'], 1, 'tok')}",
                        speed["s3"] / speed["local"]))
        rows.append(Row("GETs per chunk read over a training epoch", f"{gets} GETs of tars / {reads} chunk reads",
                        "one GET per chunk", gets / reads, 1.0, at_most=True))
    manifest = json.loads((local / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    notes = [f"data: stdlib docs × {1 if args.tiny else 8}, train split {train['tokens'] / 1e6:.1f} M tokens "
             f"in {train['chunks']} chunks of ≈ {train['tokens'] * 2 / train['chunks'] / 2**20:.1f} MB",
             "one process, one thread; an epoch is read by one stream here: with R ranks × W DataLoader workers each "
             "reads its share of the chunks, plus a GET of manifest.json where each opens the shards",
             "ratio: s3 over local tokens/s; GETs over chunk reads"]
    common.report("Shards on S3 (benchmarks/s3.py)", rows, args, notes)
    return rows


if __name__ == "__main__":
    main()
