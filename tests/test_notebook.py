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
    if (spec.argv[0] not in ("python", "python3")
            and os.path.realpath(spec.argv[0]) != os.path.realpath(sys.executable)):
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
        f"--log_dir={log_dir}", "--num_samples=0", "--val_tokens=1024", "--hellaswag",
        f"--hellaswag_path={hella}",
        "--sample_prompt=ROMEO:",  # the notebook samples with the run's own prompt
    ]) == 0
    with open(log_dir / "log.txt") as f:
        assert sum(" hella " in line for line in f) == 3  # evals at steps 0, 2 and 4, after the last step

    out = tmp_path / "figures"
    monkeypatch.setenv("PLAY_LOG", str(log_dir / "log.txt"))
    monkeypatch.setenv("PLAY_OUT", str(out))
    monkeypatch.delenv("PLAY_PROMPT", raising=False)
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
    assert "HellaSwag this run: n=8" in printed  # its error bars: sqrt(p(1-p)/8)
    # the shipped reference curve, read but not drawn over a tiny shakespeare run
    last = "val 3.0717 at step 19072 (78 points), hella 0.3074 at step 19072 (78 points)"
    assert f"reference: {last}" in printed and "reference not drawn: this run trained on" in printed
    if compare:  # its console output reads to the same points
        assert f"build_nanogpt_124M_2xH100_epoch1.log: {last}" in printed


LOG_RUN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
           "--val_tokens=1024", "--total_batch_size=128", "--dtype=float32", "--device=cpu",
           "--num_samples=0", "--warmup_steps=1", "--eval_interval=2", "--checkpoint_interval=2"]


def notebook_function(name):
    """A function defined in one of play.ipynb's cells, on its own (the cell's other statements not run)."""
    import ast
    import json
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        tree = ast.parse(cell.source) if cell.cell_type == "code" else None
        for node in (tree.body if tree else []):
            if isinstance(node, ast.FunctionDef) and node.name == name:
                scope = {"os": os, "json": json}
                exec(compile(ast.Module([node], []), NOTEBOOK, "exec"), scope)
                return scope[name]
    raise LookupError(name)


def test_the_fineweb_edu_reference_is_drawn_only_for_runs_on_fineweb_edu_shards(tmp_path):
    import json
    choose = notebook_function("trained_on_fineweb_edu")
    assert choose({}) is None  # no config.json: nothing known, the reference is drawn
    assert choose({"data": SHAKESPEARE}) is False
    default = tmp_path / "edu_fineweb10B"
    default.mkdir()
    assert choose({"data": str(default)}) is True  # fineweb.py's default folder, no manifest
    for source, expected in [({"dataset": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT"}, True),
                             ({"files": [["/data/my_docs.parquet", 100]]}, False)]:
        folder = tmp_path / f"shards_{expected}"
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"params": {"source": source}, "shards": []}))
        assert choose({"data": str(folder)}) is expected
    (tmp_path / "my_shards").mkdir()
    assert choose({"data": str(tmp_path / "my_shards")}) is False


def points(log_dir):
    """log.txt's (step, kind, text) and metrics.jsonl's rows."""
    import json
    with open(log_dir / "log.txt") as f:
        lines = [tuple(line.split()) for line in f if line.strip()]
    with open(log_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return lines, rows


def test_metrics_jsonl_and_config_json_follow_log_txt_through_a_branch(tmp_path):
    import json
    data, log_dir = tmp_path / "input.txt", tmp_path / "log"
    shutil.copy(SHAKESPEARE, data)
    had_wandb = "wandb" in sys.modules
    base = [f"--data={data}", f"--log_dir={log_dir}", *LOG_RUN]
    assert train_gpt2.main([*base, "--max_steps=4"]) == 0
    assert had_wandb or "wandb" not in sys.modules  # imported only with --wandb_project
    lines, rows = points(log_dir)
    assert [(str(r["step"]), r["kind"]) for r in rows] == [l[:2] for l in lines]  # the same points, in order
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [0, 1, 2, 3]
    assert all(r["tokens"] == 128 * r["step"] for r in rows)
    assert all(f"{r['value']:.6f}" == l[2] for r, l in zip(rows, lines) if r["kind"] == "train")
    fields = {"step", "kind", "tokens", "value", "lr", "norm", "dt_ms", "tok_s"}
    assert all(set(r) == fields for r in train_rows)
    config = json.loads((log_dir / "config.json").read_text())
    ckpt = train_gpt2.run_dir.load_checkpoint(str(log_dir / "ckpt_000004.pt"), ("config",))
    assert config == ckpt["config"] and config["max_steps"] == 4
    # resumed from step 2 with a new length: a branch; rows of steps 2.. move aside with log.txt's lines
    assert train_gpt2.main([*base, f"--resume={log_dir / 'ckpt_000002.pt'}", "--max_steps=5"]) == 0
    lines, rows = points(log_dir)
    assert [(str(r["step"]), r["kind"]) for r in rows] == [l[:2] for l in lines]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [0, 1, 2, 3, 4]
    assert json.loads((log_dir / "config.json").read_text())["max_steps"] == 5
    superseded = (log_dir / "metrics.jsonl.superseded").read_text().splitlines()
    assert [json.loads(s)["step"] for s in superseded if '"train"' in s] == [2, 3]


def test_wandb_offline_gets_every_point(tmp_path):
    pytest.importorskip("wandb")
    data, log_dir = tmp_path / "input.txt", tmp_path / "log"
    shutil.copy(SHAKESPEARE, data)
    import subprocess
    # a process of its own, as a user runs it: wandb's writer has flushed the run file when it exits
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), f"--data={data}",
                          f"--log_dir={log_dir}", *LOG_RUN, "--max_steps=3", "--wandb_project=tiny",
                          "--wandb_run_name=tiny-run"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    raw = run.read_bytes()  # protobuf records: the keys and JSON values are stored as plain bytes
    _, rows = points(log_dir)
    for key in (b"train/loss", b"val/loss", b"train/lr", b"tiny-run"):
        assert key in raw, (key, len(raw))
    for r in rows:  # each point's value as JSON, as wandb writes it
        assert json_bytes(r["value"]) in raw, r


def json_bytes(x):
    import json
    return json.dumps(x).encode()
