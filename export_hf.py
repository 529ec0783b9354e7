"""
Export one of our checkpoints to the Hugging Face GPT-2 format: config.json + model.safetensors
(+ the GPT-2 tokenizer files), so that transformers, lm-evaluation-harness and friends can read it.

    python export_hf.py --checkpoint=log/ckpt_019073.pt --out=hf_export
    python export_hf.py --model=gpt2 --out=hf_gpt2            # HF -> ours -> HF, a round trip
    lm_eval --model hf --model_args pretrained=hf_export --tasks hellaswag

    from transformers import pipeline
    pipeline("text-generation", model="hf_export")("Hello, I'm a language model,")

Importing runs nothing; tests call export_hf(model, out_dir).
"""

import argparse
import os
import socket
import sys

import torch

GPT2_VOCAB = 50257
TOKENIZER_NOTE = ("the model files are complete; give pipeline() a tokenizer (tokenizer=...) or rerun with "
                  "--tokenizer=DIR, a folder holding the GPT-2 tokenizer (tokenizer.json, or vocab.json + merges.txt)")


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


def hub_reachable(timeout=3.0):
    """False when offline: from_pretrained would otherwise retry for minutes before giving up."""
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def load_tokenizer(source):
    """A GPT-2 tokenizer from a hub name or a dir; None when there is none to be had (offline)."""
    from transformers import GPT2TokenizerFast
    kwargs = {} if os.path.isdir(source) or hub_reachable() else {"local_files_only": True}
    try:
        tok = GPT2TokenizerFast.from_pretrained(source, **kwargs)
    except (OSError, ValueError):
        return None
    # with no files to read, transformers 5 returns an empty tokenizer instead of raising
    return tok if len(tok) >= GPT2_VOCAB else None


def export_hf(model, out_dir, tokenizer_from="gpt2"):
    """
    Writes our GPT to out_dir as a Hugging Face GPT2LMHeadModel. tokenizer_from: a hub name or dir,
    a tokenizer object, or None. Returns the tokenizer saved with the model, or None.
    """
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel(hf_config(model.config))
    # hf_state_dict() already transposes the Conv1D weights and drops the padded vocab rows;
    # strict: a name or shape that does not match HF's GPT-2 is an error, not a silent random weight
    hf.load_state_dict(model.hf_state_dict(), strict=True)
    hf.save_pretrained(out_dir)  # config.json, generation_config.json, model.safetensors
    tokenizer = load_tokenizer(tokenizer_from) if isinstance(tokenizer_from, str) else tokenizer_from
    if tokenizer is not None:
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
    parser.add_argument("--tokenizer", default="gpt2", help="hub name or dir of the GPT-2 tokenizer; 'none' skips it")
    args = parser.parse_args(argv)

    import train_gpt2
    try:
        if args.checkpoint:
            model = train_gpt2.model_from_checkpoint(args.checkpoint)
        else:
            model = train_gpt2.GPT.from_pretrained(args.model)
    except train_gpt2.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # transformers: no such model name or dir
        print(f"error: --model={args.model}: could not load it ({str(e).strip().splitlines()[0]})", file=sys.stderr)
        return 2
    skip_tokenizer = args.tokenizer.lower() == "none"
    tokenizer = export_hf(model, args.out, None if skip_tokenizer else args.tokenizer)
    print(f"wrote {args.out}: {', '.join(sorted(os.listdir(args.out)))}")
    if tokenizer is None:
        why = "--tokenizer=none" if skip_tokenizer else f"could not load {args.tokenizer!r}, offline?"
        print(f"note: tokenizer not saved ({why}); {TOKENIZER_NOTE}")
    print(f"check: max |logit difference| ours vs exported = {max_logit_diff(model, args.out):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
