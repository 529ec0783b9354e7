"""export_hf.py: our GPT -> Hugging Face GPT-2 -> the same logits, and back; pipeline() runs on the export."""
import dataclasses
import os

import pytest
import torch

import export_hf
from conftest import ROOT
from train_gpt2 import GPT, GPTConfig, get_tokenizer, save_checkpoint

TIKTOKEN_CACHE = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken_cache")


def tiny_gpt():
    torch.manual_seed(0)
    # vocab 50257 pads to 50304 rows: the export must drop the 47 padded ones
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def offline_gpt2_tokenizer():
    """GPT-2's tokenizer built from tiktoken's two cached files (encoder.json and vocab.bpe), or skip."""
    from transformers import GPT2TokenizerFast
    vocab = merges = None
    for name in os.listdir(TIKTOKEN_CACHE) if os.path.isdir(TIKTOKEN_CACHE) else []:
        with open(os.path.join(TIKTOKEN_CACHE, name), encoding="utf-8") as f:
            head = f.read(16)
        if head.startswith('{"!": 0'):
            vocab = os.path.join(TIKTOKEN_CACHE, name)
        elif head.startswith("#version"):
            merges = os.path.join(TIKTOKEN_CACHE, name)
    if not (vocab and merges):
        pytest.skip(f"no encoder.json / vocab.bpe in {TIKTOKEN_CACHE}")
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def test_ours_to_hugging_face_same_logits_and_greedy_tokens(tmp_path):
    from transformers import GPT2LMHeadModel
    model = tiny_gpt()
    assert export_hf.export_hf(model, tmp_path, tokenizer_from=None) is None
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
        prompt = idx[:1, :8]
        ours = model.generate(prompt, 12, temperature=0)
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs)


def test_hugging_face_to_ours_to_hugging_face(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    original = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).eval()
    original.save_pretrained(tmp_path / "hf")
    # the CLI path: --model=DIR loads it into our GPT and writes it back out
    assert export_hf.main([f"--model={tmp_path / 'hf'}", f"--out={tmp_path / 'back'}", "--tokenizer=none"]) == 0
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    theirs, again = original.state_dict(), back.state_dict()
    assert theirs.keys() == again.keys()
    for key in theirs:
        assert torch.equal(theirs[key], again[key]), key
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, original(idx).logits, atol=1e-5, rtol=0)


def test_checkpoint_cli_and_bad_checkpoint(tmp_path, capsys):
    from transformers import GPT2LMHeadModel
    model = tiny_gpt()
    ckpt = str(tmp_path / "ckpt_000004.pt")
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)})
    assert export_hf.main([f"--checkpoint={ckpt}", f"--out={tmp_path / 'hf'}", "--tokenizer=none"]) == 0
    printed = capsys.readouterr().out
    assert "tokenizer not saved (--tokenizer=none)" in printed and "max |logit difference|" in printed
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    assert export_hf.main([f"--checkpoint={tmp_path / 'missing.pt'}", f"--out={tmp_path / 'x'}"]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err


def test_pipeline_runs_on_the_export(tmp_path):
    from transformers import pipeline
    tokenizer = offline_gpt2_tokenizer()
    prompt = "Hello, I'm a language model,"
    assert tokenizer.encode(prompt) == get_tokenizer().encode(prompt)  # the same tokenizer as tiktoken's
    export_hf.export_hf(tiny_gpt(), tmp_path, tokenizer_from=tokenizer)
    assert "tokenizer.json" in os.listdir(tmp_path)
    generate = pipeline("text-generation", model=str(tmp_path), device="cpu")  # tokenizer read from the dir
    text = generate(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)
    # greedy: the pipeline's continuation is our model's greedy continuation
    ours = tiny_gpt().generate(torch.tensor([tokenizer.encode(prompt)]), 8, temperature=0)
    assert text == tokenizer.decode(ours[0].tolist())


def test_dropout_maps_to_hugging_face_pdrop(tmp_path):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.15)).eval()
    export_hf.export_hf(model, tmp_path, tokenizer_from=None)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    c = hf.config
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.15, 0.15, 0.15)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # in eval mode neither drops: the same network
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    assert export_hf.hf_config(GPTConfig()).resid_pdrop == 0.0  # the 124M run: no dropout, as before
