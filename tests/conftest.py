"""Shared test setup: the repo on sys.path, the offline GPT-2 tokenizer, the shared real data."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)
# tiktoken downloads the GPT-2 BPE files once; the shared cache holds them for offline machines
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(os.path.dirname(ROOT), "shared", "tiktoken_cache"))


def shared_file(name):
    """Path of a file in ../shared/data, or skip the test when it is absent."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    return path
