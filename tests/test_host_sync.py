"""The loop reads the device once per step (loss, grad norm and stop flag together), after queuing it."""
import shutil

import pytest
import torch

import train_gpt2
from test_train import TINY

# each of these waits for the GPU to reach the tensor; on a CPU they only count
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero")
STEPS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import shared_file
    path = tmp_path_factory.mktemp("data") / "input.txt"
    shutil.copy(shared_file("tinyshakespeare.txt"), path)
    return path


def record(monkeypatch):
    """A list that gets "step" at each train_step, "opt" at each optimizer step, and each tensor read."""
    events = []
    for name in READS:
        def counted(self, *a, _read=getattr(torch.Tensor, name), _name=name, **k):
            events.append(_name)
            return _read(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    train_step, configure = train_gpt2.train_step, train_gpt2.GPT.configure_optimizers

    def marked_step(*a):
        events.append("step")
        return train_step(*a)

    def configure_marked(self, *a, **k):
        opt = configure(self, *a, **k)
        step = opt.step

        def marked(*sa, **sk):
            events.append("opt")
            return step(*sa, **sk)
        opt.step = marked
        return opt
    monkeypatch.setattr(train_gpt2, "train_step", marked_step)
    monkeypatch.setattr(train_gpt2.GPT, "configure_optimizers", configure_marked)
    return events


def per_step(events):
    """The events of each step but the last (which also checkpoints), from its train_step to the next."""
    steps = []
    for e in events:
        if e == "step":
            steps.append([])
        elif steps:
            steps[-1].append(e)
    return steps[:-1]


@pytest.mark.parametrize("extra, expected", [
    ([], ["opt", "tolist"]),  # queued first: the GPU never waits for the host to launch the optimizer
    (["--optimizer=muon"], ["opt", "tolist"]),
    (["--skip_nonfinite"], ["tolist", "opt"]),  # read first: a NaN step is never applied
])
def test_one_host_sync_per_step(data, tmp_path, monkeypatch, extra, expected):
    events = record(monkeypatch)
    assert train_gpt2.main([f"--data={data}", f"--log_dir={tmp_path}", *TINY, f"--max_steps={STEPS}",
                            "--warmup_steps=2", "--eval_interval=0", "--num_samples=0",
                            "--checkpoint_interval=0", *extra]) == 0
    steps = per_step(events)
    assert len(steps) == STEPS - 1
    assert steps == [expected] * (STEPS - 1)
