"""
Speed of one training step (forward, backward, clip, AdamW) and of sampling: Hugging Face GPT-2
against our GPT with its optimizations added one at a time, like build-nanogpt's ladder. MFU is
against a matmul peak measured on the same device in the same run, so it is honest on a CPU too.

    python bench.py                                  # the CPU ladder: 4 layers, 128 dims, B=8, T=256
    python bench.py --quick                          # HF fp32, our baseline and our full path only
    python bench.py --device=cuda --n_layer=12 --n_head=12 --n_embd=768 --T=1024 --B=16   # the ladder on a GPU
    python bench.py --preset=gpt2-h100 --json=h100.json   # GPT-2 124M, T=1024, bf16 + compile, B=16/32/64
    python bench.py --help

Rungs run interleaved, one step of each per round, so load from other processes falls on all of
them alike; every figure is a median over the rounds, and so is the peak (probed once per round).
All rungs start from the same weights and see the same batch (loss@0 shows it). FLOPs per token are
GPT.flops_per_token() of the unpadded model at the run's T (6N + attention, PaLM appendix B), the
same for every rung. Until the fused AdamW rung, HF and ours use AdamW(fused=False, foreach=False).
Importing runs nothing.
"""

import argparse
import ctypes
import dataclasses
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train_gpt2 import GPT, GPTConfig, measure_peak_flops, reuse_freed_memory

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
    rungs = [hf32, dataclasses.replace(hf32, key="hf-bf16", label="Hugging Face bf16 autocast", bf16=True), base]
    steps = [("tf32", "+ TF32", dict(tf32=True)),
             ("bf16", "+ bf16 autocast", dict(bf16=True)),
             ("compile", "+ torch.compile", dict(compile=True)),
             ("flash", "+ flash attention (SDPA)", dict(flash=True)),
             ("vocab", "+ vocab padded to a multiple of 64", dict(vocab_multiple=64)),
             ("fused-adamw", "+ fused AdamW", dict(fused_adamw=True)),
             ("chunked-ce", "+ chunked head + loss (our full path)", dict(chunked_loss=True))]
    for key, label, change in steps:
        base = dataclasses.replace(base, key=key, label=label, **change)
        rungs.append(base)
    return rungs


QUICK = ("hf-fp32", "base", "chunked-ce")
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


def make_step(rung, model, optimizer, loss_of, device_type):
    def step(x, y):
        if device_type == "cuda":  # global switches: set for every step, as rungs take turns
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = rung.tf32
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=rung.bf16):
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # here rather than first: a step starts with no grads
        return loss.detach()
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


def run_ladder(rungs, args, B, device, hf_weights, flops_per_token, log):
    """Warms up every rung, then times them in rounds; returns one dict per rung."""
    device_type = torch.device(device).type
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, args.vocab, (B, args.T), generator=g).to(device)
    y = torch.randint(0, args.vocab, (B, args.T), generator=g).to(device)
    results, live = [], []
    for rung in rungs:
        res = {"key": rung.key, "label": rung.label, "B": B, "T": args.T}
        results.append(res)
        try:
            model, optimizer, loss_of = build(rung, args, hf_weights, device)
            step = make_step(rung, model, optimizer, loss_of, device_type)
            t0 = time.perf_counter()
            res["loss0"] = step(x, y).item()  # the same weights and batch: every rung should agree
            for _ in range(args.warmup - 1):
                step(x, y)
            synchronize(device_type)
            res["warmup_s"] = time.perf_counter() - t0  # includes compile
            res["peak_mem_bytes"] = state_bytes(model, optimizer) + step_memory(step, x, y, device_type)
        except torch.cuda.OutOfMemoryError:
            res["error"] = "out of memory"
            model = optimizer = step = None
            torch.cuda.empty_cache()
            log(f"  {rung.key}: out of memory")
            continue
        res["times"] = []
        live.append((res, step))
        log(f"  {rung.key}: ready (loss {res['loss0']:.4f}, warm-up {res['warmup_s']:.1f}s)")

    peaks = {"bf16": [], "fp32": []}
    for r in range(args.steps):
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 peak is plain fp32
        # a large matmul in each dtype, between the steps, so it sees the same load they do
        n = 8192 if device_type == "cuda" else 2048
        peaks["bf16"].append(measure_peak_flops(device, torch.bfloat16, n=n, seconds=args.peak_seconds))
        peaks["fp32"].append(measure_peak_flops(device, torch.float32, n=n, seconds=args.peak_seconds))
        for res, step in live:
            synchronize(device_type)
            t0 = time.perf_counter()
            step(x, y)
            synchronize(device_type)
            res["times"].append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{args.steps}: " + " ".join(f"{res['key']} {res['times'][-1] * 1000:.0f}ms"
                                                     for res, _ in live))

    peak = {k: median(v) for k, v in peaks.items()}
    ref = next((res for res in results if res["key"] == "hf-fp32" and "times" in res), None)
    for res in results:
        if "times" not in res:
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
    from transformers import GPT2LMHeadModel
    from export_hf import hf_config
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
    methods = {
        "ours, KV cache": lambda: ours.generate(idx, n_new, temperature=0, use_cache=True),
        "ours, no cache": lambda: ours.generate(idx, n_new, temperature=0, use_cache=False),
        "Hugging Face generate": lambda: hf.generate(idx, max_new_tokens=n_new, min_new_tokens=n_new,
                                                     do_sample=False),
    }
    times, outputs = {k: [] for k in methods}, {}
    with torch.no_grad(), autocast:
        for k, fn in methods.items():  # warm-up
            outputs[k] = fn()
        for _ in range(args.sample_repeats):
            for k, fn in methods.items():
                synchronize(device_type)
                t0 = time.perf_counter()
                fn()
                synchronize(device_type)
                times[k].append(time.perf_counter() - t0)
    ref = outputs["Hugging Face generate"][:, prompt_len:]
    out = {"batch": args.sample_batch, "prompt_tokens": prompt_len, "new_tokens": n_new,
           "dtype": args.sample_dtype, "methods": {}}
    for k in methods:
        tok_s = args.sample_batch * n_new / median(times[k])
        # greedy decoding of the same weights: the tokens should be the same (random weights give
        # near-ties, so a rare fp32 rounding difference can flip one; the fraction says how many agree)
        agree = (outputs[k][:, prompt_len:] == ref).float().mean().item()
        out["methods"][k] = {"tok_s": tok_s, "same_tokens_as_hf": agree}
        log(f"  sampling {k}: {tok_s:.0f} tok/s")
    return out

# ----------------------------------------------------------------------------------------------
# Report


def fmt_bytes(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_report(report):
    c = report["config"]
    print(f"\ndevice {report['device']} | {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} dims, "
          f"vocab {c['vocab']} | T={c['T']} | {report['flops_per_token'] / 1e6:.1f} MFLOP/token | "
          f"median of {c['steps']} interleaved rounds" + (" | compile OFF everywhere" if c["no_compile"] else ""))
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
            print(f"{r['label']:58s} {r['tok_s']:9.0f} {r['ms']:8.1f} {r['mfu'] * 100:5.1f}% {vs:>10s} "
                  f"{r['spread'] * 100:5.0f}% {fmt_bytes(r['peak_mem_bytes']):>9s} {r['loss0']:8.4f}")
    if report.get("sampling"):
        s = report["sampling"]
        print(f"\nsampling, greedy, {s['dtype']}, batch {s['batch']}, {s['prompt_tokens']}-token prompt "
              f"+ {s['new_tokens']} new tokens:")
        for k, m in s["methods"].items():
            print(f"  {k:24s} {m['tok_s']:9.0f} tok/s   same tokens as HF: {m['same_tokens_as_hf'] * 100:.0f}%")
    print("\nspread: (slowest - fastest) / median over the rounds. peak mem: weights + optimizer state "
          "+ the step's own peak (" + ("cuda max_memory_allocated" if report["device_type"] == "cuda"
                                       else "resident memory sampled every ms") + ").")

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
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", default="", help="also write the figures to this file")
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
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
    return p, args


def select_rungs(p, args, device_type):
    known = {r.key: r for r in ladder()}
    keys = list(known) if args.rungs == "all" else QUICK if args.rungs == "quick" else args.rungs.split(",")
    unknown = [k for k in keys if k not in known]
    if unknown:
        p.error(f"--rungs: unknown {','.join(unknown)}; choose from {','.join(known)}")
    rungs = [known[k] for k in keys]
    if device_type != "cuda":  # TF32 is a CUDA mode: on CPU the rung would repeat the one before
        rungs = [dataclasses.replace(r, tf32=False) for r in rungs if r.key != "tf32"]
    if args.no_compile:
        rungs = [dataclasses.replace(r, compile=False) for r in rungs]
    return rungs


def main(argv=None, log=print):
    p, args = parse_args(sys.argv[1:] if argv is None else argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = torch.device(device).type
    if device_type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device=cuda but no CUDA GPU is visible; use --device=cpu")
        torch.cuda.set_device(device)  # synchronize() and the memory stats below mean this GPU
    rungs = select_rungs(p, args, device_type)
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
              "config": {k: v for k, v in vars(args).items() if k not in ("json", "quick")},
              "flops_per_token": flops_per_token, "runs": []}
    for B in args.B:
        torch._dynamo.reset()  # the last batch size's graphs are dead: keep them off the recompile limit
        log(f"B={B}: building and warming up {len(rungs)} rungs")
        results, peak = run_ladder(rungs, args, B, device, hf_weights, flops_per_token, log)
        report["runs"].append({"B": B, "peak_flops": peak, "rungs": results})
    if args.sample_tokens > 0:
        report["sampling"] = bench_sampling(args, device, hf_weights, log)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
