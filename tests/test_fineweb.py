"""fineweb.py: the shards hold exactly <|endoftext|> + tokens of every document, and resume is byte-exact."""
import contextlib
import errno
import glob
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import fineweb
from conftest import FINEWEB, ROOT
from fineweb import find_shards, load_shard

SHARD = 20_000  # tokens per shard in these tests: several shards from a few hundred kB of text


def enc():
    return fineweb.get_encoding()


def random_docs(n, seed, words_per_doc=(0, 3000)):
    """Documents of random length from a vocabulary with punctuation, digits, accents, CJK, emoji."""
    rng = np.random.default_rng(seed)
    vocab = ("the of and to in a is that for it as was with be by on not he I this are or his from at "
             "which but have an they you were her she there been one all we their has would when if "
             "2024 3.14 -- ... !? café naïve Zürich 東京 データ 🙂 \n\n \t é'ß").split(" ")
    vocab += ["\n", " ", "  "]
    docs = []
    for _ in range(n):
        k = int(rng.integers(*words_per_doc))
        docs.append(" ".join(vocab[i] for i in rng.integers(0, len(vocab), k)))
    return docs


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return str(path)


def expected_stream(docs):
    return np.array([t for text in docs for t in [fineweb.EOT] + enc().encode_ordinary(text)],
                    dtype=np.uint16)


def run(files, out, *flags):
    return fineweb.main(["--files", *files, "--out", str(out), f"--shard_size={SHARD}", "--no_progress",
                         *flags])


def read_shards(out):
    """The shards of out in manifest order, as arrays, checked against the manifest."""
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    arrays = []
    for s in manifest["shards"]:
        path = os.path.join(out, s["file"])
        arr = np.load(path)
        assert arr.dtype == np.uint16 and arr.ndim == 1
        assert len(arr) == s["tokens"] and s["sha256"] == fineweb.file_sha256(path)
        assert s["docs"] == np.count_nonzero(arr == fineweb.EOT)
        arrays.append(arr)
    return manifest, arrays


def folder_bytes(out):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "*")))}


@pytest.fixture
def jsonl(tmp_path):
    """Two jsonl files, ~200k tokens: short, empty, odd and multi-shard documents, and a blank line."""
    docs = random_docs(60, seed=0)
    docs[5] = ""
    docs[7] = " ".join(["long"] * 45_000)  # one document over two shard boundaries
    docs[9] = "a text may contain <|endoftext|> as text: it is ordinary text, not token 50256"
    docs[11] = "a lone surrogate \ud800 from a JSON escape"  # encode_ordinary's repair path
    a = write_jsonl(tmp_path / "a.jsonl", docs[:30])
    b = write_jsonl(tmp_path / "b.jsonl", docs[30:])
    with open(b, "a") as f:
        f.write("\n")  # a trailing blank line is not a document
    return [a, b], docs


def check_stream(out, docs):
    manifest, arrays = read_shards(out)
    stream = np.concatenate(arrays)
    assert len(stream) == sum(1 + len(enc().encode_ordinary(d)) for d in docs)
    np.testing.assert_array_equal(stream, expected_stream(docs))
    names = [s["file"] for s in manifest["shards"]]
    assert names[0] == "edufineweb_val_000000.npy"
    assert names[1:] == [f"edufineweb_train_{i:06d}.npy" for i in range(1, len(names))]
    assert all(len(a) == SHARD for a in arrays[:-1]) and 0 < len(arrays[-1]) <= SHARD
    assert manifest["complete"] and manifest["shards"][-1]["end"] == [len(docs), 0]
    # train_gpt2 finds and accepts them
    train, val = find_shards(str(out))
    assert [os.path.basename(p) for p in val] == names[:1] and len(train) == len(names) - 1
    assert all(len(load_shard(p)) > 0 for p in train + val)


def test_jsonl_stream_is_every_document(jsonl, tmp_path):
    files, docs = jsonl
    assert run(files, tmp_path / "out", "--workers=1") == 0
    check_stream(tmp_path / "out", docs)
    # a shard boundary inside a document is recorded as (document, token offset)
    _, arrays = read_shards(tmp_path / "out")
    assert len(arrays) >= 6


def test_parquet_stream_and_workers(tmp_path):
    """Real FineWeb documents: the exact stream, and 2 workers write the same bytes as 1."""
    files = FINEWEB
    import pyarrow.parquet as pq
    docs = [t for f in files for t in pq.read_table(f).column("text").to_pylist()]
    assert run(files, tmp_path / "w1", "--workers=1") == 0
    check_stream(tmp_path / "w1", docs)
    assert run(files, tmp_path / "w2", "--workers=2", "--chunk_docs=7") == 0
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w2")


def test_max_tokens(jsonl, tmp_path):
    files, docs = jsonl
    assert run(files, tmp_path / "out", "--workers=1", "--max_tokens=50001") == 0
    manifest, arrays = read_shards(tmp_path / "out")
    np.testing.assert_array_equal(np.concatenate(arrays), expected_stream(docs)[:50001])
    assert [len(a) for a in arrays] == [SHARD, SHARD, 10001]
    assert run(files, tmp_path / "out", "--workers=1", "--max_tokens=50001") == 0  # complete: a no-op


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resume_after_stop_is_byte_identical(jsonl, tmp_path, stop_after):
    files, docs = jsonl
    assert run(files, tmp_path / "clean", "--workers=1") == 0
    assert run(files, tmp_path / "resumed", "--workers=1", f"--stop_after={stop_after}") == 0
    manifest, _ = read_shards(tmp_path / "resumed")
    assert len(manifest["shards"]) == stop_after and not manifest["complete"]
    # what a kill leaves: a half-written next shard and manifest, both under temp names
    (tmp_path / "resumed" / f"edufineweb_train_{stop_after:06d}.npy.tmp").write_bytes(b"\x93NUMPY half")
    (tmp_path / "resumed" / "manifest.json.tmp").write_text('{"params": ')
    assert run(files, tmp_path / "resumed", "--workers=1", "--chunk_docs=5") == 0
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "clean")


def shards_listed(manifest_path):
    """How many finished shards a manifest lists (0 before it exists: it is written whole, by rename)."""
    try:
        return len(json.loads(manifest_path.read_text())["shards"])
    except FileNotFoundError:
        return 0


def test_kill9_then_rerun_is_byte_identical(tmp_path):
    """kill -9 of a real run (main process and its workers) after its first shard, then a rerun."""
    files = [write_jsonl(tmp_path / "big.jsonl", random_docs(400, seed=1, words_per_doc=(1000, 4000)))]
    cmd = [sys.executable, os.path.join(ROOT, "fineweb.py"), "--files", *files,
           "--out", str(tmp_path / "killed"), f"--shard_size={SHARD}", "--workers=2", "--no_progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest_path = tmp_path / "killed" / "manifest.json"
    try:
        deadline = time.time() + 60
        while shards_listed(manifest_path) == 0 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the session started above: the run and its workers
        except ProcessLookupError:  # it ended by itself: the assert below says so
            pass
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed: give it more data"
    manifest, _ = read_shards(tmp_path / "killed")
    assert 1 <= len(manifest["shards"]) and not manifest["complete"]
    assert run(files, tmp_path / "killed", "--workers=1") == 0
    assert run(files, tmp_path / "clean", "--workers=1") == 0
    assert folder_bytes(tmp_path / "killed") == folder_bytes(tmp_path / "clean")


def test_other_parameters_over_a_folder_is_an_error(jsonl, tmp_path, capsys):
    files, _ = jsonl
    assert run(files, tmp_path / "out", "--workers=1", "--stop_after=1") == 0
    capsys.readouterr()
    assert fineweb.main(["--files", *files, "--out", str(tmp_path / "out"), "--shard_size=30000",
                         "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "shard_size: 20000 there, 30000 now" in err
    assert len(err.strip().splitlines()) == 1
    os.remove(tmp_path / "out" / "edufineweb_val_000000.npy")  # a finished shard lost
    assert run(files, tmp_path / "out", "--workers=1") == 2
    assert "edufineweb_val_000000.npy is missing" in capsys.readouterr().err


def test_empty_glob_is_an_error(tmp_path, capsys):
    assert run([str(tmp_path / "nothing*.jsonl")], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --files") and "matches no file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ('{"text": "fine"}\n{"text": 123}\n', "document 1 ({path} line 2): text is int, not a string"),
    ('{"text": "fine"}\n\n{"text": null}\n', "document 1 ({path} line 3): text is NoneType, not a string"),
    ('{"text": "fine"}\n{"text": "broken\n', "{path} line 2: not valid JSON"),
    ('{"body": "no text field"}\n', "{path} line 1: expected a JSON object with a \"text\" field"),
    (b'{"text": "caf\xe9"}\n', "{path} line 1: not UTF-8 text"),
])
def test_bad_document_is_named(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert run([str(path)], tmp_path / "out", "--workers=1") == 2
    err = capsys.readouterr().err
    assert message.format(path=path) in err and len(err.strip().splitlines()) == 1


def test_bad_document_in_a_worker_is_named(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, ["ok"] * 20 + [None])
    assert run([str(path)], tmp_path / "out", "--workers=2", "--chunk_docs=4") == 2
    assert f"error: document 20 ({path} line 21): text is NoneType" in capsys.readouterr().err


def test_a_worker_that_cannot_start_fails_the_command_in_one_line(tmp_path):
    """A Pool respawns a worker whose initializer raises, forever: here the tokenizer cannot load (a
    damaged BPE file, no network, nothing cached), and the command must end with one error line."""
    shutil.copy(os.path.join(ROOT, "fineweb.py"), tmp_path)
    shutil.copytree(os.path.join(ROOT, "gpt2_tokenizer"), tmp_path / "gpt2_tokenizer")
    (tmp_path / "gpt2_tokenizer" / "encoder.json").write_text("{}")
    write_jsonl(tmp_path / "docs.jsonl", ["some text"] * 10)
    (tmp_path / "cache").mkdir()
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "fineweb.py", "--files", "docs.jsonl", "--out", "out",
                          "--workers=2", "--no_progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert out.stderr.startswith("error: a tokenizer worker could not start: ")
    assert "encoder.json is not OpenAI's GPT-2 file" in out.stderr


def test_progress_bars_end_at_100_percent(tmp_path, capsys):
    """The short last shard's bar ends at its own size (it stopped at 65% of --shard_size)."""
    path = write_jsonl(tmp_path / "docs.jsonl", [" ".join(["word"] * 1000)] * 13)  # 13,013 tokens
    params = {"source": "test"}
    fineweb.write_shards(lambda start: fineweb.iter_files([path], start), str(tmp_path / "out"), params,
                         shard_size=10_000, progress=True)
    bars = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n") if "_0000" in line]
    assert len(bars) == 2 and all("100%" in bar for bar in bars), bars
    assert "3.01k/3.01k" in bars[1]


def test_unreadable_files(tmp_path, capsys):
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet")
    assert run([str(tmp_path / "junk.parquet")], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --files: {tmp_path / 'junk.parquet'} is not a readable parquet file")
    (tmp_path / "folder.jsonl").mkdir()
    assert run([str(tmp_path / "folder.jsonl")], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"error: --files: cannot read {tmp_path / 'folder.jsonl'} (Is a directory)" in err
    (tmp_path / "notes.csv").write_text("a,b\n")
    assert run([str(tmp_path / "notes.csv")], tmp_path / "out") == 2
    assert "notes.csv is not a .jsonl, .parquet, .txt file" in capsys.readouterr().err


def test_token_range_check_names_the_document():
    labels = ["document 0 (a)", "document 1 (b)"]
    tokens, lengths = fineweb.tokenize_docs(["x", "y"], labels, lambda text: [65535, 0])
    assert tokens.tolist() == [fineweb.EOT, 65535, 0] * 2 and lengths.tolist() == [3, 3]
    with pytest.raises(fineweb.DataError, match=r"document 1 \(b\): token id 65536 does not fit in uint16"):
        fineweb.tokenize_docs(["x", "y"], labels, lambda text: [1] if text == "x" else [5, 65536])
    with pytest.raises(fineweb.DataError, match=r"document 0 \(a\): token id -1"):
        fineweb.tokenize_docs(["x", "y"], labels, lambda text: [-1])


def test_txt_files_are_one_document_each(tmp_path):
    docs = random_docs(3, seed=2)
    paths = []
    for i, text in enumerate(docs):
        paths.append(str(tmp_path / f"doc{i}.txt"))
        with open(paths[-1], "w", encoding="utf-8", newline="") as f:
            f.write(text)
    assert run([str(tmp_path / "doc*.txt")], tmp_path / "out", "--workers=1") == 0
    _, arrays = read_shards(tmp_path / "out")
    np.testing.assert_array_equal(np.concatenate(arrays), expected_stream(docs))


def test_dataset_path_matches_files_and_resumes(tmp_path, monkeypatch):
    """The default source (a Hugging Face dataset, here a local parquet folder): same shards as --files,
    and a stopped run resumes by row index to the same bytes."""
    files = FINEWEB
    folder = tmp_path / "dataset"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    params = {"source": {"dataset": str(folder)}}

    def docs_from(start):
        return fineweb.iter_dataset(str(folder), "", "train", start, cache_dir=str(tmp_path / "hf_cache"))

    fineweb.write_shards(docs_from, str(tmp_path / "ds"), params, SHARD, stop_after=2, progress=False)
    fineweb.write_shards(docs_from, str(tmp_path / "ds"), params, SHARD, progress=False)
    assert run(files, tmp_path / "files", "--workers=1") == 0
    ds, from_files = folder_bytes(tmp_path / "ds"), folder_bytes(tmp_path / "files")
    del ds["manifest.json"], from_files["manifest.json"]  # their params differ: dataset vs files
    assert ds == from_files

# ----------------------------------------------------------------------------------------------
# Streaming: the same shards and manifest as the downloaded dataset, and resume reads only what it needs


def dataset_folder(tmp_path):
    """A local stand-in for a Hugging Face parquet dataset: FineWeb's two sample files in a folder."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    for f in FINEWEB:
        shutil.copy(f, folder)
    return folder


def test_streaming_matches_download_and_resumes(tmp_path, monkeypatch):
    """Streaming (file by file, from parquet footers) writes the bytes load_dataset's download does,
    manifest included; stopped, or cut off mid-stream like a lost connection, it resumes to the same bytes,
    and a resume in the second file reads no row of the first."""
    import pyarrow.parquet as pq
    folder = dataset_folder(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    params = {"source": {"dataset": str(folder)}}

    def docs_from(streaming):
        return lambda start: fineweb.iter_dataset(str(folder), "", "train", start, str(tmp_path / "hf_cache"),
                                                  streaming=streaming)

    fineweb.write_shards(docs_from(False), str(tmp_path / "download"), params, SHARD, progress=False)
    fineweb.write_shards(docs_from(True), str(tmp_path / "stream"), params, SHARD, progress=False)
    clean = folder_bytes(tmp_path / "download")
    assert folder_bytes(tmp_path / "stream") == clean and len(clean) >= 5  # shards + manifest
    rows_first = pq.ParquetFile(FINEWEB[0]).metadata.num_rows

    # stopped two thirds in (inside the second of two files of equal size), then resumed
    half = len(read_shards(tmp_path / "download")[0]["shards"]) * 2 // 3
    fineweb.write_shards(docs_from(True), str(tmp_path / "resumed"), params, SHARD, stop_after=half,
                         progress=False)
    manifest, _ = read_shards(tmp_path / "resumed")
    assert manifest["shards"][-1]["end"][0] > rows_first  # the resume starts in the second file
    reads = []
    real_read = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: reads.append(i) or real_read(self, i, **kw))
    fineweb.write_shards(docs_from(True), str(tmp_path / "resumed"), params, SHARD, progress=False)
    assert folder_bytes(tmp_path / "resumed") == clean
    assert len(reads) == 1  # the second file's one row group; the first file was skipped from its footer

    # the connection lost while reading the second file: one DataError, finished shards kept, then a rerun
    calls = []

    def flaky(self, i, **kw):
        calls.append(i)
        if len(calls) == 2:
            raise ConnectionError("Connection reset by peer")
        return real_read(self, i, **kw)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", flaky)
    with pytest.raises(fineweb.DataError, match=r"--dataset .*: could not read it \(ConnectionError: "
                       r"Connection reset by peer\); .* rerun the same command"):
        fineweb.write_shards(docs_from(True), str(tmp_path / "cut"), params, SHARD, chunk_docs=5,
                             progress=False)
    manifest, _ = read_shards(tmp_path / "cut")
    assert 1 <= len(manifest["shards"]) < len(clean) - 1 and not manifest["complete"]
    assert not glob.glob(str(tmp_path / "cut" / "*.tmp"))
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", real_read)
    fineweb.write_shards(docs_from(True), str(tmp_path / "cut"), params, SHARD, progress=False)
    assert folder_bytes(tmp_path / "cut") == clean


@pytest.mark.parametrize("download", [False, True])
def test_dataset_flags_stream_or_download_to_the_same_folder(tmp_path, monkeypatch, capsys, download):
    """main(): --download changes where rows come from, not the output: the same params, so a streamed run
    and a downloaded one write the same manifest, and one can finish the other."""
    folder = dataset_folder(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    real = fineweb.iter_dataset
    seen = []

    def local(name, config, split, start=0, cache_dir=None, streaming=True):
        seen.append(streaming)
        return real(name, config, split, start, str(tmp_path / "hf_cache"), streaming)
    monkeypatch.setattr(fineweb, "iter_dataset", local)
    flags = [f"--dataset={folder}", "--config=", "--out", str(tmp_path / "out"), f"--shard_size={SHARD}",
             "--no_progress", "--workers=1"]
    assert fineweb.main(flags + ["--stop_after=2"] + (["--download"] if download else [])) == 0
    assert fineweb.main(flags + ([] if download else ["--download"])) == 0  # finished the other way
    assert seen == [not download, download]
    params = json.loads((tmp_path / "out" / "manifest.json").read_text())["params"]
    fineweb.write_shards(lambda start: real(str(folder), "", "train", start, str(tmp_path / "hf_cache")),
                         str(tmp_path / "clean"), params, SHARD, progress=False)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "clean")

# ----------------------------------------------------------------------------------------------
# What a run says when it cannot give train_gpt2.py what it needs


def test_one_val_shard_warning_gives_the_command_that_works(tmp_path, capsys, monkeypatch):
    """A small input under the default --shard_size: one val shard. The warning is one line with a command
    that, run as given, makes a folder train_gpt2.py accepts."""
    path = write_jsonl(tmp_path / "small docs.jsonl", random_docs(20, seed=3, words_per_doc=(50, 300)))
    monkeypatch.chdir(ROOT)
    assert fineweb.main(["--files", path, "--out", str(tmp_path / "out"), "--no_progress",
                         "--workers=1"]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("warning: ") and "only a val shard" in err, err
    command = err.split("new folder: ", 1)[1].rsplit(" (then train with ", 1)[0]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "fineweb.py"]
    # the folder it names is refused for the new --shard_size: why the command uses a new one
    new_size = next(a for a in argv if a.startswith("--shard_size="))
    assert fineweb.main(["--files", path, "--out", str(tmp_path / "out"), new_size, "--no_progress"]) == 2
    capsys.readouterr()
    assert fineweb.main(argv[2:] + ["--no_progress", "--workers=1"]) == 0
    assert capsys.readouterr().err == ""
    new_out = next(a for a in argv if a.startswith("--out="))[len("--out="):]
    train, val = find_shards(new_out)
    assert len(val) == 1 and len(train) == 9


@pytest.mark.parametrize("kind", ["parquet", "blank lines", "empty file"])
def test_no_documents_is_one_line_and_writes_nothing(tmp_path, capsys, kind):
    """An empty input wrote no shard and said "only a val shard": now it says there were no documents,
    exits 2, and leaves no folder or manifest behind."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if kind == "parquet":
        path = str(tmp_path / "empty.parquet")
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path = str(tmp_path / "empty.jsonl")
        (tmp_path / "empty.jsonl").write_text("\n\n" if kind == "blank lines" else "")
    assert run([path], tmp_path / "out", "--workers=1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the input holds no documents") and err.count("\n") == 1, err
    assert "val shard" not in err and not (tmp_path / "out").exists()
    assert run([path], tmp_path / "new" / "nested", "--workers=1") == 2  # the folders it made: gone too
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    assert run([path], tmp_path / "mine", "--workers=1") == 2
    assert sorted(os.listdir(tmp_path / "mine")) == [".fineweb.lock", "notes.txt"]  # no manifest left

# ----------------------------------------------------------------------------------------------
# A full disk, a second run, a planted symlink, a killed parent: one line, and only whole shards left


def fail_fsync_on(monkeypatch, suffix, nth):
    """os.fsync raises ENOSPC on the nth file fineweb fsyncs whose name ends with suffix, as a full disk
    does (ext4 reports it at write, flush or fsync; fsync is the last of them, so the shard is all there)."""
    real, seen = os.fsync, []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            seen.append(fd)
            if len(seen) == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(fineweb.os, "fsync", fsync)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
@pytest.mark.parametrize("suffix", [".npy.tmp", "manifest.json.tmp"])
def test_disk_full_is_one_line_and_keeps_whole_shards(jsonl, tmp_path, capsys, monkeypatch, suffix):
    files, _ = jsonl
    assert run(files, tmp_path / "clean", "--workers=1") == 0
    clean = folder_bytes(tmp_path / "clean")
    # the 3rd shard fails, or the manifest that would list it (the 4th manifest: the first lists no shard)
    fail_fsync_on(monkeypatch, suffix, 3 if suffix == ".npy.tmp" else 4)
    capsys.readouterr()
    assert run(files, tmp_path / "full", "--workers=1", "--chunk_docs=5") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: disk full writing ") and err.count("\n") == 1, err
    assert "GB free there now" in err and "rerun the same command" in err and "Traceback" not in err
    manifest, arrays = read_shards(tmp_path / "full")
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    assert sorted(os.listdir(tmp_path / "full")) == sorted([".fineweb.lock", "manifest.json"] +
                                                           [s["file"] for s in manifest["shards"]])
    for s in manifest["shards"]:  # the two finished shards are the clean run's, byte for byte
        assert (tmp_path / "full" / s["file"]).read_bytes() == clean[s["file"]]
    monkeypatch.undo()
    assert run(files, tmp_path / "full", "--workers=1") == 0
    assert folder_bytes(tmp_path / "full") == clean


def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    """A real failing write, no monkeypatch: ulimit -f below one shard's size (40 kB here)."""
    import resource
    path = write_jsonl(tmp_path / "docs.jsonl", random_docs(40, seed=4))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), "--files", path, "--out",
                           str(tmp_path / "out"), f"--shard_size={SHARD}", "--workers=1", "--no_progress"],
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: file size limit (ulimit -f) reached writing ")
    assert not (tmp_path / "out").exists()  # it made the folder, wrote no shard: nothing is left


def test_second_run_on_the_same_out_is_refused(jsonl, tmp_path, capsys):
    files, _ = jsonl
    out = tmp_path / "out"
    fd, created = fineweb.lock_out(str(out))  # as a run in another process holds it
    try:
        assert created == str(out)
        assert run(files, out, "--workers=1") == 2
        err = capsys.readouterr().err
        assert err == (f"error: --out {out}: another fineweb.py (pid {os.getpid()}) is writing there; "
                       f"wait for it to finish, or choose another --out\n")
        assert os.listdir(out) == [".fineweb.lock"]
    finally:
        os.close(fd)  # what the OS does for a process that ends, kill -9 included
    assert run(files, out, "--workers=1") == 0


def test_two_real_runs_at_once_one_refused(tmp_path):
    """Two processes on one --out: the second is one line, exit 2; the first finishes the exact stream."""
    docs = random_docs(600, seed=5, words_per_doc=(1000, 4000))  # ~1.6M tokens: seconds of work
    path = write_jsonl(tmp_path / "big.jsonl", docs)
    cmd = [sys.executable, os.path.join(ROOT, "fineweb.py"), "--files", path, "--out", str(tmp_path / "out"),
           f"--shard_size={SHARD}", "--workers=1", "--no_progress"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "out" / "manifest.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    overlapped = first.poll() is None
    assert first.wait(timeout=300) == 0 and first.stderr.read() == ""
    assert overlapped, "the first run ended before the second was refused: give it more data"
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr[-3000:]
    assert "another fineweb.py (pid " in second.stderr
    check_stream(tmp_path / "out", docs)


def test_a_planted_symlink_is_never_followed(jsonl, tmp_path, capsys):
    files, _ = jsonl
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's file")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "edufineweb_val_000000.npy.tmp")
    assert run(files, out, "--workers=1") == 2
    err = capsys.readouterr().err
    assert "edufineweb_val_000000.npy.tmp is a symbolic link" in err and err.count("\n") == 1
    assert victim.read_text() == "someone's file" and os.path.islink(out / "edufineweb_val_000000.npy.tmp")
    os.remove(out / "edufineweb_val_000000.npy.tmp")
    os.symlink(victim, out / "manifest.json.tmp")
    assert run(files, out, "--workers=1") == 2
    assert victim.read_text() == "someone's file"
    os.remove(out / "manifest.json.tmp")
    os.remove(out / ".fineweb.lock")
    os.symlink(victim, out / ".fineweb.lock")
    assert run(files, out, "--workers=1") == 2
    assert "cannot write there" in capsys.readouterr().err and victim.read_text() == "someone's file"


def children(pid):
    """Process ids whose parent is pid (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_workers_exit_quietly_when_the_parent_is_killed(tmp_path):
    """kill -9 of the main process only: its two workers exit within seconds and print nothing (they
    printed BrokenPipeError tracebacks, sending results to a parent that was gone)."""
    files = [write_jsonl(tmp_path / "big.jsonl", random_docs(400, seed=1, words_per_doc=(1000, 4000)))]
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "fineweb.py"), "--files", *files, "--out",
                             str(tmp_path / "out"), f"--shard_size={SHARD}", "--workers=2", "--chunk_docs=16",
                             "--no_progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 60
    while shards_listed(tmp_path / "out" / "manifest.json") < 1 and time.time() < deadline:
        time.sleep(0.005)
    workers = [k for k in children(proc.pid) if alive(k)]
    try:
        assert proc.poll() is None and len(workers) >= 2, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers)
    finally:
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
        log.close()
    assert (tmp_path / "stderr.txt").read_text() == ""

def test_many_shards_exact_and_manifest_writes_stay_linear(tmp_path, monkeypatch, no_fsync):
    """Found by test_property_jsonl_records: four 50k-token documents at --shard_size=600 (334 shards) took
    19 s, all of it in json.dumps(indent=1) of a manifest rewritten after every shard."""
    spent = []
    real = fineweb.save_manifest

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        real(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
    monkeypatch.setattr(fineweb, "save_manifest", timed)
    docs = ["huge " * 50_000] * 4 + ["x"]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    assert fineweb.main(["--files", path, "--out", str(tmp_path / "out"), "--shard_size=600",
                         "--chunk_docs=2", "--workers=1", "--no_progress"]) == 0
    manifest, arrays = read_shards(tmp_path / "out")
    np.testing.assert_array_equal(np.concatenate(arrays), expected_stream(docs))
    assert len(spent) == len(manifest["shards"]) + 2 == 336  # an empty one first, one a shard, a complete one
    # fsync aside (a disk's time, not ours): 16 s of pure-Python json before, about 0.1 s now
    assert sum(spent) < 2, f"{sum(spent):.1f} s in {len(spent)} manifest writes"

# ----------------------------------------------------------------------------------------------
# Flags: every bad one is one line and exit 2 before any work; then properties over records and flags


def main_rc(argv):
    """main's exit status and stderr, whether main returned it or the flag parser raised SystemExit."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = fineweb.main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


BAD_FLAGS = {
    "shard_size=0": (["--shard_size=0"], "--shard_size=0: must be >= 1"),
    "shard_size=-5": (["--shard_size=-5"], "--shard_size=-5: must be >= 1"),
    "shard_size=10**12": (["--shard_size=1000000000000"],
                          "--shard_size=1000000000000: at most 1,000,000,000"),
    "shard_size=abc": (["--shard_size=abc"], "--shard_size: invalid int value: 'abc'"),
    "workers=0": (["--workers=0"], "--workers=0: must be >= 1"),
    "workers=10**6": (["--workers=1000000"], "--workers=1000000: at most"),
    "chunk_docs=0": (["--chunk_docs=0"], "--chunk_docs=0"),
    "chunk_docs=10**7": (["--chunk_docs=10000000"], "--chunk_docs=10000000: at most 1,000,000"),
    "max_tokens=0": (["--max_tokens=0"], "--max_tokens=0: must be >= 1"),
    "stop_after=0": (["--stop_after=0"], "--stop_after=0: must be >= 1"),
    "stop_after=-1": (["--stop_after=-1"], "--stop_after=-1: must be >= 1"),
    "repeat=0": (["--repeat=0"], "--repeat=0"),
    "rounds=-1": (["--rounds=-1"], "--rounds=-1"),
    "prefix empty": (["--prefix="], "--prefix=''"),
    "prefix ../x": (["--prefix=../x"], "--prefix='../x'"),
    "prefix .hidden": (["--prefix=.hidden"], "--prefix='.hidden'"),
    "prefix with a space": (["--prefix=my shards"], "--prefix='my shards'"),
    "prefix NUL": (["--prefix=a\0b"], "--prefix"),
    "out empty": (["--out="], "--out is empty"),
    "out NUL": (["--out=a\0b"], "--out: contains a NUL character"),
    "dataset NUL": (["--dataset=a\0b"], "--dataset: contains a NUL character"),
    "unknown flag": (["--shards=3"], "unrecognized arguments: --shards=3"),
    "benchmark without files": (["--benchmark"], "--benchmark needs --files"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_is_one_line_and_touches_nothing(tmp_path, case):
    flags, message = BAD_FLAGS[case]
    path = write_jsonl(tmp_path / "docs.jsonl", ["some text"] * 3)
    files = [] if case == "benchmark without files" else ["--files", path]
    rc, err = main_rc(files + ["--out", str(tmp_path / "out"), "--no_progress", *flags])
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == ["docs.jsonl"]


def tree(root):
    """Every file under root: {relative path: bytes} (symlinks as their target)."""
    found = {}
    for folder, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            found[rel] = ("->" + os.readlink(path)) if os.path.islink(path) else open(path, "rb").read()
    return found


OURS = re.compile(r"(.*/)?(\.fineweb\.lock|manifest\.json|[A-Za-z0-9][A-Za-z0-9._-]*_(val|train)_\d{6}\.npy)")


def check_touched_only_ours(before, after, out_rel):
    """Files before the run are unchanged (or are ours and were rewritten); new files are ours, in out."""
    for rel, data in before.items():
        assert after.get(rel) == data or OURS.fullmatch(rel), f"{rel} was changed or removed"
    for rel in set(after) - set(before):
        assert rel.startswith(out_rel + os.sep) and OURS.fullmatch(rel), f"{rel} is not a file fineweb writes"


# text values: any str (lone surrogates included: JSON escapes them), empty, huge; and what is not text
ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=40)
TEXTS = st.one_of(*[ANY_TEXT] * 5, st.just(""), st.just("huge " * 50_000), st.just("<|endoftext|>"))
NOT_TEXT = st.one_of(st.integers(), st.floats(), st.none(), st.booleans(),
                     st.lists(st.integers(), max_size=2),
                     st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
GOOD = st.one_of(st.fixed_dictionaries({"text": TEXTS}),
                 st.fixed_dictionaries({"text": TEXTS, "id": st.integers()}))
BAD = st.one_of(st.fixed_dictionaries({"text": NOT_TEXT}), st.fixed_dictionaries({"body": TEXTS}),
                st.lists(st.integers(), max_size=2), st.integers())
# up to 8 good records, and in about half of the lists one bad record at any place
RECORDS = st.tuples(st.lists(GOOD, max_size=8), st.one_of(st.none(), st.tuples(st.integers(0, 8), BAD))).map(
    lambda t: t[0] if t[1] is None else t[0][:t[1][0]] + [t[1][1]] + t[0][t[1][0]:])


@pytest.fixture
def no_fsync(monkeypatch):
    """fsync as a no-op: the properties below are about bytes and names, not about surviving a power cut,
    and a huge document cut into a hundred shards would spend seconds in fsync on a busy disk."""
    monkeypatch.setattr(fineweb.os, "fsync", lambda fd: None)


def written_stream(out):
    """The tokens of the shards out's manifest lists (none if no manifest), checked against it."""
    if not os.path.exists(os.path.join(out, "manifest.json")):
        return np.zeros(0, np.uint16), None
    manifest, arrays = read_shards(out)
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.uint16)), manifest


@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(records=RECORDS, shard_size=st.integers(500, 30_000), chunk_docs=st.integers(1, 4))
def test_property_jsonl_records(tmp_path_factory, no_fsync, records, shard_size, chunk_docs):
    """Any jsonl records: the exact stream, or one error line naming a bad record (exit 2) with only whole
    shards of the records before it left; never a traceback, never a file fineweb did not write."""
    tmp = tmp_path_factory.mktemp("records")
    (tmp / "notes.txt").write_text("a user's file")
    with open(tmp / "docs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    before = tree(tmp)
    rc, err = main_rc(["--files", str(tmp / "docs.jsonl"), "--out", str(tmp / "out"),
                       f"--shard_size={shard_size}", f"--chunk_docs={chunk_docs}", "--workers=1",
                       "--no_progress"])
    check_touched_only_ours(before, tree(tmp), "out")
    event(f"exit {rc}")
    good = [isinstance(r, dict) and isinstance(r.get("text", 0), str) for r in records]
    texts = [r["text"] for r, ok in zip(records, good) if ok]
    first_bad = good.index(False) if False in good else len(records)
    stream, manifest = written_stream(tmp / "out")
    if not records:
        assert rc == 2 and err.startswith("error: the input holds no documents"), err
    elif all(good):
        assert rc == 0 and manifest["complete"]
        np.testing.assert_array_equal(stream, expected_stream(texts))
    else:
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        bad_lines = [f"line {i + 1}" for i, ok in enumerate(good) if not ok]
        assert any(f"{tmp / 'docs.jsonl'} {line}" in err for line in bad_lines), err
        assert manifest is None or not manifest["complete"]
        np.testing.assert_array_equal(stream, expected_stream(texts[:first_bad])[:len(stream)])


PARQUET_COLUMNS = st.one_of(
    st.lists(st.one_of(st.text(max_size=30), st.just(""), st.none()), max_size=6).map(
        lambda v: (v, "string")),
    st.lists(st.text(max_size=30), max_size=6).map(lambda v: (v, "large_string")),
    st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=3).map(lambda v: (v, "int64")),
    st.lists(st.binary(max_size=8), min_size=1, max_size=3).map(lambda v: (v, "binary")))


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(column=PARQUET_COLUMNS, name=st.sampled_from(["text", "text", "content"]), row_group=st.integers(1, 4))
def test_property_parquet_records(tmp_path_factory, no_fsync, column, name, row_group):
    """A parquet text column of any type, with nulls, in row groups of any size, or no text column."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    values, kind = column
    tmp = tmp_path_factory.mktemp("parquet")
    pq.write_table(pa.table({name: pa.array(values, getattr(pa, kind)())}), tmp / "docs.parquet",
                   row_group_size=row_group)
    before = tree(tmp)
    rc, err = main_rc(["--files", str(tmp / "docs.parquet"), "--out", str(tmp / "out"), "--shard_size=50",
                       "--workers=1", "--no_progress"])
    check_touched_only_ours(before, tree(tmp), "out")
    event(f"exit {rc}")
    stream, manifest = written_stream(tmp / "out")
    if name != "text":
        assert rc == 2 and "has no \"text\" column (columns: content)" in err
    elif not values:
        assert rc == 2 and err.startswith("error: the input holds no documents"), err
    elif all(isinstance(v, str) for v in values):
        assert rc == 0 and manifest["complete"]
        np.testing.assert_array_equal(stream, expected_stream(values))
    else:
        first_bad = next(i for i, v in enumerate(values) if not isinstance(v, str))
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{tmp / 'docs.parquet'} row {first_bad}): text is {type(values[first_bad]).__name__}" in err
        np.testing.assert_array_equal(stream, expected_stream(values[:first_bad])[:len(stream)])


def mostly(valid, *bad):
    """valid three times in four: with several flags drawn at once, some examples are all valid.
    bad: values, or strategies."""
    strategies = [b if isinstance(b, st.SearchStrategy) else st.just(b) for b in bad]
    return st.one_of(valid, valid, valid, st.one_of(*strategies))


FLAG_VALUES = {
    "--shard_size": mostly(st.integers(100, 20_000), st.integers(-2, 2), st.just(10**12), st.just("1e3")),
    "--workers": mostly(st.just(1), -1, 0, 10**6, "two"),
    "--chunk_docs": mostly(st.integers(1, 5), -1, 0, 10**9),
    "--max_tokens": mostly(st.integers(1, 10_000), -1, 0),
    "--stop_after": mostly(st.integers(1, 3), -1, 0),
    "--prefix": mostly(st.sampled_from(["edufineweb", "eval", "ok.v2", "a-b_c"]),
                       st.sampled_from(["", ".", "..", "a/b", "-x", "x" * 101, "a b"]), st.text(max_size=5)),
    "--repeat": mostly(st.integers(1, 2), -1, 0),
}
OUTS = ["new", "nested/new", "user_dir"] * 3 + ["a_file", "has_npy", "symlinked_lock", ""]
SOURCES = ["good", "two good"] * 3 + ["missing", "notes.csv", "a_dir.jsonl"]


@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(flags=st.fixed_dictionaries({}, optional=FLAG_VALUES), out=st.sampled_from(OUTS),
       source=st.sampled_from(SOURCES))
def test_property_flags(tmp_path_factory, no_fsync, flags, out, source):
    """Any mix of flags, folders and inputs: exit 0 with the exact (possibly cut) stream, or exit 2 with one
    line; no traceback; no file fineweb did not write is touched, nothing written outside --out."""
    tmp = tmp_path_factory.mktemp("flags")
    docs = random_docs(12, seed=6, words_per_doc=(0, 400))
    write_jsonl(tmp / "docs.jsonl", docs)
    (tmp / "a_file").write_text("not a folder")
    (tmp / "user_dir").mkdir()
    (tmp / "user_dir" / "notes.tmp").write_text("a user's file")
    (tmp / "has_npy").mkdir()
    np.save(tmp / "has_npy" / "theirs.npy", np.arange(3))
    (tmp / "symlinked_lock").mkdir()
    os.symlink(tmp / "a_file", tmp / "symlinked_lock" / ".fineweb.lock")
    (tmp / "notes.csv").write_text("a,b\n")
    (tmp / "a_dir.jsonl").mkdir()
    inputs = {"good": [str(tmp / "docs.jsonl")], "missing": [str(tmp / "nothing*.jsonl")],
              "two good": [str(tmp / "docs.jsonl")] * 2}.get(source, [str(tmp / source)])
    argv = ["--files", *inputs, f"--out={tmp / out}" if out else "--out=", "--no_progress"]
    argv += [f"{k}={v}" for k, v in flags.items()]
    argv += [] if "--workers" in flags else ["--workers=1"]
    before = tree(tmp)
    rc, err = main_rc(argv)
    check_touched_only_ours(before, tree(tmp), out)
    assert rc in (0, 2), (rc, err)
    event(f"exit {rc}" + (f": {err.split(':')[1].strip()}" if rc == 2 else ""))
    if rc == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return
    assert source in ("good", "two good") and out in ("new", "nested/new", "user_dir")
    stream, manifest = written_stream(tmp / out)
    full = expected_stream(docs * (2 if source == "two good" else 1))
    if flags.get("--max_tokens") is not None:
        full = full[:flags["--max_tokens"]]
    if manifest["complete"]:
        np.testing.assert_array_equal(stream, full)
    else:  # stopped by --stop_after: that many whole shards, the start of the stream
        assert len(manifest["shards"]) == flags["--stop_after"]
        np.testing.assert_array_equal(stream, full[:len(stream)])
