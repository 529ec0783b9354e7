"""bench.py runs every rung on the same weights and batch, so the ladder compares like with like."""
import json
import math
import weakref

import pytest
import torch

import bench

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--vocab=1000", "--T=32", "--B=2,3", "--steps=2", "--warmup=1",
        "--no_compile", "--peak_seconds=0.02", "--sample_tokens=4", "--sample_dtype=float32"]
QUIET = dict(log=lambda *a: None)


def check_rungs(run, expected):
    assert [r["key"] for r in run["rungs"]] == expected
    assert run["peak_flops"]["bf16"] > 0 and run["peak_flops"]["fp32"] > 0
    for r in run["rungs"]:
        assert len(r["times"]) == 2
        for field in ("tok_s", "ms", "mfu", "vs_hf_fp32", "peak_mem_bytes"):
            assert r[field] > 0 and math.isfinite(r[field]), (r["key"], field)
    # the first step of every rung sees the same weights and batch: HF's model, ours in fp32 and
    # bf16, padded or not, chunked loss or not, all give the same loss (to bf16 rounding)
    ref = run["rungs"][0]["loss0"]
    assert abs(ref - math.log(1000)) < 0.5  # a fresh model is near-uniform
    losses = {r["key"]: r["loss0"] for r in run["rungs"]}
    assert abs(losses["base"] - ref) < 1e-5  # both fp32
    assert all(abs(loss - ref) < 1e-2 * ref for loss in losses.values()), losses


def test_ladder_smoke(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(TINY + [f"--json={out}"], **QUIET)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # TF32 and cuDNN attention are CUDA-only rungs
    expected = [r.key for r in bench.ladder() if r.key not in ("tf32", "cudnn-sdpa")]
    assert [run["B"] for run in report["runs"]] == [2, 3]
    assert report["config"]["mode"] == "interleaved"  # auto on a CPU
    for run in report["runs"]:
        check_rungs(run, expected)
        assert all(r["mode"] == "interleaved" and r["micro_batches"] == 1 for r in run["rungs"])
    # greedy decoding of the same fp32 weights: cached, uncached and Hugging Face agree token for token
    methods = report["sampling"]["methods"]
    assert len(methods) == 3
    for m in methods.values():
        assert m["tok_s"] > 0 and m["same_tokens_as_hf"] == 1.0


def test_isolated_mode_builds_times_and_frees_each_rung_alone(monkeypatch):
    live = []  # how many rungs are built and not yet freed, seen at each build

    real_build = bench.build

    def counting_build(rung, args, hf_weights, device):
        model, optimizer, loss_of = real_build(rung, args, hf_weights, device)
        live[:] = [m for m in live if m() is not None]
        live.append(weakref.ref(model))
        counting_build.max_live = max(counting_build.max_live, len(live))
        return model, optimizer, loss_of
    counting_build.max_live = 0
    monkeypatch.setattr(bench, "build", counting_build)
    args = [a for a in TINY if not a.startswith("--B=")] + ["--B=2", "--mode=isolated", "--sample_tokens=0",
                                                            "--rungs=hf-fp32,base,bf16,chunked-ce"]
    report = bench.main(args, **QUIET)
    assert counting_build.max_live == 1  # each rung's model was gone before the next was built
    run = report["runs"][0]
    check_rungs(run, ["hf-fp32", "base", "bf16", "chunked-ce"])
    assert all(r["mode"] == "isolated" for r in run["rungs"])


def test_a_rung_that_does_not_fit_runs_alone_then_as_micro_batches(monkeypatch):
    """A fake GPU memory limit: Hugging Face's model cannot take more than 2 rows at once."""
    real_build = bench.build

    def limited_build(rung, args, hf_weights, device):
        model, optimizer, loss_of = real_build(rung, args, hf_weights, device)
        if not rung.hf:
            return model, optimizer, loss_of

        def loss_of_limited(x, y):
            if x.size(0) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
            return loss_of(x, y)
        return model, optimizer, loss_of_limited
    monkeypatch.setattr(bench, "build", limited_build)
    args = [a for a in TINY if not a.startswith("--B=")] + ["--B=4", "--sample_tokens=0",
                                                            "--rungs=hf-fp32,base,chunked-ce"]
    report = bench.main(args, **QUIET)
    rungs = {r["key"]: r for r in report["runs"][0]["rungs"]}
    # interleaved mode: HF ran out of memory next to the others, was timed alone, as 2 micro-batches of 2
    assert rungs["hf-fp32"]["mode"] == "isolated" and rungs["hf-fp32"]["micro_batches"] == 2
    assert rungs["base"]["mode"] == "interleaved" and rungs["base"]["micro_batches"] == 1
    # the same 4 rows in two halves: the same loss, to fp32 rounding
    assert abs(rungs["hf-fp32"]["loss0"] - rungs["base"]["loss0"]) < 1e-5
    assert len(rungs["hf-fp32"]["times"]) == 2 and rungs["hf-fp32"]["tok_s"] > 0


def test_bare_cuda_device_gets_an_index(monkeypatch):
    """torch.cuda.set_device('cuda') raises ValueError (no index): bench.py --device=cuda crashed so."""
    calls = []

    def set_device(dev):
        if isinstance(dev, str) or torch.device(dev).index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{dev}")
        calls.append(torch.device(dev))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    p, _ = bench.parse_args([])
    assert bench.resolve_device(p, "cuda") == "cuda:0"
    assert bench.resolve_device(p, "auto") == "cuda:0"
    assert bench.resolve_device(p, "cuda:1") == "cuda:1"
    assert calls == [torch.device("cuda:0"), torch.device("cuda:0"), torch.device("cuda:1")]


def test_gpu_check_runs_on_a_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "check.json"
    report = bench.main(["--check", "--tiny", "--sample_dtype=float32", f"--json={out}"], **QUIET)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # the 64-row micro-batch train_gpt2.py picks off CUDA is timed as a second run of our path alone
    assert report["auto_batch_size"] == 64 and [run["B"] for run in report["runs"]] == [4, 64]
    assert [r["key"] for r in report["runs"][0]["rungs"]] == ["hf-fp32", "hf-bf16", "fused-adamw", "chunked-ce"]
    assert [r["key"] for r in report["runs"][1]["rungs"]] == ["chunked-ce"]
    for run in report["runs"]:
        assert all(r["tok_s"] > 0 for r in run["rungs"])
    for m in report["sampling"]["methods"].values():
        assert m["same_tokens_as_hf"] == 1.0
    h = report["hellaswag"]
    assert "error" not in h, h
    assert h["items"] == 6 and h["single_items_s"] > 0 and h["batched_items_s"] > 0 and h["same_predictions"] == 1.0
    assert report["sdpa_kernel"] == "FLASH_ATTENTION"  # on a CPU: cuDNN is absent, flash comes next
    # and the profiler sees that kernel run in one step of our path
    assert any("flash_attention" in k for k in report["runs"][0]["rungs"][-1]["attention_kernels"])


def test_unknown_rung_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--rungs=base,warp-drive"], **QUIET)
    assert "warp-drive" in capsys.readouterr().err
