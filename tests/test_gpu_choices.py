"""CUDA-only choices of train_gpt2.py, checked on a CPU: the micro-batch rule, --device=cuda:N, peak probe."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from device import DistInfo, auto_batch_size, measure_peak_flops, setup_distributed
from train_gpt2 import ConfigError, TrainConfig

GB = 10 ** 9


@pytest.mark.parametrize("free_gb, world, expected", [
    (79, 1, 128),  # an idle H100 80GB: 124M at B=128 is predicted at ~50 GB
    (39, 1, 64),  # a 40 GB A100
    (22, 1, 32),  # a 24 GB card
    (79, 8, 64),  # 8 GPUs: 128 x 1024 x 8 rows would be a million tokens, twice the 524,288 of a step
])
def test_auto_batch_size_from_free_memory(monkeypatch, free_gb, world, expected):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gb * GB, 80 * GB))
    cfg = TrainConfig()
    assert cfg.batch_size == 0  # auto is the default
    B = auto_batch_size(cfg, DistInfo(0, 0, world, "cuda:0", "cuda", True))
    assert B == expected
    assert cfg.total_batch_size % (B * cfg.block_size * world) == 0  # tokens per step unchanged


def test_auto_batch_size_off_cuda_is_the_old_default():
    d = DistInfo(0, 0, 1, "cpu", "cpu", True)
    assert auto_batch_size(TrainConfig(), d) == 64


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, as far as setup_distributed can tell; its set_device calls."""
    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def test_cuda_n_without_torchrun_becomes_the_current_gpu(two_gpus):
    d = setup_distributed("cuda:1")
    assert (d.device, d.device_type, d.world_size) == ("cuda:1", "cuda", 1)
    assert two_gpus == [1]  # synchronize, the memory stats and the peak probe then mean GPU 1, not GPU 0
    setup_distributed("cuda")  # bare: whichever GPU is current, as torch itself would pick
    assert two_gpus == [1]


@pytest.mark.parametrize("device", ["cuda:2", "cuda:x"])
def test_cuda_n_past_the_device_count_is_a_config_error(two_gpus, device):
    with pytest.raises(ConfigError) as e:
        setup_distributed(device)
    assert str(e.value) == f"--device={device}: this machine has 2 CUDA device(s), cuda:0 to cuda:1"
    assert two_gpus == []


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("iters", [1, 4])
def test_peak_probe_times_a_fixed_number_of_matmuls(monkeypatch, iters):
    """One untimed matmul then iters timed ones, however slow the clock says they are."""
    clock = iter(range(0, 1000, 10))  # every reading 10 s later than the last
    monkeypatch.setattr("device.time.perf_counter", lambda: next(clock))
    with CountMatmuls() as mode:
        flops = measure_peak_flops("cpu", torch.float32, n=64, iters=iters)
    assert mode.count == 1 + iters
    assert flops == 2 * 64 ** 3 * iters / 10  # the two clock readings bracket the timed matmuls alone
