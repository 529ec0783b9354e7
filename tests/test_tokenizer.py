"""The GPT-2 tokenizer from the BPE files in gpt2_tokenizer/: tiktoken's own ids, no network, no cache."""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

import gpt2_tokenizer
from conftest import FINEWEB, HELLASWAG, ROOT, SHAKESPEARE

OPENAI = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# no network: a proxy nobody listens on, and an empty tiktoken cache
OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}


def real_texts():
    import pyarrow.parquet as pq
    with open(SHAKESPEARE, encoding="utf-8") as f:
        texts = [f.read()]
    with open(HELLASWAG) as f:
        for line in f:
            item = json.loads(line)
            texts += [item["ctx"]] + [" " + e for e in item["endings"]]
    texts += [t for path in FINEWEB for t in pq.read_table(path).column("text").to_pylist()]
    return texts + ["héllo wörld 🤗 中文  \n\n\t  x", "  leading and trailing   ",
                    "'s 've 're 'll 'd 'm 't", ""]


def tiktokens_own_gpt2(cache_dir, monkeypatch):
    """tiktoken's gpt2 encoding as tiktoken builds it, reading our two files from its cache, where it
    checks them against OpenAI's sha256 (a mismatch would send it to the network, which is cut)."""
    import tiktoken
    from tiktoken_ext import openai_public
    for name in ("encoder.json", "vocab.bpe"):
        key = hashlib.sha1((OPENAI + name).encode()).hexdigest()  # tiktoken's cache file name for the URL
        shutil.copy(os.path.join(ROOT, "gpt2_tokenizer", name), os.path.join(cache_dir, key))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    return tiktoken.Encoding(**openai_public.gpt2())


def test_same_ids_as_tiktoken_on_real_text(tmp_path, monkeypatch):
    ours, theirs = gpt2_tokenizer.get_tokenizer(), tiktokens_own_gpt2(tmp_path, monkeypatch)
    assert ours.n_vocab == theirs.n_vocab == 50257 and ours.eot_token == theirs.eot_token == 50256
    texts = real_texts()
    assert sum(len(t) for t in texts) > 1_300_000  # tiny shakespeare, HellaSwag and FineWeb
    for text in texts:
        ids = ours.encode_ordinary(text)
        assert ids == theirs.encode_ordinary(text)
        assert ours.decode(ids) == text
    assert ours.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert (ours.encode("a<|endoftext|>", allowed_special="all")
            == theirs.encode("a<|endoftext|>", allowed_special="all"))


def test_hugging_face_tokenizer_from_the_same_files():
    hf, ours = gpt2_tokenizer.hf_tokenizer(), gpt2_tokenizer.get_tokenizer()
    assert len(hf) == 50257 and hf.eos_token_id == 50256
    for text in real_texts():
        assert hf.encode(text) == ours.encode_ordinary(text)


def test_works_with_no_network_and_no_cache(tmp_path):
    """What a fresh clone on an offline machine runs: no TIKTOKEN_CACHE_DIR files, no network."""
    env = {**os.environ, **OFFLINE, "TIKTOKEN_CACHE_DIR": str(tmp_path)}  # empty: nothing cached
    code = ("from train_gpt2 import get_tokenizer; import hellaswag, fineweb; "
            "print(get_tokenizer().encode('Hello, world'), fineweb.get_encoding() is get_tokenizer())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[15496, 11, 995] True", out.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # and nothing was downloaded into the cache


def test_a_damaged_file_is_a_clear_error(tmp_path):
    copy = tmp_path / "gpt2_tokenizer"
    shutil.copytree(os.path.join(ROOT, "gpt2_tokenizer"), copy)
    with open(copy / "vocab.bpe", "a") as f:
        f.write("x y\n")
    spec = importlib.util.spec_from_file_location("gpt2_tokenizer_copy", copy / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(module.TokenizerFilesError,
                       match="vocab.bpe is not OpenAI's GPT-2 file .*git checkout"):
        module.hf_tokenizer()
    os.remove(copy / "encoder.json")
    with pytest.raises(module.TokenizerFilesError, match="encoder.json: No such file"):
        module.get_tokenizer()
