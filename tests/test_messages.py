"""What a run says when it stops, ends or has nothing to do; the figures it prints are its weights'."""
import os
import shutil
from contextlib import nullcontext

import numpy as np
import pytest

import train_gpt2
from conftest import SHAKESPEARE
from helpers_run import read_log
from device import DistInfo
from train_gpt2 import ConfigError, Source, val_windows

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--total_batch_size=128", "--val_tokens=1024", "--dtype=float32", "--device=cpu", "--num_samples=0",
        "--warmup_steps=1", "--eval_interval=2"]


@pytest.fixture
def base(tmp_path):
    data = tmp_path / "input.txt"
    shutil.copy(SHAKESPEARE, data)
    return [f"--data={data}", f"--log_dir={tmp_path / 'log'}", *TINY]


def snapshot(folder):
    """{name: (bytes, mtime)} of every file in folder."""
    return {n: (open(os.path.join(folder, n), "rb").read(), os.stat(os.path.join(folder, n)).st_mtime_ns)
            for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n))}


def test_resuming_a_finished_run_says_so_and_writes_nothing(base, tmp_path, capsys):
    assert train_gpt2.main([*base, "--max_steps=3"]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path / "log")
    assert train_gpt2.main([*base, "--max_steps=3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "the run is complete at --max_steps=3 (3 steps done)" in out
    assert "pass --max_steps=N (N > 3) with --resume" in out
    assert "resuming at" not in out and "done:" not in out and "mean_step_ms" not in out
    assert snapshot(tmp_path / "log") == before  # no log line, no run.json rewrite, no checkpoint


def test_stop_step_n_stops_after_step_n_minus_1_with_n_steps_done(base, tmp_path, capsys):
    assert train_gpt2.main([*base, "--max_steps=6", "--stop_step=3"]) == 0
    out = capsys.readouterr().out
    assert "stopped after step 2 (3 steps done); continue with --resume" in out
    assert "done: step 2 |" in out
    assert [s for s, _ in read_log(tmp_path / "log")] == [0, 1, 2]
    files = ["ckpt_000003.pt", "config.json", "lock", "log.txt", "metrics.jsonl", "run.json"]
    assert sorted(os.listdir(tmp_path / "log")) == files
    # the same --stop_step again: nothing is left to do in this job
    before = snapshot(tmp_path / "log")
    assert train_gpt2.main([*base, "--resume", "--stop_step=3"]) == 0
    assert "3 steps are done, --stop_step=3 asks for none" in capsys.readouterr().out
    assert snapshot(tmp_path / "log") == before
    # the next job picks up at step 3
    assert train_gpt2.main([*base, "--resume", "--stop_step=5"]) == 0
    out = capsys.readouterr().out
    assert "resuming at step 3" in out and "stopped after step 4 (5 steps done)" in out
    assert [s for s, _ in read_log(tmp_path / "log")] == [0, 1, 2, 3, 4]


def test_the_final_val_loss_is_the_saved_weights(base, tmp_path, capsys):
    assert train_gpt2.main([*base, "--max_steps=4"]) == 0
    out = capsys.readouterr().out
    log_dir = tmp_path / "log"
    val = read_log(log_dir, "val")
    assert [s for s, _ in val] == [0, 2, 4]  # 4: after the last step, 3
    ckpt_path = str(log_dir / "ckpt_000004.pt")
    saved = train_gpt2.run_dir.load_checkpoint(ckpt_path, ("val_loss",))["val_loss"]
    # the checkpoint's weights scored afresh on the same val tokens
    _, va = train_gpt2.load_text_tokens(base[0].split("=", 1)[1])
    model = train_gpt2.model_from_checkpoint(ckpt_path)
    fresh = train_gpt2.evaluate_loss(model, [Source(lambda: va)], 4, 32, 1024,
                                     DistInfo(0, 0, 1, "cpu", "cpu", True), nullcontext())
    assert saved == pytest.approx(fresh, abs=1e-6)
    assert val[-1][1] == pytest.approx(saved, abs=5e-5) and f"done: step 3 | val_loss {saved:.4f} |" in out
    # resumed with more steps: that final eval is not logged twice, and the new end is scored
    assert train_gpt2.main([*base, "--max_steps=6", "--resume"]) == 0
    assert [s for s, _ in read_log(log_dir, "val")] == [0, 2, 4, 6]


def test_a_val_split_shorter_than_a_batch_names_the_fix_that_helps():
    short = [Source(lambda: np.zeros(100, dtype=np.uint16))]
    # --init_from=gpt2 on input.txt, on a CPU: a larger --val_tokens cannot help
    with pytest.raises(ConfigError, match=r"the val split \(100 tokens\) .* --batch_size or --block_size$"):
        val_windows(short, 64, 1024, 10_485_760)
    with pytest.raises(ConfigError, match=r"--val_tokens=20 is smaller .*; raise --val_tokens$"):
        val_windows([Source(lambda: np.zeros(10_000, dtype=np.uint16))], 4, 32, 20)


def test_eval_only_scores_a_checkpoint_logs_it_and_writes_nothing_else(base, tmp_path, capsys):
    assert train_gpt2.main([*base, "--max_steps=4"]) == 0
    log_dir, ckpt = tmp_path / "log", str(tmp_path / "log" / "ckpt_000004.pt")
    saved = train_gpt2.run_dir.load_checkpoint(ckpt, ("val_loss",))["val_loss"]
    capsys.readouterr()
    before = snapshot(log_dir)
    log_before = (log_dir / "log.txt").read_text()
    assert train_gpt2.main([f"--resume={ckpt}", "--eval_only=true"]) == 0  # its run's config: data, log_dir
    out = capsys.readouterr().out
    assert "evaluating at step 4" in out and f"step 4 | val loss {saved:.4f}" in out
    assert (log_dir / "log.txt").read_text() == log_before + f"4 val {saved:.4f}\n"  # appended, one line
    after, logs = snapshot(log_dir), ("log.txt", "metrics.jsonl")  # the logs gain that point, nothing else
    assert {n: v for n, v in after.items() if n not in logs} == {n: v for n, v in before.items()
                                                                 if n not in logs}
    assert after["metrics.jsonl"][0].startswith(before["metrics.jsonl"][0])


def test_eval_only_without_weights_is_one_line_exit_2(base, tmp_path, capsys):
    assert train_gpt2.main([*base, "--eval_only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--eval_only=true" in err and "--resume=PATH or --init_from=NAME" in err
    assert not (tmp_path / "log").exists()


def test_tiny_shards_preset_leaves_its_warmup_in_a_short_run():
    c = train_gpt2.parse_args(["--preset=tiny-shards", "--data=my_shards"])
    assert c.data == "my_shards" and c.warmup_steps == 20 < 40 and c.val_tokens == 65_536
    assert train_gpt2.get_lr(39, c) == c.max_lr  # at step 39 of 300 the LR is at its peak, not in warmup
