"""
FineWeb-Edu as GPT-2 token shards for train_gpt2.py.

    python fineweb.py                 # HuggingFaceFW/fineweb-edu sample-10BT, streamed -> edu_fineweb10B/
    python fineweb.py --max_tokens=20000000 --shard_size=2000000 --out fw_small   # a small run: 20M tokens
    python fineweb.py --files 'data/*.parquet' --out my_shards --shard_size 10000000   # local files
    python fineweb.py --benchmark --files tests/data/fineweb_sample_*.parquet     # tokens/s, 1 vs 2 workers

Every document becomes <|endoftext|> followed by its GPT-2 tokens (tiktoken encode_ordinary). The
stream is cut into uint16 .npy shards of exactly --shard_size tokens (only the last is shorter); a
document that does not fit continues in the next shard. The first shard is the validation split:
edufineweb_val_000000.npy, edufineweb_train_000001.npy, ...

The dataset is streamed: its parquet files are read over the network as they are tokenized, and only the
shards reach the disk (2 bytes a token: 20 GB for 10B tokens). --download stores the whole split in the
Hugging Face cache first, as load_dataset does, and reads it from there: the same shards, far more disk.

Rerunning the same command after an interruption (Ctrl-C, kill -9, a lost node or connection, a full
disk) continues after the last finished shard: <out>/manifest.json records where each one ends in the
document stream, and the result is byte-identical to an uninterrupted run. Every file is written to a
temp name and renamed, the manifest after the shard it lists; one run at a time holds <out>'s lock.
Importing this file runs nothing: `from fineweb import tokenize_docs, write_shards`.
"""

import argparse
import errno
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time
from collections import deque

import numpy as np

EOT = 50256  # <|endoftext|>: delimits documents, as in GPT-2's training data
SHARD_SIZE = 100_000_000  # tokens per shard, as in build-nanogpt: 10B tokens -> 100 shards
FORMAT = 1  # layout version of shards + manifest; a folder of another version is not resumed
READABLE = (".jsonl", ".parquet", ".txt")
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)  # our files' descriptors stay out of the tokenizer processes


class DataError(ValueError):
    """Bad input or output folder: the message names the flag, file or document and says what to do."""


# ----------------------------------------------------------------------------------------------
# Documents: (where, text) pairs from the Hugging Face dataset or local files, from any index on


def list_files(patterns):
    """The files --files names, each glob sorted, in the order given."""
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise DataError(f"--files {pattern}: matches no file; give paths or globs of "
                            f"{', '.join(READABLE)} files")
        for path in found:
            if os.path.splitext(path)[1] not in READABLE:
                raise DataError(f"--files: {path} is not a {', '.join(READABLE)} file")
        files += found
    return files


def iter_files(files, start=0):
    """(where, text) for each document of the files, from document index start on.
    A jsonl line or a parquet row is a document (its "text" field); a txt file is one document.
    Skipping to start reads no text it does not need: resuming late in a big run stays quick."""
    skip = start
    for path in files:
        ext = os.path.splitext(path)[1]
        try:
            if ext == ".txt":
                if skip > 0:
                    skip -= 1
                    continue
                with open(path, "rb") as f:
                    yield path, _decode(f.read(), path)
            elif ext == ".jsonl":
                skip = yield from _iter_jsonl(path, skip)
            else:
                skip, _ = yield from _iter_parquet(path, skip)
        except OSError as e:
            raise DataError(f"--files: cannot read {path} ({e.strerror or e}); "
                            f"check the path and permissions") from None


def _decode(data, where):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"fix or drop this document") from None


def _iter_jsonl(path, skip):
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines are not documents
            if skip > 0:
                skip -= 1
                continue
            where = f"{path} line {lineno}"
            try:
                record = json.loads(_decode(line, where))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); fix or drop this line") from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f"{where}: expected a JSON object with a \"text\" field")
            yield where, record["text"]
    return skip


def _iter_parquet(path, skip, flag="--files", label=None):
    """
    (where, text) for the rows of one parquet file from row skip on; returns (rows left to skip, rows in
    the file). Whole row groups are skipped from the footer alone. path: a local path or an fsspec URL
    (hf://... when streaming a Hugging Face dataset). label(row, id): how a row is named in errors.
    """
    import pyarrow.parquet as pq
    try:
        if "://" in path:
            import fsspec
            pf = pq.ParquetFile(fsspec.open(path, "rb").open())  # reads the footer only, not the rows
        else:
            pf = pq.ParquetFile(path)
    except OSError:
        raise
    except Exception as e:  # pyarrow's ArrowInvalid for a file that is not parquet
        raise DataError(f"{flag}: {path} is not a readable parquet file ({_first_line(e)}); "
                        f"download it again") from None
    columns = pf.schema_arrow.names
    if "text" not in columns:
        raise DataError(f"{flag}: {path} has no \"text\" column (columns: {', '.join(columns)})")
    read = ["text", "id"] if label and "id" in columns else ["text"]
    label = label or (lambda row, _: f"{path} row {row}")
    row = 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        if skip >= n:
            skip, row = skip - n, row + n
            continue
        try:
            table = pf.read_row_group(group, columns=read)
        except OSError:
            raise
        except Exception as e:  # a damaged row group
            raise DataError(f"{flag}: {path} row group {group} is unreadable ({_first_line(e)}); "
                            f"download it again") from None
        texts = table.column("text").to_pylist()
        ids = table.column("id").to_pylist() if len(read) == 2 else [None] * n
        for i in range(skip, n):
            yield label(row + i, ids[i]), texts[i]
        skip, row = 0, row + n
    return skip, row


def _first_line(e):
    text = str(e).strip()
    return f"{e.__class__.__name__}: {text.splitlines()[0]}" if text else e.__class__.__name__


def iter_dataset(name, config, split, start=0, cache_dir=None, streaming=True):
    """
    (where, text) for each row of a Hugging Face dataset, from row start on. streaming: read over the
    network as tokenized, nothing stored; a parquet dataset (FineWeb is one) is read file by file, and
    resuming skips whole files and row groups from their footers. Otherwise: load_dataset downloads the
    whole split into the cache first, then rows are read from there. Both give the same rows in the same
    order: the split's files in order, each file's rows in order.
    """
    flags = f"--dataset {name} --config {config} --split {split}"
    try:
        if streaming:
            files = _parquet_files(name, config, split, cache_dir)
            if files is not None:
                yield from _iter_parquet_files(name, files, start)
                return
        from datasets import load_dataset
        ds = load_dataset(name, name=config or None, split=split, cache_dir=cache_dir, streaming=streaming)
        columns = ds.column_names or []
        if "text" not in columns:
            raise DataError(f"--dataset {name}: no \"text\" column (columns: {', '.join(columns)})")
        has_id = "id" in columns
        ds = ds.select_columns(["text", "id"] if has_id else ["text"])
        if streaming:  # a dataset not stored as parquet: resuming reads past the first rows again
            for row, record in enumerate(ds.skip(start) if start else ds, start):
                yield f"{name} row {row}" + (f" id {record['id']}" if has_id else ""), record["text"]
            return
        step = 1024  # rows per slice: random access by row makes resuming instant
        for first in range(start, len(ds), step):
            rows = ds[first:first + step]
            for i, text in enumerate(rows["text"]):
                yield f"{name} row {first + i}" + (f" id {rows['id'][i]}" if has_id else ""), text
    except DataError:
        raise
    except Exception as e:  # offline, unknown name or config, a lost connection: datasets raises many kinds
        raise DataError(f"{flags}: could not read it ({_first_line(e)}); check the names and the connection "
                        f"and rerun the same command (it continues after the last finished shard), "
                        f"or pass local files with --files") from None


def _parquet_files(name, config, split, cache_dir):
    """The split's parquet files (hf://... URLs or local paths) in load_dataset's order, or None for a
    dataset stored in another format. Only metadata is read."""
    from datasets import load_dataset_builder
    from datasets.packaged_modules.parquet.parquet import Parquet
    builder = load_dataset_builder(name, config or None, cache_dir=cache_dir)
    if not isinstance(builder, Parquet) or not builder.config.data_files:
        return None
    splits = {str(s): files for s, files in builder.config.data_files.items()}
    if split not in splits:
        raise DataError(f"--split {split}: --dataset {name} has the splits {', '.join(sorted(splits))}")
    return list(splits[split])


def _iter_parquet_files(name, files, start):
    skip, first = start, 0  # first: the dataset row index of the file's first row
    for path in files:
        def label(row, id_, first=first):
            return f"{name} row {first + row}" + (f" id {id_}" if id_ is not None else "")
        skip, rows = yield from _iter_parquet(path, skip, f"--dataset {name}", label)
        first += rows

# ----------------------------------------------------------------------------------------------
# Tokenization: chunks of documents to uint16 token arrays, in worker processes, in order


def get_encoding():
    """GPT-2 BPE from the files shipped in gpt2_tokenizer/ (no network); loaded once per process."""
    from gpt2_tokenizer import TokenizerFilesError, get_tokenizer
    try:
        return get_tokenizer()
    except TokenizerFilesError as e:
        raise DataError(str(e)) from None


def encode_ordinary(text):
    """enc.encode_ordinary(text) as a uint32 array: no list of Python ints (~20% faster per token)."""
    enc = get_encoding()
    try:
        # special tokens neither allowed nor disallowed: "<|endoftext|>" in a text is ordinary text
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # a lone surrogate: encode_ordinary knows how to repair the text
        return np.array(enc.encode_ordinary(text), dtype=np.uint32)


def tokenize_docs(texts, labels, encode=encode_ordinary):
    """
    Documents as one uint16 array, each preceded by <|endoftext|>, and the length of each.
    A text that is not a string, or an id that does not fit in uint16, is a DataError naming the
    document: astype would wrap it around silently.
    """
    encoded = []
    for text, label in zip(texts, labels):
        if not isinstance(text, str):
            raise DataError(f"{label}: text is {type(text).__name__}, not a string; "
                            f"fix or drop this document")
        encoded.append(encode(text))
    lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.int64)
    for start, ids in zip(np.cumsum(lengths) - lengths, encoded):
        tokens[start] = EOT
        tokens[start + 1:start + len(ids) + 1] = ids
    bad = np.flatnonzero((tokens < 0) | (tokens > np.iinfo(np.uint16).max))
    if len(bad):
        doc = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        raise DataError(f"{labels[doc]}: token id {tokens[bad[0]]} does not fit in uint16; "
                        f"shards hold GPT-2 ids (< 50257)")
    return tokens.astype(np.uint16), lengths


def _worker(conn):
    """
    A tokenizer process: runs the (function, args) tasks conn brings, in order, and sends back (ok, result).
    A reader thread takes tasks in as they come, so the parent never blocks sending one while this process
    blocks sending a result; and it sees the parent go (kill -9) at once, as the end of the pipe. Either
    end gone: exit quietly, no traceback.
    """
    import queue
    tasks = queue.Queue()

    def read():
        try:
            while True:
                tasks.put(conn.recv())
        except (EOFError, OSError):
            os._exit(0)
    threading.Thread(target=read, daemon=True).start()
    try:
        try:
            get_encoding()
            start_error = None
        except Exception as e:  # told to the parent with the first task: it prints one line and stops
            detail = e if isinstance(e, DataError) else f"{e.__class__.__name__}: {e}"
            start_error = f"a tokenizer worker could not start: {detail}".splitlines()[0]
        while True:
            fn, args = tasks.get()
            try:
                if start_error:
                    raise DataError(start_error)
                reply = (True, fn(*args))
            except DataError as e:
                reply = (False, str(e))
            except MemoryError:
                reply = (False, "a tokenizer worker ran out of memory; lower --chunk_docs or --workers")
            conn.send(reply)
    except (OSError, KeyboardInterrupt):  # the parent is gone (BrokenPipeError) or Ctrl-C reached us too
        os._exit(0)


def _tokenize_chunk(texts, labels):
    return tokenize_docs(texts, labels)


class Tokenizer:
    """
    Tokenizes chunks of documents in `workers` processes and returns them in order: chunk i goes to
    worker i % workers, and at most two chunks per worker are in flight, so memory stays bounded.
    """

    def __init__(self, workers):
        self.conns, self.procs = [], []
        if workers > 1:
            import multiprocessing
            # spawn: fork is unsafe once datasets/pyarrow have started threads
            ctx = multiprocessing.get_context("spawn")
            for _ in range(workers):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(theirs,), daemon=True)
                proc.start()
                theirs.close()  # only the worker holds its end: when we go, it reads the end of the pipe
                self.conns.append(ours)
                self.procs.append(proc)

    def _send(self, w, fn, args):
        try:
            self.conns[w].send((fn, args))
        except OSError:
            self._died(w)

    def _receive(self, w):
        try:
            ok, value = self.conns[w].recv()
        except (EOFError, OSError):
            self._died(w)
        if not ok:
            raise DataError(value)
        return value

    def _died(self, w):
        self.procs[w].join(5)
        raise DataError(f"a tokenizer worker died (exit code {self.procs[w].exitcode}; killed for memory?); "
                        f"rerun with fewer --workers or a smaller --chunk_docs: it continues after the last "
                        f"finished shard")

    def map(self, chunks):
        """(tokens, lengths) for each (texts, labels) chunk, in order."""
        if not self.procs:
            for texts, labels in chunks:
                yield _tokenize_chunk(texts, labels)
            return
        pending = deque()  # the worker of each chunk in flight, oldest first
        for i, (texts, labels) in enumerate(chunks):
            if len(pending) == 2 * len(self.procs):
                yield self._receive(pending.popleft())
            w = i % len(self.procs)
            self._send(w, _tokenize_chunk, (texts, labels))
            pending.append(w)
        while pending:
            yield self._receive(pending.popleft())

    def each(self, fn, args):
        """fn(*args[w]) in worker w, side by side; the results in order."""
        for w, a in enumerate(args):
            self._send(w, fn, a)
        return [self._receive(w) for w in range(len(args))]

    def close(self):
        for conn in self.conns:
            conn.close()  # a worker reads the end of its pipe and exits: no waiting for read-ahead chunks
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        self.conns, self.procs = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def chunked(docs, start, chunk_docs):
    """Groups (where, text) documents into (texts, labels) chunks; labels carry the document index."""
    texts, labels = [], []
    for index, (where, text) in enumerate(docs, start):
        texts.append(text)
        labels.append(f"document {index} ({where})")
        if len(texts) == chunk_docs:
            yield texts, labels
            texts, labels = [], []
    if texts:
        yield texts, labels

# ----------------------------------------------------------------------------------------------
# Shards and the manifest: every file written to a temp name and renamed, so a kill never leaves half of one


def shard_name(prefix, index):
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def save_shard(path, tokens):
    """tokens as an .npy file at path (temp + rename); returns the file's sha256."""
    # through a plain .write(): np.save's fast path for a real file (fwrite) reports a full disk as "N
    # requested and M written", with no errno to tell it from any other failure
    write_file(path, lambda f: np.save(_Writer(f), tokens))
    return file_sha256(path)


class _Writer:
    def __init__(self, f):
        self.write = f.write


def write_file(path, write):
    """
    write(f) into path + .tmp, fsync, rename over path: a kill leaves the old file or the new one, never
    half of one. Neither name is followed if it is a symlink (O_NOFOLLOW). A failure (a full disk, a file
    size limit) removes the temp file and is a DataError that says what happened and where.
    """
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))  # the rename itself survives a power cut
    except OSError as e:
        if e.errno != errno.ELOOP:  # our temp file, not someone's symlink
            _remove(tmp)
        raise DataError(_write_error(path, e)) from None


def _fsync_dir(folder):
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename happened all the same
        pass
    finally:
        os.close(fd)


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_error(path, e):
    folder = os.path.dirname(path) or "."
    try:
        free = f"{shutil.disk_usage(folder).free / 1e9:.1f} GB free there now"
    except OSError:
        free = "free space unknown"
    resume = "rerun the same command to continue after the last finished shard"
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (f"disk full writing {path} ({free}); make room (or choose an --out on a bigger disk) "
                f"and {resume}")
    if e.errno == errno.EFBIG:
        return f"file size limit (ulimit -f) reached writing {path}; raise it and {resume}"
    if e.errno == errno.ELOOP:
        return f"{path}.tmp is a symbolic link; fineweb.py writes its own files only: remove it and {resume}"
    return f"cannot write {path} ({e.strerror or e}); {resume}"


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def save_manifest(out, manifest, lines=None):
    """
    manifest.json, one line per shard. json.dumps(indent=...) runs in pure Python, and the manifest is
    rewritten after every shard: 336 shards took 18 s. lines: the shards' encoded lines from the last
    call, reused (a finished shard never changes).
    """
    shards, lines = manifest["shards"], [] if lines is None else lines
    del lines[len(shards):]
    lines += [json.dumps(s) for s in shards[len(lines):]]
    fields = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items() if k != "shards"]
    fields.append(' "shards": [' + ("\n  " + ",\n  ".join(lines) + "\n ]" if lines else "]"))
    text = "{\n" + ",\n".join(fields) + "\n}\n"
    write_file(os.path.join(out, "manifest.json"), lambda f: f.write(text.encode()))


def open_manifest(out, params):
    """The manifest of out: a fresh one, or the one an earlier run with the same params left."""
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        if os.path.isdir(out) and glob.glob(os.path.join(out, "*.npy")):
            raise DataError(f"--out {out} holds .npy files but no manifest.json (made by another tool?); "
                            f"choose an empty --out folder")
        return {"params": params, "shards": [], "complete": False}
    try:
        with open(path) as f:
            manifest = json.load(f)
        old = manifest["params"]
        if not all({"file", "bytes", "tokens", "end"} <= set(s) for s in manifest["shards"]):
            raise KeyError("a shard without file, bytes, tokens or end")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is unreadable ({e.__class__.__name__}: {e}); "
                        f"delete {out} and run again") from None
    if old != params:
        diff = ", ".join(f"{k}: {old.get(k)!r} there, {params.get(k)!r} now"
                         for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k))
        raise DataError(f"--out {out} holds shards made with other parameters ({diff}); rerun with the "
                        f"same flags to continue it, or choose another --out (or delete it) to start over")
    for shard in manifest["shards"]:
        file = os.path.join(out, shard["file"])
        if not os.path.isfile(file) or os.path.getsize(file) != shard["bytes"]:
            raise DataError(f"{file} is missing or not the size {path} records; delete {out} and run again")
    return manifest


def load_shard(path, vocab_size=50257, ids=True):
    """A shard memory-mapped and checked: 1-D uint16, the size its header says, (if ids) ids < vocab_size."""
    from flags import ConfigError  # what train_gpt2.py raises for its --data
    fix = "rebuild the folder with fineweb.py (delete it, rerun the same command)"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # shorter than its header says (the mmap fails), not a .npy, ...
        raise ConfigError(f"shard {path} is unreadable or truncated ({e}); {fix}") from None
    if arr.dtype != np.uint16 or arr.ndim != 1:
        raise ConfigError(f"shard {path} holds {arr.dtype} {arr.shape}, not a 1-D uint16 token array; {fix}")
    if len(arr) == 0 or arr.offset + arr.nbytes != os.path.getsize(path):
        raise ConfigError(f"shard {path} is empty or longer than its header says; {fix}")
    if ids and int(arr.max()) >= vocab_size:
        raise ConfigError(f"shard {path} holds token ids >= {vocab_size}; {fix}")
    return arr


def find_shards(folder):
    """(train shard paths, val shard paths) of a fineweb.py output folder, told apart by name pattern."""
    from flags import ConfigError
    hint = "create it with: python fineweb.py (or pass --data=input.txt)"
    if not os.path.isdir(folder):
        raise ConfigError(f"--data={folder}: no such shard folder; {hint}")
    # fineweb.py's names, PREFIX_val_000000.npy and PREFIX_train_000001.npy: a prefix may contain "val" too
    found = [m for n in sorted(os.listdir(folder)) if (m := re.fullmatch(r"(.+)_(train|val)_\d+\.npy", n))]
    train, val = ([os.path.join(folder, m[0]) for m in found if m[2] == split] for split in ("train", "val"))
    if not train or not val:
        raise ConfigError(f"--data={folder}: needs *train*.npy and *val*.npy shards, found "
                          f"{len(train)} and {len(val)}; {hint}")
    return train, val


def verify_shards(out, names, sha256=False, error=DataError):
    """
    For train_gpt2.py: the shard files `names` found in out are those its manifest.json lists, whole (at
    their recorded sizes) and, with sha256=True, unchanged. No manifest: nothing to check, unless sha256.
    A failure raises `error` (train_gpt2.py passes its ConfigError).
    """
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        if sha256:
            raise error(f"--verify_shards: {out} has no manifest.json (fineweb.py writes one) "
                        f"to check against")
        return
    try:
        with open(path) as f:
            manifest = json.load(f)
        listed = {s["file"]: s for s in manifest["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise error(f"{path} is unreadable ({e}); delete {out} and rerun fineweb.py") from None
    if not manifest.get("complete"):
        raise error(f"{path}: fineweb.py has not finished {out}; "
                    f"rerun the same fineweb.py command to finish it")
    for name in sorted(set(names) | set(listed)):
        file = os.path.join(out, name)
        why = ("is not listed in manifest.json" if name not in listed
               else "is missing" if name not in names
               else "is not the size manifest.json records" if os.path.getsize(file) != listed[name]["bytes"]
               else "differs from manifest.json's sha256"
               if sha256 and file_sha256(file) != listed[name]["sha256"]
               else None)
        if why:
            raise error(f"shard {file} {why}; delete {out} and rerun fineweb.py (same flags) to rebuild it")


LOCK = ".fineweb.lock"  # in --out: held (flock) while a run writes there


def lock_out(out):
    """
    Creates out if need be and locks it for this process: (lock file descriptor, the outermost folder this
    made, or None). flock: the OS releases it when the process ends, even by kill -9: it never goes stale.
    """
    created = None
    parent = os.path.abspath(out)
    while not os.path.lexists(parent):
        created, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(out, exist_ok=True)
        # the lock file doubles as the probe that out is writable (os.access is wrong for root, read-only
        # mounts, chattr +i); O_NOFOLLOW: a symlink planted under our name is not followed
        fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC, 0o644)
    except OSError as e:
        why = "it is a file" if os.path.isfile(out) else e.strerror
        raise DataError(f"--out {out}: cannot write there ({why}); choose a writable folder") from None
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock
        return fd, created
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DataError(f"--out {out}: another fineweb.py (pid {holder}) is writing there; wait for it to "
                        f"finish, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, created


def write_shards(docs_from, out, params, shard_size=SHARD_SIZE, workers=1, max_tokens=None,
                 stop_after=None, chunk_docs=256, progress=True, prefix="edufineweb"):
    """
    Tokenizes the documents docs_from(start) yields into shards in out, continuing the run the
    manifest there records, if any. params (everything that shapes the output) must match that run's.
    stop_after: stop once out holds this many shards, as an interruption would. Returns the manifest.
    Holds a lock on out throughout: a second run on the same out is refused.
    """
    fd, created = lock_out(out)
    try:
        return _write_shards(docs_from, out, params, shard_size, workers, max_tokens, stop_after, chunk_docs,
                             progress, prefix)
    finally:
        if created and os.listdir(out) == [LOCK]:  # folders this run made and wrote nothing into
            os.remove(os.path.join(out, LOCK))
            folder = os.path.abspath(out)
            while len(folder) >= len(created) and not os.listdir(folder):
                os.rmdir(folder)
                folder = os.path.dirname(folder)
        os.close(fd)


def _write_shards(docs_from, out, params, shard_size, workers, max_tokens, stop_after, chunk_docs,
                  progress, prefix):
    fresh = not os.path.exists(os.path.join(out, "manifest.json"))
    manifest = open_manifest(out, params)
    if manifest["complete"]:
        shards = manifest["shards"]
        print(f"{out}: complete already ({len(shards)} shards, {sum(s['tokens'] for s in shards):,} tokens)")
        return manifest
    if fresh:
        save_manifest(out, manifest)  # no shards yet: it claims the folder, so a rerun continues it
    try:
        return _continue(docs_from, out, manifest, shard_size, workers, max_tokens, stop_after, chunk_docs,
                         progress, prefix)
    except BaseException:
        if fresh and not manifest["shards"]:  # nothing written: nothing of this run is left behind
            _remove(os.path.join(out, "manifest.json"))
        raise


def _continue(docs_from, out, manifest, shard_size, workers, max_tokens, stop_after, chunk_docs, progress,
              prefix):
    from tqdm import tqdm
    shards = manifest["shards"]
    # what a killed run was writing, by their exact names: no other file is ever removed
    following = shard_name(prefix, len(shards))
    for stale in (following, following + ".tmp", "manifest.json.tmp"):
        if os.path.isfile(os.path.join(out, stale)) and not os.path.islink(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    # where the stream continues: document `doc`, token `offset` of its tokens (<|endoftext|> is token 0)
    doc, offset = shards[-1]["end"] if shards else (0, 0)
    total = sum(s["tokens"] for s in shards)
    if shards:
        print(f"resuming after {len(shards)} shards ({total:,} tokens): document {doc}, token {offset}")
    budget = max_tokens if max_tokens is not None else float("inf")
    try:
        buf = np.empty(shard_size, dtype=np.uint16)
    except MemoryError:
        raise DataError(f"--shard_size={shard_size}: no memory for one shard "
                        f"({2 * shard_size / 1e9:.1f} GB); lower it") from None
    fill, start = 0, [doc, offset]
    bar, lines = None, []  # lines: the manifest's encoded shards, kept from one write to the next

    def finish(end):
        nonlocal fill, start, bar
        name = shard_name(prefix, len(shards))
        path = os.path.join(out, name)
        tokens = buf[:fill]
        sha = save_shard(path, tokens)
        shards.append({"file": name, "tokens": int(fill), "docs": int(np.count_nonzero(tokens == EOT)),
                       "start": start, "end": end, "bytes": os.path.getsize(path), "sha256": sha})
        try:
            save_manifest(out, manifest, lines)  # after the rename: a listed shard is always a whole one
        except DataError:
            shards.pop()
            _remove(path)  # whole, but listed nowhere: gone, so nothing reads it as finished
            raise
        fill, start = 0, end
        if bar is not None:
            bar.total = len(tokens)  # the short last shard's bar ends at 100%, not where the data ran out
            bar.refresh()
            bar.close()
            bar = None

    with Tokenizer(workers) as tokenizer:
        chunks = tokenizer.map(chunked(docs_from(doc), doc, chunk_docs)) if total < budget else []
        for tokens, lengths in chunks:
            ends = np.cumsum(lengths)  # chunk-relative end of each document
            i, offset = offset, 0  # the first document's tokens before offset are in a finished shard
            while i < len(tokens) and total < budget:
                if bar is None:
                    bar = tqdm(total=shard_size, desc=shard_name(prefix, len(shards)), unit="tok",
                               unit_scale=True, disable=not progress)
                take = int(min(shard_size - fill, len(tokens) - i, budget - total))
                buf[fill:fill + take] = tokens[i:i + take]
                fill, i, total = fill + take, i + take, total + take
                bar.update(take)
                if fill == shard_size or total == budget:
                    j = int(np.searchsorted(ends, i, side="right"))  # the document token i belongs to
                    finish([doc + j, int(i - (ends[j - 1] if j else 0))])
                    if stop_after is not None and len(shards) >= stop_after and total < budget:
                        print(f"stopped after {len(shards)} shards; rerun the same command to continue")
                        return manifest
            doc += len(lengths)
            if total >= budget:
                break
    if fill > 0:
        finish([doc, 0])
    if bar is not None:
        bar.close()
    if not shards:  # every document adds at least its <|endoftext|>: no token means no document
        raise DataError(f"the input holds no documents (0 rows or lines); nothing was written to {out}")
    manifest["complete"] = True
    save_manifest(out, manifest, lines)
    print(f"{out}: {len(shards)} shards, {total:,} tokens, {sum(s['docs'] for s in shards):,} documents")
    return manifest

# ----------------------------------------------------------------------------------------------
# Benchmark: tokens/s of the worker pipeline against a plain encode_ordinary loop


def benchmark(files, repeat, rounds=3, worker_counts=(1, 2), chunk_docs=256):
    """
    Tokens/s of a plain one-process encode_ordinary loop and of Tokenizer with each worker count,
    over the documents of files repeated `repeat` times. The modes take turns for `rounds` rounds
    and the best round of each counts: other processes on the machine only ever slow a round down.
    "ceiling": W plain loops over 1/W of the documents each, side by side in W processes with no
    pipeline at all: the most W workers can reach on this machine as loaded now.
    """
    docs = [text for _, text in iter_files(files)] * repeat
    labelled = [(str(i), text) for i, text in enumerate(docs)]
    w_max = max(worker_counts)
    print(f"benchmark: {len(docs)} documents ({len(docs) // repeat} x {repeat}), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    get_encoding()
    tokenizers = {w: Tokenizer(w) for w in worker_counts}
    try:
        for w, tokenizer in tokenizers.items():
            list(tokenizer.map(chunked([("warm-up", "hello")] * w, 0, 1)))  # workers up, tokenizer loaded
        rates = {mode: [] for mode in ["plain", *worker_counts] + (["ceiling"] if w_max > 1 else [])}
        for r in range(rounds):
            t0 = time.perf_counter()
            n_plain = _plain_loop(docs)
            rates["plain"].append(n_plain / (time.perf_counter() - t0))
            for w, tokenizer in tokenizers.items():
                t0 = time.perf_counter()
                n = sum(len(tokens) for tokens, _ in tokenizer.map(chunked(labelled, 0, chunk_docs)))
                rates[w].append(n / (time.perf_counter() - t0))
                assert n == n_plain, (n, n_plain)
            if w_max > 1:
                t0 = time.perf_counter()
                n = sum(tokenizers[w_max].each(_plain_loop, [(docs[i::w_max],) for i in range(w_max)]))
                rates["ceiling"].append(n / (time.perf_counter() - t0))
            print(f"round {r + 1}: " + " | ".join(f"{_mode_name(m, w_max)} {v[-1] / 1e6:.2f}M tok/s"
                                                   for m, v in rates.items()))
    finally:
        for tokenizer in tokenizers.values():
            tokenizer.close()
    best = {mode: max(v) for mode, v in rates.items()}
    print(f"best of {rounds} rounds ({n_plain:,} tokens each), "
          f"load average {os.getloadavg()[0]:.2f} at the end:")
    for mode, rate in best.items():
        ratio = rate / best["plain"]
        print(f"  {_mode_name(mode, w_max):>18}: {rate / 1e6:.2f}M tok/s = {ratio:.2f}x the plain loop")
    return best


def _plain_loop(texts):
    enc = get_encoding()
    return sum(len(enc.encode_ordinary(text)) + 1 for text in texts)  # +1: the <|endoftext|>


def _mode_name(mode, w_max):
    if mode == "plain":
        return "plain loop"
    if mode == "ceiling":
        return f"ceiling: {w_max} loops"
    return f"fineweb {mode} worker" + ("s" if mode > 1 else "")

# ----------------------------------------------------------------------------------------------
# Command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own prints the usage too: several lines for one mistake
        print(f"error: {message}; see python fineweb.py --help", file=sys.stderr)
        raise SystemExit(2)


MAX_SHARD_SIZE = 1_000_000_000  # tokens: a shard is built in memory (2 GB) and train_gpt2.py loads it whole
MAX_CHUNK_DOCS = 1_000_000


def parse_args(argv):
    """The flags, each checked before any work: a bad one is one line on stderr and exit 2."""
    p = Parser(description=__doc__.split("\n\n")[0].strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hugging Face dataset name")
    p.add_argument("--config", default="sample-10BT", help="dataset config (name); '' for none")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--download", action="store_true", help="download the whole split into the Hugging Face "
                   "cache first (load_dataset), then read it from there; default: stream it, storing nothing")
    p.add_argument("--files", nargs="+", metavar="GLOB", help="local .jsonl/.parquet/.txt files instead of "
                   "the dataset (jsonl/parquet: the \"text\" field; a txt file is one document)")
    p.add_argument("--out", default=None, help="output folder (default: edu_fineweb10B next to this script)")
    p.add_argument("--prefix", default="edufineweb", help="shard file name prefix")
    p.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="tokens per shard")
    p.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens (small runs)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--stop_after", type=int, default=None, help="stop once --out holds this many shards, "
                   "as an interruption would (rerun to continue)")
    p.add_argument("--chunk_docs", type=int, default=256, help="documents per worker task")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--benchmark", action="store_true", help="measure tokens/s on --files and exit")
    p.add_argument("--repeat", type=int, default=10,
                   help="benchmark: pass over the documents this many times")
    p.add_argument("--rounds", type=int, default=3, help="benchmark: rounds of all modes; the best counts")
    args = p.parse_args(argv)
    cpus = os.cpu_count() or 1
    limits = {"shard_size": MAX_SHARD_SIZE, "workers": 4 * cpus, "chunk_docs": MAX_CHUNK_DOCS,
              "max_tokens": None, "stop_after": None, "repeat": 10_000, "rounds": 1_000}
    for name, most in limits.items():
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name}={value}: must be >= 1")
        if value is not None and most is not None and value > most:
            why = f" (4 per CPU; this machine has {cpus})" if name == "workers" else ""
            p.error(f"--{name}={value}: at most {most:,}{why}")
    for name in ("dataset", "config", "split", "out", "prefix"):
        value = getattr(args, name)
        if value is not None and "\0" in value:
            p.error(f"--{name}: contains a NUL character")
    for pattern in args.files or []:
        if "\0" in pattern or not pattern:
            p.error(f"--files {pattern!r}: not a path or glob")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", args.prefix):
        p.error(f"--prefix={args.prefix!r}: a file name prefix of letters, digits, '.', '_' and '-' "
                f"(at most 100), starting with a letter or digit; shards go in --out")
    if args.out == "":
        p.error("--out is empty: give a folder")
    if args.benchmark and not args.files:
        p.error("--benchmark needs --files (e.g. tests/data/fineweb_sample_*.parquet)")
    return args


def rerun_command(args, out, shard_size):
    """The command line that repeats this run into out with shard_size: flags that shape the output only."""
    script = os.path.relpath(os.path.abspath(__file__))
    cmd = ["python", script if not script.startswith("..") else os.path.abspath(__file__)]
    if args.files:
        cmd += ["--files", *args.files]
    else:
        cmd += [f"--dataset={args.dataset}", f"--config={args.config}", f"--split={args.split}"]
    cmd += [f"--out={out}", f"--shard_size={shard_size}"]
    cmd += [f"--prefix={args.prefix}"] if args.prefix != "edufineweb" else []
    cmd += [f"--max_tokens={args.max_tokens}"] if args.max_tokens else []
    return shlex.join(cmd)


def one_shard_warning(args, out, total):
    """One val shard and no train shard: say so, and the exact command that makes about 10 shards."""
    if total < 2:
        return f"warning: {out} holds 1 token: no train shard can be cut from it; give more text"
    size = -(-total // 10)  # ceil: val + 9 train shards, so val is about a tenth, as in a big run
    new_out = f"{out.rstrip(os.sep)}_{size}"
    return (f"warning: {out} holds only a val shard ({total:,} tokens, under --shard_size) and train_gpt2.py "
            f"needs a train shard too; rerunning in {out} with another --shard_size is refused, so write 10 "
            f"shards into a new folder: {rerun_command(args, new_out, size)} "
            f"(then train with --data={shlex.quote(new_out)})")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.benchmark:
            benchmark(list_files(args.files), args.repeat, args.rounds, chunk_docs=args.chunk_docs)
            return 0
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "edu_fineweb10B")
        if args.files:
            files = list_files(args.files)
            source = {"files": [[os.path.abspath(f), os.path.getsize(f)] for f in files]}

            def docs_from(start):
                return iter_files(files, start)
        else:
            source = {"dataset": args.dataset, "config": args.config, "split": args.split}

            def docs_from(start):
                return iter_dataset(args.dataset, args.config, args.split, start, streaming=not args.download)
        # everything that shapes the bytes of the output; workers, chunk_docs, --download do not
        params = {"format": FORMAT, "tokenizer": "gpt2", "source": source, "shard_size": args.shard_size,
                  "max_tokens": args.max_tokens, "prefix": args.prefix}
        manifest = write_shards(docs_from, out, params, args.shard_size, args.workers, args.max_tokens,
                                args.stop_after, args.chunk_docs, not args.no_progress, args.prefix)
        if manifest["complete"] and len(manifest["shards"]) == 1:
            print(one_shard_warning(args, out, manifest["shards"][0]["tokens"]), file=sys.stderr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to continue after the last finished shard",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
