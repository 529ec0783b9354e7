"""
Export one of our checkpoints to the Hugging Face GPT-2 format: config.json + model.safetensors
+ the GPT-2 tokenizer (from gpt2_tokenizer/, no network), so that transformers, lm-evaluation-harness
and friends can read it.

    python export_hf.py --checkpoint=log/ckpt_019073.pt --out=hf_export
    python export_hf.py --model=gpt2 --out=hf_gpt2            # HF -> ours -> HF, a round trip
    lm_eval --model hf --model_args pretrained=hf_export --tasks hellaswag

    from transformers import pipeline
    pipeline("text-generation", model="hf_export")("Hello, I'm a language model,")

Importing runs nothing; tests call export_hf(model, out_dir).
"""

import argparse
import os
import sys

import torch

GPT2_VOCAB = 50257


def hf_config(config):
    """The GPT2Config of our GPTConfig."""
    from transformers import GPT2Config
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head,
        activation_function="gelu_new",  # the tanh GELU, as in our MLP
        # the dropout we trained with (0 for the 124M run), not HF's default of 0.1: fine-tuning from
        # the export then regularizes as our training did
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1,  # <|endoftext|>
    )


def export_hf(model, out_dir):
    """
    Writes our GPT to out_dir as a Hugging Face GPT2LMHeadModel, with the GPT-2 tokenizer built from
    the files shipped in gpt2_tokenizer/ (no network). Returns that tokenizer.
    """
    from transformers import GPT2LMHeadModel
    from gpt2_tokenizer import hf_tokenizer
    hf = GPT2LMHeadModel(hf_config(model.config))
    # hf_state_dict() already transposes the Conv1D weights and drops the padded vocab rows;
    # strict: a name or shape that does not match HF's GPT-2 is an error, not a silent random weight
    hf.load_state_dict(model.hf_state_dict(), strict=True)
    # generation stops at the context: pipeline()'s default of 256 new tokens would index past wpe
    # on a short-context model (an IndexError); a set max_length keeps that default out
    hf.generation_config.max_length = model.config.block_size
    hf.save_pretrained(out_dir)  # config.json, generation_config.json, model.safetensors
    tokenizer = hf_tokenizer()
    tokenizer.model_max_length = model.config.block_size
    tokenizer.save_pretrained(out_dir)
    return tokenizer


@torch.no_grad()
def max_logit_diff(model, out_dir, n_tokens=64):
    """Largest |logit| difference between our model and the exported one on a random sequence."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, min(n_tokens, model.config.block_size)),
                        generator=torch.Generator().manual_seed(0))
    was_training = model.training
    ours = model.eval()(idx)[0]
    model.train(was_training)
    return (ours - hf(idx).logits).abs().max().item()


def main(argv):
    parser = argparse.ArgumentParser(description="Export a model to the Hugging Face GPT-2 format")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="one of our checkpoints: log/ckpt_019073.pt")
    source.add_argument("--model", help="a Hugging Face GPT-2 name or dir (gpt2, ./hf_dir): the round trip")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)

    import train_gpt2
    from transformers.utils import logging
    logging.disable_progress_bar()  # no bars for a few MB written and read back
    try:
        if args.checkpoint:
            model = train_gpt2.model_from_checkpoint(args.checkpoint)
        else:
            model = train_gpt2.GPT.from_pretrained(args.model)
        train_gpt2.check_writable(args.out, "--out")  # after the model loads: a refused one leaves no folder
    except train_gpt2.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    export_hf(model, args.out)
    print(f"wrote {args.out}: {', '.join(sorted(os.listdir(args.out)))}")
    print(f"check: max |logit difference| ours vs exported = {max_logit_diff(model, args.out):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
