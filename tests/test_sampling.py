"""The static-cache decode path: the same tokens as recomputing everything and as Hugging Face, compiled too."""
import pytest
import torch

from train_gpt2 import GPT, GPTConfig, KVCache, sample_next


@pytest.fixture(scope="module")
def pair():
    """A tiny Hugging Face GPT-2 and ours with its weights."""
    from transformers import GPT2LMHeadModel
    from export_hf import hf_config
    torch.manual_seed(0)
    config = GPTConfig(block_size=48, vocab_size=300, n_layer=2, n_head=2, n_embd=32)
    ours = GPT(config).eval()
    hf = GPT2LMHeadModel(hf_config(config)).eval()
    hf.load_state_dict(ours.hf_state_dict(), strict=True)
    return ours, hf


def hf_greedy(hf, prompt, n):
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, eos_token_id=None)


def test_greedy_cached_equals_uncached_and_hf(pair):
    ours, hf = pair
    prompt = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = hf_greedy(hf, prompt, 30)
    assert torch.equal(ours.generate(prompt, 30, temperature=0, use_cache=False), ref)
    assert torch.equal(ours.generate(prompt, 30, temperature=0, use_cache=True, compile=False), ref)
    # past block_size (48): the cache fills exactly, then the cropped window takes over
    long = ours.generate(prompt, 60, temperature=0, compile=False)
    assert torch.equal(long, ours.generate(prompt, 60, temperature=0, use_cache=False))


def test_compiled_decode_step_same_tokens_one_graph(pair):
    """fullgraph=True: no graph break (no .item(), no host copy); error_on_recompile: one graph for every position."""
    ours, hf = pair
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    ours.generate(prompt, 3, temperature=0, compile=True)  # the one compile
    with torch._dynamo.config.patch(error_on_recompile=True):
        greedy = ours.generate(prompt, 40, temperature=0, compile=True)
        assert torch.equal(greedy, hf_greedy(hf, prompt, 40))
        # a different prompt length reuses the same step and buffers
        other = prompt[:, :3]
        assert torch.equal(ours.generate(other, 20, temperature=0, compile=True), hf_greedy(hf, other, 20))
    # top-k sampling with a generator: the compiled step draws exactly what the eager paths draw
    # (its own compile: temperature and top_k are constants of the graph)
    sampled = [ours.generate(prompt, 25, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3),
                             **kw) for kw in (dict(compile=True), dict(compile=False), dict(use_cache=False))]
    assert torch.equal(sampled[0], sampled[1]) and torch.equal(sampled[1], sampled[2])
    # bf16 autocast, as training samples: the compiled step runs on weights cast once per call, eager
    # autocast casts them itself; the tokens are the same, and the same as Hugging Face's under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = ours.generate(prompt, 30, temperature=0, compile=True)
        assert ours._decode_state[1][3]["lm_head.weight"].dtype == torch.bfloat16
        assert torch.equal(compiled, ours.generate(prompt, 30, temperature=0, compile=False))
        assert torch.equal(compiled, hf_greedy(hf, prompt, 30))


def test_cache_buffers_are_reused_and_positions_stay_on_device(pair):
    ours, _ = pair
    prompt = torch.randint(0, 300, (3, 4))
    ours.generate(prompt, 5, temperature=0, compile=False)
    out, cache = ours._decode_state[1][:2]
    ours.generate(prompt[:, :2], 9, temperature=0, compile=False)
    assert ours._decode_state[1][1] is cache  # same batch, device, dtype: the same preallocated buffers
    assert cache.pos.dim() == 0 and cache.pos.item() == 2 + 9 - 1  # the last new token is never fed back
    assert cache.k[0].shape[-2] == ours.config.block_size and out.shape == (3, ours.config.block_size + 1)


def test_masked_cache_attention_equals_one_pass(pair):
    ours, _ = pair
    idx = torch.randint(0, 300, (2, 20))
    full, _ = ours(idx)
    cache = KVCache(ours.config, 2, "cpu", torch.float32)
    parts = [ours(idx[:, a:b], cache=cache)[0] for a, b in ((0, 6), (6, 7), (7, 20))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_exponential_race_samples_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, 1.0, 0, torch.empty_like(logits).exponential_(generator=g))
    freq = torch.bincount(picks, minlength=5).float() / len(picks)
    torch.testing.assert_close(freq, torch.softmax(logits[0], 0), atol=0.01, rtol=0)
    # top_k=2: only the two largest logits are ever drawn, in their renormalized proportions
    picks = sample_next(logits, 1.0, 2, torch.empty_like(logits).exponential_(generator=g))
    assert set(picks.tolist()) == {0, 1}
    assert abs((picks == 0).float().mean().item() - torch.softmax(torch.tensor([2.0, 1.0]), 0)[0].item()) < 0.01
