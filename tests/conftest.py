"""Shared test setup: the repo on sys.path, and the real data the tests read, all inside the repo."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "tests", "data")  # small real samples: see tests/data/README.md
# .ci/run sets TEST_SHARED_DATA=../shared/data where that exists: the same tests on its larger real samples
SHARED = os.environ.get("TEST_SHARED_DATA", "")

SHAKESPEARE = os.path.join(ROOT, "input.txt")  # tiny shakespeare, committed
HELLASWAG = (os.path.join(SHARED, "hellaswag_val_500.jsonl") if SHARED
             else os.path.join(DATA, "hellaswag_val_40.jsonl"))
FINEWEB = [os.path.join(SHARED or DATA, f"fineweb_sample_00000{i}.parquet") for i in (1, 2)]
REFERENCE_EVALS = os.path.join(ROOT, "reference", "build_nanogpt_124M_2xH100_evals.tsv")


def data_file(name):
    """The in-repo copy of a file of ../shared/data, by its name there (that folder is not in a clone)."""
    files = {"tinyshakespeare.txt": SHAKESPEARE, "hellaswag_val_500.jsonl": HELLASWAG,
             "fineweb_sample_000001.parquet": FINEWEB[0], "fineweb_sample_000002.parquet": FINEWEB[1],
             "build_nanogpt_124M_2xH100_evals.tsv": REFERENCE_EVALS}
    return files[name]


shared_file = data_file  # the name tests used while the data lived in ../shared


def pytest_configure(config):
    # torch's own: inductor's CPU backend imports torch.utils.mkldnn, which calls torch.jit.script_method
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
