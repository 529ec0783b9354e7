"""sample.py: its engine gives GPT.generate's and Hugging Face's tokens on every path; its command line."""
import os
import subprocess
import sys

import pytest
import torch

import sample
from conftest import ROOT, SHAKESPEARE
from sample import KVCache, sample_next
from train_gpt2 import GPT, GPTConfig


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


def paths(ours):
    """The three ways to sample: recompute everything, the eager cached engine, the compiled step."""
    return {"uncached": ours.generate,
            "eager": lambda *a, **kw: sample.generate(ours, *a, **kw),
            "compiled": lambda *a, **kw: sample.generate(ours, *a, compile=True, **kw)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_every_path_equals_hf(pair, dtype):
    ours, hf = pair
    prompt = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    # bf16: under autocast, as training samples; the engine runs on weights it cast once per call,
    # Hugging Face and GPT.generate on the ones autocast casts every token: the same tokens
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        ref = hf_greedy(hf, prompt, 30)
        for name, generate in paths(ours).items():
            assert torch.equal(generate(prompt, 30, temperature=0), ref), name
        # one sequence: on a CPU in bf16 the eager steps run ATen's gemv instead of oneDNN's matmul
        assert torch.equal(sample.generate(ours, prompt[1:], 30, temperature=0), ref[1:])
        assert torch.backends.mkldnn.enabled  # and the switch is put back
        if dtype == "bfloat16":
            d = sample.decoder(ours, 2, "cpu", compile=False)
            assert d.weights["model.lm_head.weight"].dtype == d.cache.k[0].dtype == torch.bfloat16
    # past block_size (48): the cache fills exactly, then the cropped window takes over
    long = sample.generate(ours, prompt, 60, temperature=0)
    assert torch.equal(long, ours.generate(prompt, 60, temperature=0))


def test_seeded_top_k_is_the_same_on_every_path(pair):
    ours, _ = pair
    prompt = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(2))
    # 50 tokens from a 5-token prompt run past block_size 48 on each path too
    out = {name: generate(prompt, 50, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3))
           for name, generate in paths(ours).items()}
    assert torch.equal(out["uncached"], out["eager"]) and torch.equal(out["eager"], out["compiled"])
    # and it samples: another seed, other tokens
    other = sample.generate(ours, prompt, 50, temperature=0.8, top_k=20,
                            generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other, out["eager"])


def test_compiled_step_never_recompiles_and_modes_keep_their_buffers(pair):
    """fullgraph=True: no graph break (no .item(), no host copy); error_on_recompile: one graph for every
    position and prompt length. Eager and compiled calls alternate without rebuilding each other's buffers."""
    ours, hf = pair
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    sample.generate(ours, prompt, 3, temperature=0, compile=True)  # the one compile
    sample.generate(ours, prompt, 3, temperature=0)
    compiled, eager = (sample.decoder(ours, 1, "cpu", compile=c) for c in (True, False))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for p in (5, 3, 11):
            assert torch.equal(sample.generate(ours, prompt[:, :p], 30, temperature=0, compile=True),
                               hf_greedy(hf, prompt[:, :p], 30))
            sample.generate(ours, prompt[:, :p], 4, temperature=0)
    assert sample.decoder(ours, 1, "cpu", compile=True) is compiled
    assert sample.decoder(ours, 1, "cpu", compile=False) is eager
    assert compiled.cache.k[0] is not eager.cache.k[0]


def test_cache_positions_eager_on_host_compiled_on_device(pair):
    ours, _ = pair
    prompt = torch.randint(0, 300, (3, 4))
    for compile in (False, True):
        sample.generate(ours, prompt, 5, temperature=0, compile=compile)
        d = sample.decoder(ours, 3, "cpu", compile)
        sample.generate(ours, prompt[:, :2], 9, temperature=0, compile=compile)
        assert sample.decoder(ours, 3, "cpu", compile) is d  # the same preallocated buffers
        pos = d.cache.pos
        assert pos.dim() == 0 if compile else isinstance(pos, int)
        assert int(pos) == 2 + 9 - 1  # the last new token is never fed back
        assert d.cache.k[0].shape[-2] == ours.config.block_size
        assert d.out.shape == (3, ours.config.block_size + 1)


def test_eager_cache_returns_the_filled_prefix_static_the_whole_cache(pair):
    ours, _ = pair
    c = ours.config
    hs = c.n_embd // c.n_head
    for static in (False, True):
        cache = KVCache(c, 1, "cpu", torch.float32, static=static)
        k = torch.randn(1, c.n_head, 5, hs)
        keys, _, mask = cache.update(0, k, k)  # a 5-token prompt: causal
        assert torch.equal(mask[:, :5], torch.ones(5, 5, dtype=torch.bool).tril()) and not mask[:, 5:].any()
        cache.pos += 5
        keys, _, mask = cache.update(0, k[:, :, :1], k[:, :, :1])  # the next token sees all 6
        assert keys.shape[2] == (c.block_size if static else 6)
        assert (mask.tolist() == [[True] * 6 + [False] * (c.block_size - 6)]) if static else mask is None
        torch.testing.assert_close(keys[:, :, :6], torch.cat([k, k[:, :, :1]], dim=2))


def test_masked_cache_attention_equals_one_pass(pair):
    ours, _ = pair
    idx = torch.randint(0, 300, (2, 20))
    full, _ = ours(idx)
    for static in (False, True):
        cache = KVCache(ours.config, 2, "cpu", torch.float32, static=static)
        parts = [ours(idx[:, a:b], cache=cache)[0] for a, b in ((0, 6), (6, 7), (7, 20))]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_weights_are_recast_every_call(pair):
    """The engine's bf16 copies follow the model's weights (training changes them between samples)."""
    _, hf = pair
    ours = GPT(GPTConfig(block_size=48, vocab_size=300, n_layer=2, n_head=2, n_embd=32)).eval()
    ours.load_hf_state_dict(hf.state_dict())
    prompt = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = sample.generate(ours, prompt, 20, temperature=0)
        with torch.no_grad():
            ours.transformer.h[1].mlp.c_fc.weight.mul_(-3.0)
            ours.lm_head.weight.copy_(ours.lm_head.weight.roll(1, dims=0))  # tied: the embeddings move too
        after = sample.generate(ours, prompt, 20, temperature=0)
        assert not torch.equal(before, after) and torch.equal(after, ours.generate(prompt, 20, temperature=0))


def test_teacher_forced_logits_are_one_forwards(pair):
    """What bench.py compares with Hugging Face: the engine's logits, fed given tokens, on both paths."""
    ours, _ = pair
    tokens = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(6))
    full, _ = ours(tokens)
    for compile in (False, True):
        forced = sample.teacher_forced_logits(ours, tokens, 8, compile=compile)
        torch.testing.assert_close(forced, full[:, 7:-1], atol=1e-5, rtol=1e-5)


def test_exponential_race_samples_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, 1.0, 0, torch.empty_like(logits).exponential_(generator=g))
    freq = torch.bincount(picks, minlength=5).float() / len(picks)
    torch.testing.assert_close(freq, torch.softmax(logits[0], 0), atol=0.01, rtol=0)
    # top_k=2: only the two largest logits are ever drawn, in their renormalized proportions
    picks = sample_next(logits, 1.0, 2, torch.empty_like(logits).exponential_(generator=g))
    assert set(picks.tolist()) == {0, 1}
    expected = torch.softmax(torch.tensor([2.0, 1.0]), 0)[0].item()
    assert abs((picks == 0).float().mean().item() - expected) < 0.01


def test_train_gpt2_does_not_import_sample():
    """One way: sample.py drives the model through its cache argument; training never loads the engine."""
    out = subprocess.run([sys.executable, "-c", "import sys, train_gpt2; print('sample' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

# ----------------------------------------------------------------------------------------------
# The command line, on a checkpoint of a real (two-step) train_gpt2.py run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run")
    args = ["--preset=shakespeare", f"--data={SHAKESPEARE}", "--max_steps=2", "--n_layer=2",
            "--eval_interval=0", "--block_size=32", "--batch_size=4", "--total_batch_size=128",
            "--compile=false", "--device=cpu",
            "--dtype=float32", f"--log_dir={log_dir}"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *args], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return str(log_dir / "ckpt_000002.pt")


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_prints_the_engines_samples(checkpoint):
    from train_gpt2 import get_tokenizer, model_from_checkpoint
    # --name value and --name=value both parse; greedy, so the text is the model's greedy continuation
    out = run_cli("--checkpoint", checkpoint, "--prompt=ROMEO:", "--num_samples", "2", "--max_new_tokens=6",
                  "--temperature=0", "--dtype=float32", "--device=cpu")
    assert out.returncode == 0, out.stderr
    samples = out.stdout.split("---------------\n")
    model = model_from_checkpoint(checkpoint)
    enc = get_tokenizer()
    ids = model.generate(torch.tensor([enc.encode("ROMEO:")]), 6, temperature=0)[0].tolist()
    assert samples == [enc.decode(ids) + "\n"] * 2 + [""]
    # <|endoftext|> is the document separator token, not text; a prompt from a file too
    out = run_cli(f"--checkpoint={checkpoint}", "--prompt=<|endoftext|>", "--max_new_tokens=4",
                  "--num_samples=1")
    assert out.returncode == 0 and out.stdout.startswith("<|endoftext|>"), out.stderr


@pytest.mark.parametrize("args, names", [
    (["--checkpoint=/no/such.pt"], ["/no/such.pt"]),
    (["--checkpoint=GARBAGE"], ["could not be read"]),
    ([], ["--checkpoint", "--model"]),
    (["--checkpoint=CKPT", "--model=gpt2"], ["--checkpoint", "--model"]),
    (["--checkpoint=CKPT", "--prompt="], ["--prompt"]),
    (["--checkpoint=CKPT", "--prompt=FILE:/no/such.txt"], ["--prompt=FILE:/no/such.txt"]),
    (["--checkpoint=CKPT", "--prompt=" + "To be or not " * 20], ["--prompt", "block_size 32"]),
    (["--checkpoint=CKPT", "--num_samples=-1"], ["--num_samples"]),
    (["--checkpoint=CKPT", "--max_new_tokens=-5"], ["--max_new_tokens"]),
    (["--checkpoint=CKPT", "--temperature=-1"], ["--temperature"]),
    (["--checkpoint=CKPT", "--temperature=nan"], ["--temperature"]),
    (["--checkpoint=CKPT", "--top_k=-1"], ["--top_k"]),
    (["--checkpoint=CKPT", "--seed=-1"], ["--seed"]),
    (["--checkpoint=CKPT", "--compile=maybe"], ["--compile"]),
    (["--checkpoint=CKPT", "--max_new_tokens=ten"], ["--max_new_tokens"]),
    (["--checkpoint=CKPT", "--warp=9"], ["--warp"]),
    (["--checkpoint=CKPT", "--device=tpu"], ["--device"]),
])
def test_cli_bad_input_is_one_line(checkpoint, tmp_path, capsys, args, names):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    args = [a.replace("CKPT", checkpoint).replace("GARBAGE", str(garbage)) for a in args]
    rc = sample.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (rc, err)
    for name in names:
        assert name in err, err
