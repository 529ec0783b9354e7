"""Bad input to train_gpt2.py, fineweb.py, hellaswag.py, export_hf.py: exit 2 and one line naming the flag or
file and the fix, before any work is done; and shard folders read by their exact names, never misread."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import export_hf
import fineweb
import hellaswag
import train_gpt2
from conftest import ROOT
from test_fineweb import random_docs, write_jsonl

# a model small enough that a case which is (wrongly) accepted still finishes in about a second
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
        "--total_batch_size=32",
        "--val_tokens=64", "--dtype=float32", "--num_samples=0", "--max_steps=1", "--warmup_steps=0",
        "--eval_interval=0", "--compile=false", "--device=cpu"]


def text_file(path, words=2000, encoding="utf-8"):
    text = "café " + " ".join(random_docs(1, 0, (words, words + 1))[0].split())
    path.write_bytes(text.encode(encoding, "replace"))  # latin-1: "é" is the byte 0xe9, not UTF-8
    return str(path)


def one_error_line(capsys, rc, *names):
    """stderr of a main() that returned rc: one line, `error: ...`, naming each of names."""
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (rc, err)
    for name in names:
        assert name in err, err
    return err


def shard_folder(folder, n_train, tokens=200, prefix="edufineweb"):
    """A fineweb.py-style folder of random shards with no manifest: PREFIX_val_000000.npy,
    PREFIX_train_00000i.npy."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_train + 1):
        np.save(folder / fineweb.shard_name(prefix, i), rng.integers(0, 50257, tokens, dtype=np.uint16))
    return str(folder)


# each bad-input case of train_gpt2.py: (extra flags, what the error line must name);
# {tmp} is the test's folder
CASES = {
    "batch_size=-2": (["--batch_size=-2"], ["--batch_size=-2"]),
    "block_size=0": (["--block_size=0"], ["--block_size=0"]),
    "n_head=0": (["--n_head=0"], ["--n_head=0"]),
    "n_embd=65,n_head=2": (["--n_embd=65", "--n_head=2"], ["--n_embd=65", "--n_head=2"]),
    "max_lr=nan": (["--max_lr=nan"], ["--max_lr=nan"]),
    "max_lr=inf": (["--max_lr=inf"], ["--max_lr=inf"]),
    "seed=-1": (["--seed=-1"], ["--seed=-1"]),
    "seed=2**32": (["--seed=4294967296"], ["--seed=4294967296", "2**32"]),
    "beta2=1.5": (["--beta2=1.5"], ["--beta2"]),
    "empty sample_prompt": (["--sample_prompt=", "--num_samples=1", "--eval_interval=1"],
                            ["--sample_prompt"]),
    "device=mps": (["--device=mps"], ["--device=mps", "--device=cpu"]),
    # before any download: GPT-2's names have 1024 positions
    "init_from=gpt2,block_size=2048": (["--init_from=gpt2", "--block_size=2048"],
                                       ["--block_size=2048", "1024"]),
    "non-UTF-8 text": (["--data={tmp}/latin1.txt"], ["latin1.txt", "UTF-8"]),
    "one .npy file": (["--data={tmp}/shards/edufineweb_train_000001.npy"], ["--data=", "folder"]),
    "log_dir is a file": (["--log_dir={tmp}/a_file"], ["--log_dir=", "a_file", "it is a file"]),
    "log_dir under a file": (["--log_dir={tmp}/a_file/log"], ["--log_dir=", "writable"]),
    "val split < one batch": (["--eval_interval=1", "--val_tokens=20"],
                              ["--val_tokens=20", "raise --val_tokens", "--batch_size"]),
    # no evaluation, but the train split is smaller than one batch: still an error
    "text < one batch, no eval": (["--data={tmp}/tiny.txt"], ["tiny.txt", "--batch_size"]),
}


@pytest.mark.parametrize("case", CASES)
def test_train_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, case):
    if case == "device=mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text_file(tmp_path / "input.txt")
    text_file(tmp_path / "latin1.txt", encoding="latin-1")
    text_file(tmp_path / "tiny.txt", words=10)
    (tmp_path / "a_file").write_text("not a folder")
    shard_folder(tmp_path / "shards", 1)
    flags, names = CASES[case]
    log_dir = tmp_path / "log"
    rc = train_gpt2.main([f"--data={tmp_path / 'input.txt'}", f"--log_dir={log_dir}", *TINY,
                          *(f.format(tmp=tmp_path) for f in flags)])
    one_error_line(capsys, rc, *names)
    assert not list(log_dir.glob("ckpt_*.pt"))  # nothing trained, nothing written


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_unwritable_log_dir_fails_before_step_0(tmp_path, capsys):
    # /proc/self is a folder no one can create files in, root included (chmod 555 would not stop root)
    rc = train_gpt2.main([f"--data={text_file(tmp_path / 'input.txt')}", "--log_dir=/proc/self", *TINY])
    one_error_line(capsys, rc, "--log_dir=/proc/self", "cannot write there")
    assert "step " not in capsys.readouterr().out


@pytest.mark.parametrize("flags, names", [
    (["--block_size=0"], ["--block_size=0"]),
    # an offline download failure (HF_HUB_OFFLINE=1, no such cached model) is one line, not a traceback
    (["--init_from=no-such-org/no-such-gpt2"], ["no-such-org/no-such-gpt2", "could not load it"]),
])
def test_cli_prints_no_traceback(tmp_path, flags, names):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *TINY, *flags,
                          f"--data={text_file(tmp_path / 'input.txt')}", f"--log_dir={tmp_path / 'log'}"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
            and all(n in out.stderr for n in names))


def test_negative_batch_size_does_not_train(tmp_path, capsys):
    """Issue 12 item 7: --batch_size=-2 trained 'successfully' (loss 0.0000) and wrote a checkpoint."""
    log_dir = tmp_path / "log"
    rc = train_gpt2.main([f"--data={text_file(tmp_path / 'input.txt')}", f"--log_dir={log_dir}", *TINY,
                          "--batch_size=-2", "--total_batch_size=64"])
    one_error_line(capsys, rc, "--batch_size=-2")
    assert not os.path.exists(log_dir / "log.txt") and not list(log_dir.glob("ckpt_*"))

# ----------------------------------------------------------------------------------------------
# Shards: split by the exact name pattern, every shard checked at start-up


def test_prefix_containing_val_keeps_train_and_val_apart(tmp_path):
    """Issue 12 item 5: with --prefix=eval, every shard name contains "val", and train shards were read
    as val."""
    out = tmp_path / "eval_shards"
    docs = write_jsonl(tmp_path / "docs.jsonl", random_docs(30, 1, (50, 200)))
    assert fineweb.main(["--files", docs, "--out", str(out), "--shard_size=1000", "--prefix=eval",
                         "--no_progress", "--workers=1"]) == 0
    train, val = fineweb.find_shards(str(out))
    assert [os.path.basename(p) for p in val] == ["eval_val_000000.npy"]
    assert ([os.path.basename(p) for p in train]
            == [f"eval_train_{i:06d}.npy" for i in range(1, len(train) + 1)])
    assert len(train) >= 2


def test_prefix_with_a_path_separator_is_refused(tmp_path, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", random_docs(5, 1, (50, 200)))
    (tmp_path / "work").mkdir()
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--files", docs, "--out", str(tmp_path / "work" / "out"), "--prefix=../escaped",
                      "--no_progress", "--workers=1"])
    assert e.value.code == 2 and "--prefix" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*escaped*"))  # nothing written outside --out (or anywhere)


def test_fineweb_keeps_other_tmp_files(tmp_path):
    """Issue 12 item 3: fineweb.py deleted every *.tmp in --out; only its own temp files may go."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.tmp").write_text("a user's file")
    (out / "edufineweb_val_000000.npy.tmp").write_bytes(b"\x93NUMPY half")  # what a killed run left
    docs = write_jsonl(tmp_path / "docs.jsonl", random_docs(5, 1, (50, 200)))
    assert fineweb.main(["--files", docs, "--out", str(out), "--shard_size=1000", "--no_progress",
                         "--workers=1"]) == 0
    assert (out / "notes.tmp").read_text() == "a user's file"
    assert not (out / "edufineweb_val_000000.npy.tmp").exists()


@pytest.mark.parametrize("out", ["a_file", "/proc/self"])
def test_fineweb_unwritable_out_is_one_line(tmp_path, capsys, out):
    if out.startswith("/proc") and not os.path.isdir(out):
        pytest.skip("needs Linux /proc")
    out = str(tmp_path / out) if out == "a_file" else out
    if out.endswith("a_file"):
        (tmp_path / "a_file").write_text("not a folder")
    docs = write_jsonl(tmp_path / "docs.jsonl", random_docs(5, 1, (50, 200)))
    one_error_line(capsys, fineweb.main(["--files", docs, "--out", out, "--no_progress", "--workers=1"]),
                   f"--out {out}", "cannot write there")


def test_truncated_shard_fails_before_step_0(tmp_path, capsys):
    """Issue 12 item 6: a truncated train shard 5 stopped the run when it was first read, 15 steps in."""
    data = shard_folder(tmp_path / "shards", 6)
    bad = os.path.join(data, "edufineweb_train_000005.npy")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) - 100)
    rc = train_gpt2.main([f"--data={data}", f"--log_dir={tmp_path / 'log'}", *TINY])
    one_error_line(capsys, rc, bad, "fineweb.py")
    assert "step " not in capsys.readouterr().out


def test_manifest_is_checked_and_verify_shards_checks_sha256(tmp_path, capsys):
    out = tmp_path / "shards"
    docs = write_jsonl(tmp_path / "docs.jsonl", random_docs(30, 1, (50, 200)))
    assert fineweb.main(["--files", docs, "--out", str(out), "--shard_size=1000", "--no_progress",
                         "--workers=1"]) == 0
    args = [f"--data={out}", f"--log_dir={tmp_path / 'log'}", *TINY]
    assert train_gpt2.main(args + ["--verify_shards"]) == 0  # intact: trains
    # one token changed in place: same size, so only the sha256 tells
    shard = out / "edufineweb_train_000002.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(data)
    capsys.readouterr()
    one_error_line(capsys, train_gpt2.main(args + ["--verify_shards", f"--log_dir={tmp_path / 'log2'}"]),
                   str(shard), "sha256", "fineweb.py")
    # a shard the manifest lists is gone: checked at start-up without --verify_shards
    os.remove(out / "edufineweb_train_000001.npy")
    one_error_line(capsys, train_gpt2.main(args + [f"--log_dir={tmp_path / 'log3'}"]),
                   "edufineweb_train_000001.npy", "missing")


def test_resume_with_fewer_shards_is_one_line(tmp_path, capsys):
    """Resuming on a --data with fewer shards than the checkpoint read was an IndexError."""
    big, small = shard_folder(tmp_path / "big", 4, tokens=40), shard_folder(tmp_path / "small", 1, tokens=40)
    log_dir = tmp_path / "log"
    base = [f"--log_dir={log_dir}", *TINY, "--max_steps=4"]
    assert train_gpt2.main([f"--data={big}", *base, "--stop_step=3"]) == 0  # 3 * 32 tokens: into shard 3
    capsys.readouterr()
    one_error_line(capsys, train_gpt2.main([f"--data={small}", *base, "--resume"]), "--data")

# ----------------------------------------------------------------------------------------------
# hellaswag.py and export_hf.py


def tiny_checkpoint(path):
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, path)
    return str(path)


def test_non_utf8_hellaswag_file_is_one_line(tmp_path, capsys):
    item = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}
    path = tmp_path / "hs.jsonl"
    latin1 = json.dumps({**item, "ctx": "caf\xe9"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(item).encode() + b"\n" + latin1)
    one_error_line(capsys, hellaswag.main([f"--checkpoint={tiny_checkpoint(tmp_path / 'c.pt')}",
                                           f"--data_path={path}"]), f"{path}:2", "UTF-8")


@pytest.mark.parametrize("kind", ["state_dict", "text"])
def test_foreign_checkpoint_is_one_line(tmp_path, capsys, kind):
    """A file that is not one of our checkpoints: a bare state_dict was a KeyError in both scripts,
    a text file an error message of many lines."""
    path = tmp_path / f"{kind}.pt"
    if kind == "state_dict":
        config = train_gpt2.GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
        torch.save(train_gpt2.GPT(config).state_dict(), path)
    else:
        path.write_text("not a checkpoint\n" * 10)
    items = tmp_path / "hs.jsonl"
    items.write_text(json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}) + "\n")
    one_error_line(capsys, hellaswag.main([f"--checkpoint={path}", f"--data_path={items}", "--device=cpu"]),
                   str(path), "ckpt_*.pt")
    one_error_line(capsys, export_hf.main([f"--checkpoint={path}", f"--out={tmp_path / 'hf'}"]),
                   str(path), "ckpt_*.pt")
    assert not (tmp_path / "hf").exists()  # refused before --out was made: no empty folder left behind


@pytest.mark.parametrize("out", ["a_file", "/proc/self"])
def test_export_unwritable_out_is_one_line(tmp_path, capsys, out):
    if out.startswith("/proc") and not os.path.isdir(out):
        pytest.skip("needs Linux /proc")
    if out == "a_file":
        out = str(tmp_path / "a_file")
        (tmp_path / "a_file").write_text("not a folder")
    rc = export_hf.main([f"--checkpoint={tiny_checkpoint(tmp_path / 'c.pt')}", f"--out={out}"])
    one_error_line(capsys, rc, f"--out={out}", "cannot write there")

# ----------------------------------------------------------------------------------------------
# A refused command changes nothing


def snapshot(root):
    """Every path under root: a file's bytes, a link's target, or "dir"."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = ("link", os.readlink(p)) if os.path.islink(p) else (
                "dir" if os.path.isdir(p) else open(p, "rb").read())
    return out


@pytest.fixture(scope="module")
def used(tmp_path_factory):
    """A folder with a finished run (log/: checkpoint, log.txt, run.json, lock), another run's checkpoint
    copied in under two names, and data."""
    root = tmp_path_factory.mktemp("used")
    data, small = text_file(root / "input.txt"), text_file(root / "small.txt", words=60)
    for log_dir in ("log", "other"):
        assert train_gpt2.main([f"--data={data}", f"--log_dir={root / log_dir}", *TINY, "--max_steps=4"]) == 0
    for name in ("their_run.pt", "ckpt_000010.pt"):
        (root / "log" / name).write_bytes((root / "other" / "ckpt_000004.pt").read_bytes())
    (root / "other" / "lock").write_text("my notes\n")
    (root / "alien").mkdir()
    (root / "alien" / "run.json").write_text('{"run": "x", "tag": "", "latest": null, "log": 5}')
    (root / "linked").mkdir()
    (root / "target.txt").write_text("a user's file")
    os.symlink(root / "target.txt", root / "linked" / "lock")
    (root / "linked_log").mkdir()
    os.symlink(root / "target.txt", root / "linked_log" / "log.txt")
    return root, data, small


REFUSED = {  # flags after --data={data} --log_dir={log} TINY: each must be refused, changing nothing
    "bad flag, new log_dir": ["--n_head=0", "--log_dir={root}/new/deeper"],
    "bad --data, new log_dir": ["--data={root}/none.txt", "--log_dir={root}/new"],
    "nan flag on a used log_dir": ["--max_lr=nan"],
    "fresh run in a used log_dir": [],
    "start_over with a bad flag": ["--start_over", "--beta1=2"],
    "start_over with bad --data": ["--start_over", "--data={root}/none.txt"],
    "resume with bad --data": ["--resume", "--data={root}/none.txt"],
    "resume with bad --hellaswag_path": ["--resume", "--max_steps=6", "--hellaswag",
                                         "--hellaswag_path={root}/none.jsonl"],
    "resume on shorter --data": ["--resume", "--max_steps=6", "--data={small}"],
    "resume a foreign checkpoint": ["--resume={root}/log/their_run.pt", "--max_steps=6"],
    "resume a foreign ckpt_ name": ["--resume={root}/log/ckpt_000010.pt", "--max_steps=6"],
    "resume with another total_batch_size": ["--resume", "--total_batch_size=64"],
    "backend nccl without CUDA": ["--backend=nccl"],
    "backend mpi": ["--backend=mpi", "--log_dir={root}/new"],
    "run.json not ours": ["--log_dir={root}/alien"],
    "lock is a symlink": ["--log_dir={root}/linked"],
    "log.txt is a symlink": ["--log_dir={root}/linked_log"],
    "a user's file named lock": ["--log_dir={root}/other", "--resume", "--max_steps=6"],
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_command_changes_nothing(used, capsys, case):
    if case == "backend nccl without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root, data, small = used
    before = snapshot(root)
    flags = [f.format(root=root, small=small) for f in REFUSED[case]]
    rc = train_gpt2.main([f"--data={data}", f"--log_dir={root / 'log'}", *TINY, *flags])
    one_error_line(capsys, rc)
    assert snapshot(root) == before


def test_the_folder_still_resumes_after_the_refusals(used, capsys):
    root, data, _ = used
    rc = train_gpt2.main([f"--data={data}", f"--log_dir={root / 'log'}", *TINY, "--resume", "--max_steps=5"])
    assert rc == 0
    assert "resuming at step 4" in capsys.readouterr().out
