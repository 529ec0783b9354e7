"""
Sample from a GPT: one of train_gpt2.py's checkpoints, or a Hugging Face GPT-2 (a name or a folder).

    python sample.py --checkpoint=log/ckpt_019073.pt --prompt="Hello, I'm a language model,"
    python sample.py --model=gpt2 --num_samples=5 --max_new_tokens=200 --temperature=0.8 --top_k=200
    python sample.py --checkpoint=log/ckpt_000300.pt --prompt=FILE:prompt.txt --temperature=0   # greedy

A prompt may hold <|endoftext|>, the separator fineweb.py puts before every document: the prompt
"<|endoftext|>" alone starts a fresh document.

The decode engine, generate(): the prompt in one forward, then one token per forward against a KV cache
preallocated at block_size. Eager (the default) attends over the filled part of the cache only and reads
matmul weights cast once per call to autocast's dtype; compile=True compiles a fixed-shape step instead
(the whole cache, masked to the filled part, so every position runs the same graph), which on CUDA is
recorded once as a CUDA graph and replayed per token. Its draws are GPT.generate's (train_gpt2.py): the
same generator gives the same tokens on every path.
"""

import argparse
import math
import sys
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from train_gpt2 import GPT, ConfigError, get_tokenizer, model_from_checkpoint

# ----------------------------------------------------------------------------------------------
# The engine


class KVCache:
    """
    Keys and values of every layer, preallocated at block_size, filled by the model's attention through
    update(). static=False (eager): pos is an int and update returns the filled prefix only. static=True
    (compiled): pos is a device tensor and update returns all block_size slots with a mask of the filled
    ones, so every position has the same shapes: one graph, no host sync, a CUDA graph can replay it.
    """

    def __init__(self, config, batch_size, device, dtype, static=False):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        # a tensor per layer and k/v, written in place (compiled, a slice of one big tensor is copied whole);
        # zeros, not empty: masked slots still meet the values in softmax @ v, and 0 * NaN is NaN
        self.k, self.v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
                          for _ in "kv")
        self.static = static
        self.pos = torch.zeros((), dtype=torch.long, device=device) if static else 0  # positions filled

    def reset(self):
        if self.static:
            self.pos.zero_()
        else:
            self.pos = 0

    def update(self, layer, k, v):
        """Writes k, v (B, nh, T, hs) at positions pos.. of layer; returns the keys and values to attend to
        and the (T, keys) mask of those each query sees, None when it sees all of them."""
        T = k.size(2)
        if not self.static:
            end = self.pos + T
            self.k[layer][:, :, self.pos:end] = k
            self.v[layer][:, :, self.pos:end] = v
            # one new token sees every filled position: no mask, SDPA's fastest path
            mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=k.device).tril(self.pos)
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask
        q_pos = self.pos + torch.arange(T, device=k.device)
        self.k[layer].index_copy_(2, q_pos, k)
        self.v[layer].index_copy_(2, q_pos, v)
        mask = torch.arange(self.k[layer].size(2), device=k.device) <= q_pos[:, None]  # key j seen by query i
        return self.k[layer], self.v[layer], mask


def sample_next(logits, temperature, top_k, noise):
    """Next ids (B,) from logits (B, V): argmax at temperature 0, else a top-k sample as
    argmax(probs / noise), noise ~ Exp(1) drawn outside (the exponential race: i wins with probability
    probs[i]); no RNG in a graph.
    The same arithmetic as GPT.generate, so both give the same tokens from the same draws."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # the same index in any dtype: no fp32 copy
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return (F.softmax(logits, dim=-1) / noise.clamp(min=1e-30)).argmax(dim=-1)


class LastLogits(nn.Module):
    """The model's logits (B, V) at the last position only, as a module so functional_call can run it
    on other weights; the head's (V, C) matmul is then one row per sequence, not one per prompt token."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, cache):
        x = self.model.hidden_states(idx, cache)[:, -1]
        return self.model.lm_head(x)[:, :self.model.config.vocab_size]


def last_logits(head, weights, idx, cache):
    if not weights:
        return head(idx, cache)
    return torch.func.functional_call(head, weights, (idx, cache), tie_weights=False, strict=False)


def decode_step(head, weights, out, cache, noise, temperature, top_k):
    """Feeds the token at position cache.pos of out (B, block_size + 1) and writes the next one after it;
    returns its logits (B, V) (compiled on CUDA: valid until the next step)."""
    if cache.static:  # the position stays on the device: no host sync, one graph for every position
        at = cache.pos.repeat(out.size(0), 1)  # (B, 1), a copy: cache.pos moves on in the forward
        logits = last_logits(head, weights, out.gather(1, at), cache)
        out.scatter_(1, at + 1, sample_next(logits, temperature, top_k, noise)[:, None])
    else:
        p = cache.pos
        logits = last_logits(head, weights, out[:, p:p + 1], cache)
        out[:, p + 1] = sample_next(logits, temperature, top_k, noise)
    return logits


class Decoder:
    """
    What generate keeps between calls for one model, batch size, device, dtype and mode (eager or compiled):
    the token buffer, the KV cache, the noise, the cast weights and the step. Fixed addresses: a compiled
    step compiles once and is captured as one CUDA graph, whatever the prompt and however many calls.
    """

    def __init__(self, model, batch_size, device, dtype, compile):
        config = model.config
        self.out = torch.zeros(batch_size, config.block_size + 1, dtype=torch.long, device=device)
        self.cache = KVCache(config, batch_size, device, dtype, static=compile)
        self.noise = torch.ones(batch_size, config.vocab_size, device=device)
        self.head = LastLogits(model)
        # nn.Linear weights and biases in autocast's dtype, refreshed once per call: autocast itself
        # would cast all of them again every token, reading the fp32 weights and writing bf16 ones,
        # three times the bytes of the matmuls that follow (a batch-1 step is bound by those bytes)
        self.weights = {f"model.{name}.{p}": torch.empty_like(t, dtype=dtype)
                        for name, m in model.named_modules() if isinstance(m, nn.Linear)
                        for p, t in m.named_parameters(recurse=False) if t.dtype != dtype}
        self.step = decode_step
        if compile:
            for t in (self.out, *self.cache.k, *self.cache.v, self.cache.pos, self.noise,
                      *self.weights.values()):
                torch._dynamo.mark_static_address(t)  # used in place, not copied into the graph
            self.step = torch.compile(decode_step, fullgraph=True, dynamic=False,
                                      mode="reduce-overhead" if torch.device(device).type == "cuda" else None)

    def load_weights(self, model):
        for name, w in self.weights.items():
            w.copy_(model.get_parameter(name[len("model."):]))


MAX_DECODERS = 4  # batch sizes x modes kept per model: each holds a block_size KV cache


def decoder(model, batch_size, device, compile):
    """The model's Decoder for this batch size, device, the current autocast dtype and mode, made once."""
    device = torch.device(device)
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)  # k, v's dtype
             else model.transformer.wte.weight.dtype)
    decoders = model.__dict__.setdefault("_sample_decoders", {})
    key = (batch_size, str(device), dtype, bool(compile))
    if key not in decoders:
        if len(decoders) >= MAX_DECODERS:
            decoders.pop(next(iter(decoders)))  # the oldest
        decoders[key] = Decoder(model, batch_size, device, dtype, compile)
    return decoders[key]


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, compile=False):
    """
    idx (B, P) with max_new_tokens appended, (B, P + max_new_tokens). temperature 0 is greedy; otherwise
    a top-k sample (top_k 0: all), drawn from generator. compile=True compiles the decode step (on CUDA:
    one CUDA graph launch a token), worth its compile time for long runs. Past block_size, each token
    recomputes the cropped window (GPT.generate).
    """
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or idx.size(1) == 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}, temperature={temperature}, top_k={top_k}, "
                         f"{idx.size(1)} prompt tokens: none may be negative, and the prompt not empty")
    was_training = model.training
    model.eval()
    B, P = idx.shape
    n = max(0, min(max_new_tokens, model.config.block_size + 1 - P))  # tokens the cache holds room for
    if n > 0:
        d = decoder(model, B, idx.device, compile)
        d.load_weights(model)
        d.cache.reset()
        d.out[:, :P] = idx
        if temperature:
            d.noise.exponential_(generator=generator)
        d.out[:, P] = sample_next(last_logits(d.head, d.weights, idx, d.cache), temperature, top_k, d.noise)
        # one sequence, eager, bf16 on a CPU: each matmul is a matrix-vector product; oneDNN's bf16 matmul
        # is slower at one row than ATen's own gemv (measured on a Xeon with AMX: ~1.2-2x per weight byte)
        gemv = B == 1 and not compile and idx.device.type == "cpu" and d.cache.k[0].dtype != torch.float32
        mkldnn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = mkldnn and not gemv
        try:
            for _ in range(n - 1):
                if temperature:
                    d.noise.exponential_(generator=generator)  # the caller's generator, outside any graph
                d.step(d.head, d.weights, d.out, d.cache, d.noise, temperature, top_k)
        finally:
            torch.backends.mkldnn.enabled = mkldnn
        idx = d.out[:, :P + n].clone()
    if max_new_tokens > n:
        idx = model.generate(idx, max_new_tokens - n, temperature, top_k, generator)
    model.train(was_training)
    return idx


@torch.no_grad()
def teacher_forced_logits(model, tokens, prompt_len, compile=False, top_k=50):
    """
    The logits (B, n, V) generate's greedy path computes for tokens (B, prompt_len + n), had it picked
    tokens[:, prompt_len:] itself: the prompt in one forward, then each token fed through the same step
    (the same graph, given generate's top_k). To compare the engine with another model on equal inputs.
    """
    model.eval()
    B, L = tokens.shape
    d = decoder(model, B, tokens.device, compile)
    d.load_weights(model)
    d.cache.reset()
    d.out[:, :L] = tokens
    logits = [last_logits(d.head, d.weights, tokens[:, :prompt_len], d.cache)]
    for i in range(prompt_len, L - 1):
        logits.append(d.step(d.head, d.weights, d.out, d.cache, d.noise, 0, top_k).clone())
        d.out[:, i + 1] = tokens[:, i + 1]  # the step wrote its own pick there: the given token goes back
    return torch.stack(logits, dim=1)


def encode(prompt):
    """GPT-2 ids of prompt; <|endoftext|> in it is the separator token, as in the training data."""
    return get_tokenizer().encode(prompt, allowed_special={"<|endoftext|>"})


def sample_texts(model, prompt, num_samples, max_new_tokens, device, seed=42, temperature=1.0, top_k=50,
                 compile=False):
    """num_samples continuations of prompt (text), seeded, through the engine."""
    idx = torch.tensor([encode(prompt)] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, temperature, top_k, generator=gen, compile=compile)
    return [get_tokenizer().decode(row.tolist()) for row in out]

# ----------------------------------------------------------------------------------------------
# The command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (python sample.py --help lists the flags)")


def parse_bool(text):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {text!r}")


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="a ckpt_*.pt written by train_gpt2.py")
    p.add_argument("--model", default="", help="a Hugging Face GPT-2: gpt2, gpt2-medium, ..., or a folder")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="the text to continue; FILE:path "
                   "reads it from a file; <|endoftext|> alone starts a fresh document")
    p.add_argument("--num_samples", type=int, default=3, help="continuations of the prompt, as one batch")
    p.add_argument("--max_new_tokens", type=int, default=100, help="tokens per continuation")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy; below 1: more likely tokens")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens; 0: all")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--compile", type=parse_bool, default=False, help="compile the decode step (CUDA: a CUDA "
                   "graph per token); pays off over long runs")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="bfloat16: autocast")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    args = p.parse_args(argv)
    if bool(args.checkpoint) == bool(args.model):
        raise ConfigError("give one of --checkpoint=PATH (train_gpt2.py's) or --model=NAME_OR_DIR (Hugging "
                          "Face's)")
    for name in ("num_samples", "max_new_tokens", "top_k", "seed"):
        least = 1 if name == "num_samples" else 0
        if getattr(args, name) < least:
            raise ConfigError(f"--{name}={getattr(args, name)}: must be >= {least}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature={args.temperature}: must be a finite number >= 0 (0: greedy)")
    if args.seed >= 2**63:
        raise ConfigError(f"--seed={args.seed}: must be below 2**63")
    if args.prompt.startswith("FILE:"):
        path = args.prompt[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                args.prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise ConfigError(f"--prompt=FILE:{path}: could not read it ({e.__class__.__name__}: {why}); "
                              f"pass a readable UTF-8 text file") from None
    if not args.prompt:
        raise ConfigError("--prompt is empty: give text to continue, or --prompt='<|endoftext|>'")
    return args


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device={device}: expected auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise ConfigError(f"--device={device}: no such device here; use --device=cpu")
    return str(dev)


def main(argv):
    try:
        args = parse_args(argv)
        device = resolve_device(args.device)
        model = model_from_checkpoint(args.checkpoint) if args.checkpoint else GPT.from_pretrained(args.model)
        ids = encode(args.prompt)
        source = f"--checkpoint={args.checkpoint}" if args.checkpoint else f"--model={args.model}"
        if len(ids) > model.config.block_size:
            raise ConfigError(f"--prompt is {len(ids)} tokens, more than the block_size "
                              f"{model.config.block_size} of {source}; shorten it")
        if max(ids) >= model.config.vocab_size:
            raise ConfigError(f"--prompt has token id {max(ids)}, outside the "
                              f"{model.config.vocab_size}-token vocab of {source}")
    except (ConfigError, SystemExit) as e:
        if isinstance(e, SystemExit):  # --help
            return e.code or 0
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(device).eval()
    device_type = torch.device(device).type
    bf16 = args.dtype == "bfloat16"
    with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext():
        texts = sample_texts(model, args.prompt, args.num_samples, args.max_new_tokens, device,
                             seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                             compile=args.compile)
    for text in texts:
        print(text)
        print("---------------")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
