"""torchrun with gloo on CPU: 2 ranks compute exactly what 1 process with twice the accumulation does."""
import re
import subprocess

import pytest
import torch

from helpers_run import ENV, command, final_params, read_log, run
from test_train import TINY, shakespeare  # noqa: F401  (fixture)

STEPS = 6


def args(data, log_dir, extra=()):
    return [f"--data={data}", f"--log_dir={log_dir}", f"--max_steps={STEPS}", "--warmup_steps=2",
            "--eval_interval=3", "--num_samples=0", "--checkpoint_interval=0", *TINY,
            "--total_batch_size=512", *extra]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """1 process, grad accum 4 (512 / (4 * 32))."""
    path = tmp_path_factory.mktemp("data") / "input.txt"
    from conftest import SHAKESPEARE
    path.write_text(open(SHAKESPEARE).read())
    log_dir = tmp_path_factory.mktemp("single")
    out = run(args(path, log_dir))
    assert "grad accum 4" in out.stdout
    return path, log_dir


def assert_same_run(dir_a, dir_b, atol):
    losses_a, losses_b = read_log(dir_a), read_log(dir_b)
    assert [s for s, _ in losses_a] == [s for s, _ in losses_b] == list(range(STEPS))
    for (s, a), (_, b) in zip(losses_a, losses_b):
        assert abs(a - b) <= atol, f"step {s}: {a} vs {b}"
    for (s, a), (_, b) in zip(read_log(dir_a, "val"), read_log(dir_b, "val")):
        assert abs(a - b) <= 1e-4, f"val at step {s}: {a} vs {b}"  # logged with 4 decimals
    pa, pb = final_params(dir_a, STEPS), final_params(dir_b, STEPS)
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], atol=atol, rtol=0, msg=name)


def test_ddp_two_ranks_equal_one_process(single_process, tmp_path):
    data, single_dir = single_process
    out = run(args(data, tmp_path), nproc=2)
    assert "x 2 | grad accum 2" in out.stdout  # 2 ranks x accum 2 == 1 x accum 4
    assert out.stdout.count("step 5/6 | loss") == 1  # only rank 0 prints
    assert_same_run(single_dir, tmp_path, atol=1e-5)


def test_compiled_over_two_ranks_is_split_at_ddp_buckets(single_process, tmp_path):
    """--compile with gloo on a CPU: the training graph, traced inside DDP's forward, is cut at DDP's gradient
    buckets (so each bucket's all-reduce can overlap the rest of the backward); one recompile (eval, then
    training: grad mode), no graph break, and the same run as 1 eager process."""
    data, single_dir = single_process
    env = {**ENV, "TORCH_LOGS": "recompiles,graph_breaks,torch._dynamo.backends.distributed"}
    out = subprocess.run(command(args(data, tmp_path, ["--compile=true"]), nproc=2), capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    for rank in (0, 1):
        lines = [line for line in out.stderr.splitlines() if line.startswith(f"[rank{rank}]:")]
        buckets = [int(n) for line in lines for n in re.findall(r"created (\d+) buckets", line)]
        assert len(buckets) == 1 and buckets[0] >= 2, out.stderr[-4000:]  # the tiny model: ~6.5 MB, 2 buckets
        assert sum("Recompiling function forward" in line for line in lines) == 1
        assert not any("Graph break" in line for line in lines)
    assert_same_run(single_dir, tmp_path, atol=1e-5)


def test_muon_two_ranks_equal_one_process(single_process, tmp_path_factory):
    """Muon's update is computed on every rank from the all-reduced gradient: the same run either way."""
    data, _ = single_process
    muon = ["--optimizer=muon", "--muon_lr=0.05", "--lr_schedule=wsd"]
    single_dir, ddp_dir = tmp_path_factory.mktemp("muon1"), tmp_path_factory.mktemp("muon2")
    run(args(data, single_dir, muon))
    run(args(data, ddp_dir, muon), nproc=2)
    assert_same_run(single_dir, ddp_dir, atol=1e-5)
    adamw = final_params(single_process[1], STEPS)
    assert not torch.allclose(final_params(single_dir, STEPS)["transformer.h.0.mlp.c_fc.weight"],
                              adamw["transformer.h.0.mlp.c_fc.weight"], atol=1e-3)  # Muon did take the step


def test_zero1_resumes_and_matches_plain_adamw(single_process, tmp_path):
    data, single_dir = single_process
    run(args(data, tmp_path, ["--zero1", "--stop_step=3"]), nproc=2)
    run(args(data, tmp_path, ["--zero1", "--resume"]), nproc=2)
    assert_same_run(single_dir, tmp_path, atol=1e-5)


def test_resume_on_another_world_size_continues_the_same_run(single_process, tmp_path):
    """Stopped on 2 ranks, resumed on 1: the data position is in tokens, so the run is the same."""
    data, single_dir = single_process
    run(args(data, tmp_path, ["--stop_step=3"]), nproc=2)
    out = run(args(data, tmp_path, ["--resume"]))
    assert "x 1 | grad accum 4" in out.stdout
    assert_same_run(single_dir, tmp_path, atol=1e-5)


def test_world_size_that_does_not_divide_the_batch(single_process, tmp_path):
    data, _ = single_process
    out = run(args(data, tmp_path, ["--total_batch_size=384"]), nproc=2, check=False)
    assert out.returncode != 0
    assert ("--total_batch_size=384 is not a multiple of --batch_size * --block_size * world size = 4*32*2"
            in out.stderr)
