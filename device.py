"""
The device a run is on and what it allows, for train_gpt2.py, hellaswag.py and bench.py: the device and
torchrun's ranks (setup_distributed), the matmul peak that MFU is measured against, the micro-batch that
fits a GPU (--batch_size=0), and glibc's malloc settings for CPU steps. Importing runs nothing.
"""
import ctypes
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flags import ConfigError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: str
    device_type: str  # "cuda", "mps" or "cpu": what autocast and the fused checks want
    master: bool


def setup_distributed(device="auto", backend="auto", timeout_s=600):
    """Reads torchrun's environment; one process without it. NCCL on CUDA, gloo on CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    device_type = device.split(":")[0]
    if device_type not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"--device={device}: expected auto, cpu, cuda, cuda:N or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device_type]:
        raise ConfigError(f"--device={device}: no {device_type.upper()} device is available here; "
                          f"use --device=cpu")
    if "RANK" not in os.environ:
        if device_type == "cuda" and device != "cuda":
            # cuda:N: made the current GPU, else synchronize(), the memory stats, the peak probe and a
            # stray context would all be on GPU 0
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise ConfigError(f"--device={device}: this machine has {torch.cuda.device_count()} CUDA "
                                  f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
            torch.cuda.set_device(int(index))
        return DistInfo(0, 0, 1, device, device_type, True)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    # a rank that waits longer than timeout_s for the others fails the job instead of hanging it
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, local_rank, world, device, device_type, rank == 0)


def predicted_peak_bytes(cfg, B):
    """
    A training step's peak GPU memory, predicted from 24.9 GB measured for 124M at B=64, T=1024 on an H100:
    16 bytes per parameter (weights, grads, AdamW moments) + 40 per token, layer and channel.
    """
    L, C, T = cfg.n_layer, cfg.n_embd, cfg.block_size
    return 16 * (12 * L * C * C + 50304 * C) + 40 * B * T * L * C


def auto_batch_size(cfg, d):
    """--batch_size=0: 64 off CUDA; on a GPU the largest of 128, 64, ... that divides the step and whose
    predicted peak (predicted_peak_bytes) fits 80% of free memory. 124M: 128 on 80 GB."""
    if d.device_type != "cuda":
        return 64
    free = torch.cuda.mem_get_info(d.device)[0]
    rows = cfg.block_size * d.world_size  # tokens of one sequence on every rank
    return next((b for b in (128, 64, 32, 16, 8, 4, 2)
                 if cfg.total_batch_size % (b * rows) == 0 and predicted_peak_bytes(cfg, b) <= 0.8 * free), 1)


def measure_peak_flops(device, dtype, n=None, iters=10):
    """
    FLOP/s of a large square matmul in dtype on device: the honest ceiling for MFU here. A fixed number
    of matmuls between two synchronizes: a GPU queues ~1,000 launches before the host blocks, so a loop
    that watched the host's clock would time the queueing and then wait for the queue to drain.
    """
    on_cuda = str(device).startswith("cuda")
    n = n or (8192 if on_cuda else 1024)  # 1.1 TFLOP, ~2 ms in bf16 on an H100; on 2 CPU cores ~40 ms in fp32
    gen = torch.Generator(device=device).manual_seed(0)  # leave the global RNG alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else (lambda: None)
    a @ b  # the first call picks its kernel
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def set_numerics(device_type):
    """TF32 matmuls on CUDA; on a CPU, freed memory kept for the next step and kernels that repeat bitwise."""
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~8x fp32 on A100/H100
        torch.backends.cudnn.allow_tf32 = True
    elif device_type == "cpu":
        reuse_freed_memory()  # the step's freed buffers stay for the next step, no page faults
        # compiled CPU kernels add the embeddings' gradients with atomics, in an order that varies from
        # run to run; in deterministic mode inductor uses the ordered kernel, and a CPU run repeats bitwise
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN-filling of new tensors


def reuse_freed_memory():
    """
    Have glibc's malloc keep freed blocks of up to 32 MiB for the next step instead of handing them back to
    the kernel: a CPU step frees and reallocates the same tens of MB every time, and pages given back come
    back zeroed, one page fault per 4 KiB (docs/performance.md). Setting any threshold turns off glibc's
    self-tuning of both, so both are set. Returns False, changing nothing, where the C library is not glibc.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # 32 MiB is the largest mmap threshold glibc accepts; 1 GiB of free heap before it trims
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 25)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
