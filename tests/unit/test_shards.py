import hashlib
import json
import subprocess
import time

import numpy as np
import pytest
import webdataset as wds

from pipeline.data.shards import Shards
from pipeline.data.sources import split_of
from tests.conftest import arpipe, write_corpus


def digest(out) -> dict:
    """(split, key) -> sha256 of tokens, over every item of a shard directory."""
    shards, items = Shards(out), {}
    for split in ("train", "val"):
        for shard, entry in shards.chunks(split):
            tokens, offsets = shards.read_chunk(shard, entry["key"])
            meta = json.loads(shards.read(shard, entry["key"], "meta.json"))
            for item, start, end in zip(meta["items"], offsets[:-1], offsets[1:]):
                assert (split, item["key"]) not in items, f"duplicate {item['key']}"
                items[split, item["key"]] = hashlib.sha256(tokens[start:end].tobytes()).hexdigest()
    return items


def texts(out) -> dict[str, str]:
    """key -> decoded text, over every item of a text shard directory."""
    shards, found = Shards(out), {}
    for split in ("train", "val"):
        for shard, entry in shards.chunks(split):
            tokens, offsets = shards.read_chunk(shard, entry["key"])
            meta = json.loads(shards.read(shard, entry["key"], "meta.json"))
            found.update({m["key"]: shards.codec.decode(tokens[a:b])
                          for m, a, b in zip(meta["items"], offsets, offsets[1:])})
    return found


def test_round_trip_decodes_every_document(corpus, text_shards):
    shards = Shards(text_shards)
    manifest = shards.manifest
    seen = {}
    for split in ("train", "val"):
        for shard, entry in shards.chunks(split):
            tokens, offsets = shards.read_chunk(shard, entry["key"])
            meta = json.loads(shards.read(shard, entry["key"], "meta.json"))
            for item, start, end in zip(meta["items"], offsets[:-1], offsets[1:]):
                assert split_of(item["key"], 0.15) == split
                seen[item["key"]] = shards.codec.decode(tokens[start:end])
    files = sorted(corpus.glob("*.txt"))
    assert len(seen) == len(files) == manifest["splits"]["train"]["items"] + manifest["splits"]["val"]["items"]
    for path in files:
        assert seen[f"{path.name}:0"] == path.read_text()
    assert manifest["splits"]["val"]["items"] > 0 and manifest["codec"]["vocab_size"] == 512
    assert manifest["splits"]["train"]["bytes"] + manifest["splits"]["val"]["bytes"] == \
        sum(len(p.read_bytes()) for p in files)
    for entry in manifest["shards"]:
        assert hashlib.sha256((text_shards / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def test_items_written_in_batches_make_the_shards_items_written_one_by_one_make(tmp_path):
    """Chunks end after the item that fills them however the items are batched (a batch may
    close one chunk and open the next, or several): the tars and their entries are identical."""
    from pipeline.codecs import Encoded
    from pipeline.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 90, 400)
    lengths[[7, 8, 200]] = [0, 700, 1]  # empty items and one longer than a chunk
    items = [(rng.integers(0, 5000, n).astype(np.uint16), {"key": f"doc:{i}", "bytes": int(n)})
             for i, n in enumerate(lengths)]

    def write(directory, batch_sizes):
        writer = ShardWriter(directory, "train", 0, np.uint16, chunk_bytes=2 * 256, shard_bytes=3000)
        i = 0
        for size in batch_sizes:
            batch = items[i : i + size]
            if size == 1:
                writer.add(*batch[0])
            else:
                writer.add_batch(Encoded(np.concatenate([t for t, _ in batch] or [np.zeros(0, np.uint16)]),
                                         np.array([len(t) for t, _ in batch], dtype=np.int64), [m for _, m in batch]))
            i += size
        assert i == len(items)
        return writer.close()

    one_by_one = write(tmp_path / "a", [1] * len(items))
    assert len(one_by_one) > 5 and sum(len(e["chunks"]) for e in one_by_one) > 40  # many chunks and shards
    sizes, left = [], len(items)
    while left:  # random batches, empty ones among them
        sizes.append(min(left, int(rng.integers(0, 30))))
        left -= sizes[-1]
    batched = write(tmp_path / "b", sizes)
    whole = write(tmp_path / "c", [len(items)])
    assert one_by_one == batched == whole
    for entry in one_by_one:
        data = {d: (tmp_path / d / entry["path"]).read_bytes() for d in "abc"}
        assert data["a"] == data["b"] == data["c"]
        assert hashlib.sha256(data["a"]).hexdigest() == entry["sha256"]


def test_shards_are_plain_webdataset_and_tar(text_shards):
    tars = sorted(str(p) for p in text_shards.glob("train/*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    manifest = json.loads((text_shards / "manifest.json").read_text())
    assert len(samples) == manifest["splits"]["train"]["chunks"]
    sample = samples[0]
    assert set(sample) >= {"__key__", "tokens.npy", "offsets.npy", "meta.json"}
    tokens = np.load(__import__("io").BytesIO(sample["tokens.npy"]), allow_pickle=False)
    assert tokens.dtype == np.uint16
    listing = subprocess.run(["tar", "tf", tars[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == [f"{sample['__key__']}.{e}" for e in ("tokens.npy", "offsets.npy", "meta.json")]


def test_task_count_does_not_change_items(tmp_path, corpus, text_shards):
    out = tmp_path / "six"
    arpipe("shard", "text", "--input", corpus, "--out", out, "--tokenizer", text_shards / "tokenizer.json",
           "--num-tasks", 6, "--val-fraction", 0.15, "--chunk-mb", 0.02)
    assert digest(out) == digest(text_shards)
    assert len(list((out / "_tasks").glob("*.json"))) == 6


def test_the_stage_process_works_through_tasks_beside_its_workers(tmp_path, corpus, text_shards, monkeypatch):
    """With --workers 3 the `arpipe shard` process runs tasks itself, in order, from the first one
    while 2 spawned workers start and take the tasks it has not claimed; each task runs once."""
    import pipeline.data.shards as shards
    from pipeline.cli import main

    ran, run_task = [], shards.run_task

    def slow_run_task(out, task, plan=None):  # a real task's length here, so the workers are up in time
        ran.append(task)
        time.sleep(1.0)
        return run_task(out, task, plan)

    monkeypatch.setattr(shards, "run_task", slow_run_task)
    out = tmp_path / "three"
    main(["shard", "text", "--input", str(corpus), "--out", str(out), "--tokenizer", str(text_shards / "tokenizer.json"),
          "--workers", "3", "--num-tasks", "8", "--val-fraction", "0.15", "--chunk-mb", "0.02"])
    assert ran[0] == 0 and ran == sorted(ran) and len(ran) < 8, ran
    assert len(list((out / "_tasks").glob("*.json"))) == 8
    assert digest(out) == digest(text_shards)


def test_a_task_is_claimed_once(monkeypatch):
    from multiprocessing import Array

    from pipeline.data import shards

    monkeypatch.setattr(shards, "_claimed", Array("b", 3))
    assert [shards.claim(t) for t in (2, 0, 2, 1, 0)] == [True, True, False, True, False]


def test_tabular_inputs_and_sample_by(tmp_path, text_shards):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"row {i}: " + "lorem ipsum " * i, "id": i} for i in range(1, 30)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "b.parquet")
    (tmp_path / "in" / "c.txt").write_text("one line\nsecond line\n\nnext paragraph\n")
    arpipe("shard", "text", "--input", tmp_path / "in", "--out", tmp_path / "o", "--sample-by", "line",
           "--tokenizer", text_shards / "tokenizer.json", "--val-fraction", 0)
    shards = Shards(tmp_path / "o")
    texts = {}
    for shard, entry in shards.chunks("train"):
        tokens, offsets = shards.read_chunk(shard, entry["key"])
        meta = json.loads(shards.read(shard, entry["key"], "meta.json"))
        texts.update({m["key"]: shards.codec.decode(tokens[a:b]) for m, a, b in zip(meta["items"], offsets, offsets[1:])})
    assert texts["a.jsonl:3"] == rows[3]["text"] and texts["b.parquet:28"] == rows[28]["text"]
    assert [texts[f"c.txt:{i}"] for i in (0, 1, 3)] == ["one line", "second line", "next paragraph"]
    assert shards.manifest["skipped"]["items"] == {"empty": 1}


def test_bad_inputs_are_counted_not_fatal(tmp_path, text_shards):
    src = write_corpus(tmp_path / "in", documents=5)
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (src / "empty.txt").write_bytes(b"")
    (src / "nul.txt").write_bytes(b"abc\x00def")
    (src / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "trunc')
    (src / "notext.jsonl").write_text('{"body": "no text field"}\n')
    arpipe("shard", "text", "--input", src, "--out", tmp_path / "o", "--tokenizer", text_shards / "tokenizer.json")
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    skipped = manifest["skipped"]
    assert skipped["items"] == {"invalid UTF-8": 1, "empty": 1, "NUL bytes": 1}
    assert skipped["examples"]["invalid UTF-8"] == ["latin1.txt:0"]
    reasons = {f["input"]: f["reason"] for f in skipped["files"]}
    assert set(reasons) == {"broken.jsonl", "notext.jsonl"} and "no 'text' field" in reasons["notext.jsonl"]
    # the JSON Lines row before the cut is kept, and counted with the file's reason
    assert [f.get("items_kept") for f in skipped["files"] if f["input"] == "broken.jsonl"] == [1]
    assert manifest["splits"]["train"]["items"] + manifest["splits"]["val"]["items"] == 5 + 1


def test_a_file_that_fails_part_way_keeps_what_came_before(tmp_path, text_shards):
    """A gzip stream cut short, read line by line: the lines before the cut are items, and the file
    is listed as skipped with the reason and how many items it kept."""
    import gzip

    src = tmp_path / "in"
    src.mkdir()
    lines = [f"line {i}: " + "all work and no play " * 5 for i in range(30_000)]  # 3.4 MB
    data = gzip.compress("".join(line + "\n" for line in lines).encode())
    (src / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    arpipe("shard", "text", "--input", src, "--out", tmp_path / "o", "--tokenizer", text_shards / "tokenizer.json",
           "--sample-by", "line", "--val-fraction", 0)
    [skipped] = json.loads((tmp_path / "o" / "manifest.json").read_text())["skipped"]["files"]
    kept = texts(tmp_path / "o")
    assert skipped["input"] == "cut.txt.gz" and skipped["reason"].startswith("EOFError")
    assert skipped["items_kept"] == len(kept) > 5000
    assert kept == {f"cut.txt.gz:{i}": lines[i] for i in range(len(kept))}


def test_rerun_with_other_settings_is_refused(tmp_path, corpus, text_shards):
    out = tmp_path / "o"
    arpipe("shard", "text", "--input", corpus, "--out", out, "--tokenizer", text_shards / "tokenizer.json")
    result = arpipe("shard", "text", "--input", corpus, "--out", out, "--tokenizer", text_shards / "tokenizer.json",
                    "--sample-by", "line", check=False)
    assert result.returncode == 2
    assert "was sharded with sample_by='document', not 'line'" in result.stderr


def test_array_tasks_then_finalize(tmp_path, corpus, text_shards):
    out = tmp_path / "o"
    for task in (2, 0, 1):
        arpipe("shard", "text", "--input", corpus, "--out", out, "--tokenizer", text_shards / "tokenizer.json",
               "--task", task, "--num-tasks", 3, "--val-fraction", 0.15, "--chunk-mb", 0.02)
    assert not (out / "manifest.json").exists()
    arpipe("shard", "text", "--input", corpus, "--out", out, "--finalize")
    assert digest(out) == digest(text_shards)


def test_manifest_paths_outside_the_directory_are_refused(tmp_path, text_shards):
    import shutil

    from pipeline import ArpipeError

    copy = tmp_path / "copy"
    shutil.copytree(text_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["path"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArpipeError, match="refusing shard path"):
        Shards(copy)


def test_codec_files_outside_the_directory_are_refused(tmp_path, text_shards):
    """The tokenizer a manifest or an export names is confined to its directory, as shard paths are:
    neither loading nor exporting reads or writes a file outside it."""
    import shutil

    from pipeline import ArpipeError
    from pipeline.export import load_export, save_export
    from pipeline.models import build_model

    copy = tmp_path / "shards"
    shutil.copytree(text_shards, copy)
    shutil.copy(text_shards / "tokenizer.json", tmp_path / "outside.json")  # a valid tokenizer, wrong place
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in ("../outside.json", str(tmp_path / "outside.json")):
        manifest["codec"]["tokenizer"] = name
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArpipeError, match="refusing codec file"):
            Shards(copy).codec

    model_cfg = {"name": "gpt", "n_layer": 1, "n_head": 1, "d_model": 8}
    state = dict(build_model(model_cfg, 512, (16,)).state_dict())
    codec = {**manifest["codec"], "tokenizer": "../outside.json"}
    with pytest.raises(ArpipeError, match="refusing codec file"):  # would copy to export/../outside.json
        save_export(tmp_path / "export", state, model_cfg, 512, (16,), codec, copy, {})
    save_export(tmp_path / "export", state, model_cfg, 512, (16,), {**codec, "tokenizer": "tokenizer.json"},
                text_shards, {})
    (tmp_path / "export" / "codec.json").write_text(json.dumps(codec))
    with pytest.raises(ArpipeError, match="refusing codec file"):
        load_export(tmp_path / "export")


def test_codecs_and_sources_never_import_the_layers_above():
    """codecs/ and data/sources.py sit below the shard writer, the stream, training and eval."""
    import ast

    from tests.conftest import REPO

    higher = ("pipeline.data.shards", "pipeline.data.stream", "pipeline.train", "pipeline.eval", "pipeline.export",
              "pipeline.cli")
    for path in [*(REPO / "pipeline" / "codecs").glob("*.py"), REPO / "pipeline" / "data" / "sources.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith(higher)], f"{path.name} imports {names}"


@pytest.mark.parametrize("sample_by", ["document", "paragraph", "line"])
def test_plain_text_is_cut_exactly_as_datasets_cuts_it(tmp_path, sample_by):
    """Plain and gzipped files are read directly (fast); `datasets`' text builder is the reference."""
    import gzip

    import datasets

    from pipeline.data.sources import text_documents, text_opener

    cases = {
        "crlf.txt": b"one\r\ntwo\r\n\r\nthree\r\n",
        "blank-lines.txt": b"\n\na\n\n\n\nb\n\n",
        "no-newline.txt": b"last line without newline",
        "latin1.txt": "caf\xe9\n\nna\xefve".encode("latin-1"),
        "long.txt": ("word " * 50 + "\n\n" + "line\n" * 30).encode() * 40,
        "empty.txt": b"",
        "long.txt.gz": gzip.compress(("word " * 50 + "\n\n\r\n" + "line\r\n" * 30).encode() * 40),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        reference = [r["text"] for r in datasets.load_dataset(
            "text", data_files=[str(path)], split="train", streaming=True, sample_by=sample_by,
            encoding_errors="replace")]
        with text_opener(path)(path, "rt", encoding="utf-8", errors="replace") as f:
            assert [d for documents in text_documents(f, sample_by, chunk=64) for d in documents] == reference, name


def test_shard_tars_are_byte_for_byte_what_tarfile_and_np_save_write(tmp_path):
    """Shards are written from a batch's arrays without copying them into one buffer (HashedTar,
    npy_header); the bytes are those of tarfile (USTAR, mtime 0, mode 444) with np.save members."""
    import io
    import tarfile

    from pipeline.data.shards import HashedTar, npy_header

    rng = np.random.default_rng(0)
    members = [(f"k{i}.tokens.npy", [rng.integers(0, 9, n).astype(dtype) for n in sizes])
               for i, (dtype, sizes) in enumerate([(np.uint8, [0]), (np.uint16, [255, 1]), (np.uint16, [256]),
                                                   (np.uint32, [3, 0, 125]), (np.int64, [64]), (np.uint8, [513])])]
    ours = HashedTar(tmp_path / "ours.tar")
    spans = [ours.add(name, [npy_header(pieces[0].dtype, sum(map(len, pieces))), *pieces]) for name, pieces in members]
    spans.append(ours.add("k.meta.json", [b'{"items": []}']))
    ours.close()
    with tarfile.open(tmp_path / "tarfile.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [(name, np.concatenate(pieces)) for name, pieces in members] + [("k.meta.json", None)]:
            buffer = io.BytesIO()
            np.save(buffer, data, allow_pickle=False) if data is not None else buffer.write(b'{"items": []}')
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = buffer.tell(), 0, 0o444
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    data = (tmp_path / "ours.tar").read_bytes()
    assert data == (tmp_path / "tarfile.tar").read_bytes() and len(data) % tarfile.RECORDSIZE == 0
    assert ours.sha256.hexdigest() == hashlib.sha256(data).hexdigest()
    for (name, pieces), (start, size) in zip(members, spans):
        assert np.array_equal(np.load(io.BytesIO(data[start : start + size])), np.concatenate(pieces)), name


def test_json_lines_are_read_as_datasets_reads_them(tmp_path):
    """JSON Lines files are read without `datasets` (importing it costs a worker seconds); its json
    builder is the reference for the rows, their keys and their text, also gzipped."""
    import gzip

    import datasets

    from pipeline.data.sources import read_text

    rows = [{"text": "plain", "n": 1}, {"text": "ünïcödé 中文 😀\n\tescaped \"quotes\" \\ and \u2028"},
            {"text": "", "n": 3}, {"text": None}, {"text": "   "}, {"text": "x" * 10_000, "extra": [1, 2]}]
    lines = "\n".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows))
    cases = {"a.jsonl": (lines + "\n").encode(), "no-final-newline.jsonl": lines.encode(),
             "blank-lines.jsonl": ("\n" + lines.replace("\n", "\n\n") + "\n\n").encode(),
             "zipped.jsonl.gz": gzip.compress(lines.encode())}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        reference = datasets.load_dataset("json", data_files=[str(tmp_path / name)], split="train", streaming=True)
        expected = [(f"{name}:{i}", row["text"]) for i, row in enumerate(reference)]
        ours = [(key, text) for records in read_text(str(tmp_path / name), tmp_path, text_field="text")
                for key, text in zip(records.keys, records.values)]
        assert ours == expected, name


def test_bulk_text_checks_give_each_documents_own_reason():
    from pipeline.data.sources import MAX_DOCUMENT_CHARS, text_problem, text_problems

    rng = np.random.default_rng(0)
    pool = ["fine", "", " \n\t", "a\x00b", "bad \ufffd byte", "x" * (MAX_DOCUMENT_CHARS + 1), "ok too", "\u3000"]
    for _ in range(300):
        texts = [pool[i] for i in rng.integers(0, len(pool), int(rng.integers(0, 6)))]
        expected = [text_problem(t) for t in texts]
        assert text_problems(texts) == (expected if any(expected) else None), texts


def test_record_batches_are_bounded_and_keep_what_came_before_a_failure():
    from pipeline.data.sources import Record, in_batches

    def rows(fail_after=None):
        for i in range(10):
            if i == fail_after:
                raise ValueError("cut")
            yield Record(f"t:{i}", "x" * 600_000 if i % 3 else "short")

    batches = list(in_batches(rows(), size=4, max_bytes=1 << 20))
    assert [b.keys for b in batches] == [["t:0", "t:1", "t:2"], ["t:3", "t:4", "t:5"], ["t:6", "t:7", "t:8"], ["t:9"]]
    got, batches = [], in_batches(rows(fail_after=5), size=4)
    with pytest.raises(ValueError, match="cut"):
        for batch in batches:
            got += batch.keys
    assert got == [f"t:{i}" for i in range(5)]  # the rows before the failure, then the failure


def test_a_file_is_read_to_its_end_also_where_reads_come_back_short(tmp_path, monkeypatch):
    import os

    from pipeline.data import sources

    path = tmp_path / "file"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    assert sources.read_bytes(str(path)) == data
    (tmp_path / "empty").write_bytes(b"")
    assert sources.read_bytes(str(tmp_path / "empty")) == b""
    assert sources.read_bytes("/proc/self/status").startswith(b"Name:")  # a size of 0 in fstat
    read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read(fd, min(n, 999)))  # as some network file systems do
    assert sources.read_bytes(str(path)) == data


def test_an_overlong_json_lines_row_is_skipped_and_the_next_row_read(monkeypatch):
    """The README's bound: a JSONL line over MAX_JSON_LINE characters is one skipped row, read past in
    bounded pieces; the rows after it keep their keys (here with the bound made small)."""
    import io

    import pipeline.data.sources as sources

    monkeypatch.setattr(sources, "MAX_JSON_LINE", 40)
    stream = io.StringIO('{"text": "a"}\n{"text": "' + "x" * 500 + '"}\n{"text": "b"}\n')
    rows = [(r.key, r.value, r.skip) for r in sources.json_lines(stream, "f.jsonl", "text")]
    assert rows == [("f.jsonl:0", "a", None), ("f.jsonl:1", None, sources.TOO_LONG), ("f.jsonl:2", "b", None)]
