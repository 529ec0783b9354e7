"""bench.py runs every rung on the same weights and batch, so the ladder compares like with like."""
import json
import math
import weakref

import pytest
import torch

import bench

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--vocab=1000", "--T=32", "--B=2,3", "--steps=2",
        "--warmup=1", "--no_compile", "--sample_tokens=4", "--sample_dtype=float32"]
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
    expected = [r.key for r in bench.ladder() if r.key != "tf32"]  # TF32 is CUDA's
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
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    p, _ = bench.parse_args([])
    assert bench.resolve_device(p, "cuda") == "cuda:0"
    assert bench.resolve_device(p, "auto") == "cuda:0"
    assert bench.resolve_device(p, "cuda:1") == "cuda:1"
    assert calls == [torch.device("cuda:0"), torch.device("cuda:0"), torch.device("cuda:1")]


SECTIONS = ["(a) train: ours vs the plain path", "(b) train: ours at the auto micro-batch 64",
            "(c) batch-1 decode", "(d) train: Hugging Face bf16", "(e) HellaSwag scoring",
            "(f) train: Hugging Face fp32"]


def test_gpu_check_runs_on_a_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "check.json"
    report = bench.main(["--check", "--tiny", "--sample_dtype=float32", f"--json={out}"], **QUIET)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert list(report["sections"]) == SECTIONS  # in order of value, each run or skipped
    assert report["wall_s"] <= 60 + 5 and report["compiles"] == 0
    ran = {k for k, v in report["sections"].items() if "seconds" in v}
    assert SECTIONS[0] in ran  # the first always fits the tiny check's 60 s
    runs = report["runs"]
    # (a): the plain path and ours at B=4, the same weights and batch, one profile each
    assert runs[0]["B"] == 4 and [r["key"] for r in runs[0]["rungs"]] == ["fused-adamw", "chunked-ce"]
    assert abs(runs[0]["rungs"][0]["loss0"] - runs[0]["rungs"][1]["loss0"]) < 1e-4
    for r in runs[0]["rungs"]:  # the attention both run: the CPU's flash kernel, forward and backward
        seen = r["attention_kernels"]
        assert any("flash_attention_for_cpu_backward" in k for k in seen), seen
    if SECTIONS[1] in ran:  # (b): the 64-row micro-batch train_gpt2.py picks off CUDA, our path alone
        assert report["auto_batch_size"] == 64 and runs[1]["B"] == 64
        assert [r["key"] for r in runs[1]["rungs"]] == ["chunked-ce"]
        a = report["auto_batch"]
        assert a["B"] == 64 and a["peak_mem_bytes"] == runs[1]["rungs"][0]["peak_mem_bytes"] > 0
        assert a["predicted_peak_bytes"] > 0
    if SECTIONS[2] in ran:
        for m in report["sampling"]["methods"].values():
            assert m["same_tokens_as_hf"] == 1.0
    if SECTIONS[4] in ran:
        h = report["hellaswag"]
        assert "error" not in h, h
        assert h["items"] == 6 and h["same_predictions"] == 1.0
    hf = [r for run in runs for r in run["rungs"] if r["key"].startswith("hf-")]
    assert [r["key"] for r in hf] == [k for k, s in zip(("hf-bf16", "hf-fp32"), SECTIONS[3::2]) if s in ran]
    assert all(abs(r["loss0"] - runs[0]["rungs"][0]["loss0"]) < 1e-2 for r in hf)
    # on a CPU PyTorch's own order tries flash first, and cuDNN is absent
    assert report["sdpa"]["kernel"] == "FLASH_ATTENTION" and report["sdpa"]["cudnn"] is None


def test_check_skips_what_its_budget_cannot_fit(capsys):
    """A budget too small for the sections: each is skipped with one line, and the run ends within a few
    seconds of the budget (what it spends is the start-up and the first section's probe step)."""
    budget = 1.0
    report = bench.main(["--check", "--tiny", "--sample_dtype=float32", f"--budget_s={budget}"])
    out = capsys.readouterr().out
    assert list(report["sections"]) == SECTIONS
    skipped = [k for k, v in report["sections"].items() if v.get("skipped") == "budget"]
    assert skipped and skipped == SECTIONS[len(SECTIONS) - len(skipped):]  # the least valuable ones
    for name in skipped:
        assert sum(line.startswith(f"{name}: skipped, ") for line in out.splitlines()) == 1
        assert f"| {name}" in out  # and a row of the table says so
    assert report["wall_s"] <= budget + 5


def test_budget_runs_what_fits_and_skips_the_rest(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    lines, record = [], {}
    budget = bench.Budget(10, 0.0, lines.append)

    def work(seconds):
        def fn():
            now[0] += seconds
            return seconds
        return fn
    assert budget.run("first", lambda: 4, work(5), record) == 5  # predicted 4 of 10: runs (and overruns)
    assert budget.run("second", lambda: 6, work(6), record) is None  # 6 > 5 left
    assert budget.run("third", lambda: 5, work(5), record) == 5  # exactly what is left
    assert budget.run("fourth", lambda: 0, work(0), record) is None  # none left: not even predicted
    assert record == {"first": {"seconds": 5, "predicted_s": 4},
                      "second": {"skipped": "budget", "predicted_s": 6, "left_s": 5},
                      "third": {"seconds": 5, "predicted_s": 5},
                      "fourth": {"skipped": "budget", "predicted_s": None, "left_s": 0}}
    assert [line.split(":")[0] for line in lines] == ["first", "second", "third", "fourth"]


def test_peak_flops_are_probed_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "PEAKS", {})
    monkeypatch.setattr(bench, "measure_peak_flops", lambda device, dtype: calls.append(dtype) or 1e12)
    args = [a for a in TINY if not a.startswith("--B=")] + ["--B=2", "--sample_tokens=0", "--rungs=base"]
    for _ in range(2):
        report = bench.main(args, **QUIET)
        assert report["runs"][0]["peak_flops"] == {"bf16": 1e12, "fp32": 1e12}
    assert calls == [torch.bfloat16, torch.float32]  # once each, whatever the rounds, rungs and runs


def test_tiny_hugging_face_config_has_its_own_end_of_text(capfd):
    _, args = bench.parse_args(["--vocab=1000"])
    config = bench.hf_model_config(args)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (1000, 999, 999)
    assert "bos_token_id" not in capfd.readouterr().err  # transformers' warning about 50256 outside the vocab
    _, args = bench.parse_args([])
    assert bench.hf_model_config(args).eos_token_id == 50256  # the GPT-2 vocab keeps <|endoftext|>


@pytest.mark.parametrize("flag, words", [
    ("--n_head=0", ["--n_head=0", ">= 1"]),
    ("--B=0", ["--B=0", ">= 1"]),
    ("--B=-2", ["--B=-2", ">= 1"]),
    ("--B=4,x", ["--B=4,x", "integer"]),
    ("--sample_repeats=0", ["--sample_repeats=0", ">= 1"]),
    ("--sample_tokens=300", ["--sample_tokens=300", "--T=256"]),
    ("--budget_s=0", ["--budget_s=0", "> 0"]),
    ("--json=/no/such/folder/x.json", ["--json=/no/such/folder/x.json", "make it first"]),
    ("--device=cuda:x", ["--device=cuda:x"]),
    ("--device=tpu", ["--device=tpu"]),
    ("--rungs=base,warp-drive", ["warp-drive", "choose from"]),
    ("--warmup=x", ["--warmup", "invalid int"]),
])
def test_bad_flags_are_one_line_before_any_work(capsys, monkeypatch, flag, words):
    monkeypatch.setattr(bench, "GPT", None)  # building any model would fail: nothing runs before the check
    with pytest.raises(SystemExit) as e:
        bench.main([flag], **QUIET)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
