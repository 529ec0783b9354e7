"""
FineWeb-Edu as GPT-2 token shards for train_gpt2.py.

    python fineweb.py                                      # HuggingFaceFW/fineweb-edu sample-10BT -> edu_fineweb10B/
    python fineweb.py --files 'data/*.parquet' --out my_shards --shard_size 10000000   # local jsonl/parquet/txt
    python fineweb.py --benchmark --files tests/data/fineweb_sample_*.parquet     # tokens/s, 1 vs 2 workers

Every document becomes <|endoftext|> followed by its GPT-2 tokens (tiktoken encode_ordinary). The
stream is cut into uint16 .npy shards of exactly --shard_size tokens (only the last is shorter); a
document that does not fit continues in the next shard. The first shard is the validation split:
edufineweb_val_000000.npy, edufineweb_train_000001.npy, ...

Rerunning the same command after an interruption (Ctrl-C, kill -9, a lost node) continues after the
last finished shard: <out>/manifest.json records where each one ends in the document stream, and the
result is byte-identical to an uninterrupted run.
Importing this file runs nothing: `from fineweb import tokenize_docs, write_shards`.
"""

import argparse
import glob
import hashlib
import json
import os
import sys
import threading
import time
from collections import deque

import numpy as np

EOT = 50256  # <|endoftext|>: delimits documents, as in GPT-2's training data
SHARD_SIZE = 100_000_000  # tokens per shard, as in build-nanogpt: 10B tokens -> 100 shards
FORMAT = 1  # layout version of shards + manifest; a folder of another version is not resumed
READABLE = (".jsonl", ".parquet", ".txt")


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
                skip = yield from _iter_parquet(path, skip)
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


def _iter_parquet(path, skip):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except OSError:
        raise
    except Exception as e:  # pyarrow's ArrowInvalid for a file that is not parquet
        raise DataError(f"--files: {path} is not a readable parquet file ({e}); download it again") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"--files: {path} has no \"text\" column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        if skip >= n:  # whole row groups are skipped from the metadata alone
            skip, row = skip - n, row + n
            continue
        try:
            texts = pf.read_row_group(group, columns=["text"]).column("text").to_pylist()
        except OSError:
            raise
        except Exception as e:  # a damaged row group
            raise DataError(f"--files: {path} row group {group} is unreadable ({e}); download it again") from None
        for i in range(skip, n):
            yield f"{path} row {row + i}", texts[i]
        skip, row = 0, row + n
    return skip


def iter_dataset(name, config, split, start=0, cache_dir=None):
    """(where, text) for each row of a Hugging Face dataset, from row start on (downloaded once, then cached)."""
    from datasets import load_dataset
    try:
        ds = load_dataset(name, name=config or None, split=split, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown name or config, ...: datasets raises many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"--dataset {name} --config {config} --split {split}: could not load it "
                        f"({e.__class__.__name__}: {first}); check the names and the connection, "
                        f"or pass local files with --files") from None
    if "text" not in ds.column_names:
        raise DataError(f"--dataset {name}: no \"text\" column (columns: {', '.join(ds.column_names)})")
    has_id = "id" in ds.column_names
    ds = ds.select_columns(["text", "id"] if has_id else ["text"])
    step = 1024  # rows per slice: random access by row makes resuming instant
    for first in range(start, len(ds), step):
        rows = ds[first:first + step]
        for i, text in enumerate(rows["text"]):
            yield f"{name} row {first + i}" + (f" id {rows['id'][i]}" if has_id else ""), text

# ----------------------------------------------------------------------------------------------
# Tokenization: chunks of documents to uint16 token arrays, in worker processes, in order


_start_error = None  # set in a pool worker whose start-up failed


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
            raise DataError(f"{label}: text is {type(text).__name__}, not a string; fix or drop this document")
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


def _init_worker():
    # a worker whose parent was killed (kill -9) exits instead of waiting forever for tasks
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()
    try:
        get_encoding()
    except Exception as e:  # a Pool respawns a worker whose initializer raises, forever: fail its tasks instead
        global _start_error
        detail = e if isinstance(e, DataError) else f"{e.__class__.__name__}: {e}"
        _start_error = f"a tokenizer worker could not start: {detail}".splitlines()[0]


def _tokenize_chunk(texts, labels):
    if _start_error:
        raise DataError(_start_error)
    return tokenize_docs(texts, labels)


class Tokenizer:
    """
    Tokenizes chunks of documents in `workers` processes and returns them in order. At most two
    chunks per worker are in flight: Pool.imap would read the whole dataset into its task queue.
    """

    def __init__(self, workers):
        self.workers, self.pool = workers, None
        if workers > 1:
            import multiprocessing
            # spawn: fork is unsafe once datasets/pyarrow have started threads
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker)

    def map(self, chunks):
        """(tokens, lengths) for each (texts, labels) chunk, in order."""
        if self.pool is None:
            for texts, labels in chunks:
                yield _tokenize_chunk(texts, labels)
            return
        pending = deque()
        for texts, labels in chunks:
            pending.append(self.pool.apply_async(_tokenize_chunk, (texts, labels)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()  # no waiting for read-ahead chunks nobody will use
            self.pool.join()
            self.pool = None

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
    """np.save to path + .tmp, fsync, rename; returns the file's sha256."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, tokens)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return file_sha256(path)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def save_manifest(out, manifest):
    path = os.path.join(out, "manifest.json")
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


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
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); delete {out} and run again") from None
    old = manifest.get("params", {})
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


def verify_shards(out, names, sha256=False, error=DataError):
    """
    For train_gpt2.py: the shard files `names` found in out are those its manifest.json lists, whole (at
    their recorded sizes) and, with sha256=True, unchanged. No manifest: nothing to check, unless sha256.
    A failure raises `error` (train_gpt2.py passes its ConfigError).
    """
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        if sha256:
            raise error(f"--verify_shards: {out} has no manifest.json (fineweb.py writes one) to check against")
        return
    try:
        with open(path) as f:
            manifest = json.load(f)
        listed = {s["file"]: s for s in manifest["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise error(f"{path} is unreadable ({e}); delete {out} and rerun fineweb.py") from None
    if not manifest.get("complete"):
        raise error(f"{path}: fineweb.py has not finished {out}; rerun the same fineweb.py command to finish it")
    for name in sorted(set(names) | set(listed)):
        file = os.path.join(out, name)
        why = ("is not listed in manifest.json" if name not in listed else "is missing" if name not in names
               else "is not the size manifest.json records" if os.path.getsize(file) != listed[name]["bytes"]
               else "differs from manifest.json's sha256" if sha256 and file_sha256(file) != listed[name]["sha256"]
               else None)
        if why:
            raise error(f"shard {file} {why}; delete {out} and rerun fineweb.py (same flags) to rebuild it")


def write_shards(docs_from, out, params, shard_size=SHARD_SIZE, workers=1, max_tokens=None,
                 stop_after=None, chunk_docs=256, progress=True, prefix="edufineweb"):
    """
    Tokenizes the documents docs_from(start) yields into shards in out, continuing the run the
    manifest there records, if any. params (everything that shapes the output) must match that run's.
    stop_after: stop once out holds this many shards, as an interruption would. Returns the manifest.
    """
    from tqdm import tqdm
    try:  # a probe file, not os.access: root ignores permission bits, not read-only mounts or chattr +i
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, f".probe.{os.getpid()}"), "w").close()
        os.remove(os.path.join(out, f".probe.{os.getpid()}"))
    except OSError as e:
        why = "it is a file" if os.path.isfile(out) else e.strerror
        raise DataError(f"--out {out}: cannot write there ({why}); choose a writable folder") from None
    manifest = open_manifest(out, params)
    shards = manifest["shards"]
    if manifest["complete"]:
        print(f"{out}: complete already ({len(shards)} shards, {sum(s['tokens'] for s in shards):,} tokens)")
        return manifest
    for stale in (shard_name(prefix, len(shards)), "manifest.json"):  # what a killed run was writing; no other file
        if os.path.exists(os.path.join(out, stale + ".tmp")):
            os.remove(os.path.join(out, stale + ".tmp"))
    # where the stream continues: document `doc`, token `offset` of its tokens (<|endoftext|> is token 0)
    doc, offset = shards[-1]["end"] if shards else (0, 0)
    total = sum(s["tokens"] for s in shards)
    if shards:
        print(f"resuming after {len(shards)} shards ({total:,} tokens): document {doc}, token {offset}")
    budget = max_tokens if max_tokens is not None else float("inf")
    buf = np.empty(shard_size, dtype=np.uint16)
    fill, start = 0, [doc, offset]
    bar = None

    def finish(end):
        nonlocal fill, start, bar
        name = shard_name(prefix, len(shards))
        tokens = buf[:fill]
        sha = save_shard(os.path.join(out, name), tokens)
        shards.append({"file": name, "tokens": int(fill), "docs": int(np.count_nonzero(tokens == EOT)),
                       "start": start, "end": end, "bytes": os.path.getsize(os.path.join(out, name)),
                       "sha256": sha})
        save_manifest(out, manifest)  # after the rename: a listed shard is always a whole one
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
    manifest["complete"] = True
    save_manifest(out, manifest)
    print(f"{out}: {len(shards)} shards, {total:,} tokens, {sum(s['docs'] for s in shards):,} documents")
    if len(shards) < 2:
        print("warning: only a val shard; train_gpt2.py needs a train shard too: lower --shard_size")
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
                n = sum(tokenizers[w_max].pool.map(_plain_loop, [docs[i::w_max] for i in range(w_max)]))
                rates["ceiling"].append(n / (time.perf_counter() - t0))
            print(f"round {r + 1}: " + " | ".join(f"{_mode_name(m, w_max)} {v[-1] / 1e6:.2f}M tok/s"
                                                   for m, v in rates.items()))
    finally:
        for tokenizer in tokenizers.values():
            tokenizer.close()
    best = {mode: max(v) for mode, v in rates.items()}
    print(f"best of {rounds} rounds ({n_plain:,} tokens each), load average {os.getloadavg()[0]:.2f} at the end:")
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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hugging Face dataset name")
    p.add_argument("--config", default="sample-10BT", help="dataset config (name); '' for none")
    p.add_argument("--split", default="train", help="dataset split")
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
    p.add_argument("--repeat", type=int, default=10, help="benchmark: pass over the documents this many times")
    p.add_argument("--rounds", type=int, default=3, help="benchmark: rounds of all modes; the best counts")
    args = p.parse_args(argv)
    for name in ("shard_size", "workers", "chunk_docs", "repeat", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not args.prefix or "/" in args.prefix or os.sep in args.prefix:
        p.error(f"--prefix {args.prefix!r}: a file name prefix, without a path separator (shards go in --out)")
    if args.max_tokens is not None and args.max_tokens < 1:
        p.error("--max_tokens must be >= 1")
    if args.benchmark and not args.files:
        p.error("--benchmark needs --files (e.g. tests/data/fineweb_sample_*.parquet)")
    return args


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
                return iter_dataset(args.dataset, args.config, args.split, start)
        # everything that shapes the bytes of the output; workers and chunk_docs do not
        params = {"format": FORMAT, "tokenizer": "gpt2", "source": source, "shard_size": args.shard_size,
                  "max_tokens": args.max_tokens, "prefix": args.prefix}
        write_shards(docs_from, out, params, args.shard_size, args.workers, args.max_tokens, args.stop_after,
                     args.chunk_docs, progress=not args.no_progress, prefix=args.prefix)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to continue after the last finished shard", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
