"""The CUDA-only speed choices of train_gpt2.py, checked on a CPU: the micro-batch rule and the SDPA kernel order."""
import pytest
import torch

from train_gpt2 import DistInfo, TrainConfig, attention_kernels, auto_batch_size

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


def test_attention_kernels_put_cudnn_first_and_restore_the_default():
    from torch.nn.attention import SDPBackend
    default = torch._C._get_sdp_priority_order()
    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with attention_kernels():
        order = torch._C._get_sdp_priority_order()
        assert order[:4] == [int(b) for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)]
        # on a CPU the kernels it lists first are absent: SDPA falls through to the same result
        torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), ref)
    assert torch._C._get_sdp_priority_order() == default
