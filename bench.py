"""
Speed of one training step (forward, backward, clip, AdamW) and of sampling: Hugging Face GPT-2
against our GPT with its optimizations added one at a time, like build-nanogpt's ladder. MFU is
against a matmul peak measured on the same device in the same run, so it is honest on a CPU too.

    python bench.py                                  # the CPU ladder: 4 layers, 128 dims, B=8, T=256
    python bench.py --quick                          # HF fp32, our baseline and our full path only
    python bench.py --device=cuda --n_layer=12 --n_head=12 --n_embd=768 --T=1024 --B=16   # the ladder on a GPU
    python bench.py --preset=gpt2-h100 --json=h100.json   # GPT-2 124M, T=1024, bf16 + compile, B=16/32/64
    python bench.py --check --json=gpu.json               # the prepared GPU check: one table, ~5 min on an H100
    python bench.py --check --tiny                        # the same on a CPU with a tiny model, in seconds
    python bench.py --help

On a CPU rungs run interleaved, one step of each per round, so load from other processes falls on all
of them alike; on a GPU each rung is built, timed and freed alone (--mode). Every figure is a median
over the rounds, and so is the peak (probed once per round).
All rungs start from the same weights and see the same batch (loss@0 shows it). FLOPs per token are
GPT.flops_per_token() of the unpadded model at the run's T (6N + attention, PaLM appendix B), the
same for every rung. Until the fused AdamW rung, HF and ours use AdamW(fused=False, foreach=False).
Importing runs nothing.
"""

import argparse
import ctypes
import dataclasses
import gc
import json
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train_gpt2 import GPT, GPTConfig, attention_kernels, measure_peak_flops, reuse_freed_memory

# ----------------------------------------------------------------------------------------------
# The ladder: each rung is the one above plus one change


@dataclass(frozen=True)
class Rung:
    key: str  # what --rungs names it by
    label: str
    hf: bool = False  # Hugging Face GPT2LMHeadModel instead of ours
    tf32: bool = False  # TF32 matmuls (CUDA only)
    bf16: bool = False  # bf16 autocast
    compile: bool = False  # torch.compile of the model and its loss
    flash: bool = False  # F.scaled_dot_product_attention (GPTConfig.flash)
    vocab_multiple: int = 1  # 64: embedding rows padded 50257 -> 50304
    fused_adamw: bool = False  # AdamW(fused=True) via GPT.configure_optimizers; else the for-loop AdamW
    chunked_loss: bool = False  # GPT.forward(idx, targets): chunked head + cross-entropy; else full logits
    cudnn: bool = False  # SDPA kernels in train_gpt2.attention_kernels()'s order: cuDNN first (CUDA only)


def ladder():
    hf32 = Rung("hf-fp32", "Hugging Face fp32", hf=True)
    base = Rung("base", "ours: fp32, manual attention, unpadded vocab, for-loop AdamW")
    rungs = [hf32, dataclasses.replace(hf32, key="hf-bf16", label="Hugging Face bf16 autocast", bf16=True), base]
    steps = [("tf32", "+ TF32", dict(tf32=True)),
             ("bf16", "+ bf16 autocast", dict(bf16=True)),
             ("compile", "+ torch.compile", dict(compile=True)),
             ("flash", "+ flash attention (SDPA)", dict(flash=True)),
             ("vocab", "+ vocab padded to a multiple of 64", dict(vocab_multiple=64)),
             ("fused-adamw", "+ fused AdamW", dict(fused_adamw=True)),
             ("chunked-ce", "+ chunked head + loss", dict(chunked_loss=True)),
             ("cudnn-sdpa", "+ cuDNN attention first (our training path)", dict(cudnn=True))]
    for key, label, change in steps:
        base = dataclasses.replace(base, key=key, label=label, **change)
        rungs.append(base)
    return rungs


QUICK = ("hf-fp32", "base", "chunked-ce", "cudnn-sdpa")
# --check: the one prepared GPU check (python bench.py --check --json=gpu.json), ~5 min on an H100.
# GPT-2 124M at B=64, T=1024: Hugging Face, the plain compiled path and ours, then ours at the micro-batch
# train_gpt2.py picks itself, sampling, HellaSwag scoring; random weights, synthetic tokens and text
CHECK = dict(n_layer=12, n_head=12, n_embd=768, T=1024, B="64", rungs="hf-fp32,hf-bf16,fused-adamw,cudnn-sdpa",
             steps=5, warmup=2, sample_tokens=128, hellaswag_items=64)
# --check --tiny: the same sections on a CPU in seconds (what the test suite runs)
CHECK_TINY = dict(device="cpu", n_layer=2, n_head=2, n_embd=64, vocab=1000, T=64, B="4", steps=2, warmup=1,
                  sample_tokens=8, sample_repeats=1, hellaswag_items=6, hellaswag_batch=3, peak_seconds=0.02,
                  no_compile=True)
PRESETS = {
    # GPT-2 124M as train_gpt2.py trains it on one H100; the plain compiled path next to ours
    "gpt2-h100": dict(device="cuda", n_layer=12, n_head=12, n_embd=768, T=1024, B="16,32,64",
                      rungs="fused-adamw,chunked-ce,cudnn-sdpa", steps=10),
}

# ----------------------------------------------------------------------------------------------
# Building a rung: the same initial weights everywhere, taken from one reference model


def build(rung, args, hf_weights, device):
    """(model, optimizer, loss function (x, y) -> scalar) of one rung."""
    if rung.hf:
        from transformers import GPT2LMHeadModel
        from export_hf import hf_config  # dropout off, tanh GELU: the same network as ours
        model = GPT2LMHeadModel(hf_config(base_config(args)))
        model.loss_type = "ForCausalLM"  # read off the model: its class name maps to no loss, and transformers warns
        model.load_state_dict(hf_weights, strict=True)

        def loss_of(x, y):  # shift_labels: y is already shifted, as ours is (labels= alone shifts again)
            return model(x, labels=y, shift_labels=y).loss
    else:
        config = dataclasses.replace(base_config(args), flash=rung.flash, vocab_multiple=rung.vocab_multiple)
        model = GPT(config)
        model.load_hf_state_dict(hf_weights)

        def loss_of(x, y):
            if rung.chunked_loss:
                return model(x, y)[1]
            # the plain path: the full (B, T, V) logits, upcast to fp32 for the loss
            return F.cross_entropy(model(x)[0].flatten(0, 1).float(), y.flatten())
    model.to(device).train()
    if rung.compile:
        loss_of = torch.compile(loss_of)
    hp = dict(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), eps=1e-8)
    if rung.fused_adamw:
        optimizer = model.configure_optimizers(device_type=torch.device(device).type, **hp)
    else:
        # the same groups as configure_optimizers, in AdamW's plain for-loop (fused=False, foreach=False)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": hp["weight_decay"]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp["learning_rate"], betas=hp["betas"], eps=hp["eps"],
                                      fused=False, foreach=False)
    return model, optimizer, loss_of


def base_config(args):
    # block_size is the run's T, so flops_per_token() counts attention at the T we train at
    return GPTConfig(block_size=args.T, vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd, vocab_multiple=1, flash=False)


def make_step(rung, model, optimizer, loss_of, device_type, splits=1):
    """One optimizer step over the batch, as splits micro-batches with their gradients accumulated."""
    def step(x, y):
        if device_type == "cuda":  # global switches: set for every step, as rungs take turns
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = rung.tf32
        total = 0.0
        for xs, ys in zip(x.chunk(splits), y.chunk(splits)):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=rung.bf16), \
                    (attention_kernels() if rung.cudnn else nullcontext()):
                loss = loss_of(xs, ys) / splits  # equal micro-batches: the mean of means is the mean
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # here rather than first: a step starts with no grads
        return total
    return step

# ----------------------------------------------------------------------------------------------
# Measuring: time, peak FLOP/s, memory


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def step_memory(step, x, y, device_type):
    """
    Bytes a step needs beyond what existed before it: CUDA's max_memory_allocated; on CPU the
    process's resident memory sampled every millisecond by a thread (after malloc_trim, so freed
    heap pages must be faulted in again and show up), which also counts allocator slack.
    """
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step(x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    start, peak, done = resident_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    step(x, y)
    done.set()
    sampler.join()
    return max(0, max(peak[0], resident_bytes()) - start)


def state_bytes(model, optimizer):
    """Weights plus optimizer state: what stays allocated between steps (grads are set to None)."""
    tensors = list(model.parameters()) + [t for s in optimizer.state.values() for t in s.values()
                                          if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def free_memory(device_type):
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()


def prepare(rung, res, args, x, y, hf_weights, device, log, alone):
    """
    Builds one rung and runs its warm-up steps; returns its step function, or None. Out of GPU memory
    next to other rungs (alone False): None, and the caller times it alone later. Out of memory alone:
    the same batch again as 2, 4, ... micro-batches, gradients accumulated, until it fits.
    """
    device_type = torch.device(device).type
    splits = 1
    while splits <= x.size(0):
        try:
            model, optimizer, loss_of = build(rung, args, hf_weights, device)
            step = make_step(rung, model, optimizer, loss_of, device_type, splits)
            t0 = time.perf_counter()
            res["loss0"] = step(x, y).item()  # the same weights and batch: every rung should agree
            for _ in range(args.warmup - 1):
                step(x, y)
            synchronize(device_type)
            res["warmup_s"] = time.perf_counter() - t0  # includes compile
            res["peak_mem_bytes"] = state_bytes(model, optimizer) + step_memory(step, x, y, device_type)
            res["micro_batches"] = splits
            if rung.key == args.profile_rung:
                res["attention_kernels"] = attention_kernels_seen(step, x, y)
            return step
        except torch.cuda.OutOfMemoryError:
            pass  # leaving the except block drops the traceback, and with it the frames holding the model
        model = optimizer = loss_of = step = None
        free_memory(device_type)
        if not alone:
            log(f"  {rung.key}: out of memory next to the other rungs: timed alone after them")
            return None
        splits *= 2
        while splits <= x.size(0) and x.size(0) % splits:
            splits *= 2
        log(f"  {rung.key}: out of memory alone: the batch as {splits} micro-batches")
    res["error"] = "out of memory, even one sequence per micro-batch"
    return None


def attention_kernels_seen(step, x, y):
    """The attention kernels (on a GPU) or ops (on a CPU) that the profiler sees in one step."""
    from torch.profiler import profile
    with profile() as prof:
        step(x, y)
        synchronize(x.device.type)
    names = {e.key for e in prof.key_averages() if not (x.is_cuda and e.key.startswith("aten::"))}
    return sorted(n[:100] for n in names if any(w in n.lower() for w in ("attention", "fmha", "flash", "sdpa")))[:8]


def time_rounds(live, args, device, peaks, log):
    """args.steps rounds; each measures the matmul peaks, then times one step of every live rung."""
    device_type = torch.device(device).type
    for r in range(args.steps):
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 peak is plain fp32
        # a large matmul in each dtype, between the steps, so it sees the same load they do
        n = 8192 if device_type == "cuda" else 2048
        peaks["bf16"].append(measure_peak_flops(device, torch.bfloat16, n=n, seconds=args.peak_seconds))
        peaks["fp32"].append(measure_peak_flops(device, torch.float32, n=n, seconds=args.peak_seconds))
        for res, step, x, y in live:
            synchronize(device_type)
            t0 = time.perf_counter()
            step(x, y)
            synchronize(device_type)
            res["times"].append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{args.steps}: " + " ".join(f"{res['key']} {res['times'][-1] * 1000:.0f}ms"
                                                     for res, *_ in live))


def run_ladder(rungs, args, B, device, hf_weights, flops_per_token, log):
    """
    Times every rung at batch B; returns one dict per rung and the median matmul peaks.
    interleaved: every rung is built first, then each round runs one step of each, so load from other
    processes falls on all of them alike (a shared CPU). isolated: each rung is built, timed and freed
    on its own, with the whole GPU memory to itself. In interleaved mode a rung that does not fit next
    to the others is timed alone after them; its "mode" says so.
    """
    device_type = torch.device(device).type
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, args.vocab, (B, args.T), generator=g).to(device)
    y = torch.randint(0, args.vocab, (B, args.T), generator=g).to(device)
    results, live, alone = [], [], []
    peaks = {"bf16": [], "fp32": []}
    for rung in rungs:
        res = {"key": rung.key, "label": rung.label, "B": B, "T": args.T, "mode": args.mode, "times": []}
        results.append(res)
        if args.mode == "isolated":
            alone.append((rung, res))
            continue
        step = prepare(rung, res, args, x, y, hf_weights, device, log, alone=False)
        if step is None:
            res["mode"] = "isolated"
            alone.append((rung, res))
            continue
        live.append((res, step, x, y))
        log(f"  {rung.key}: ready (loss {res['loss0']:.4f}, warm-up {res['warmup_s']:.1f}s)")
    if live:
        time_rounds(live, args, device, peaks, log)
    live = step = None
    free_memory(device_type)
    for rung, res in alone:
        step = prepare(rung, res, args, x, y, hf_weights, device, log, alone=True)
        if step is not None:
            log(f"  {rung.key}: ready alone (loss {res['loss0']:.4f}, warm-up {res['warmup_s']:.1f}s, "
                f"{res['micro_batches']} micro-batch(es))")
            time_rounds([(res, step, x, y)], args, device, peaks, log)
        step = None
        torch._dynamo.reset()  # the rung's compiled graphs go with it
        free_memory(device_type)

    peak = {k: median(v) for k, v in peaks.items()}
    ref = next((res for res in results if res["key"] == "hf-fp32" and res["times"]), None)
    for res in results:
        if not res["times"]:
            res.setdefault("error", "not run")
            continue
        dt = median(res["times"])
        res["ms"] = dt * 1000
        res["tok_s"] = B * args.T / dt
        res["mfu"] = flops_per_token * res["tok_s"] / peak["bf16"]
        res["spread"] = (max(res["times"]) - min(res["times"])) / dt  # how noisy the rounds were
        if ref is not None:
            res["vs_hf_fp32"] = res["tok_s"] / ref["tok_s"]
    return results, peak

# ----------------------------------------------------------------------------------------------
# Sampling: our KV cache, our recompute-everything loop, Hugging Face generate; greedy, same weights


def bench_sampling(args, device, hf_weights, log):
    """
    tok/s of sample.py's engine (eager, and the compiled step if compile is on), GPT.generate (recompute
    everything) and Hugging Face generate; greedy, the same weights, timed in alternation. And how true each
    one is to Hugging Face: the first position where its greedy tokens part from HF's, and the largest
    |logit difference| fed HF's tokens (teacher forcing); for the compiled step, graphs dynamo compiled
    after its first call (recompiles) and whether inductor skipped CUDA graphs, and why.
    """
    import logging
    from transformers import GPT2LMHeadModel
    import sample
    from export_hf import hf_config
    from torch._dynamo.utils import counters
    device_type = torch.device(device).type
    config = dataclasses.replace(base_config(args), flash=True, vocab_multiple=64)
    ours = GPT(config)
    ours.load_hf_state_dict(hf_weights)
    hf = GPT2LMHeadModel(hf_config(base_config(args)))
    hf.load_state_dict(hf_weights, strict=True)
    hf.generation_config.pad_token_id = hf.generation_config.eos_token_id
    hf.generation_config.eos_token_id = None  # never stop early: every method makes the same number
    ours.to(device).eval()
    hf.to(device).eval()
    n_new = args.sample_tokens
    prompt_len = min(args.sample_prompt, args.T - n_new)
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randint(0, args.vocab, (args.sample_batch, prompt_len), generator=g).to(device)
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.sample_dtype == "bfloat16")
    methods = {}
    if not args.no_compile:  # one compile of the decode step; on CUDA it is then replayed as a CUDA graph
        methods["ours, KV cache, compiled step"] = lambda: sample.generate(ours, idx, n_new, temperature=0,
                                                                           compile=True)
    methods.update({
        "ours, KV cache, eager (default)": lambda: sample.generate(ours, idx, n_new, temperature=0),
        "ours, no cache (GPT.generate)": lambda: ours.generate(idx, n_new, temperature=0),
        "Hugging Face generate": lambda: hf.generate(idx, max_new_tokens=n_new, min_new_tokens=n_new,
                                                     do_sample=False),
    })
    skips = []  # inductor's reasons for not using CUDA graphs, from its log

    class Skips(logging.Handler):
        def emit(self, record):
            skips.append(record.getMessage().splitlines()[0][:200])
    skip_log = logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs")
    handler = Skips(logging.WARNING)
    skip_log.addHandler(handler)
    times, outputs, first, graphs = {k: [] for k in methods}, {}, {}, {}
    try:
        with torch.no_grad(), autocast:
            for k, fn in methods.items():  # warm-up; the compiled step compiles (and is captured) here
                t0 = time.perf_counter()
                outputs[k] = fn()
                synchronize(device_type)
                first[k] = time.perf_counter() - t0
                graphs[k] = counters["stats"]["unique_graphs"]
                log(f"  sampling {k}: first call {first[k]:.1f}s")
            for _ in range(args.sample_repeats):
                for k, fn in methods.items():
                    synchronize(device_type)
                    t0 = time.perf_counter()
                    fn()
                    synchronize(device_type)
                    times[k].append(time.perf_counter() - t0)
            # teacher forcing: every method fed HF's greedy tokens, its logits at the new positions
            seq = outputs["Hugging Face generate"]
            hf_logits = hf(seq).logits[:, prompt_len - 1:-1].float()
            forced = {"ours, no cache (GPT.generate)": lambda: ours(seq)[0][:, prompt_len - 1:-1],
                      "ours, KV cache, eager (default)":
                          lambda: sample.teacher_forced_logits(ours, seq, prompt_len),
                      "ours, KV cache, compiled step":
                          lambda: sample.teacher_forced_logits(ours, seq, prompt_len, compile=True)}
            logit_diff = {k: (f().float() - hf_logits).abs().max().item()
                          for k, f in forced.items() if k in methods}
            recompiles = {k: counters["stats"]["unique_graphs"] - graphs[k]
                          for k in methods if "compiled" in k}
    finally:
        skip_log.removeHandler(handler)
    ref = outputs["Hugging Face generate"][:, prompt_len:]
    out = {"batch": args.sample_batch, "prompt_tokens": prompt_len, "new_tokens": n_new,
           "dtype": args.sample_dtype, "methods": {},
           "cudagraphs": ("n/a" if device_type != "cuda" or args.no_compile else
                          f"skipped: {'; '.join(dict.fromkeys(skips))}" if skips else "used")}
    for k in methods:
        tok_s = args.sample_batch * n_new / median(times[k])
        # greedy decoding of the same weights: random weights give near-ties, so a rounding difference
        # (bf16 above all) can flip one token, after which the rest differ: where the first flip is says more
        differs = (outputs[k][:, prompt_len:] != ref).any(dim=0).nonzero()
        same = (outputs[k][:, prompt_len:] == ref).float().mean().item()
        out["methods"][k] = {"tok_s": tok_s, "same_tokens_as_hf": same,
                             "first_divergence": int(differs[0]) if len(differs) else None,
                             "max_logit_diff": logit_diff.get(k, 0.0), "first_call_s": first[k],
                             "vs_hf": median(times["Hugging Face generate"]) / median(times[k])}
        if k in recompiles:
            out["methods"][k]["recompiles"] = recompiles[k]
        m = out["methods"][k]
        log(f"  sampling {k}: {tok_s:.0f} tok/s, first greedy divergence from HF at {m['first_divergence']}, "
            f"max |logit diff| {m['max_logit_diff']:.2e}")
    log(f"  sampling: compiled step recompiles {recompiles or 'n/a'}, CUDA graphs {out['cudagraphs']}")
    return out


def bench_hellaswag(args, device, log):
    """
    items/s of HellaSwag scoring (hellaswag.score) one item per forward and --hellaswag_batch per
    forward, for a random GPT of the run's shape with the GPT-2 vocab, on synthetic items of
    HellaSwag's length (a ~60-word context, 4 endings of 10-25 words); predictions compared.
    """
    import random
    import hellaswag
    device_type = torch.device(device).type
    rng = random.Random(args.seed)
    words = ("the man woman is a then and to of in on with his her they it he she small large water ball "
             "runs walks picks up down puts takes into out over table car dog camera shows begins").split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    items = [{"ctx": text(rng.randint(40, 80)), "endings": [text(rng.randint(10, 25)) for _ in range(4)],
              "label": rng.randrange(4)} for _ in range(args.hellaswag_items)]
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(block_size=args.T, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd))
    model.to(device).eval()
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.sample_dtype == "bfloat16")
    out = {"items": len(items), "batch_size": args.hellaswag_batch, "dtype": args.sample_dtype}
    preds, times = {}, {1: [], args.hellaswag_batch: []}
    for bs in times:  # warm-up
        hellaswag.score(model, items[:bs], device, bs, autocast)
    for _ in range(max(1, args.sample_repeats)):
        for bs in times:
            synchronize(device_type)
            t0 = time.perf_counter()
            _, mean_loss = hellaswag.score(model, items, device, bs, autocast)
            synchronize(device_type)
            times[bs].append(time.perf_counter() - t0)
            preds[bs] = mean_loss.argmin(dim=1)
    out["single_items_s"] = len(items) / median(times[1])
    out["batched_items_s"] = len(items) / median(times[args.hellaswag_batch])
    out["speedup"] = out["batched_items_s"] / out["single_items_s"]
    out["same_predictions"] = (preds[1] == preds[args.hellaswag_batch]).float().mean().item()
    log(f"  hellaswag: one per forward {out['single_items_s']:.1f} items/s, {args.hellaswag_batch} per forward "
        f"{out['batched_items_s']:.1f} ({out['speedup']:.2f}x)")
    return out


def sdpa_kernel_name(args, device):
    """The SDPA kernel our training path picks for its attention shape (bf16, causal)."""
    from torch.nn.attention import SDPBackend
    q = torch.zeros(1, args.n_head, args.T, args.n_embd // args.n_head, device=device, dtype=torch.bfloat16)
    try:
        with attention_kernels():
            return SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
    except (AttributeError, RuntimeError, ValueError) as e:  # a private function: say so rather than fail
        return f"unknown ({e.__class__.__name__})"

# ----------------------------------------------------------------------------------------------
# Report


def fmt_bytes(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_report(report):
    c = report["config"]
    print(f"\ndevice {report['device']} | {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} dims, "
          f"vocab {c['vocab']} | T={c['T']} | {report['flops_per_token'] / 1e6:.1f} MFLOP/token | "
          f"median of {c['steps']} rounds, {c['mode']}" + (" | compile OFF everywhere" if c["no_compile"] else ""))
    for run in report["runs"]:
        p = run["peak_flops"]
        print(f"\nB={run['B']}: measured matmul peak bf16 {p['bf16'] / 1e12:.3f} TFLOP/s, "
              f"fp32 {p['fp32'] / 1e12:.3f} TFLOP/s (MFU is against bf16)")
        print(f"{'rung':58s} {'tok/s':>9s} {'ms/step':>8s} {'MFU':>6s} {'vs HF fp32':>10s} "
              f"{'spread':>6s} {'peak mem':>9s} {'loss@0':>8s}")
        for r in run["rungs"]:
            if "error" in r:
                print(f"{r['label']:58s} {r['error']}")
                continue
            vs = f"{r['vs_hf_fp32']:.2f}x" if "vs_hf_fp32" in r else "-"
            notes = ([f"as {r['micro_batches']} micro-batches"] if r["micro_batches"] > 1 else []) + \
                ([f"{r['mode']}"] if r["mode"] != c["mode"] else [])
            print(f"{r['label']:58s} {r['tok_s']:9.0f} {r['ms']:8.1f} {r['mfu'] * 100:5.1f}% {vs:>10s} "
                  f"{r['spread'] * 100:5.0f}% {fmt_bytes(r['peak_mem_bytes']):>9s} {r['loss0']:8.4f}"
                  + (f"  ({', '.join(notes)})" if notes else ""))
    if report.get("sampling"):
        s = report["sampling"]
        print(f"\nsampling, greedy, {s['dtype']}, batch {s['batch']}, {s['prompt_tokens']}-token prompt "
              f"+ {s['new_tokens']} new tokens:")
        for k, m in s["methods"].items():
            print(f"  {k:34s} {m['tok_s']:9.0f} tok/s {m['vs_hf']:6.2f}x HF   same tokens as HF: "
                  f"{m['same_tokens_as_hf'] * 100:.0f}%   first call {m['first_call_s']:.1f}s")
    print("\nspread: (slowest - fastest) / median over the rounds. peak mem: weights + optimizer state "
          "+ the step's own peak (" + ("cuda max_memory_allocated" if report["device_type"] == "cuda"
                                       else "resident memory sampled every ms") + ").")

CHECK_NAMES = {"fused-adamw": "plain compiled path (SDPA, padded vocab, fused AdamW)",
               "chunked-ce": "ours (+ chunked head and loss)",
               "cudnn-sdpa": "ours (+ chunked head and loss, cuDNN attention)"}


def print_check(report):
    """The --check table: one row per figure, training per 64 x T tokens whatever the micro-batch."""
    c = report["config"]
    rungs = [r for run in report["runs"] for r in run["rungs"]]
    plain = next((r for r in rungs if r["key"] == "fused-adamw" and "tok_s" in r), None)
    rows = []
    for r in rungs:
        if "error" in r:
            rows.append((f"train {r['B']}x{r['T']}: {CHECK_NAMES.get(r['key'], r['label'])}", r["error"], "", ""))
            continue
        vs = f"{r['tok_s'] / plain['tok_s']:.2f}x plain compiled" if plain else ""
        split = f", as {r['micro_batches']} micro-batches" if r["micro_batches"] > 1 else ""
        rows.append((f"train {r['B']}x{r['T']}{split}: {CHECK_NAMES.get(r['key'], r['label'])}",
                     f"{r['tok_s'] / 1e3:.1f}k tok/s, {r['ms'] * 64 / r['B']:.1f} ms per 64x{r['T']}, "
                     f"MFU {r['mfu'] * 100:.0f}%", vs, fmt_bytes(r["peak_mem_bytes"])))
    s = report.get("sampling")
    for k, m in (s["methods"].items() if s else []):
        rows.append((f"sampling {s['dtype']}, batch {s['batch']}, greedy: {k}", f"{m['tok_s']:.0f} tok/s",
                     f"{m['vs_hf']:.2f}x HF generate", f"same tokens as HF {m['same_tokens_as_hf'] * 100:.0f}%"))
    h = report.get("hellaswag")
    if h and "error" in h:
        rows.append(("HellaSwag scoring", h["error"], "", ""))
    elif h:
        rows.append((f"HellaSwag, {h['items']} items: one per forward", f"{h['single_items_s']:.1f} items/s", "", ""))
        rows.append((f"HellaSwag, {h['items']} items: {h['batch_size']} per forward",
                     f"{h['batched_items_s']:.1f} items/s", f"{h['speedup']:.2f}x one per forward",
                     f"same predictions {h['same_predictions'] * 100:.0f}%"))
    rows.append(("micro-batch train_gpt2.py picks here (--batch_size=0)", str(report.get("auto_batch_size")), "", ""))
    rows.append(("SDPA kernel of the training path", report.get("sdpa_kernel", "-"), "", ""))
    seen = next((r["attention_kernels"] for r in rungs if r.get("attention_kernels")), [])
    rows.append(("attention kernels in one step of ours (profiler)", "; ".join(seen) or "-", "", ""))
    rows.append(("peak memory of the hungriest training rung", fmt_bytes(report["peak_mem_bytes"]), "", ""))
    rows.append(("wall time", f"{report['wall_s']:.0f} s", "", ""))
    print(f"\ncheck: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} dims, T={c['T']} on {report['device']}, "
          f"torch {report['torch']}, rungs {c['mode']}")
    width = max(len(r[0]) for r in rows)
    for what, *figures in rows:
        print(f"| {what:{width}s} | " + " | ".join(figures) + " |")

# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults; flags still override")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:1")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--vocab", type=int, default=50257, help="vocab size before padding")
    p.add_argument("--B", default="8", help="sequences per step; a comma list runs the ladder per batch size")
    p.add_argument("--T", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=7, help="timed rounds (one step of every rung per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per rung first (compile happens here)")
    p.add_argument("--rungs", default="all", help="all, quick, or a comma list of: "
                   + ",".join(r.key for r in ladder()))
    p.add_argument("--quick", action="store_true", help="same as --rungs=quick: " + ",".join(QUICK))
    p.add_argument("--no_compile", action="store_true", help="every rung eager (a smoke run, or no C++ compiler)")
    p.add_argument("--peak_seconds", type=float, default=0.25, help="length of each round's peak probe")
    p.add_argument("--sample_tokens", type=int, default=64, help="new tokens per sampling run; 0 skips sampling")
    p.add_argument("--sample_prompt", type=int, default=16, help="prompt tokens for sampling")
    p.add_argument("--sample_batch", type=int, default=1)
    p.add_argument("--sample_repeats", type=int, default=3)
    p.add_argument("--sample_dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="bfloat16: under autocast, as train_gpt2.py samples")
    p.add_argument("--mode", default="auto", choices=["auto", "interleaved", "isolated"],
                   help="interleaved: all rungs built, one step of each per round (for a noisy CPU); isolated: "
                        "each rung built, timed and freed alone (all of the GPU's memory); auto: isolated on CUDA")
    p.add_argument("--check", action="store_true", help="the prepared GPU check: " + " ".join(
        f"--{k}={v}" for k, v in CHECK.items()) + ", plus ours at the auto micro-batch, HellaSwag, the SDPA kernel")
    p.add_argument("--tiny", action="store_true", help="with --check: a tiny model on the CPU (a smoke run)")
    p.add_argument("--hellaswag_items", type=int, default=0, help="synthetic HellaSwag items to score (--check: 64)")
    p.add_argument("--hellaswag_batch", type=int, default=16, help="items per forward, against one per forward")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", default="", help="also write the figures to this file")
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    if pre.check:
        p.set_defaults(**{**CHECK, **(CHECK_TINY if pre.tiny else {})})
    elif pre.tiny:
        p.error("--tiny goes with --check")
    args = p.parse_args(argv)
    if args.quick:
        args.rungs = "quick"
    try:
        args.B = [int(b) for b in str(args.B).split(",")]
    except ValueError:
        p.error(f"--B={args.B}: expected an integer or a comma list of integers")
    if args.n_embd % args.n_head:
        p.error(f"--n_embd={args.n_embd} is not a multiple of --n_head={args.n_head}")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    if args.sample_tokens >= args.T:
        p.error(f"--sample_tokens={args.sample_tokens} must be below --T={args.T}")
    if args.hellaswag_items < 0 or args.hellaswag_batch < 1:
        p.error("--hellaswag_items must be >= 0 and --hellaswag_batch >= 1")
    return p, args


def resolve_device(p, device):
    """auto -> cuda if there is one; a bare cuda gets the current GPU's index, which set_device needs."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        p.error(f"--device={device}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device=cuda but no CUDA GPU is visible; use --device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)  # synchronize() and the memory stats below mean this GPU
    return str(dev)


def select_rungs(p, args, device_type):
    known = {r.key: r for r in ladder()}
    keys = list(known) if args.rungs == "all" else QUICK if args.rungs == "quick" else args.rungs.split(",")
    unknown = [k for k in keys if k not in known]
    if unknown:
        p.error(f"--rungs: unknown {','.join(unknown)}; choose from {','.join(known)}")
    rungs = [known[k] for k in keys]
    if device_type != "cuda":  # TF32 and cuDNN are CUDA's: off it, these rungs would repeat the one before
        if "chunked-ce" not in keys:  # then our path is the chunked-ce rung
            rungs = [known["chunked-ce"] if r.key == "cudnn-sdpa" else r for r in rungs]
        rungs = [dataclasses.replace(r, tf32=False) for r in rungs if r.key not in ("tf32", "cudnn-sdpa")]
    if args.no_compile:
        rungs = [dataclasses.replace(r, compile=False) for r in rungs]
    return rungs


def main(argv=None, log=print):
    p, args = parse_args(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    device = resolve_device(p, args.device)
    device_type = torch.device(device).type
    if args.mode == "auto":  # a GPU's step time does not depend on other processes; its memory does
        args.mode = "isolated" if device_type == "cuda" else "interleaved"
    rungs = select_rungs(p, args, device_type)
    args.profile_rung = rungs[-1].key if args.check else None  # which attention kernel runs, seen by the profiler
    # as train_gpt2.py does on a CPU; process-wide, so every rung, Hugging Face's too, runs with it
    malloc_tuned = device_type == "cpu" and reuse_freed_memory()

    # one set of initial weights for every rung and the sampler, in Hugging Face layout
    torch.manual_seed(args.seed)
    reference = GPT(base_config(args))
    hf_weights = reference.hf_state_dict()
    flops_per_token = reference.flops_per_token()
    name = (torch.cuda.get_device_name(device) if device_type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads" + (", malloc keeps freed memory" if malloc_tuned else ""))
    report = {"device": name, "device_type": device_type, "torch": torch.__version__,
              "config": {k: v for k, v in vars(args).items() if k not in ("json", "quick", "profile_rung")},
              "flops_per_token": flops_per_token, "runs": []}
    batches = list(args.B)
    if args.check:  # then ours at the micro-batch train_gpt2.py picks for this model on this device
        from train_gpt2 import DistInfo, TrainConfig, auto_batch_size
        cfg = TrainConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.T)
        auto = auto_batch_size(cfg, DistInfo(0, 0, 1, device, device_type, True))
        report["auto_batch_size"] = auto
        if auto not in batches:
            batches.append(auto)
    for B in batches:
        torch._dynamo.reset()  # the last batch size's graphs are dead: keep them off the recompile limit
        run_rungs = rungs if B in args.B else rungs[-1:]  # the auto micro-batch: our path alone
        log(f"B={B}: {len(run_rungs)} rungs, {args.mode}")
        results, peak = run_ladder(run_rungs, args, B, device, hf_weights, flops_per_token, log)
        report["runs"].append({"B": B, "peak_flops": peak, "rungs": results})
    log(f"training rungs done after {time.perf_counter() - t_start:.0f}s")
    if args.sample_tokens > 0:
        report["sampling"] = bench_sampling(args, device, hf_weights, log)
        log(f"sampling done after {time.perf_counter() - t_start:.0f}s")
    if args.hellaswag_items > 0:
        try:
            report["hellaswag"] = bench_hellaswag(args, device, log)
        except Exception as e:  # the GPT-2 tokenizer's files missing offline, say: the rest still counts
            report["hellaswag"] = {"error": f"skipped: {e.__class__.__name__}: {str(e).splitlines()[0][:120]}"}
            log(f"  hellaswag {report['hellaswag']['error']}")
    report["peak_mem_bytes"] = max((r["peak_mem_bytes"] for run in report["runs"] for r in run["rungs"]
                                    if "peak_mem_bytes" in r), default=0)
    report["sdpa_kernel"] = sdpa_kernel_name(args, device)
    report["wall_s"] = time.perf_counter() - t_start
    print_report(report)
    if args.check:
        print_check(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main(log=lambda *a: print(*a, flush=True))  # flushed: a log piped to a file shows where the time goes
