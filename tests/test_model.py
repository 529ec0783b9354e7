"""The model equals Hugging Face's GPT-2, samples correctly, and starts where theory says."""
import math

import pytest
import torch

import sample
from train_gpt2 import GPT, GPTConfig


def make_hf_dir(tmp_path, **config):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**config)).eval()
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("shape", [
    dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=1000),  # tiny
    dict(),  # the full GPT-2 124M shape
], ids=["tiny", "124M"])
def test_hf_parity_logits_and_greedy(tmp_path, shape):
    hf = make_hf_dir(tmp_path, **shape)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    V = hf.config.vocab_size
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = ours(idx)
    assert logits.shape == ref.shape  # padded vocab rows are not in the output
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    # greedy decoding must pick the same 20 tokens
    prompt = idx[:1, :8]
    ref_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), ref_tokens)


def test_kv_cache_matches_full_recompute():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=500, n_layer=2, n_head=2, n_embd=32))
    prompt = torch.randint(0, 500, (3, 5))
    # 40 new tokens run past block_size=32: the cached path must then crop like the plain one
    a = sample.generate(model, prompt, 40, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 40, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # a chunk fed after cached tokens (mask with an offset) gives the same logits as one pass
    full, _ = model(prompt)
    for static in (False, True):
        cache = sample.KVCache(model.config, 3, "cpu", torch.float32, static=static)
        model(prompt[:, :2], cache=cache)
        tail, _ = model(prompt[:, 2:], cache=cache)
        torch.testing.assert_close(tail, full[:, 2:], atol=1e-5, rtol=1e-5)


def test_sampling_never_picks_padded_ids():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=1, n_embd=16))
    assert model.config.padded_vocab_size == 128
    with torch.no_grad():  # make the padded rows the most likely by far if they were reachable
        model.transformer.wte.weight[100:] = 10.0
    for generate in (model.generate, lambda *a, **kw: sample.generate(model, *a, **kw)):
        out = generate(torch.zeros(4, 1, dtype=torch.long), 10, top_k=0,
                       generator=torch.Generator().manual_seed(0))
        assert out.max() < 100


def test_weight_tying_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.shape[0] == 50304
    # GPT-2 init: residual projections scaled by 1/sqrt(2 n_layer)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(4)) < 0.002
    idx, targets = torch.randint(0, 50257, (2, 4, 64))
    _, loss = model(idx, targets)
    # a fresh model is near-uniform over the 50257 real ids: loss ~ ln(50257) = 10.82
    assert abs(loss.item() - math.log(50257)) < 0.15


def test_weight_decay_groups():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=1, n_embd=16))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["fused"]  # CPU supports fused AdamW here


def test_grad_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=200, n_layer=2, n_head=2, n_embd=32)
    big, small = GPT(cfg), GPT(cfg)
    small.load_state_dict(big.state_dict())
    x = torch.randint(0, 200, (4, 16))
    y = torch.randint(0, 200, (4, 16))
    _, loss = big(x, y)
    loss.backward()
    for i in range(4):  # the training loop's scaling: each micro-batch loss / grad_accum
        _, loss = small(x[i:i + 1], y[i:i + 1])
        (loss / 4).backward()
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("flash", [True, False])
def test_dropout_acts_in_training_only(flash):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32, flash=flash)
    plain, dropped = GPT(cfg), GPT(GPTConfig(**{**cfg.__dict__, "dropout": 0.2}))
    dropped.load_state_dict(plain.state_dict())  # dropout adds no parameters
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        plain.eval(), dropped.eval()
        assert torch.equal(plain(x)[0], dropped(x)[0])  # eval: no dropout at all
        plain.train(), dropped.train()
        assert torch.equal(plain(x)[0], plain(x)[0])  # dropout 0 in training: deterministic
        a, b = dropped(x)[0], dropped(x)[0]
        assert not torch.allclose(a, b) and not torch.allclose(a, plain(x)[0])
    # each of HF's places drops: embeddings, attention weights, both residual branches
    sites = {"drop": dropped.transformer.drop, "attn": dropped.transformer.h[0].attn.resid_dropout,
             "mlp": dropped.transformer.h[0].mlp.dropout}
    assert all(m.p == 0.2 for m in sites.values()) and dropped.transformer.h[0].attn.dropout == 0.2
