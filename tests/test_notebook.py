"""play.ipynb runs headless on a tiny real run: figures written, a sample printed, logs read right."""
import os
import shutil
import sys

import nbformat
import pytest

import train_gpt2
from conftest import HELLASWAG, ROOT, SHARED, SHAKESPEARE

NOTEBOOK = os.path.join(ROOT, "play.ipynb")


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_plots_and_samples_a_tiny_run(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient
    spec = KernelSpecManager().get_kernel_spec("python3")
    # jupyter_client starts a bare "python" argv as sys.executable, i.e. this venv's python
    if spec.argv[0] not in ("python", "python3") and os.path.realpath(spec.argv[0]) != os.path.realpath(sys.executable):
        pytest.skip(f"kernel python3 runs {spec.argv[0]}, not {sys.executable}")

    # a tiny run with HellaSwag on a few real items, so the log has all three kinds of lines
    data = tmp_path / "input.txt"
    shutil.copy(SHAKESPEARE, data)
    hella = tmp_path / "hellaswag_8.jsonl"
    with open(HELLASWAG) as f:
        hella.write_text("".join(f.readlines()[:8]))
    log_dir = tmp_path / "log"
    assert train_gpt2.main([
        f"--data={data}", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--total_batch_size=128", "--max_steps=4", "--eval_interval=2", "--dtype=float32", "--device=cpu",
        f"--log_dir={log_dir}", "--num_samples=0", "--val_tokens=1024", "--hellaswag", f"--hellaswag_path={hella}",
    ]) == 0
    with open(log_dir / "log.txt") as f:
        assert sum(" hella " in line for line in f) == 3  # evals at steps 0, 2 and 4, after the last step

    out = tmp_path / "figures"
    monkeypatch.setenv("PLAY_LOG", str(log_dir / "log.txt"))
    monkeypatch.setenv("PLAY_OUT", str(out))
    monkeypatch.setenv("PLAY_PROMPT", "ROMEO:")
    # optional: build-nanogpt's full console output of the run whose evals the shipped reference holds
    compare = os.path.join(SHARED, "build_nanogpt_124M_2xH100_epoch1.log") if SHARED else ""
    monkeypatch.setenv("PLAY_COMPARE_LOG", compare)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": ROOT}}).execute()

    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for name in ("loss.png", "hellaswag.png"):
        assert (out / name).stat().st_size > 1000
    assert "sample: 'ROMEO:" in printed and (out / "samples.txt").read_text().count("ROMEO:") >= 4
    assert "this run: val" in printed and "hella" in printed and "(3 points)" in printed
    # the shipped reference curve: the last of the 78 evals of a real 10B-token build-nanogpt run
    last = "val 3.0717 at step 19072 (78 points), hella 0.3074 at step 19072 (78 points)"
    assert f"build-nanogpt 124M, 10B tokens: {last}" in printed
    if compare:  # its console output reads to the same points
        assert f"build_nanogpt_124M_2xH100_epoch1.log: {last}" in printed
