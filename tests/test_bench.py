"""bench.py runs every rung on the same weights and batch, so the ladder compares like with like."""
import json
import math

import pytest

import bench

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--vocab=1000", "--T=32", "--B=2,3", "--steps=2", "--warmup=1",
        "--no_compile", "--peak_seconds=0.02", "--sample_tokens=4", "--sample_dtype=float32"]


def test_ladder_smoke(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(TINY + [f"--json={out}"], log=lambda *a: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    expected = [r.key for r in bench.ladder() if r.key != "tf32"]  # TF32 is a CUDA-only rung
    assert [run["B"] for run in report["runs"]] == [2, 3]
    for run in report["runs"]:
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
    # greedy decoding of the same fp32 weights: cached, uncached and Hugging Face agree token for token
    methods = report["sampling"]["methods"]
    assert len(methods) == 3
    for m in methods.values():
        assert m["tok_s"] > 0 and m["same_tokens_as_hf"] == 1.0


def test_unknown_rung_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--rungs=base,warp-drive"], log=lambda *a: None)
    assert "warp-drive" in capsys.readouterr().err
