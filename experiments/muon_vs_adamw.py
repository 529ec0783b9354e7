"""
Muon vs AdamW on the 4-layer, 128-wide GPT at equal tokens, several seeds, on two data sets.

    python experiments/muon_vs_adamw.py sweep --data=shakespeare    # best LR of each optimizer (seed 0)
    python experiments/muon_vs_adamw.py main --data=shakespeare     # both at their best LR, 3 seeds
    python experiments/muon_vs_adamw.py report                      # the README table from the results
    python experiments/muon_vs_adamw.py time                        # step time, interleaved in one process
    torchrun --nproc_per_node=2 experiments/muon_vs_adamw.py time   # the same on 2 gloo ranks (DDP)
    python experiments/muon_vs_adamw.py wd --data=shakespeare       # Muon's weight decay, 3 seeds

--data is shakespeare (tiny shakespeare, its last 10% held out) or fineweb (documents from
--fineweb, tokenized by fineweb.py into shards whose first one, ~40k tokens, is held out).
Every run is `python train_gpt2.py ...` with its own log dir under --out; its final val loss is
appended to --out/results.jsonl, and a run already there is not run again.

Val loss is measured every 10 steps on the first 16,384 held-out tokens (the same ones for every
run). Tokens Muon needs to reach AdamW's final val loss are read off Muon's own curve (linear between
evals, per seed): a conservative figure, since a Muon run as short as that would have decayed its LR
by then and done better. The sweep and main runs give Muon no weight decay (--muon_weight_decay=0,
as they were measured); the wd phase runs Muon at --muon_lr with each of WEIGHT_DECAYS.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

# the model and budget: 60 steps of 2,048 tokens (123k tokens, ~0.4 epochs of either data set),
# sized for a 2-core CPU shared with other jobs
MODEL = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=128", "--batch_size=16"]
BUDGET = dict(total_batch_size=2048, max_steps=60, warmup_steps=6, eval_interval=10, val_tokens=16384)
SWEEP = {"adamw": [1e-3, 2e-3, 4e-3, 8e-3], "muon": [0.02, 0.04]}  # max_lr for AdamW, muon_lr for Muon
MUON_ADAMW_LR = 4e-3  # max_lr of a Muon run's AdamW part (embeddings, head, biases, gains)
# 0.1 is Moonlight's (and the default); 60 steps at muon_lr 0.02 decay the weights by only
# sum(lr * wd) ~ 0.66 * wd, so 3 stands in for a 124M run's ~1.9 (19,073 steps at 0.0018, wd 0.1)
WEIGHT_DECAYS = [0.0, 0.1, 3.0]


def data_path(args):
    if args.data == "shakespeare":
        path = args.shakespeare or next((p for p in ("input.txt", os.path.join(SHARED, "tinyshakespeare.txt"))
                                         if os.path.exists(os.path.join(ROOT, p))), "input.txt")
        return os.path.join(ROOT, path)
    shards = os.path.join(args.out, "fineweb_shards")
    if not os.path.isdir(shards):
        files = sorted(glob.glob(args.fineweb))
        if not files:
            sys.exit(f"error: --fineweb={args.fineweb} matches no files; "
                     "pass a glob of FineWeb parquet/jsonl files")
        subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), "--files", *files, "--out", shards,
                        "--shard_size=40000", "--no_progress"], check=True)
    return shards


def load_results(args):
    path = os.path.join(args.out, "results.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(args, optimizer, lr, seed, muon_wd=0.0):
    """Final val loss of one training run (from results.jsonl if it was run before)."""
    key = dict(data=args.data, optimizer=optimizer, lr=lr, seed=seed,
               adamw_lr=args.adamw_lr if optimizer == "muon" else lr)
    if optimizer == "muon":
        key["muon_wd"] = muon_wd
    for r in load_results(args):
        if all(r.get(k, 0.0 if k == "muon_wd" else None) == v for k, v in key.items()):  # rows before wd: 0
            return r["val"]
    name = "_".join(f"{k}{v}" for k, v in key.items())
    log_dir = os.path.join(args.out, name)
    flags = [f"--data={data_path(args)}", *MODEL, *(f"--{k}={v}" for k, v in BUDGET.items()),
             f"--optimizer={optimizer}", f"--max_lr={key['adamw_lr']}", f"--seed={seed}",
             f"--log_dir={log_dir}", "--num_samples=0", "--checkpoint_interval=0", "--keep_checkpoints=1",
             f"--compile={args.compile}",
             *([f"--muon_lr={lr}", f"--muon_weight_decay={muon_wd}"] if optimizer == "muon" else [])]
    t0 = time.time()
    with open(log_dir + ".out", "a") as out:
        subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *flags], stdout=out,
                       stderr=subprocess.STDOUT, check=True)
    with open(os.path.join(log_dir, "log.txt")) as f:
        curve = [(int(r[0]), float(r[2])) for r in map(str.split, f) if r[1:2] == ["val"]]
    val = curve[-1][1]
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        f.write(json.dumps({**key, "val": val, "curve": curve, "wall_s": round(time.time() - t0)}) + "\n")
    print(f"{name}: val {val:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return val


def best_lr(args, optimizer):
    vals = {lr: run(args, optimizer, lr, seed=0) for lr in SWEEP[optimizer]}
    return min(vals, key=vals.get)


def steps_to_reach(target, curve):
    """The first (fractional) step at which a val curve [(step, val)] reaches target, linear between evals."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return float("inf")  # not reached within the run


def mean_spread(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(args, data):
    rows = [r for r in load_results(args) if r["data"] == data and not r.get("muon_wd")]
    sweep = lambda opt: {r["lr"]: r for r in rows if r["optimizer"] == opt and r["seed"] == 0}  # noqa: E731
    if not sweep("adamw"):
        return None
    adamw_lr = min(sweep("adamw").values(), key=lambda r: r["val"])["lr"]
    if not sweep("muon"):
        return None
    best_muon = min(sweep("muon").values(), key=lambda r: r["val"])
    muon_lr = best_muon["lr"]
    main = [r for r in rows if r["lr"] == (muon_lr if r["optimizer"] == "muon" else adamw_lr)
            and r["adamw_lr"] == (best_muon["adamw_lr"] if r["optimizer"] == "muon" else adamw_lr)]
    adamw = {r["seed"]: r for r in main if r["optimizer"] == "adamw"}
    muon = {r["seed"]: r for r in main if r["optimizer"] == "muon"}
    seeds = sorted(set(adamw) & set(muon))
    if not seeds:
        return None
    last = adamw[seeds[0]]["curve"][-1][0]  # the final eval's step
    at = lambda r, step: dict(r["curve"])[step]  # noqa: E731
    return dict(data=data, seeds=seeds, adamw_lr=adamw_lr, muon_lr=muon_lr, steps=last,
                adamw=mean_spread([adamw[s]["val"] for s in seeds]),
                muon=mean_spread([muon[s]["val"] for s in seeds]),
                muon_40=mean_spread([at(muon[s], round(last * 2 / 3, -1)) for s in seeds]),
                ratio=mean_spread([steps_to_reach(adamw[s]["val"], muon[s]["curve"]) / last for s in seeds]))


def report(args):
    print("| data | AdamW (max_lr) val | Muon (muon_lr) val | Muon val at 2/3 of the tokens | "
          "Muon tokens to AdamW's val | seeds |")
    print("|---|---|---|---|---|---|")
    pm = lambda ms, d=4: f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}"  # noqa: E731
    sweeps = []
    for data in ("shakespeare", "fineweb"):
        s = summarize(args, data)
        if s:
            print(f"| {data} | {pm(s['adamw'])} ({s['adamw_lr']:g}) | {pm(s['muon'])} ({s['muon_lr']:g}) | "
                  f"{pm(s['muon_40'])} | {pm(s['ratio'], 2)}x | {len(s['seeds'])} |")
        runs = sorted((r["optimizer"], r["lr"], r["val"]) for r in load_results(args)
                      if r["data"] == data and r["seed"] == 0 and not r.get("muon_wd"))
        sweeps.append(f"{data}: " + ", ".join(f"{o} {lr:g} -> {v:.4f}" for o, lr, v in runs))
    print(f"\n(mean ± standard deviation over seeds; val after {BUDGET['max_steps'] - 1} updates of "
          f"{BUDGET['total_batch_size']:,} tokens; tokens as a fraction of AdamW's)\n"
          "sweep, seed 0, final val: "
          + "; ".join(sweeps))


def weight_decay(args):
    """Muon at --muon_lr with each of WEIGHT_DECAYS, seed by seed (so a cut-short run still pairs them)."""
    for seed in range(args.seeds):
        for wd in WEIGHT_DECAYS:
            run(args, "muon", args.muon_lr, seed, muon_wd=wd)
    rows = [r for r in load_results(args) if r["data"] == args.data and r["optimizer"] == "muon"
            and r["lr"] == args.muon_lr and r["adamw_lr"] == args.adamw_lr]
    val = {(r.get("muon_wd", 0.0), r["seed"]): r["val"] for r in rows}
    print(f"| --muon_weight_decay | val ({args.data}, muon_lr {args.muon_lr:g}) | minus wd 0's | seeds |")
    print("|---|---|---|---|")
    for wd in WEIGHT_DECAYS:
        seeds = [s for s in range(args.seeds) if (wd, s) in val and (0.0, s) in val]
        if seeds:
            v = mean_spread([val[wd, s] for s in seeds])
            dv = mean_spread([val[wd, s] - val[0.0, s] for s in seeds])
            print(f"| {wd:g} | {v[0]:.4f} ± {v[1]:.4f} | {dv[0]:+.4f} ± {dv[1]:.4f} | {len(seeds)} |")


def time_steps(args):
    """Step time of AdamW and Muon on the same model and batch, alternating step by step in one process;
    under torchrun, DDP over gloo, and Muon twice: sharded, and with every rank orthogonalizing all."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP
    import device
    import train_gpt2 as tg
    d = device.setup_distributed("cpu")
    torch.manual_seed(0)
    cfg = tg.GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128)
    x = torch.randint(0, cfg.vocab_size, (16, 128))
    runs = {}
    for name in ("adamw", "muon", "muon_all") if d.world_size > 1 else ("adamw", "muon"):
        model = tg.GPT(cfg)
        muon = None if name == "adamw" else dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
        opt = model.configure_optimizers(0.1, 4e-3, (0.9, 0.95), 1e-8, "cpu", muon=muon)
        if name == "muon_all":
            opt.optimizers[0].ranks = lambda: (0, 1)  # each rank all 16 matrices, as one process does
        runs[name] = (DDP(model) if d.world_size > 1 else model, opt, [])
    for i in range(args.rounds + 3):
        for name, (model, opt, times) in runs.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 3:  # the first steps allocate the optimizer state
                times.append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, (_, _, t) in runs.items()}
    if d.master:
        print(f"median step (B=16, T=128, bf16 autocast, {d.world_size} rank(s) x {torch.get_num_threads()} "
              f"threads, {args.rounds} steps each, interleaved): "
              + ", ".join(f"{name} {t * 1e3:.0f} ms ({t / med['adamw']:.3f}x)" for name, t in med.items())
              + f"; load average {os.getloadavg()[0]:.1f}")
    if d.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["sweep", "main", "report", "time", "wd"])
    p.add_argument("--data", choices=["shakespeare", "fineweb"], default="shakespeare")
    p.add_argument("--shakespeare", default="", help="tiny shakespeare text file (default: input.txt)")
    p.add_argument("--fineweb", default=os.path.join(SHARED, "fineweb_sample_*.parquet"),
                   help="glob of FineWeb parquet/jsonl files")
    p.add_argument("--out", default=os.path.join(ROOT, "log", "muon_vs_adamw"), help="logs and results.jsonl")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30, help="time: steps timed per optimizer")
    p.add_argument("--muon_lr", type=float, default=0.02, help="the wd phase's Muon LR (the sweep's best)")
    p.add_argument("--compile", default="true", help="torch.compile each run (~1.5x faster CPU steps)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.phase == "report":
        return report(args)
    if args.phase == "time":
        return time_steps(args)
    args.adamw_lr = MUON_ADAMW_LR
    if args.phase == "wd":
        return weight_decay(args)
    adamw_lr, muon_lr = best_lr(args, "adamw"), best_lr(args, "muon")
    print(f"{args.data}: best AdamW max_lr {adamw_lr:g}, best Muon muon_lr {muon_lr:g}", flush=True)
    if args.phase == "main":
        for seed in range(args.seeds):
            run(args, "adamw", adamw_lr, seed)
            run(args, "muon", muon_lr, seed)
        report(args)


if __name__ == "__main__":
    main()
