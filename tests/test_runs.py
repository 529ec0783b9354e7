"""Runs sharing a --log_dir: which checkpoint resumes, which files are deleted, locks, non-finite weights."""
import os
import shutil
import subprocess
import time

import pytest
import torch

import train_gpt2
from helpers_run import ENV, command, read_log
from test_train import TINY


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import shared_file
    path = tmp_path_factory.mktemp("data") / "input.txt"
    shutil.copy(shared_file("tinyshakespeare.txt"), path)
    return path


def args(data, log_dir, extra=()):
    return [f"--data={data}", f"--log_dir={log_dir}", "--max_steps=8", "--warmup_steps=2",
            "--eval_interval=0", "--num_samples=0", "--checkpoint_interval=2", "--keep_checkpoints=0",
            *TINY, *extra]


def train(data, log_dir, *extra):
    return train_gpt2.main(args(data, log_dir, extra))


def files(log_dir):
    """{name: bytes} of the checkpoints in log_dir."""
    return {p.name: p.read_bytes() for p in log_dir.iterdir() if p.name.startswith("ckpt_")}


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_fresh_run_in_a_used_log_dir_is_refused_until_start_over(data, tmp_path, capsys):
    assert train(data, tmp_path) == 0
    before = files(tmp_path)
    # the case: this used to delete the new ckpt_000004 at once and leave the old run's newer ones
    assert train(data, tmp_path, "--keep_checkpoints=3", "--stop_step=4") == 2
    err = one_line_error(capsys)
    assert "holds the checkpoints of another run" in err and "--resume" in err and "--start_over=true" in err
    assert files(tmp_path) == before
    assert train(data, tmp_path, "--keep_checkpoints=3", "--stop_step=4", "--start_over") == 0
    assert files(tmp_path / "old_1") == before  # moved, byte for byte, with the old log
    assert len(read_log(tmp_path / "old_1")) == 8
    assert sorted(files(tmp_path)) == ["ckpt_000002.pt", "ckpt_000004.pt"]
    assert [s for s, _ in read_log(tmp_path)] == [0, 1, 2, 3]
    out = capsys.readouterr().out
    assert f"checkpoint: {tmp_path / 'ckpt_000004.pt'}" in out
    # the quickstart, run twice: refused with the same one line before any data or model is loaded
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "ckpt_000300.pt").write_bytes(b"")
    assert train_gpt2.main(["--preset=shakespeare", f"--log_dir={tmp_path / 'q'}",
                            "--data=/nonexistent.txt"]) == 2
    assert "holds the checkpoints of another run (newest: " in one_line_error(capsys)


def test_resuming_an_older_checkpoint_branches_off_without_touching_the_newer_files(data, tmp_path, capsys):
    assert train(data, tmp_path) == 0
    first = files(tmp_path)
    assert sorted(first) == [f"ckpt_00000{s}.pt" for s in (2, 4, 6, 8)]
    assert train(data, tmp_path, f"--resume={tmp_path / 'ckpt_000004.pt'}", "--keep_checkpoints=1",
                 "--stop_step=6") == 0
    assert "this run is branch b1" in capsys.readouterr().out
    assert files(tmp_path) == {**first, "ckpt_000006_b1.pt": files(tmp_path)["ckpt_000006_b1.pt"]}
    # a bare --resume continues the branch (not the abandoned ckpt_000008), and the log has each step once
    assert train(data, tmp_path, "--resume", "--keep_checkpoints=1") == 0
    assert "resuming at step 6" in capsys.readouterr().out
    assert files(tmp_path).keys() == {*first, "ckpt_000008_b1.pt"}  # clean-up deleted only the branch's own
    # what play.ipynb shows
    assert train_gpt2.run_dir.list_checkpoints(str(tmp_path)) == [str(tmp_path / "ckpt_000008_b1.pt")]
    assert [s for s, _ in read_log(tmp_path)] == list(range(8))
    # the branch trained on the same config: it is the same run as the one it left
    a = torch.load(tmp_path / "ckpt_000008.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ckpt_000008_b1.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bare_resume_loads_only_our_own_names_and_clean_up_leaves_other_files(data, tmp_path, capsys):
    assert train(data, tmp_path, "--stop_step=4") == 0
    shutil.copy(tmp_path / "ckpt_000002.pt", tmp_path / "ckpt_best.pt")  # a user's own copy
    assert train(data, tmp_path, "--resume", "--keep_checkpoints=1") == 0
    assert "resuming at step 4" in capsys.readouterr().out
    assert sorted(files(tmp_path)) == ["ckpt_000008.pt", "ckpt_best.pt"]


def test_a_truncated_newest_checkpoint_names_the_intact_one_before_it(data, tmp_path, capsys):
    assert train(data, tmp_path, "--stop_step=4") == 0
    newest = tmp_path / "ckpt_000004.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    assert train(data, tmp_path, "--resume") == 2
    err = one_line_error(capsys)
    assert f"checkpoint {newest} could not be read" in err
    assert f"resume with --resume={tmp_path / 'ckpt_000002.pt'}" in err
    assert train(data, tmp_path, f"--resume={tmp_path / 'ckpt_000002.pt'}") == 0  # the advice works


def test_a_file_that_is_not_our_checkpoint_is_one_line(data, tmp_path, capsys):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert train(data, tmp_path / "log", f"--resume={tmp_path / 'other.pt'}") == 2
    err = one_line_error(capsys)
    assert "other.pt is not a train_gpt2.py checkpoint (no config, " in err


def poison_weights_after(monkeypatch, n, poison):
    """Wraps AdamW so that after its n-th step poison(model params) runs: what eps=0 or lr=inf does."""
    configure = train_gpt2.GPT.configure_optimizers

    def configure_poisoned(self, *a, **k):
        opt, calls = configure(self, *a, **k), []
        step = opt.step

        def poisoned_step(*sa, **sk):
            out = step(*sa, **sk)
            calls.append(1)
            if len(calls) >= n:
                with torch.no_grad():
                    poison(self)
            return out
        opt.step = poisoned_step
        return opt
    monkeypatch.setattr(train_gpt2.GPT, "configure_optimizers", configure_poisoned)


def test_nonfinite_weights_are_never_checkpointed(data, tmp_path, monkeypatch, capsys):
    # NaN in a padded vocab row (as eps=0 makes there): the loss stays finite, the weights do not
    poison_weights_after(monkeypatch, 3, lambda m: m.transformer.wte.weight[-1].fill_(float("nan")))
    assert train(data, tmp_path, "--checkpoint_interval=1") == 1
    err = capsys.readouterr().err
    assert "step 3: weight transformer.wte.weight is NaN or inf, so no checkpoint is written" in err
    assert f"last good checkpoint: {tmp_path / 'ckpt_000002.pt'}" in err
    assert sorted(files(tmp_path)) == ["ckpt_000001.pt", "ckpt_000002.pt"]
    assert train_gpt2.run_dir.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_000002.pt")


def test_skip_nonfinite_stops_when_the_weights_themselves_are_gone(data, tmp_path, monkeypatch, capsys):
    poison_weights_after(monkeypatch, 3, lambda m: m.lm_head.weight.fill_(float("inf")))
    assert train(data, tmp_path, "--skip_nonfinite") == 1
    err = capsys.readouterr().err
    assert ("step 3: non-finite loss nan" in err
            and f"last good checkpoint: {tmp_path / 'ckpt_000002.pt'}" in err)
    assert sorted(files(tmp_path)) == ["ckpt_000002.pt"]
    good = torch.load(tmp_path / "ckpt_000002.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in good["model"].values())


def test_a_second_trainer_is_refused_and_kill_9_leaves_no_stale_lock(data, tmp_path, capsys):
    proc = subprocess.Popen(command(args(data, tmp_path, ["--max_steps=100000", "--checkpoint_interval=1"])),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while not (tmp_path / "ckpt_000001.pt").exists():
            assert proc.poll() is None and time.time() - t0 < 120, proc.stderr.read()
            time.sleep(0.05)
        assert train(data, tmp_path, "--resume") == 2
        assert (f"--log_dir={tmp_path} is in use by another training run (pid {proc.pid} on "
                in one_line_error(capsys))
    finally:
        proc.kill()
        proc.wait()
    # leftovers of a write cut short, <name>.<pid>.tmp of a dead pid: they go; every other name stays
    (tmp_path / f"ckpt_000009.pt.{proc.pid}.tmp").write_bytes(b"half")
    (tmp_path / f"run.json.{proc.pid}.tmp").write_bytes(b"half")
    mine = ["ckpt_000009.pt.tmp", "ckpt_notes.pt.tmp", "notes.tmp", "run.json.orig.tmp",
            f"ckpt_000009.pt.{os.getpid()}x.tmp", f"ckpt_000009.pt.{os.getppid()}.tmp"]  # last: a live pid
    for name in mine:
        (tmp_path / name).write_bytes(b"mine")
    done = max(int(p.name[5:11]) for p in tmp_path.glob("ckpt_*.pt"))  # steps the killed run finished
    assert train(data, tmp_path, "--resume", f"--max_steps={done + 2}") == 0  # the lock died with the process
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == sorted(mine)
    steps = [s for s, _ in read_log(tmp_path)]
    assert steps == list(range(len(steps)))


def test_a_run_that_died_before_its_first_checkpoint_leaves_no_duplicate_steps(data, tmp_path):
    (tmp_path / "log.txt").write_text("0 train 10.9\n1 train 10.8\n")  # what it had logged
    assert train(data, tmp_path, "--max_steps=3") == 0
    assert [s for s, _ in read_log(tmp_path)] == [0, 1, 2]
    assert (tmp_path / "log.txt.superseded").read_text() == "0 train 10.9\n1 train 10.8\n"


def test_resuming_an_init_from_run_never_reads_the_source_again(data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32)).save_pretrained(hf)
    assert train(data, tmp_path / "log", f"--init_from={hf}", "--stop_step=2") == 0
    hf.rename(tmp_path / "moved")
    assert train(data, tmp_path / "log", "--resume", "--max_steps=4") == 0
    assert [s for s, _ in read_log(tmp_path / "log")] == [0, 1, 2, 3]


STALL = """
import sys, time, torch, torch.distributed as dist
import device
d = device.setup_distributed("cpu", "gloo", timeout_s=2)
if d.rank == 1:
    time.sleep(60)  # stalled: never joins the all-reduce
t0 = time.time()
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError as e:
    print(f"gave up after {time.time() - t0:.1f} s: {e}")
"""


def test_a_stalled_rank_fails_the_others_after_the_timeout_not_30_minutes(tmp_path):
    import socket
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "PYTHONPATH": os.path.dirname(train_gpt2.__file__)}
    procs = [subprocess.Popen([sys.executable, "-c", STALL],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=45)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert out.startswith("gave up after ") and "Timed out" in out, out
    assert 1.9 < float(out.split()[3]) < 15  # 2 s, give or take a loaded machine
    assert train_gpt2.TrainConfig().dist_timeout == 600  # the default, as the README says


def test_a_full_disk_mid_checkpoint_is_one_line_and_keeps_the_one_before(data, tmp_path, monkeypatch, capsys):
    save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # what torch says when the disk fills mid-write
            f.write(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    assert train(data, tmp_path) == 2
    err = one_line_error(capsys)
    assert f"writing {tmp_path / 'ckpt_000004.pt'} failed" in err and "is the disk full?" in err
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000002.pt", "config.json", "lock", "log.txt",
                                            "metrics.jsonl", "run.json"]  # no partial checkpoint
    monkeypatch.undo()
    assert train_gpt2.run_dir.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_000002.pt")
    assert train(data, tmp_path, "--resume") == 0  # the one before is intact


def test_a_file_size_limit_is_one_line_not_a_traceback(data, tmp_path):
    import resource

    def limit():  # 1 MB: log.txt and run.json fit, a checkpoint (~20 MB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    out = subprocess.run(command(args(data, tmp_path)), env=ENV, capture_output=True, text=True, timeout=300,
                         preexec_fn=limit)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith(f"error: writing {tmp_path / 'ckpt_000002.pt'} failed ([enforce fail")
    assert out.stderr.count("\n") == 1 and "is the disk full?" in out.stderr
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") or n.startswith("ckpt_")]


def test_a_lock_only_rank_0_sees_stops_both_ranks_with_one_line(data, tmp_path):
    held = train_gpt2.run_dir.lock(str(tmp_path))  # another trainer holds the folder
    try:
        out = subprocess.run(command(args(data, tmp_path), nproc=2), env=ENV, capture_output=True, text=True,
                             timeout=300)
    finally:
        held.close()
    assert out.returncode != 0
    # each rank's one line (the two may share a line of stderr), exit 2 on both; the only traceback is
    # torchrun's own report of a failed child, none from a trainer's frames
    assert "is in use by another training run" in out.stderr, out.stderr[-3000:]
    assert "error: rank 0 refused the run: see its error line" in out.stderr
    # exit 2 on each rank torchrun saw end (it may stop rank 1 itself once rank 0 has ended); a traceback is 1
    assert "exitcode  : 2" in out.stderr and "exitcode  : 1 " not in out.stderr
    assert 'train_gpt2.py", line' not in out.stderr
    assert "Connection closed by peer" not in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["lock"]
