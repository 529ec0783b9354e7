"""
Speed of one training step (forward, backward, clip, AdamW) and of sampling: Hugging Face GPT-2
against our GPT with its optimizations added one at a time, like build-nanogpt's ladder. MFU is
against a matmul peak measured on the same device in the same run, so it is honest on a CPU too.

    python bench.py                                  # the CPU ladder: 4 layers, 128 dims, B=8, T=256
    python bench.py --quick                          # HF fp32, our baseline and our full path only
    python bench.py --device=cuda --n_layer=12 --n_head=12 --n_embd=768 --T=1024 --B=16  # the ladder, GPU
    python bench.py --preset=gpt2-h100 --json=h100.json   # GPT-2 124M, T=1024, bf16 + compile, B=16/32/64
    python bench.py --check --json=gpu.json               # the prepared GPU check: one table, <= 4 minutes
    python bench.py --check --tiny                        # the same on a CPU with a tiny model, in seconds
    python bench.py --help

On a CPU rungs run interleaved, one step of each per round, so load from other processes falls on all
of them alike; on a GPU each rung is built, timed and freed alone (--mode). Every figure is a median
over the rounds. The matmul peak is probed once per process (bf16; on a CPU fp32 too).
All rungs start from the same weights and see the same batch (loss@0 shows it). FLOPs per token are
GPT.flops_per_token() of the unpadded model at the run's T (6N + attention, PaLM appendix B), the
same for every rung. Until the fused AdamW rung, HF and ours use AdamW(fused=False, foreach=False).
Importing runs nothing.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from device import measure_peak_flops, reuse_freed_memory
from train_gpt2 import GPT, GPTConfig

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


def ladder():
    hf32 = Rung("hf-fp32", "Hugging Face fp32", hf=True)
    base = Rung("base", "ours: fp32, manual attention, unpadded vocab, for-loop AdamW")
    hf16 = dataclasses.replace(hf32, key="hf-bf16", label="Hugging Face bf16 autocast", bf16=True)
    rungs = [hf32, hf16, base]
    steps = [("tf32", "+ TF32", dict(tf32=True)),
             ("bf16", "+ bf16 autocast", dict(bf16=True)),
             ("compile", "+ torch.compile", dict(compile=True)),
             ("flash", "+ flash attention (SDPA)", dict(flash=True)),
             ("vocab", "+ vocab padded to a multiple of 64", dict(vocab_multiple=64)),
             ("fused-adamw", "+ fused AdamW", dict(fused_adamw=True)),
             ("chunked-ce", "+ chunked head + loss (our training path)", dict(chunked_loss=True))]
    for key, label, change in steps:
        base = dataclasses.replace(base, key=key, label=label, **change)
        rungs.append(base)
    return rungs


QUICK = ("hf-fp32", "base", "chunked-ce")
# --check: the one prepared GPU check (python bench.py --check --json=gpu.json), within --budget_s.
# GPT-2 124M, T=1024, random weights, synthetic tokens and text; its sections, most valuable first, are
# run_check's SECTIONS
CHECK = dict(n_layer=12, n_head=12, n_embd=768, T=1024, B="64", steps=5, warmup=2, sample_tokens=128,
             hellaswag_items=64)
# --check --tiny: the same sections on a CPU in seconds (what the test suite runs)
CHECK_TINY = dict(device="cpu", n_layer=2, n_head=2, n_embd=64, vocab=1000, T=64, B="4", steps=2, warmup=1,
                  sample_tokens=8, sample_repeats=1, hellaswag_items=6, hellaswag_batch=3, no_compile=True,
                  budget_s=60)
PRESETS = {
    # GPT-2 124M as train_gpt2.py trains it on one H100; the plain compiled path next to ours
    "gpt2-h100": dict(device="cuda", n_layer=12, n_head=12, n_embd=768, T=1024, B="16,32,64",
                      rungs="fused-adamw,chunked-ce", steps=10),
}

# ----------------------------------------------------------------------------------------------
# Building a rung: the same initial weights everywhere, taken from one reference model


def build(rung, args, hf_weights, device):
    """(model, optimizer, loss function (x, y) -> scalar) of one rung."""
    if rung.hf:
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel(hf_model_config(args))
        # read off the model: its class name maps to no loss, and transformers warns
        model.loss_type = "ForCausalLM"
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


def hf_model_config(args):
    """
    Hugging Face's GPT2Config of the run's model (export_hf.hf_config: dropout off, tanh GELU, the same
    network as ours). A vocab smaller than GPT-2's gets its last id as <|endoftext|>: 50256 would be
    outside it (transformers warns so).
    """
    from export_hf import GPT2_VOCAB, hf_config
    config = base_config(args)
    hf = hf_config(dataclasses.replace(config, vocab_size=max(config.vocab_size, GPT2_VOCAB)))
    hf.vocab_size = config.vocab_size
    hf.bos_token_id = hf.eos_token_id = min(config.vocab_size, GPT2_VOCAB) - 1
    return hf


def make_step(rung, model, optimizer, loss_of, device_type, splits=1):
    """One optimizer step over the batch, as splits micro-batches with their gradients accumulated."""
    def step(x, y):
        if device_type == "cuda":  # global switches: set for every step, as rungs take turns
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = rung.tf32
        total = 0.0
        for xs, ys in zip(x.chunk(splits), y.chunk(splits)):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=rung.bf16):
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
            if rung.key in args.profile_rungs:
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


@contextlib.contextmanager
def stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side prints USDT lines there at start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def attention_kernels_seen(step, x, y):
    """The attention kernels (on a GPU) or ops (on a CPU) that the profiler sees in one step."""
    from torch.profiler import profile
    prof = profile()
    with stderr_silenced():
        prof.start()
    try:
        step(x, y)
        synchronize(x.device.type)
    finally:
        with stderr_silenced():
            prof.stop()
    names = {e.key for e in prof.key_averages() if not (x.is_cuda and e.key.startswith("aten::"))}
    words = ("attention", "fmha", "flash", "sdpa")
    return sorted(n[:100] for n in names if any(w in n.lower() for w in words))[:8]


PEAKS = {}  # device -> its matmul peaks, probed once per process


def peak_flops(device):
    """{"bf16": FLOP/s} of a large matmul, and "fp32" off CUDA: MFU is against bf16, and on a GPU an fp32
    probe (no TF32) costs ~20 ms a matmul for a figure nothing uses."""
    if device not in PEAKS:
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
        PEAKS[device] = {"bf16": measure_peak_flops(device, torch.bfloat16)}
        if not on_cuda:
            PEAKS[device]["fp32"] = measure_peak_flops(device, torch.float32)
    return PEAKS[device]


def time_rounds(live, args, device, log):
    """args.steps rounds, each timing one step of every live rung; fewer once past args.deadline."""
    device_type = torch.device(device).type
    for r in range(args.steps):
        if r and args.deadline is not None and time.perf_counter() > args.deadline:
            log(f"  out of time after {r} rounds")
            break
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
        time_rounds(live, args, device, log)
    live = step = None
    free_memory(device_type)
    for rung, res in alone:
        step = prepare(rung, res, args, x, y, hf_weights, device, log, alone=True)
        if step is not None:
            log(f"  {rung.key}: ready alone (loss {res['loss0']:.4f}, warm-up {res['warmup_s']:.1f}s, "
                f"{res['micro_batches']} micro-batch(es))")
            time_rounds([(res, step, x, y)], args, device, log)
        step = None
        torch._dynamo.reset()  # the rung's compiled graphs go with it
        free_memory(device_type)

    peak = peak_flops(device)
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
    log(f"  hellaswag: one per forward {out['single_items_s']:.1f} items/s, {args.hellaswag_batch} per "
        f"forward {out['batched_items_s']:.1f} ({out['speedup']:.2f}x)")
    return out


def sdpa_kernels(args, device):
    """
    The SDPA kernel PyTorch's own dispatcher picks for our training attention (bf16, causal), its priority
    order after that first dispatch (on sm90/sm100 with cuDNN above 9.15 it puts cuDNN first itself), and
    the cuDNN version.
    """
    from torch.nn.attention import SDPBackend
    q = torch.zeros(1, args.n_head, args.T, args.n_embd // args.n_head, device=device, dtype=torch.bfloat16)
    try:  # private functions: say so rather than fail
        kernel = SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
        order = [SDPBackend(b).name for b in torch._C._get_sdp_priority_order()]
    except (AttributeError, RuntimeError, ValueError) as e:
        kernel, order = f"unknown ({e.__class__.__name__})", []
    cudnn = torch.backends.cudnn.version() if torch.device(device).type == "cuda" else None
    return {"kernel": kernel, "priority_order": order, "cudnn": cudnn}

# ----------------------------------------------------------------------------------------------
# --check: sections by value, each run only if its predicted time fits what is left of --budget_s


class Budget:
    """Wall-clock seconds left of --budget_s, counted from the start of main()."""

    def __init__(self, seconds, t0, log):
        self.seconds, self.t0, self.log = seconds, t0, log

    def left(self):
        return self.seconds - (time.perf_counter() - self.t0)

    def run(self, name, predict, fn, record):
        """
        fn() if predict() (its seconds, which may time a probe) fits in what is left, else None; record[name]
        says which, and the times. Nothing is predicted once no time is left.
        """
        predicted_s = predict() if self.left() > 0 else None
        left = self.left()
        if predicted_s is None or predicted_s > left:
            predicted = f"predicted {predicted_s:.0f}s, " if predicted_s is not None else ""
            self.log(f"{name}: skipped, {predicted}{left:.0f}s left")
            record[name] = {"skipped": "budget", "predicted_s": predicted_s, "left_s": left}
            return None
        t0 = time.perf_counter()
        out = fn()
        took = time.perf_counter() - t0
        self.log(f"{name}: {took:.1f}s (predicted {predicted_s:.0f}s), "
                 f"{time.perf_counter() - self.t0:.0f}s in, {self.left():.0f}s left")
        record[name] = {"seconds": took, "predicted_s": predicted_s}
        return out


# predictions until the check measures them: a cold compile of 124M's training step on an H100 host, and
# 124M's compiled step at B=64 x 1024 on an H100 (build-nanogpt's ~170 ms at B=16 on an A100, per token / 2)
COMPILE_S = 50.0
CUDA_STEP_S = 0.15
HF_BF16_VS_PLAIN = 3.0  # Hugging Face eager bf16 against the plain compiled step
HF_FP32_VS_BF16 = 5.0  # Hugging Face fp32 (no TF32) against its bf16 autocast, both eager
MAX_COMPILES = 3  # plain, ours, and one more: ours at the auto micro-batch or the compiled decode step


def timed(fn, device_type, repeats=1):
    """Seconds one call of fn takes, after an untimed one."""
    fn()
    synchronize(device_type)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device_type)
    return (time.perf_counter() - t0) / repeats


def probe_step_s(args, B, device, hf_weights):
    """A step of the plain path at B, predicted as 3 eager forwards (backward ~2), without an optimizer."""
    model = GPT(dataclasses.replace(base_config(args), flash=True, vocab_multiple=64)).to(device)
    x = torch.zeros(B, args.T, dtype=torch.long, device=device)
    with torch.no_grad():
        return 3 * timed(lambda: model(x), torch.device(device).type)


def probe_forward_s(args, device, hf_weights):
    """Seconds of an eager no-grad forward of ours at (1, prompt) and at (4, T): decoding's, HellaSwag's."""
    model = GPT(dataclasses.replace(base_config(args), flash=True, vocab_multiple=64))
    model.load_hf_state_dict(hf_weights)
    model.to(device).eval()
    device_type = torch.device(device).type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.sample_dtype == "bfloat16")
    one = torch.zeros(1, min(args.sample_prompt, args.T), dtype=torch.long, device=device)
    four = torch.zeros(4, args.T, dtype=torch.long, device=device)
    with torch.no_grad(), autocast:
        return timed(lambda: model(one), device_type, 3), timed(lambda: model(four), device_type)


def known_rungs(args):
    return {r.key: dataclasses.replace(r, compile=r.compile and not args.no_compile) for r in ladder()}


def run_check(args, device, hf_weights, flops_per_token, report, budget, log):
    """
    The sections of --check, most valuable first:
    (a) ours against build-nanogpt's recipe (the plain compiled path) at --B, tokens/s and their ratio;
    (b) ours at the micro-batch train_gpt2.py picks here, its measured peak memory beside the predicted one;
    (c) batch-1 greedy decoding: compiled (a CUDA graph), eager, Hugging Face generate;
    (d) Hugging Face bf16 autocast; (e) HellaSwag scoring; (f) Hugging Face fp32, last.
    """
    from device import auto_batch_size, predicted_peak_bytes
    from device import DistInfo
    from train_gpt2 import TrainConfig
    known = known_rungs(args)
    plain, ours = known["fused-adamw"], known["chunked-ce"]
    device_type = torch.device(device).type
    B, warm = args.B[0], args.warmup + args.steps + 2  # steps a rung runs: warm-up, memory, profile, timed
    sections = report["sections"] = {}
    # a CPU's step is timed (eagerly) at once; a GPU's compile dwarfs its steps, whose prediction will do
    m = {"compile_s": COMPILE_S if ours.compile else 0.0, "compiles": 0}

    def predict_a():
        if device_type == "cuda":  # CUDA_STEP_S scaled by FLOPs from 124M at 64 x 1024
            m["step_s"] = CUDA_STEP_S * flops_per_token * B * args.T / (124e6 * 6 * 64 * 1024)
        else:
            m["step_s"] = probe_step_s(args, B, device, hf_weights)
        return 2 * m["compile_s"] + 2 * warm * m["step_s"]

    def train(rungs, batch, profile=()):
        args.profile_rungs = set(profile)
        results, peak = run_ladder(rungs, args, batch, device, hf_weights, flops_per_token, log)
        report["runs"].append({"B": batch, "peak_flops": peak, "rungs": results})
        for rung, res in zip(rungs, results):
            m["compiles"] += rung.compile and "warmup_s" in res
            if rung.compile and res["times"]:  # what compiling took: the warm-up less its steps
                m["compile_s"] = max(0.0, res["warmup_s"] - args.warmup * median(res["times"]))
        return results

    def section_a():
        results = train([plain, ours], B, profile=(plain.key, ours.key))
        timed = [median(r["times"]) for r in results if r["times"]]
        if timed:
            m["step_s"] = max(timed)
        return results

    A = "(a) train: ours vs the plain path"
    budget.run(A, predict_a, section_a, sections)

    cfg = TrainConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.T)
    auto = auto_batch_size(cfg, DistInfo(0, 0, 1, device, device_type, True))
    report["auto_batch_size"] = auto

    def section_b():
        # where the auto micro-batch is --B, (a) measured it already
        mine = [r for run in report["runs"] if run["B"] == auto for r in run["rungs"] if r["key"] == ours.key]
        run = mine[0] if mine else train([ours], auto)[0]
        report["auto_batch"] = {"B": auto, "peak_mem_bytes": run.get("peak_mem_bytes"),
                                "predicted_peak_bytes": predicted_peak_bytes(cfg, auto)}

    def predict_b():
        if auto == B and "seconds" in sections[A]:
            return 0.0  # (a) measured it
        if device_type == "cuda":  # compute-bound: a step's time grows with its rows
            return m["compile_s"] * ours.compile + warm * m["step_s"] * auto / B
        # a small model on a CPU is mostly overhead: a step timed, not scaled
        return m["compile_s"] * ours.compile + warm * probe_step_s(args, auto, device, hf_weights)
    budget.run(f"(b) train: ours at the auto micro-batch {auto}", predict_b, section_b, sections)

    def section_c():
        compiled = not args.no_compile and m["compiles"] < MAX_COMPILES
        if not args.no_compile and not compiled:
            log(f"  compiled decode left out: {m['compiles']} compiles already (at most {MAX_COMPILES})")
        sample_args = argparse.Namespace(**{**vars(args), "no_compile": not compiled})
        report["sampling"] = bench_sampling(sample_args, device, hf_weights, log)
        report["sampling"]["compiled_left_out"] = not args.no_compile and not compiled
        m["compiles"] += compiled

    def predict_c():
        # a decode step costs about a short forward (HF's ~3 times that, no cache more as the prefix grows);
        # the compiled step compiles a forward alone, about half a training step's graph
        m["forward_1_s"], m["forward_4_s"] = probe_forward_s(args, device, hf_weights)
        n_decode = (1 + args.sample_repeats) * 10 * args.sample_tokens  # warm-up, repeats: ~10 forwards each
        compiled = not args.no_compile and m["compiles"] < MAX_COMPILES
        return 0.5 * m["compile_s"] * compiled + n_decode * m["forward_1_s"]
    if args.sample_tokens > 0:
        budget.run("(c) batch-1 decode", predict_c, section_c, sections)

    m.setdefault("step_s", CUDA_STEP_S)  # (a) was skipped: any guess, for what is then sure to be skipped too
    m["hf_step_s"] = m["step_s"] * HF_BF16_VS_PLAIN
    done = budget.run("(d) train: Hugging Face bf16", lambda: warm * m["hf_step_s"] + 5,
                      lambda: train([known["hf-bf16"]], B), sections)
    if done and done[0]["times"]:
        m["hf_step_s"] = median(done[0]["times"])

    def section_e():
        try:
            report["hellaswag"] = bench_hellaswag(args, device, log)
        except Exception as e:  # the GPT-2 tokenizer's files missing, say: the rest still counts
            report["hellaswag"] = {"error": f"skipped: {failure(e)}"}
            log(f"  hellaswag {report['hellaswag']['error']}")
    if args.hellaswag_items > 0:
        # items scored: repeats, one per forward and batched, each item a forward of its 4 endings (shorter
        # than T, from a model with the GPT-2 vocab whatever --vocab is: ~1.5 of the probe's), + the tokenizer
        items = args.hellaswag_items * (1 + max(1, args.sample_repeats)) * 2
        if "forward_4_s" not in m and budget.left() > 0:
            m["forward_1_s"], m["forward_4_s"] = probe_forward_s(args, device, hf_weights)
        budget.run("(e) HellaSwag scoring", lambda: 2 + 1.5 * items * m["forward_4_s"], section_e, sections)

    # Hugging Face fp32 at B=64 does not fit 80 GB: out of memory, then as micro-batches (a retry or two)
    budget.run("(f) train: Hugging Face fp32", lambda: 2 * warm * m["hf_step_s"] * HF_FP32_VS_BF16,
               lambda: train([known["hf-fp32"]], B), sections)
    report["compiles"] = m["compiles"]
    report["sdpa"] = sdpa_kernels(args, device)
# ----------------------------------------------------------------------------------------------
# Report


def failure(e):
    """An exception as one short line."""
    return f"{e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def fmt_bytes(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_report(report):
    c = report["config"]
    print(f"\ndevice {report['device']} | {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} dims, "
          f"vocab {c['vocab']} | T={c['T']} | {report['flops_per_token'] / 1e6:.1f} MFLOP/token | "
          f"median of {c['steps']} rounds, {c['mode']}"
          + (" | compile off (--no_compile)" if c["no_compile"] else ""))
    for run in report["runs"]:
        p = run["peak_flops"]
        print(f"\nB={run['B']}: measured matmul peak bf16 {p['bf16'] / 1e12:.3f} TFLOP/s"
              + (f", fp32 {p['fp32'] / 1e12:.3f} TFLOP/s" if "fp32" in p else "") + " (MFU is against bf16)")
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
            print(f"  {k:34s} {m['tok_s']:9.0f} tok/s {m['vs_hf']:6.2f}x HF   {decode_truth(m)}   "
                  f"first call {m['first_call_s']:.1f}s")
        print(f"  CUDA graphs: {s.get('cudagraphs', 'n/a')}")
    print("\nspread: (slowest - fastest) / median over the rounds. peak mem: weights + optimizer state "
          "+ the step's own peak (" + ("cuda max_memory_allocated" if report["device_type"] == "cuda"
                                       else "resident memory sampled every ms") + ").")

def decode_truth(m):
    """How far a decode method is from HF's greedy tokens: the first divergence, the teacher-forced
    logit gap."""
    first = "identical to HF" if m.get("first_divergence") is None else \
        f"first differs from HF at token {m['first_divergence']}"
    out = f"{first}, max |logit diff| {m.get('max_logit_diff', 0.0):.1e}"
    return out + (f", {m['recompiles']} recompiles" if "recompiles" in m else "")


def check_name(r):
    """A --check row's name: what the rung is, and whether it ran compiled (--no_compile: none does)."""
    names = {"fused-adamw": "the plain path (build-nanogpt's recipe: SDPA, padded vocab, fused AdamW)",
             "chunked-ce": "ours (the plain path + chunked head and loss)",
             "hf-bf16": "Hugging Face bf16 autocast", "hf-fp32": "Hugging Face fp32"}
    compiled = next(x.compile for x in ladder() if x.key == r["key"]) and not r["no_compile"]
    return f"{names.get(r['key'], r['label'])}, {'compiled' if compiled else 'eager'}"


def print_check(report):
    """The --check table: one row per figure, each training figure at the batch it ran."""
    c = report["config"]
    rungs = [dict(r, no_compile=c["no_compile"]) for run in report["runs"] for r in run["rungs"]]
    rows = []
    for r in rungs:
        what = f"train, {r['B']}x{r['T']} tokens a step: {check_name(r)}"
        if "error" in r:
            rows.append((what, r["error"], "", ""))
            continue
        same_b = [p for p in rungs if p["key"] == "fused-adamw" and p["B"] == r["B"] and "tok_s" in p]
        plain = same_b[0] if same_b else None
        vs = f"{r['tok_s'] / plain['tok_s']:.2f}x the plain path" if plain and r is not plain else ""
        split = f" as {r['micro_batches']} micro-batches" if r["micro_batches"] > 1 else ""
        speed = f"{r['tok_s'] / 1e3:.1f}k tok/s, {r['ms']:.1f} ms a step{split}, MFU {r['mfu'] * 100:.0f}%"
        rows.append((what, speed, vs, f"peak {fmt_bytes(r['peak_mem_bytes'])}"))
    a = report.get("auto_batch")
    if a:
        rows.append((f"ours at the micro-batch train_gpt2.py picks here: {a['B']}",
                     f"peak {fmt_bytes(a['peak_mem_bytes'])} measured" if a["peak_mem_bytes"]
                     else "not measured",
                     f"{fmt_bytes(a['predicted_peak_bytes'])} predicted (auto_batch_size's GPU rule)", ""))
    s = report.get("sampling")
    for k, m in (s["methods"].items() if s else []):
        rows.append((f"decode {s['dtype']}, batch {s['batch']}, greedy: {k}", f"{m['tok_s']:.0f} tok/s",
                     f"{m['vs_hf']:.2f}x HF generate", decode_truth(m)))
    if s:
        rows.append(("decode: CUDA graphs", str(s.get("cudagraphs", "n/a")), "", ""))
    if s and s.get("compiled_left_out"):
        rows.append(("decode: ours compiled", f"left out: at most {MAX_COMPILES} compiles", "", ""))
    h = report.get("hellaswag")
    if h and "error" in h:
        rows.append(("HellaSwag scoring", h["error"], "", ""))
    elif h:
        rows.append((f"HellaSwag, {h['items']} items: one per forward", f"{h['single_items_s']:.1f} items/s",
                     "", ""))
        rows.append((f"HellaSwag, {h['items']} items: {h['batch_size']} per forward",
                     f"{h['batched_items_s']:.1f} items/s", f"{h['speedup']:.2f}x one per forward",
                     f"same predictions {h['same_predictions'] * 100:.0f}%"))
    for name, sec in report["sections"].items():
        if "skipped" in sec:
            predicted = f"predicted {sec['predicted_s']:.0f} s, " if sec["predicted_s"] is not None else ""
            rows.append((name, f"skipped: {predicted}{sec['left_s']:.0f} s left of the budget", "", ""))
    sdpa = report["sdpa"]
    rows.append(("SDPA kernel PyTorch picks for our attention (bf16, causal)", sdpa["kernel"],
                 "order " + ", ".join(sdpa["priority_order"][:4]), f"cuDNN {sdpa['cudnn'] or '-'}"))
    for r in rungs:
        if r.get("attention_kernels"):
            rows.append((f"attention kernels in one step (profiler): {check_name(r)}",
                         "; ".join(r["attention_kernels"]), "", ""))
    rows.append(("compiles", str(report["compiles"]), "", ""))
    rows.append(("wall time", f"{report['wall_s']:.0f} s of --budget_s={c['budget_s']:.0f}", "", ""))
    print(f"\ncheck: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} dims, vocab {c['vocab']}, "
          f"T={c['T']} on {report['device']}, torch {report['torch']}, rungs {c['mode']}, "
          + ("compile off (--no_compile)" if c["no_compile"] else "compile on for the compiled rows"))
    width = max(len(r[0]) for r in rows)
    for what, *figures in rows:
        print(f"| {what:{width}s} | " + " | ".join(f for f in figures if f) + " |")

# ----------------------------------------------------------------------------------------------
# Command line


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (usage is --help's)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults; flags still override")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:1")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--vocab", type=int, default=50257, help="vocab size before padding")
    p.add_argument("--B", default="8", help="sequences per step; a comma list runs the ladder per batch size")
    p.add_argument("--T", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=7, help="timed rounds (one step of every rung per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per rung first (compiles run here)")
    p.add_argument("--rungs", default="all", help="all, quick, or a comma list of: "
                   + ",".join(r.key for r in ladder()))
    p.add_argument("--quick", action="store_true", help="same as --rungs=quick: " + ",".join(QUICK))
    p.add_argument("--no_compile", action="store_true", help="every rung eager (smoke runs, no C++ compiler)")
    p.add_argument("--sample_tokens", type=int, default=64, help="new tokens per sampling run (0: none)")
    p.add_argument("--sample_prompt", type=int, default=16, help="prompt tokens for sampling")
    p.add_argument("--sample_batch", type=int, default=1)
    p.add_argument("--sample_repeats", type=int, default=3, help="timed runs of each sampling method")
    p.add_argument("--sample_dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="bfloat16: under autocast, as train_gpt2.py samples")
    p.add_argument("--mode", default="auto", choices=["auto", "interleaved", "isolated"],
                   help="interleaved: all rungs built, one step of each per round (for a noisy CPU); "
                        "isolated: each rung built, timed and freed alone (all of the GPU's memory); "
                        "auto: isolated on CUDA")
    p.add_argument("--check", action="store_true", help="the prepared GPU check: " + " ".join(
        f"--{k}={v}" for k, v in CHECK.items()) + "; sections by value (run_check) that fit --budget_s")
    p.add_argument("--budget_s", type=float, default=240.0,
                   help="with --check: wall-clock seconds not to exceed; what would not fit is skipped")
    p.add_argument("--tiny", action="store_true", help="with --check: a tiny model on the CPU (a smoke run)")
    p.add_argument("--hellaswag_items", type=int, default=0, help="synthetic HellaSwag items (--check: 64)")
    p.add_argument("--hellaswag_batch", type=int, default=16, help="items per forward, against one a forward")
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
    validate(p, args)
    return p, args


def validate(p, args):
    """Every flag checked before any work, each bad one a one-line error naming it."""
    if args.check and (args.quick or args.rungs != "all" or args.preset):
        p.error("--check runs its own sections: leave out --rungs, --quick and --preset")
    if args.quick:
        args.rungs = "quick"
    try:
        args.B = [int(b) for b in str(args.B).split(",")]
    except ValueError:
        p.error(f"--B={args.B}: expected an integer or a comma list of integers")
    if min(args.B) < 1:
        p.error(f"--B={','.join(map(str, args.B))}: sequences per step must be >= 1")
    if args.check and len(args.B) > 1:
        p.error(f"--B={','.join(map(str, args.B))}: --check runs at one batch size")
    for flag in ("n_layer", "n_head", "n_embd", "vocab", "T", "steps", "warmup", "sample_prompt",
                 "sample_batch", "sample_repeats", "hellaswag_batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}={getattr(args, flag)}: must be >= 1")
    if args.n_embd % args.n_head:
        p.error(f"--n_embd={args.n_embd} is not a multiple of --n_head={args.n_head}")
    if not 0 <= args.sample_tokens < args.T:
        p.error(f"--sample_tokens={args.sample_tokens}: must be >= 0 and below --T={args.T}")
    if args.hellaswag_items < 0:
        p.error(f"--hellaswag_items={args.hellaswag_items}: must be >= 0")
    if not args.budget_s > 0:
        p.error(f"--budget_s={args.budget_s}: must be > 0 seconds")
    folder = os.path.dirname(os.path.abspath(args.json)) if args.json else ""
    if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        p.error(f"--json={args.json}: folder {folder} does not exist or is not writable; make it first")
    if args.json and os.path.isdir(args.json):
        p.error(f"--json={args.json} is a folder; give a file name")


def resolve_device(p, device):
    """auto -> cuda if there is one; a bare cuda gets the current GPU's index, which set_device needs."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        p.error(f"--device={device}: expected auto, cpu, cuda or cuda:N")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device={device}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device=cuda but no CUDA GPU is visible; use --device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            p.error(f"--device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(dev)  # synchronize() and the memory stats below mean this GPU
    return str(dev)


def select_rungs(p, args, device_type):
    known = {r.key: r for r in ladder()}
    keys = list(known) if args.rungs == "all" else QUICK if args.rungs == "quick" else args.rungs.split(",")
    unknown = [k for k in keys if k not in known]
    if unknown:
        p.error(f"--rungs: unknown {','.join(unknown)}; choose from {','.join(known)}")
    rungs = [known[k] for k in keys]
    if device_type != "cuda":  # TF32 is CUDA's: off it, that rung would repeat the one before
        rungs = [dataclasses.replace(r, tf32=False) for r in rungs if r.key != "tf32"]
    if args.no_compile:
        rungs = [dataclasses.replace(r, compile=False) for r in rungs]
    return rungs


def write_json(path, report):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)  # a reader never sees half a file


def main(argv=None, log=print):
    p, args = parse_args(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    device = resolve_device(p, args.device)
    device_type = torch.device(device).type
    if args.mode == "auto":  # a GPU's step time does not depend on other processes; its memory does
        args.mode = "isolated" if device_type == "cuda" else "interleaved"
    rungs = select_rungs(p, args, device_type)
    args.profile_rungs, args.deadline = set(), None
    # as train_gpt2.py does on a CPU; process-wide, so every rung, Hugging Face's too, runs with it
    malloc_tuned = device_type == "cpu" and reuse_freed_memory()

    # one set of initial weights for every rung and the sampler, in Hugging Face layout
    torch.manual_seed(args.seed)
    reference = GPT(base_config(args))
    hf_weights = reference.hf_state_dict()
    flops_per_token = reference.flops_per_token()
    name = (torch.cuda.get_device_name(device) if device_type == "cuda" else
            f"cpu, {torch.get_num_threads()} threads" + (", malloc keeps freed memory" * malloc_tuned))
    internal = ("json", "quick", "profile_rungs", "deadline")
    report = {"device": name, "device_type": device_type, "torch": torch.__version__,
              "config": {k: v for k, v in vars(args).items() if k not in internal},
              "flops_per_token": flops_per_token, "runs": []}
    if args.check:
        budget = Budget(args.budget_s, t_start, log)
        args.deadline = t_start + args.budget_s  # timed rounds stop early rather than run past it
        run_check(args, device, hf_weights, flops_per_token, report, budget, log)
    else:
        for B in args.B:
            torch._dynamo.reset()  # the last batch size's graphs are dead: keep them off the recompile limit
            log(f"B={B}: {len(rungs)} rungs, {args.mode}")
            results, peak = run_ladder(rungs, args, B, device, hf_weights, flops_per_token, log)
            report["runs"].append({"B": B, "peak_flops": peak, "rungs": results})
        log(f"training rungs done after {time.perf_counter() - t_start:.0f}s")
        if args.sample_tokens > 0:
            report["sampling"] = bench_sampling(args, device, hf_weights, log)
            log(f"sampling done after {time.perf_counter() - t_start:.0f}s")
        if args.hellaswag_items > 0:
            try:
                report["hellaswag"] = bench_hellaswag(args, device, log)
            except Exception as e:  # the GPT-2 tokenizer's files missing offline, say: the rest still counts
                report["hellaswag"] = {"error": f"skipped: {failure(e)}"}
                log(f"  hellaswag {report['hellaswag']['error']}")
        report["sdpa"] = sdpa_kernels(args, device)
    report["peak_mem_bytes"] = max((r["peak_mem_bytes"] for run in report["runs"] for r in run["rungs"]
                                    if "peak_mem_bytes" in r), default=0)
    report["wall_s"] = time.perf_counter() - t_start
    if args.check:
        print_check(report)
    else:
        print_report(report)
    if args.json:
        write_json(args.json, report)
        log(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main(log=lambda *a: print(*a, flush=True))  # flushed: a log piped to a file shows where the time goes
