"""
Export one of our checkpoints to the Hugging Face GPT-2 format: config.json + model.safetensors
+ the GPT-2 tokenizer (from gpt2_tokenizer/, no network), so that transformers, lm-evaluation-harness
and friends can read it.

    python export_hf.py --checkpoint=log/ckpt_019073.pt --out=hf_export
    python export_hf.py --model=gpt2 --out=hf_gpt2            # HF -> ours -> HF, a round trip
    python export_hf.py --checkpoint=... --out=hf_dir --overwrite=true   # replace a folder not ours

An export lands whole or not at all: it is written to a temp folder next to --out and renamed into
place at the end, so a failure (disk full, Ctrl-C) leaves the previous export as it was. A non-empty
--out is replaced only if it is one of our exports (export_hf.json, written last, lists its files and
no other file is there) or with --overwrite=true.
    lm_eval --model hf --model_args pretrained=hf_export --tasks hellaswag

    from transformers import pipeline
    pipeline("text-generation", model="hf_export")("Hello, I'm a language model,")

Importing runs nothing; tests call export_hf(model, out_dir).
"""

import argparse
import errno
import json
import os
import shutil
import sys
import tempfile

import torch

GPT2_VOCAB = 50257
MARKER = "export_hf.json"  # written last: the files of one of our exports


class ExportError(ValueError):
    """Bad input or a failed write: the message names the flag or file and says what to do."""


class UsageError(Exception):
    """A flag argparse refused; main() prints it as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own: usage + message, several lines
        raise UsageError(message)


def hf_config(config, pdrop=None):
    """The GPT2Config of our GPTConfig; pdrop: HF's resid/embd/attn_pdrop, if not all config.dropout."""
    from transformers import GPT2Config
    pdrop = {"resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
             **(pdrop or {})}
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head,
        activation_function="gelu_new",  # the tanh GELU, as in our MLP
        # the dropout we trained with (0 for the 124M run), not HF's default of 0.1: fine-tuning from
        # the export then regularizes as our training did
        **pdrop,
        bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1,  # <|endoftext|>
    )


def first_nonfinite_weight(model):
    """Name of the first weight of model with a NaN or inf in it, else None."""
    return next((name for name, t in model.state_dict().items()
                 if t.is_floating_point() and not torch.isfinite(t).all()), None)


def foreign_files(folder):
    """The files in folder that no export of ours wrote: all of them, unless its marker lists them."""
    names = set(os.listdir(folder))
    try:
        with open(os.path.join(folder, MARKER)) as f:
            marker = json.load(f)
        if marker["written_by"] == "export_hf.py":
            names -= set(marker["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sorted(names)


def is_our_export(folder):
    """True if folder holds an export of ours and nothing else."""
    return os.path.isfile(os.path.join(folder, MARKER)) and not foreign_files(folder)


def holds(folder, path):
    """True if path is folder or inside it (symlinks resolved)."""
    folder = os.path.realpath(folder)
    return os.path.commonpath([folder, os.path.realpath(path)]) == folder


def check_out(out, target, overwrite):
    """Refuses an --out that is a file, or a non-empty folder that is not our export (unless overwrite)."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise ExportError(f"--out={out}: cannot write there (it is a file); choose a writable folder")
    names = foreign_files(target) if os.path.isdir(target) else []
    if not names:  # a new or empty folder, or one of our exports
        return
    if not overwrite:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ExportError(f"--out={out} holds files that export_hf.py did not write ({shown}); choose a new "
                          f"or empty folder, or pass --overwrite=true to replace it and everything in it")
    for keep in (os.getcwd(), os.path.expanduser("~")):
        if holds(target, keep):
            raise ExportError(f"--out={out} holds {keep}: --overwrite=true would delete it; "
                              f"choose another folder")


def write_error(e, out, parent):
    """The one-line ExportError of a failed write: disk full, or the OS's reason."""
    from safetensors import SafetensorError
    text = str(e)
    # safetensors reports a full disk as its own error, with the OS error inside the message
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
            (isinstance(e, SafetensorError) and ("os error 28" in text or "No space left" in text)):
        try:
            free = f", {shutil.disk_usage(parent).free / 1e6:.1f} MB free"
        except OSError:
            free = ""
        return ExportError(f"--out={out}: the disk is full ({parent}{free}); free some space and rerun "
                           f"(the previous export, if any, is unchanged)")
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    why = e.strerror if isinstance(e, OSError) and e.strerror else first
    return ExportError(f"--out={out}: cannot write there ({why}); choose a writable folder")


def export_hf(model, out_dir, overwrite=False, pdrop=None, source="the model"):
    """
    Writes our GPT to out_dir as a Hugging Face GPT2LMHeadModel, with the GPT-2 tokenizer built from
    the files shipped in gpt2_tokenizer/ (no network). Returns that tokenizer. out_dir is replaced
    whole at the end (see the docstring at the top); a failure leaves it as it was.
    pdrop: HF's dropout probabilities to keep, when they are not all model.config.dropout;
    source: how error messages name the model (--checkpoint=PATH).
    """
    from safetensors import SafetensorError
    from transformers import GPT2LMHeadModel
    from gpt2_tokenizer import hf_tokenizer
    out = os.fspath(out_dir)
    bad = first_nonfinite_weight(model)
    if bad:  # training stops on such a weight; an export of it would only give NaN logits
        raise ExportError(f"{source}: weight {bad} holds NaN or inf; export a checkpoint from before the "
                          f"loss diverged")
    target = os.path.realpath(out)  # through a symlink: the folder it names is what gets replaced
    parent = os.path.dirname(target)
    made = parent  # the topmost folder this call makes, removed again if the export fails
    while not os.path.exists(os.path.dirname(made)):
        made = os.path.dirname(made)
    made = None if os.path.exists(made) else made
    tmp = old = None  # old: the previous export, moved aside while the new one is renamed into place
    try:
        os.makedirs(parent, exist_ok=True)
        # next to --out: the same file system, so the final rename is atomic
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".partial", dir=parent)
        check_out(out, target, overwrite)
        hf = GPT2LMHeadModel(hf_config(model.config, pdrop))
        # hf_state_dict() already transposes the Conv1D weights and drops the padded vocab rows;
        # strict: a name or shape that does not match HF's GPT-2 is an error, not a silent random weight
        hf.load_state_dict(model.hf_state_dict(), strict=True)
        # pipeline() generates 256 new tokens by default, past the context of a small model (an IndexError
        # at wpe); a set max_new_tokens replaces that default. Not max_length: transformers warns on every
        # call that passes max_new_tokens when the model's generation config sets max_length.
        hf.generation_config.max_new_tokens = max(1, min(256, model.config.block_size // 2))
        hf.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
        tokenizer = hf_tokenizer()
        tokenizer.model_max_length = model.config.block_size
        tokenizer.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"written_by": "export_hf.py", "files": files}, f, indent=1)
        if os.path.lexists(target):
            old = f"{tmp}.old"
            os.rename(target, old)
        os.rename(tmp, target)
    except (OSError, SafetensorError) as e:
        raise write_error(e, out, parent) from None
    finally:
        if old and not os.path.lexists(target):  # stopped between the two renames: put the old one back
            os.rename(old, target)
            old = None
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a partial export otherwise
        if made and not os.path.exists(target):
            shutil.rmtree(made, ignore_errors=True)
    if old:
        shutil.rmtree(old, ignore_errors=True)
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
    parser = Parser(description="Export a model to the Hugging Face GPT-2 format")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="one of our checkpoints: log/ckpt_019073.pt")
    source.add_argument("--model", help="a Hugging Face GPT-2 name or dir (gpt2, ./hf_dir): the round trip")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", default="false", help="true: replace an --out that is not our export")
    try:
        args = parser.parse_args(argv)
        overwrite = {"true": True, "1": True, "false": False, "0": False}.get(args.overwrite.lower())
        if overwrite is None:
            raise UsageError(f"--overwrite={args.overwrite}: expected true or false")
        if not args.out or not (args.checkpoint or args.model):
            raise UsageError("--out, --checkpoint and --model need a value: --out=DIR")
    except UsageError as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2

    import train_gpt2
    from transformers.utils import logging
    logging.disable_progress_bar()  # no bars for a few MB written and read back
    try:
        pdrop = None
        if args.checkpoint:
            if overwrite and os.path.isdir(args.out) and holds(args.out, args.checkpoint):
                raise ExportError(f"--out={args.out} holds --checkpoint={args.checkpoint}: --overwrite=true "
                                  f"would delete it; choose another folder")
            model = train_gpt2.model_from_checkpoint(args.checkpoint)
        else:
            from transformers import GPT2Config
            model = train_gpt2.GPT.from_pretrained(args.model)
            # one dropout in our GPTConfig, three in HF's: the round trip keeps the source's three
            c = GPT2Config.from_pretrained(args.model)
            pdrop = {"resid_pdrop": c.resid_pdrop, "embd_pdrop": c.embd_pdrop, "attn_pdrop": c.attn_pdrop}
        source = f"--checkpoint={args.checkpoint}" if args.checkpoint else f"--model={args.model}"
        export_hf(model, args.out, overwrite, pdrop, source)
    except (ExportError, train_gpt2.ConfigError) as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; --out={args.out} is as it was before", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: {', '.join(sorted(os.listdir(args.out)))}")
    print(f"check: max |logit difference| ours vs exported = {max_logit_diff(model, args.out):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
