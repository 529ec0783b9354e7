"""
The GPT-2 tokenizer from OpenAI's own two files, shipped here: no network, no tiktoken cache.

    encoder.json  token -> id (50,257 entries)     vocab.bpe  the 50,000 merges, in rank order

Both are byte-identical to https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/ (the
sha256s below are the ones tiktoken checks its download against), (c) 2019 OpenAI, Modified MIT
License: see LICENSE in this folder. get_tokenizer() gives the same ids as tiktoken.get_encoding("gpt2")
(tested); hf_tokenizer() is transformers' GPT2TokenizerFast from the same files.
"""
import functools
import hashlib
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
          "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
EOT = "<|endoftext|>"


class TokenizerFilesError(ValueError):
    """A shipped BPE file is missing or altered; the message says how to restore it."""


def path(name):
    """Path of one of the two files, checked against OpenAI's sha256."""
    file = os.path.join(HERE, name)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerFilesError(f"{file}: {e.strerror}; restore it with `git checkout -- gpt2_tokenizer`") from None
    if hashlib.sha256(data).hexdigest() != SHA256[name]:
        raise TokenizerFilesError(f"{file} is not OpenAI's GPT-2 file (sha256 differs); "
                                  f"restore it with `git checkout -- gpt2_tokenizer`")
    return file


def _byte_of_char():
    """encoder.json spells bytes as printable characters: printable ones as themselves, the other
    68 (control, space, ...) as chr(256 + n) in byte order (GPT-2's bytes_to_unicode)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """tiktoken's GPT-2 encoding (same ids and pattern as tiktoken.get_encoding("gpt2"))."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizing regex
    with open(path("encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    to_byte = _byte_of_char()
    # an id is also its merge rank: vocab.bpe lists the merges in id order after the 256 bytes
    ranks = {bytes(to_byte[c] for c in token): i for token, i in encoder.items() if token != EOT}
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: encoder[EOT]}, explicit_n_vocab=len(encoder))


def hf_tokenizer():
    """transformers' GPT2TokenizerFast from the same two files (vocab.json and merges.txt by another name)."""
    from transformers import GPT2TokenizerFast
    return GPT2TokenizerFast(vocab=path("encoder.json"), merges=path("vocab.bpe"))
