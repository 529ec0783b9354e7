"""Runs train_gpt2.py as a user would (python or torchrun) and reads back its log and checkpoint."""
import os
import subprocess
import sys

import torch

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "train_gpt2.py")
# 2 cores: one thread per process keeps 2-rank runs from fighting over them
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(args, nproc=1):
    if nproc == 1:
        return [sys.executable, SCRIPT, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            SCRIPT, *args]


def run(args, nproc=1, check=True, timeout=300):
    out = subprocess.run(command(args, nproc), capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def read_log(log_dir, kind="train"):
    """[(step, value)] of one kind of line in log_dir/log.txt."""
    with open(os.path.join(log_dir, "log.txt")) as f:
        rows = [line.split() for line in f if line.strip()]
    return [(int(r[0]), float(r[2])) for r in rows if r[1] == kind]


def final_params(log_dir, step):
    return torch.load(os.path.join(log_dir, f"ckpt_{step:06d}.pt"), weights_only=True)["model"]
