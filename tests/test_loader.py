"""train_gpt2's token-stream loader: exact windows, ranks, shard boundaries, shuffle, resume, val loss,
bad shards."""
import json
import re
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import fineweb
import train_gpt2
from test_fineweb import random_docs, write_jsonl
from device import DistInfo
from fineweb import find_shards, load_shard
from train_gpt2 import EOT, ConfigError, DataLoaderLite, GPT, GPTConfig, Source, build_data, evaluate_loss


def save(path, arr):
    np.save(path, arr)
    return str(path)


def shard_sources(paths):
    return [Source(lambda p=p: load_shard(p)) for p in paths]


def synthetic_shards(folder, lengths, seed=0, docs=False):
    """Shards of random ids; with docs=True each is whole documents (<|endoftext|> + 0..40 tokens)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, n in enumerate(lengths):
        arr = rng.integers(0, EOT, n).astype(np.uint16)
        if docs:
            starts = np.flatnonzero(rng.random(n) < 1 / 20)
            arr[np.concatenate(([0], starts))] = EOT
        paths.append(save(folder / f"shard_train_{i:06d}.npy", arr))
    return paths


def cycled(paths, n):
    """The first n tokens of the shards read in order, over and over: the unshuffled stream."""
    one = np.concatenate([np.load(p) for p in paths]).astype(np.int64)
    return np.tile(one, n // len(one) + 1)[:n]


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def read_stream(loader, n):
    """n tokens of the stream as a one-rank loader gives them (its inputs, batch after batch)."""
    BT = loader.B * loader.T
    xs = [loader.next_batch()[0].reshape(-1) for _ in range((n + BT - 1) // BT)]
    return torch.cat(xs)[:n].numpy()


def split_docs(stream):
    """Documents of a token stream: each starts at an <|endoftext|>."""
    return [tuple(d) for d in np.split(stream, np.flatnonzero(stream == EOT)[1:])]


def test_windows_are_exact_and_wrap_into_the_next_epoch(tmp_path):
    paths = synthetic_shards(tmp_path, [97])  # 97 tokens: no window size divides it
    B, T = 2, 5
    loader = DataLoaderLite(shard_sources(paths), B, T)
    stream = cycled(paths, 40 * B * T + 1)
    for k, (x, y) in enumerate(batches(loader, 40)):  # ~4 epochs
        assert x.shape == y.shape == (B, T) and x.dtype == torch.long
        window = stream[k * B * T:(k + 1) * B * T + 1]
        np.testing.assert_array_equal(x.reshape(-1).numpy(), window[:-1])
        np.testing.assert_array_equal(y.reshape(-1).numpy(), window[1:])  # y is x shifted by one


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("W", [1, 2, 3])
def test_ranks_are_disjoint_and_cover_the_stream(tmp_path, W, shuffle):
    paths = synthetic_shards(tmp_path, [150, 61, 230], docs=True)
    B, T, steps = 2, 7, 30
    stream = read_stream(DataLoaderLite(shard_sources(paths), B, T, shuffle=shuffle, seed=3),
                         (steps * W + 1) * B * T + 1)
    seen = []
    for r in range(W):
        loader = DataLoaderLite(shard_sources(paths), B, T, rank=r, world_size=W, shuffle=shuffle, seed=3)
        for s, (x, y) in enumerate(batches(loader, steps)):
            k = s * W + r  # rank r takes window r of every W
            np.testing.assert_array_equal(x.reshape(-1).numpy(), stream[k * B * T:(k + 1) * B * T])
            np.testing.assert_array_equal(y.reshape(-1).numpy(), stream[k * B * T + 1:(k + 1) * B * T + 1])
            seen.append(k)
    assert sorted(seen) == list(range(steps * W))  # disjoint, and together every window


def test_shard_boundaries_lose_no_token(tmp_path):
    """fineweb.py shards through build_data: the train stream is the train shards back to back, cycled."""
    files = [write_jsonl(tmp_path / "docs.jsonl", random_docs(80, seed=4))]
    out = str(tmp_path / "shards")
    assert fineweb.main(["--files", *files, "--out", out, "--shard_size=20000", "--workers=1",
                         "--no_progress"]) == 0
    train_paths, val_paths = find_shards(out)
    assert len(train_paths) >= 3 and len(val_paths) == 1
    B, T = 3, 257  # 771-token windows: never aligned with the 20,000-token shards
    cfg = train_gpt2.TrainConfig(data=out)
    loader, val_sources = build_data(cfg, B, T, rank=0, world_size=1)
    total = sum(len(np.load(p)) for p in train_paths)
    n_batches = total // (B * T) + 20  # past the end of the last shard, into the second epoch
    stream = cycled(train_paths, n_batches * B * T + 1)
    for k, (x, y) in enumerate(batches(loader, n_batches)):
        window = stream[k * B * T:(k + 1) * B * T + 1]
        np.testing.assert_array_equal(x.reshape(-1).numpy(), window[:-1])
        np.testing.assert_array_equal(y.reshape(-1).numpy(), window[1:])
    np.testing.assert_array_equal(np.concatenate([s.arr for s in val_sources]), np.load(val_paths[0]))


def test_shuffle_permutes_documents_per_epoch(tmp_path):
    paths = synthetic_shards(tmp_path, [400, 333, 517], docs=True)
    n = sum(len(np.load(p)) for p in paths)
    docs = sorted(split_docs(cycled(paths, n)))

    def epochs(seed, k=3):
        stream = read_stream(DataLoaderLite(shard_sources(paths), 4, 9, shuffle=True, seed=seed), k * n)
        return [stream[e * n:(e + 1) * n] for e in range(k)]

    a, again, other = epochs(seed=7), epochs(seed=7), epochs(seed=8)
    for epoch in a + other:
        assert sorted(split_docs(epoch)) == docs  # the same documents, each whole, once
    for e in range(3):
        np.testing.assert_array_equal(a[e], again[e])  # reproducible from the seed
        assert not np.array_equal(a[e], other[e])  # another seed, another order
        assert not np.array_equal(a[e], cycled(paths, n))  # not the stored order
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])  # a new order each epoch


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_dict_resumes_the_same_batches(tmp_path, shuffle):
    paths = synthetic_shards(tmp_path, [300, 211], docs=True)
    first = DataLoaderLite(shard_sources(paths), 2, 11, rank=1, world_size=2, shuffle=shuffle, seed=5)
    batches(first, 9)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint holds plain data
    expected = batches(first, 25)  # crosses two epoch boundaries
    resumed = DataLoaderLite(shard_sources(paths), 2, 11, rank=1, world_size=2, shuffle=shuffle, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, batches(resumed, 25)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    other_seed = DataLoaderLite(shard_sources(paths), 2, 11, shuffle=shuffle, seed=6)
    with pytest.raises(ConfigError, match="--shuffle/--seed differ from the checkpoint"):
        other_seed.load_state_dict(state)

# ----------------------------------------------------------------------------------------------
# Validation loss: the same for one rank and for two (gloo, on CPU)


def tiny_gpt(state=None):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    if state is not None:
        model.load_state_dict(state)
    return model


def _val_loss_rank(rank, world_size, init_file, weights, val_paths, B, T, val_tokens, out):
    """One rank of the two-process evaluation (torch.multiprocessing.spawn calls it)."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = tiny_gpt(torch.load(weights, weights_only=True))
        d = DistInfo(rank, rank, world_size, "cpu", "cpu", rank == 0)
        loss = evaluate_loss(model, shard_sources(val_paths), B, T, val_tokens, d, nullcontext())
        with open(f"{out}.{rank}", "w") as f:
            f.write(repr(loss))
    finally:
        dist.destroy_process_group()


def test_val_loss_is_the_same_on_one_and_two_ranks(tmp_path):
    rng = np.random.default_rng(0)
    val_paths = [save(tmp_path / f"val_{i}.npy", rng.integers(0, 50257, n).astype(np.uint16))
                 for i, n in enumerate([300, 141])]
    B, T = 2, 16
    val_tokens = 7 * B * T  # 7 windows: one rank gets 4, the other 3, and the second crosses a shard
    model = tiny_gpt()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    one_rank = DistInfo(0, 0, 1, "cpu", "cpu", True)
    loss1 = evaluate_loss(model, shard_sources(val_paths), B, T, val_tokens, one_rank, nullcontext())

    # the definition: the mean loss of the first 7 windows of the val stream
    stream = torch.from_numpy(cycled(val_paths, 7 * B * T + 1))
    with torch.no_grad():
        losses = [model(stream[k * B * T:(k + 1) * B * T].view(B, T),
                        stream[k * B * T + 1:(k + 1) * B * T + 1].view(B, T))[1].item() for k in range(7)]
    assert loss1 == pytest.approx(sum(losses) / 7, abs=1e-6)

    out = str(tmp_path / "loss")
    args = (2, str(tmp_path / "store"), str(tmp_path / "weights.pt"), val_paths, B, T, val_tokens, out)
    torch.multiprocessing.spawn(_val_loss_rank, args=args, nprocs=2)
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            assert abs(float(f.read()) - loss1) < 1e-6

# ----------------------------------------------------------------------------------------------
# Bad data: a ConfigError that names the folder or file and says what to do


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ConfigError, match="no such shard folder.*python fineweb.py") as e:
        find_shards(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="found 0 and 0.*python fineweb.py") as e:
        find_shards(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(e.value)
    save(tmp_path / "empty" / "x_val_000000.npy", np.zeros(10, np.uint16))
    with pytest.raises(ConfigError, match="found 0 and 1"):
        find_shards(str(tmp_path / "empty"))


def truncated(path):
    save(path, np.arange(1000, dtype=np.uint16))
    with open(path, "r+b") as f:
        f.truncate(1000)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: save(p, np.arange(100, dtype=np.int32)), "holds int32 (100,), not a 1-D uint16"),
    (lambda p: save(p, np.zeros((4, 25), np.uint16)), "holds uint16 (4, 25), not a 1-D uint16"),
    (truncated, "is unreadable"),
    (lambda p: p.write_text("not a numpy file") and str(p), "is unreadable"),
    (lambda p: save(p, np.array([1, 2, 50257], np.uint16)), "holds token ids >= 50257"),
    (lambda p: save(p, np.zeros(0, np.uint16)), "is empty"),
])
def test_bad_shard_is_named(tmp_path, make, message):
    good = synthetic_shards(tmp_path, [50])
    bad = make(tmp_path / "bad_train_000002.npy")
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_shard(bad)
    assert bad in str(e.value) and "fineweb.py" in str(e.value)
    # the loader opens shards when it reaches them, and fails the same way there
    loader = DataLoaderLite(shard_sources(good + [bad]), 2, 10)
    with pytest.raises(ConfigError, match=re.escape(message)):
        batches(loader, 5)


def test_main_reports_a_missing_data_folder(tmp_path, capsys):
    missing = str(tmp_path / "no_shards")
    code = train_gpt2.main([f"--data={missing}", "--device=cpu", "--n_layer=1", "--n_head=1", "--n_embd=8",
                            "--block_size=8", "--batch_size=1", "--total_batch_size=8",
                            f"--log_dir={tmp_path / 'log'}", "--compile=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: --data={missing}: no such shard folder") and "python fineweb.py" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
