"""Config parsing, LR schedule, the text loader and a short end-to-end run of train_gpt2.py."""
import math
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt2
from conftest import HELLASWAG, ROOT, SHAKESPEARE
from train_gpt2 import ConfigError, DataLoaderLite, Source, TrainConfig, get_lr, parse_args

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--total_batch_size=256", "--val_tokens=2048", "--dtype=float32", "--num_samples=1",
        "--sample_tokens=8"]


@pytest.fixture
def shakespeare(tmp_path):
    path = tmp_path / "input.txt"
    shutil.copy(SHAKESPEARE, path)
    return str(path)


def test_defaults_are_the_124M_reproduction():
    c = TrainConfig()
    # B auto: 64, or 128 on 80 GB
    assert (c.batch_size, c.block_size, c.total_batch_size) == (0, 1024, 524288)
    assert (c.max_lr, c.warmup_steps, c.max_steps, c.weight_decay) == (6e-4, 715, 19073, 0.1)
    assert (c.beta1, c.beta2, c.eps, c.grad_clip, c.seed) == (0.9, 0.95, 1e-8, 1.0, 1337)
    assert c.max_lr * c.min_lr_ratio == pytest.approx(6e-5)


def test_cli_overrides_parse_with_their_types():
    c = parse_args(["--max_lr=1e-3", "--n_layer=6", "--compile=false", "--shuffle", "--data=input.txt",
                    "--resume"])
    assert c.max_lr == 1e-3 and isinstance(c.n_layer, int) and c.n_layer == 6
    assert c.compile is False and c.shuffle is True and c.data == "input.txt" and c.resume == "latest"
    assert parse_args(["--compile=1"]).compile is True and parse_args([]).compile is None
    # a preset sets values; an explicit flag still wins
    c = parse_args(["--preset=shakespeare", "--max_steps=7"])
    assert c.data == "input.txt" and c.n_layer == 4 and c.max_steps == 7
    c = parse_args(["--preset=gpt2-fast"])  # the 124M model with Muon + WSD, 2B tokens, HellaSwag logged
    assert ((c.optimizer, c.lr_schedule, c.n_layer, c.hellaswag, c.eval_interval)
            == ("muon", "wsd", 12, True, 250))
    assert 1.9e9 < c.max_steps * c.total_batch_size <= 2e9


@pytest.mark.parametrize("argv, message", [
    (["--n_layers=6"], "unknown flag --n_layers; valid flags: .*--n_layer"),
    (["--n_layer=six"], "--n_layer=six: expected a value of type int"),
    (["--compile=maybe"], "--compile=maybe: expected true/false/1/0"),
    (["--preset=huge"], "unknown preset"),
    (["n_layer=6"], "flags look like --name=value"),
])
def test_cli_errors_are_clear(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_lr_schedule():
    c = TrainConfig(max_lr=6e-4, warmup_steps=10, max_steps=110)
    assert get_lr(0, c) == pytest.approx(6e-5)  # never 0 at step 0
    assert get_lr(9, c) == pytest.approx(6e-4)  # end of warmup
    assert get_lr(60, c) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # half-way down the cosine
    assert get_lr(110, c) == pytest.approx(6e-5)  # the floor: 10% of max_lr
    assert all(get_lr(s, c) >= get_lr(s + 1, c) for s in range(9, 120))


def test_wsd_schedule():
    c = TrainConfig(max_lr=6e-4, warmup_steps=10, max_steps=110, lr_schedule="wsd", decay_fraction=0.2,
                    min_lr_ratio=0.0)
    assert get_lr(0, c) == pytest.approx(6e-5) and get_lr(9, c) == pytest.approx(6e-4)  # the same warmup
    assert all(get_lr(s, c) == pytest.approx(6e-4) for s in range(9, 89))  # constant until the last 22 steps
    assert get_lr(99, c) == pytest.approx(6e-4 * 11 / 22)  # linear: half-way down the decay
    assert get_lr(109, c) == pytest.approx(6e-4 / 22) and get_lr(110, c) == 0.0  # down to min_lr_ratio = 0
    assert all(get_lr(s, c) >= get_lr(s + 1, c) for s in range(9, 120))
    c.min_lr_ratio = 0.1
    assert get_lr(99, c) == pytest.approx(6e-5 + (6e-4 - 6e-5) / 2) and get_lr(110, c) == pytest.approx(6e-5)


def test_loader_targets_are_inputs_shifted_and_wrap():
    stream = np.arange(100, dtype=np.uint16)
    loader = DataLoaderLite([Source(lambda: stream)], B=2, T=8)
    seen = []
    for _ in range(8):  # 8 * 16 tokens > 100: the stream wraps into the next epoch
        x, y = loader.next_batch()
        assert x.shape == y.shape == (2, 8)
        assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
        seen.append(x.flatten())
    flat = torch.cat(seen).numpy()
    assert np.array_equal(flat, np.arange(128) % 100)  # contiguous, no token skipped at the wrap
    assert loader.epoch == 1


def test_end_to_end_run_writes_log_and_checkpoint(tmp_path, shakespeare):
    log_dir = tmp_path / "log"
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), f"--data={shakespeare}",
           f"--log_dir={log_dir}", "--max_steps=6", "--eval_interval=3", "--checkpoint_interval=3",
           "--warmup_steps=2", *TINY]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "step 5/6 | loss" in out.stdout and "| tok/s" in out.stdout and "sample:" in out.stdout
    lines = (log_dir / "log.txt").read_text().split("\n")
    train = [l for l in lines if " train " in l]
    assert [int(l.split()[0]) for l in train] == list(range(6))
    assert [l.split()[0] for l in lines if " val " in l] == ["0", "3", "6"]  # 6: after the last step
    # one numbering: the console's steps and losses are log.txt's, and so is the summary's last val loss
    console = [l.split(" | ")[:2] for l in out.stdout.splitlines()
               if l.startswith("step ") and "/6 | loss" in l]
    assert ([(c[0], c[1]) for c in console]
            == [(f"step {s}/6", f"loss {float(v):.4f}") for s, _, v in map(str.split, train)])
    last_val = [l.split() for l in lines if " val " in l][-1]
    assert f"done: step 5 | val_loss {float(last_val[2]):.4f} |" in out.stdout
    assert float(train[-1].split()[2]) < float(train[0].split()[2])  # it learns
    ckpt = torch.load(log_dir / "ckpt_000006.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["n_layer"] == 2 and math.isfinite(ckpt["val_loss"])
    assert os.path.exists(log_dir / "ckpt_000003.pt")
    model = train_gpt2.model_from_checkpoint(str(log_dir / "ckpt_000006.pt"))
    texts = train_gpt2.sample_texts(model, "ROMEO:", 2, 10, "cpu")
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) > len("ROMEO:") for t in texts)


def test_warns_when_warmup_outlasts_the_run_and_when_a_resume_changes_max_steps(
        tmp_path, shakespeare, capsys):
    args = [f"--data={shakespeare}", f"--log_dir={tmp_path}", *TINY, "--num_samples=0", "--max_lr=1e-3"]
    assert train_gpt2.main([*args, "--max_steps=3", "--warmup_steps=5"]) == 0
    out = capsys.readouterr().out
    assert ("warning: --warmup_steps=5 >= --max_steps=3: the LR never leaves its warmup "
            "(it ends at 6.0e-04, not 1.0e-03); lower --warmup_steps" in out)
    assert train_gpt2.main([*args, "--resume", "--max_steps=6", "--warmup_steps=1"]) == 0
    out = capsys.readouterr().out
    lr = get_lr(3, TrainConfig(max_lr=1e-3, warmup_steps=1, max_steps=6))
    assert (f"warning: --max_steps=6 differs from the checkpoint's 3: the LR schedule is redrawn over the "
            f"new length (step 3: lr {lr:.1e}, 1.0e-04 in the original one)") in out
    assert "warning: --warmup" not in out


def test_help_describes_every_flag(capsys):
    assert train_gpt2.main(["--help"]) == 0
    lines = {l.split()[0].split("=")[0]: l for l in capsys.readouterr().out.splitlines()
             if l.startswith("  --")}
    assert list(lines) == [f"--{f}" for f in TrainConfig.__dataclass_fields__]
    assert all(len(l.split(None, 1)) == 2 for l in lines.values()), \
        [l for l in lines.values() if len(l.split()) < 2]
    assert lines["--compile"].split(None, 1)[1] == "torch.compile; unset: on for cuda only"


def test_bad_batch_sizes_and_missing_data_are_one_line_errors(tmp_path, shakespeare, capsys):
    rc = train_gpt2.main([f"--data={shakespeare}", f"--log_dir={tmp_path}", *TINY, "--total_batch_size=100"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "--total_batch_size=100 is not a multiple of" in err and "multiple of 128" in err
    rc = train_gpt2.main([f"--data={tmp_path}/nope.txt", f"--log_dir={tmp_path}", *TINY])
    assert rc == 2 and "nope.txt: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    rc = train_gpt2.main([f"--data={shakespeare}", f"--log_dir={tmp_path}", *TINY, "--hellaswag",
                          f"--hellaswag_path={bad}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --hellaswag_path:") and "bad.jsonl:1" in err


@pytest.mark.parametrize("flag, message", [
    ("--optimizer=sgd", "--optimizer=sgd: expected adamw or muon"),
    ("--lr_schedule=linear", "--lr_schedule=linear: expected cosine or wsd"),
    ("--dropout=1", "--dropout must be in [0, 1)"),
    ("--decay_fraction=1.5", "--decay_fraction in [0, 1]"),
    ("--zero1", "--zero1 shards AdamW's state only; drop it with --optimizer=muon"),
])
def test_bad_optimizer_schedule_and_dropout_flags(tmp_path, shakespeare, capsys, flag, message):
    extra = ["--optimizer=muon"] if flag == "--zero1" else []
    assert train_gpt2.main([f"--data={shakespeare}", f"--log_dir={tmp_path}", *TINY, flag, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_compiled_training_still_evaluates_hellaswag_and_samples(tmp_path, shakespeare):
    """compile is on for training; val loss, HellaSwag and sampling must keep working beside it."""
    items = tmp_path / "hellaswag.jsonl"
    with open(HELLASWAG) as f:
        items.write_text("".join(f.readlines()[:8]))
    log_dir = tmp_path / "log"
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), f"--data={shakespeare}",
           f"--log_dir={log_dir}", "--max_steps=2", "--eval_interval=1", "--compile=true", "--hellaswag",
           f"--hellaswag_path={items}", *TINY, "--dtype=bfloat16", "--block_size=128",
           "--total_batch_size=512"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("sample: ") == 3 and "hellaswag acc_norm" in out.stdout  # steps 0, 1, 2 (the end)
    hella = [l.split() for l in (log_dir / "log.txt").read_text().splitlines() if " hella " in l]
    assert [h[0] for h in hella] == ["0", "1", "2"] and all(0 <= float(h[2]) <= 1 for h in hella)


CHURN = """
import ctypes, resource, sys
import device
if sys.argv[1] == "tuned":
    assert device.reuse_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
size = 25 << 20  # three 25 MB blocks, freed and taken again, as a CPU step does with its buffers

def step():
    blocks = [libc.malloc(size) for _ in range(3)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)

step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (4 * 3 * size / 4096))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt thresholds are glibc's")
def test_reuse_freed_memory_stops_page_faults_on_reallocated_buffers():
    def faults_per_page(mode):
        out = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=ROOT, capture_output=True, text=True,
                             check=True)
        return float(out.stdout.strip().splitlines()[-1])
    assert faults_per_page("default") > 0.5  # glibc hands the freed blocks back, and they fault in again
    assert faults_per_page("tuned") < 0.01
