"""export_hf.py: our GPT -> Hugging Face GPT-2 -> the same logits, and back; pipeline() runs on the export."""
import dataclasses
import os

import torch

import export_hf
from train_gpt2 import GPT, GPTConfig, get_tokenizer, save_checkpoint

def tiny_gpt():
    torch.manual_seed(0)
    # vocab 50257 pads to 50304 rows: the export must drop the 47 padded ones
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def test_ours_to_hugging_face_same_logits_and_greedy_tokens(tmp_path):
    from transformers import GPT2LMHeadModel
    model = tiny_gpt()
    export_hf.export_hf(model, tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path))
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
    assert export_hf.main([f"--model={tmp_path / 'hf'}", f"--out={tmp_path / 'back'}"]) == 0
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
    assert export_hf.main([f"--checkpoint={ckpt}", f"--out={tmp_path / 'hf'}"]) == 0
    captured = capsys.readouterr()
    assert "tokenizer.json" in captured.out and "max |logit difference|" in captured.out
    assert "Writing model shards" not in captured.err  # no progress bars for a few MB
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    assert export_hf.main([f"--checkpoint={tmp_path / 'missing.pt'}", f"--out={tmp_path / 'x'}"]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err


def test_pipeline_runs_on_the_export(tmp_path):
    from transformers import AutoTokenizer, pipeline
    export_hf.export_hf(tiny_gpt(), tmp_path)  # the tokenizer comes from gpt2_tokenizer/, no flag, no network
    prompt = "Hello, I'm a language model,"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.encode(prompt) == get_tokenizer().encode(prompt) == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    generate = pipeline("text-generation", model=str(tmp_path), device="cpu")  # tokenizer read from the dir
    text = generate(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)
    # greedy: the pipeline's continuation is our model's greedy continuation
    ours = tiny_gpt().generate(torch.tensor([tokenizer.encode(prompt)]), 8, temperature=0)
    assert text == tokenizer.decode(ours[0].tolist())


def test_pipeline_defaults_stay_within_the_context(tmp_path):
    """pipeline()'s default is 256 new tokens: on a 128-token model that indexed past wpe (IndexError)."""
    from transformers import pipeline
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    export_hf.export_hf(model, tmp_path)
    generate = pipeline("text-generation", model=str(tmp_path), device="cpu")
    torch.manual_seed(0)
    out = generate("Hello, I'm a language model,", return_tensors=True)[0]["generated_token_ids"]
    assert len(out) == 128  # a random model rarely emits <|endoftext|>: it runs to the context's end


def test_dropout_maps_to_hugging_face_pdrop(tmp_path):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.15)).eval()
    export_hf.export_hf(model, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    c = hf.config
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.15, 0.15, 0.15)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # in eval mode neither drops: the same network
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    assert export_hf.hf_config(GPTConfig()).resid_pdrop == 0.0  # the 124M run: no dropout, as before
