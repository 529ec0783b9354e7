"""
HellaSwag (Zellers et al. 2019) validation accuracy, completion style, as build-nanogpt reports it.

    python hellaswag.py --model=gpt2                          # OpenAI GPT-2 124M (downloads the val set)
    python hellaswag.py --checkpoint=log/ckpt_019073.pt       # one of our checkpoints
    python hellaswag.py --model=./hf_export --data_path=hellaswag_val.jsonl --limit=500
    torchrun --standalone --nproc_per_node=8 hellaswag.py --checkpoint=log/ckpt_019073.pt
    python hellaswag.py --benchmark --data_path=hellaswag_val.jsonl   # batched vs one item per forward

Each item is a context and 4 endings. The model reads context + " " + ending for each ending and
we sum its cross-entropy over the ending tokens: the lowest sum is its answer (acc), the lowest
mean per token its length-normalized answer (acc_norm, the number GPT-2/GPT-3 comparisons quote).
Importing runs nothing; train_gpt2.py calls load_items() and evaluate_counts().
"""

import argparse
import hashlib
import json
import os
import re
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DATA_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")


class HellaSwagError(ValueError):
    """Bad or missing data: the message names the file (and line) and says what to do."""

# ----------------------------------------------------------------------------------------------
# Data: the validation set, downloaded once and checked


def download(cache_dir=CACHE_DIR):
    """Path of hellaswag_val.jsonl in cache_dir, downloaded and sha256-checked if not there yet."""
    path = os.path.join(cache_dir, "hellaswag_val.jsonl")
    if os.path.exists(path):  # only a verified download is ever renamed to this name
        return path
    import requests
    hint = ("download it by hand and pass its path: --data_path=FILE here, --hellaswag_path=FILE to "
            "train_gpt2.py")
    print(f"downloading {DATA_URL} to {path}")
    try:
        resp = requests.get(DATA_URL, timeout=60)
        resp.raise_for_status()
    except requests.RequestException as e:
        raise HellaSwagError(f"could not download {DATA_URL} ({e.__class__.__name__}); {hint}") from None
    digest = hashlib.sha256(resp.content).hexdigest()
    if digest != DATA_SHA256:
        raise HellaSwagError(f"{DATA_URL} has sha256 {digest}, expected {DATA_SHA256} (cut download or "
                             f"changed upstream); {hint}")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # a name per process: every rank of a run may download at once
    with open(tmp, "wb") as f:
        f.write(resp.content)
    os.replace(tmp, path)
    return path


def short(value, limit=40):
    """repr of value, cut to limit characters: an error line stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_item(line):
    """One jsonl line (str or bytes) -> {"ctx": str, "endings": [4 str], "label": int}, or a ValueError."""
    if isinstance(line, bytes):  # load_items reads bytes: a line that is not UTF-8 is named, not a traceback
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    try:
        raw = json.loads(line.lstrip("\ufeff"))  # a BOM, as some editors write one, is not JSON
    except RecursionError:  # json recurses per level: [[[[...]]]] 100k deep is a RecursionError
        raise ValueError("JSON nested too deeply to be a HellaSwag item") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ValueError(f"not valid JSON ({getattr(e, 'msg', str(e)[:80])})") from None
    if not isinstance(raw, dict) or not all(k in raw for k in ("ctx", "endings", "label")):
        raise ValueError("expected a JSON object with keys ctx, endings, label")
    ctx, endings, label = raw["ctx"], raw["endings"], raw["label"]
    if not isinstance(ctx, str) or not isinstance(endings, list) or len(endings) != 4 \
            or not all(isinstance(e, str) for e in endings):
        raise ValueError("ctx must be a string and endings a list of 4 strings")
    # nothing to score: an empty ending has no tokens of its own, and the first token of a row without
    # context has nothing before it to predict it; such an item would count as answered with all losses 0
    if not ctx.strip() or not all(e.strip() for e in endings):
        raise ValueError("ctx and every ending must hold some text, not be empty or blank")
    if type(label) is not int or not 0 <= label < 4:
        raise ValueError(f"label must be an integer 0-3, got {short(label)}")
    return {"ctx": ctx, "endings": endings, "label": label}


def load_items(path=None, cache_dir=CACHE_DIR):
    """The items of a HellaSwag jsonl file; path None: the full validation set (downloaded once)."""
    if path is None:
        path = download(cache_dir)
    elif os.path.isdir(path):
        raise HellaSwagError(f"HellaSwag file {path}: is a folder; pass the .jsonl file in it")
    elif not os.path.isfile(path):
        raise HellaSwagError(f"HellaSwag file {path}: no such file")
    items = []
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    items.append(parse_item(line))
                except ValueError as e:
                    raise HellaSwagError(f"{path}:{lineno}: {e}") from None
    except OSError as e:
        raise HellaSwagError(f"HellaSwag file {path}: cannot read it ({e.strerror})") from None
    if not items:
        raise HellaSwagError(f"{path}: no items in the file")
    return items

# ----------------------------------------------------------------------------------------------
# Scoring: the one function that the CLI and training both use


def context_length(model):
    """Longest sequence the model reads: our GPT's block_size, or a Hugging Face n_positions."""
    c = model.config
    for name in ("block_size", "n_positions", "max_position_embeddings"):
        if getattr(c, name, None):
            return int(getattr(c, name))
    raise ValueError(f"{type(model).__name__}: no block_size / n_positions in its config")


def ending_losses(model, idx, select, targets):
    """
    Cross-entropy (n,) of the n next tokens targets predicted at the positions where select (B, T)
    is True. Only those rows go through the 50k-wide head.
    """
    from chunked_loss import token_losses
    if hasattr(model, "hidden_states"):  # our GPT; its padded vocab rows are cut off the logits
        h, vocab_size = model.hidden_states(idx)[select], model.config.vocab_size
    else:  # Hugging Face GPT2LMHeadModel
        h, vocab_size = model.transformer(idx).last_hidden_state[select], model.lm_head.out_features
    return token_losses(h, model.lm_head.weight, targets, vocab_size)


def render(item, enc, max_len):
    """An item as 4 token rows (context + ending) and 4 masks that are 1 on the ending tokens."""
    # encode_ordinary: like encode, but a literal "<|endoftext|>" in the text is read as text, not an error
    ctx = enc.encode_ordinary(item["ctx"])
    rows, masks = [], []
    for ending in item["endings"]:
        # GPT-2 tokens carry their leading space, so the space goes with the ending
        end = enc.encode_ordinary(" " + ending)
        # too long for the model: drop context from the left, the ending tokens are what we score
        rows.append((ctx + end)[-max_len:])
        masks.append(([0] * len(ctx) + [1] * len(end))[-max_len:])
    return rows, masks


@torch.no_grad()
def score(model, items, device, batch_size=8, autocast=nullcontext(), progress=False):
    """
    Per item and ending, the summed and the mean cross-entropy of the ending tokens: two (N, 4)
    float tensors on the CPU. batch_size items (4 rows each) share a forward; the rows are padded
    on the right, which the causal mask hides from every real token, so batching does not change
    a row's result.
    """
    from tqdm import tqdm
    from gpt2_tokenizer import get_tokenizer
    enc = get_tokenizer()
    max_len = context_length(model)
    if max_len < 2:  # one position predicts nothing: every loss would be 0
        raise HellaSwagError(f"{type(model).__name__} reads {max_len} token; scoring needs a context of 2 "
                             f"or more")
    rendered = [render(item, enc, max_len) for item in items]
    # longest items first: batches of similar lengths waste little compute on padding, and a batch
    # too big for memory fails at once rather than at the end
    order = sorted(range(len(items)), key=lambda i: -max(len(r) for r in rendered[i][0]))
    sum_loss = torch.zeros(len(items), 4)
    mean_loss = torch.zeros(len(items), 4)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="hellaswag", disable=not progress):
        batch = order[start:start + batch_size]
        rows = [r for i in batch for r in rendered[i][0]]
        masks = [m for i in batch for m in rendered[i][1]]
        T = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), T, dtype=torch.long)  # pad id 0: any real id, it is never scored
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for j, (r, m) in enumerate(zip(rows, masks)):
            tokens[j, :len(r)] = torch.tensor(r)
            mask[j, :len(m)] = torch.tensor(m, dtype=torch.bool)
        tokens, mask = tokens.to(device), mask.to(device)
        # position t predicts token t + 1: the predictions of ending tokens sit one to their left
        targets = mask[:, 1:]
        select = torch.zeros_like(mask)
        select[:, :-1] = targets
        with autocast:
            ending = ending_losses(model, tokens, select, tokens[:, 1:][targets])  # (ending tokens,)
        losses = torch.zeros(targets.shape, device=ending.device)
        losses[targets] = ending
        row_sum = losses.sum(dim=1).view(-1, 4).cpu()
        row_count = targets.sum(dim=1).view(-1, 4).cpu()
        sum_loss[batch] = row_sum
        mean_loss[batch] = row_sum / row_count.clamp(min=1)
    model.train(was_training)
    return sum_loss, mean_loss


def load_items_on_ranks(path, d, agree):
    """load_items for training: rank 0 first (it may download), then the others; agree(error, world, device)
    tells every rank whether rank 0 failed, so all of them stop with one line."""
    from flags import ConfigError
    items, error = None, None
    for master_turn in (True, False):
        if master_turn == d.master:
            try:
                items = load_items(path)
            except HellaSwagError as e:
                error = ConfigError(f"--hellaswag_path: {e}")
        if master_turn:
            agree(error if d.master else None, d.world_size, d.device)
    if error is not None:
        raise error
    return items


def evaluate_counts(model, items, device, rank, world_size, autocast=nullcontext(), batch_size=8,
                    progress=False):
    """
    Correct answers (acc and acc_norm) over all items: this rank scores items[rank::world_size]
    and the counts are summed over ranks, so every rank returns the global numbers.
    """
    mine = items[rank::world_size]
    sum_loss, mean_loss = score(model, mine, device, batch_size, autocast, progress)
    labels = torch.tensor([item["label"] for item in mine], dtype=torch.long)
    counts = torch.tensor([(sum_loss.argmin(dim=1) == labels).sum().item(),
                           (mean_loss.argmin(dim=1) == labels).sum().item(), len(mine)],
                          dtype=torch.long, device=device)
    if world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)  # SUM: gloo has no AVG, and counts add up anyway
    correct, correct_norm, total = counts.tolist()
    return {"correct": correct, "correct_norm": correct_norm, "total": total}

# ----------------------------------------------------------------------------------------------
# Command line: evaluate a model, or time batched scoring


def load_model(args, device):
    """Our checkpoint (--checkpoint) or a Hugging Face causal LM (--model) on device, in eval mode."""
    import train_gpt2
    if args.checkpoint:
        try:
            model = train_gpt2.model_from_checkpoint(args.checkpoint, device)
        except train_gpt2.ConfigError:
            raise
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:  # a dict, not our GPT's
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise HellaSwagError(f"--checkpoint={args.checkpoint}: its weights do not fit a GPT "
                                 f"({type(e).__name__}: {first}); pass a ckpt_*.pt from a --log_dir"
                                 ) from None
    else:
        from transformers import AutoModelForCausalLM
        local = args.model.startswith(("/", "./", "../", "~"))
        if local and not os.path.isdir(os.path.expanduser(args.model)):
            raise HellaSwagError(f"--model={args.model}: no such folder")
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model)
        except Exception as e:  # transformers raises many kinds for a folder it cannot read
            first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
            raise HellaSwagError(f"--model={args.model}: could not load it ({first_line})") from None
        if model.config.vocab_size < 50257:
            raise HellaSwagError(f"--model={args.model}: vocab of {model.config.vocab_size} ids; HellaSwag "
                                 f"is tokenized with GPT-2's 50257, so the model must use the GPT-2 "
                                 f"tokenizer")
        model.to(device)
    return model.eval()


def benchmark(items, device, batch_size, n_layer=4, n_embd=128, repeats=1):
    """items/s of one item per forward vs batch_size items per forward, for a random small GPT."""
    from gpt2_tokenizer import get_tokenizer
    from chunked_loss import token_losses
    from train_gpt2 import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_embd // 32, n_embd=n_embd)).to(device)
    score(model, items[:batch_size], device, batch_size)  # warm-up: allocator, kernels, tokenizer
    times, preds, head_times = {1: [], batch_size: []}, {}, []
    enc = get_tokenizer()
    n_rows = sum(sum(m) for item in items for m in render(item, enc, model.config.block_size)[1])
    for _ in range(repeats):  # alternate the two, so that a busy spell on a shared machine hits both
        for bs in times:
            t0 = time.perf_counter()
            sum_loss, mean_loss = score(model, items, device, bs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[bs].append(time.perf_counter() - t0)
            preds[bs] = (sum_loss.argmin(dim=1), mean_loss.argmin(dim=1))
        # what no batching can share: every ending token's own row of the 50k-wide head and its
        # logsumexp, timed alone on as many rows as the items have ending tokens
        t0 = time.perf_counter()
        token_losses(torch.randn(n_rows, n_embd, device=device), model.lm_head.weight,
                     torch.randint(0, model.config.vocab_size, (n_rows,), device=device),
                     model.config.vocab_size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        head_times.append(time.perf_counter() - t0)
    results = {bs: len(items) / min(t) for bs, t in times.items()}
    same = all(torch.equal(a, b) for a, b in zip(preds[1], preds[batch_size]))
    print(f"benchmark: GPT {n_layer} layers x {n_embd} dims on {device}, {len(items)} items, "
          f"{torch.get_num_threads()} threads, best of {repeats}")
    print(f"  one item per forward : {results[1]:.1f} items/s")
    print(f"  {batch_size} items per forward: {results[batch_size]:.1f} items/s "
          f"({results[batch_size] / results[1]:.2f}x) | same predictions: {same}")
    print(f"  the head + logsumexp alone, at the {n_rows} ending tokens: {len(items) / min(head_times):.1f} "
          f"items/s, a bound no batch size can beat")
    return results, same


class UsageError(Exception):
    """A flag argparse refused; main() prints it as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own: usage + message, several lines
        raise UsageError(message)


def parse_args(argv):
    """The flags, each checked: UsageError names the flag and what to pass."""
    parser = Parser(description="HellaSwag validation accuracy (completion style)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="Hugging Face model name or local dir: gpt2, ./hf_export")
    source.add_argument("--checkpoint", help="one of our checkpoints: log/ckpt_019073.pt")
    parser.add_argument("--data_path",
                        help="a local hellaswag_val.jsonl (default: download once into hellaswag/)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N items (0: all)")
    parser.add_argument("--batch_size", type=int, default=8, help="items per forward (4 rows each)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    parser.add_argument("--benchmark", action="store_true", help="time batched vs one item per forward")
    parser.add_argument("--repeats", type=int, default=1, help="--benchmark: best of this many runs")
    args = parser.parse_args(argv)
    for name in ("model", "checkpoint", "data_path"):
        if getattr(args, name) == "":
            raise UsageError(f"--{name} is empty; pass a value (--{name}=...) or leave the flag out")
    if not (args.model or args.checkpoint or args.benchmark):
        raise UsageError("pass --model=NAME_OR_DIR, --checkpoint=PATH or --benchmark")
    for name, low in (("batch_size", 1), ("limit", 0), ("repeats", 1)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name}={getattr(args, name)}: must be >= {low}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        raise UsageError(f"--device={args.device}: expected auto, cpu, cuda, cuda:N or mps")
    return args


def main(argv):
    import device
    import train_gpt2
    from gpt2_tokenizer import TokenizerFilesError
    try:
        args = parse_args(argv)
        items = load_items(args.data_path)
        items = items[:args.limit] if args.limit else items
        d = device.setup_distributed(args.device)  # one process, or every rank under torchrun
        if args.benchmark:
            benchmark(items[:args.limit or 64], d.device, args.batch_size, repeats=args.repeats)
            return 0
        model = load_model(args, d.device)
        autocast = (torch.autocast(device_type=d.device_type, dtype=torch.bfloat16)
                    if args.dtype == "bfloat16" else nullcontext())
        t0 = time.perf_counter()
        counts = evaluate_counts(model, items, d.device, d.rank, d.world_size, autocast, args.batch_size,
                                 progress=d.master)
    except (UsageError, HellaSwagError, TokenizerFilesError, train_gpt2.ConfigError) as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)  # a path may hold a newline: still one line
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    if d.master:
        total = counts["total"]
        print(f"{args.model or args.checkpoint}: acc {counts['correct'] / total:.4f} | acc_norm "
              f"{counts['correct_norm'] / total:.4f} | count {total} | {time.perf_counter() - t0:.1f}s")
    if d.world_size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
