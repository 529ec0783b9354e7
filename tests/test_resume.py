"""A run stopped, killed or preempted and then resumed is bitwise the run that never stopped."""
import os
import signal
import subprocess
import time

import pytest
import torch

import train_gpt2
from helpers_run import ENV, command, final_params, read_log, run
from test_train import TINY, shakespeare  # noqa: F401  (fixture)

STEPS = 8


def args(data, log_dir, extra=()):
    # grad accum 8 makes a step slow enough (~0.1 s) to kill between two steps reliably
    return [f"--data={data}", f"--log_dir={log_dir}", f"--max_steps={STEPS}", "--warmup_steps=2",
            "--eval_interval=4", "--num_samples=0", "--checkpoint_interval=0", *TINY,
            "--total_batch_size=1024", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    from conftest import SHAKESPEARE
    data = tmp_path_factory.mktemp("data") / "input.txt"
    data.write_text(open(SHAKESPEARE).read())
    log_dir = tmp_path_factory.mktemp("reference")
    run(args(data, log_dir))
    return data, log_dir


def assert_identical(ref_dir, log_dir):
    """Bitwise: the same logged losses (each step once) and the same final parameters."""
    assert read_log(log_dir) == read_log(ref_dir)
    assert read_log(log_dir, "val") == read_log(ref_dir, "val")
    ref, got = final_params(ref_dir, STEPS), final_params(log_dir, STEPS)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_stop_then_resume_is_bitwise_identical(reference, tmp_path):
    data, ref_dir = reference
    out = run(args(data, tmp_path, ["--stop_step=3"]))
    assert "stopped after step 2 (3 steps done)" in out.stdout and os.path.exists(tmp_path / "ckpt_000003.pt")
    out = run(args(data, tmp_path, ["--resume"]))  # newest checkpoint in log_dir
    assert "resuming at step 3" in out.stdout
    assert_identical(ref_dir, tmp_path)


def test_muon_wsd_dropout_stop_then_resume_is_bitwise_identical(reference, tmp_path_factory):
    """Muon's momentum, the WSD schedule and dropout's random masks all continue exactly."""
    data, _ = reference
    extra = ["--optimizer=muon", "--lr_schedule=wsd", "--decay_fraction=0.5", "--dropout=0.1"]
    ref_dir, log_dir = tmp_path_factory.mktemp("muon_ref"), tmp_path_factory.mktemp("muon_resumed")
    run(args(data, ref_dir, extra))
    run(args(data, log_dir, [*extra, "--stop_step=5"]))
    ckpt = torch.load(log_dir / "ckpt_000005.pt", weights_only=True)
    assert len(ckpt["optimizer"][0]["state"]) == 4 * 2  # a momentum buffer per block matrix
    run(args(data, log_dir, ["--resume"]))  # the optimizer, schedule and dropout come from the checkpoint
    assert_identical(ref_dir, log_dir)


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.005)


def test_kill_9_after_a_checkpoint_then_resume(reference, tmp_path):
    data, ref_dir = reference
    proc = subprocess.Popen(command(args(data, tmp_path, ["--checkpoint_interval=3"])), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(tmp_path / "ckpt_000003.pt", proc)
    time.sleep(0.15)  # let it log a step or so past the checkpoint, then pull the plug
    proc.kill()
    proc.wait()
    assert not os.path.exists(tmp_path / f"ckpt_{STEPS:06d}.pt"), "the run finished before it was killed"
    run(args(data, tmp_path, ["--checkpoint_interval=3", "--resume"]))
    assert_identical(ref_dir, tmp_path)  # the steps logged after the checkpoint are not doubled


def test_sigterm_finishes_the_step_and_checkpoints(reference, tmp_path):
    data, ref_dir = reference
    proc = subprocess.Popen(command(args(data, tmp_path)), env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:  # wait for the first step to be done
        if line.startswith("step 0/"):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "on signal 15; continue with --resume" in stdout
    run(args(data, tmp_path, [f"--resume={train_gpt2.run_dir.list_checkpoints(str(tmp_path))[-1]}"]))
    assert_identical(ref_dir, tmp_path)


def poison_training_loss(monkeypatch, when, value):
    """Multiplies the training loss of the n-th forward call (1-based; grad accum 8 per step) by value."""
    forward, calls = train_gpt2.GPT.forward, []

    def poisoned(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        if targets is not None and self.training:
            calls.append(1)
            if when(len(calls)):
                loss = loss * value
        return logits, loss
    monkeypatch.setattr(train_gpt2.GPT, "forward", poisoned)


def test_nan_stops_with_message_and_keeps_last_good_checkpoint(reference, tmp_path, monkeypatch, capsys):
    data, _ = reference
    # step 3's first micro-step
    poison_training_loss(monkeypatch, lambda call: call == 8 * 3 + 1, float("nan"))
    rc = train_gpt2.main(args(data, tmp_path, ["--checkpoint_interval=2"]))
    err = capsys.readouterr().err
    assert rc == 1 and "step 3: non-finite loss nan" in err and "ckpt_000002.pt" in err
    assert train_gpt2.run_dir.list_checkpoints(str(tmp_path)) == [str(tmp_path / "ckpt_000002.pt")]
    good = torch.load(tmp_path / "ckpt_000002.pt", weights_only=True)
    assert good["step"] == 2 and all(torch.isfinite(t).all() for t in good["model"].values())


def test_skip_nonfinite_skips_the_step(reference, tmp_path, monkeypatch):
    data, _ = reference
    poison_training_loss(monkeypatch, lambda call: call > 8 * 2, float("inf"))  # every step from step 2 on
    assert train_gpt2.main(args(data, tmp_path, ["--skip_nonfinite", "--max_steps=4",
                                                 "--checkpoint_interval=2"])) == 0
    at2, at4 = final_params(tmp_path, 2), final_params(tmp_path, 4)
    assert all(torch.equal(at2[k], at4[k]) for k in at2)  # skipped steps changed nothing


@pytest.mark.parametrize("extra, message", [
    (["--resume=/no/such/ckpt.pt"], "checkpoint /no/such/ckpt.pt: no such file"),
    (["--resume"], "--resume: no checkpoint (ckpt_*.pt) in --log_dir="),
])
def test_bad_resume_paths(reference, tmp_path, capsys, extra, message):
    data, _ = reference
    assert train_gpt2.main(args(data, tmp_path / "empty", extra)) == 2
    assert message in capsys.readouterr().err


def test_resume_with_another_model_config_names_the_field(reference, tmp_path, capsys):
    data, ref_dir = reference
    ckpt = str(ref_dir / f"ckpt_{STEPS:06d}.pt")
    assert train_gpt2.main(args(data, tmp_path, [f"--resume={ckpt}", "--n_embd=64"])) == 2
    err = capsys.readouterr().err
    assert "was trained with n_embd=32, this run has n_embd=64" in err and err.count("\n") == 1


def test_resume_with_another_optimizer_is_refused(reference, tmp_path, capsys):
    data, ref_dir = reference
    ckpt = str(ref_dir / f"ckpt_{STEPS:06d}.pt")
    assert train_gpt2.main(args(data, tmp_path, [f"--resume={ckpt}", "--optimizer=muon"])) == 2
    err = capsys.readouterr().err
    assert ("--optimizer=muon differs from the checkpoint's; resume with its own" in err
            and err.count("\n") == 1)


def test_block_size_beyond_the_pretrained_model(tmp_path, capsys, reference):
    from transformers import GPT2Config, GPT2LMHeadModel
    data, _ = reference
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16)).save_pretrained(
        tmp_path / "hf")
    assert train_gpt2.main(args(data, tmp_path, [f"--init_from={tmp_path / 'hf'}"])) == 2
    assert "--block_size=32 exceeds" in capsys.readouterr().err


@pytest.mark.parametrize("change, names", [
    (lambda c: c.update(step=-5), ["step -5"]),  # trained with a negative LR
    (lambda c: c["model_config"].update(n_embd=64), ["do not have the shape"]),
    (lambda c: c["loader"].update(offset="x"), ["loader"]),
    (lambda c: c["config"].update(max_steps=0), ["max_steps 0"]),
    (lambda c: c.update(config=[1, 2]), ["config is not a dict"]),
    (lambda c: c["rng"].update(torch=None), ["RNG state"]),
])
def test_a_checkpoint_with_bad_metadata_is_one_line_naming_it(reference, tmp_path, capsys, change, names):
    data, ref_dir = reference
    ckpt = torch.load(ref_dir / f"ckpt_{STEPS:06d}.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, tmp_path / "bad.pt")
    assert train_gpt2.main(args(data, tmp_path / "log", [f"--resume={tmp_path / 'bad.pt'}"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint {tmp_path / 'bad.pt'}: " in err, err
    assert all(n in err for n in names), err
    assert not (tmp_path / "log").exists()


def test_with_no_run_json_a_users_log_txt_is_moved_aside_not_appended_to(reference, tmp_path):
    data, ref_dir = reference
    import shutil
    os.makedirs(tmp_path / "log")
    shutil.copy(ref_dir / f"ckpt_{STEPS:06d}.pt", tmp_path / "log" / "ckpt_000008.pt")  # no run.json with it
    (tmp_path / "log" / "log.txt").write_text("my own notes\n")
    run(args(data, tmp_path / "log", ["--resume", "--max_steps=9"]))
    assert (tmp_path / "log" / "log.txt.superseded").read_text() == "my own notes\n"
    assert [s for s, _ in read_log(tmp_path / "log")] == [8]


def test_a_prompt_with_endoftext_samples(reference):
    model = train_gpt2.model_from_checkpoint(str(reference[1] / f"ckpt_{STEPS:06d}.pt"))
    texts = train_gpt2.sample_texts(model, "<|endoftext|>ROMEO:", 2, 4, "cpu")
    assert len(texts) == 2 and all(t.startswith("<|endoftext|>ROMEO:") for t in texts)
