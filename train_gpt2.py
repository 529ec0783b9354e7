"""
Train GPT-2 (124M) from scratch, in one file.

    python train_gpt2.py --preset=shakespeare                  # a small GPT on tiny shakespeare, on a CPU
    python fineweb.py                                          # FineWeb-Edu 10B -> edu_fineweb10B/
    torchrun --standalone --nproc_per_node=8 train_gpt2.py     # the GPT-2 124M reproduction, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --resume   # continue from the newest checkpoint

Every field of TrainConfig below is a flag: --name=value (python train_gpt2.py --help lists them).
Importing this file runs nothing: `from train_gpt2 import GPT, GPTConfig`.
"""

import ctypes
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import re
import signal
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import run_dir
from muon import Muon, Optimizers  # --optimizer=muon
from gpt2_tokenizer import get_tokenizer  # OpenAI's GPT-2 BPE, shipped in gpt2_tokenizer/: no download

# ----------------------------------------------------------------------------------------------
# Hyperparameters: defaults are the GPT-2 124M reproduction on FineWeb-Edu 10B


@dataclass
class TrainConfig:
    preset: str = ""  # a named set of overrides from PRESETS, applied before the other flags
    # data
    data: str = "edu_fineweb10B"  # a text file (input.txt) or a folder of token shards
    shuffle: bool = False  # permute shard order and document order per epoch (from seed)
    val_tokens: int = 10_485_760  # tokens of validation per eval, however many ranks (capped by the split)
    # model
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads (head size = n_embd / n_head)
    n_embd: int = 768  # width of the residual stream (C)
    block_size: int = 1024  # tokens of context (T)
    init_from: str = "scratch"  # "scratch", or a GPT.from_pretrained name/path (gpt2, ./hf_dir)
    # batch: grad accumulation steps = total_batch_size / (batch_size * block_size * world size)
    batch_size: int = 0  # sequences per micro-batch per rank (B); 0: auto, 64 or what the GPU fits (auto_batch_size)
    total_batch_size: int = 524_288  # tokens per optimizer step, 2**19 ~ 0.5M as in GPT-3 Small
    dropout: float = 0.0  # on embeddings, attention weights and residual branches (as HF GPT-2); 0 for 124M
    # optimizer and schedule (GPT-3 paper, table 2.1 and appendix B)
    optimizer: str = "adamw"  # adamw, or muon: Muon for the blocks' matrices, AdamW (max_lr) for the rest
    muon_lr: float = 0.0018  # Muon's peak LR (update RMS 0.2 * lr; modded-nanogpt's 124M value), max_lr's schedule
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_weight_decay: float = 0.1  # Muon's decoupled decay: p *= 1 - lr * wd a step (Moonlight's 0.1)
    max_lr: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # the schedule ends at max_lr * min_lr_ratio
    lr_schedule: str = "cosine"  # cosine, or wsd: warmup, constant, then linear decay (Hu et al. 2024)
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays linearly
    warmup_steps: int = 715  # steps of linear LR warmup: 375M tokens / 2**19 tokens per step
    max_steps: int = 19_073  # steps in all: 10B tokens / 2**19 tokens per step = one epoch of FineWeb-Edu 10B
    weight_decay: float = 0.1  # AdamW, on 2-D tensors (matmuls, embeddings) only
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    eps: float = 1e-8  # AdamW
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    # evaluation, sampling, logging, checkpoints
    eval_interval: int = 250  # steps between val loss / HellaSwag / samples
    hellaswag: bool = False  # HellaSwag acc_norm at each eval (needs hellaswag.py and its data)
    hellaswag_path: str = ""  # local hellaswag_val.jsonl; empty downloads it
    num_samples: int = 4  # samples printed at each eval
    sample_tokens: int = 32  # tokens per sample
    sample_prompt: str = "Hello, I'm a language model,"  # the samples continue this text
    log_dir: str = "log"  # log.txt and checkpoints go here
    checkpoint_interval: int = 5000  # steps between checkpoints; one is always written at the end
    keep_checkpoints: int = 3  # newest checkpoints kept in log_dir; 0 keeps all
    resume: str = ""  # "--resume" alone: newest checkpoint of the run in log_dir; or a checkpoint path
    start_over: bool = False  # a fresh run in a log_dir holding checkpoints moves them into log_dir/old_N/ first
    # system
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    backend: str = "auto"  # torch.distributed backend: auto (nccl on cuda, gloo otherwise), nccl, gloo
    dist_timeout: int = 600  # seconds a rank waits for the others in a collective before the job fails
    dtype: str = "bfloat16"  # autocast dtype: bfloat16 or float32 (no autocast)
    compile: typing.Optional[bool] = None  # torch.compile; unset: on for cuda only
    cudnn_attention: bool = True  # try cuDNN's SDPA kernel first (CUDA); false: PyTorch's default order
    zero1: bool = False  # shard optimizer state across ranks (ZeroRedundancyOptimizer)
    skip_nonfinite: bool = False  # skip a step with a NaN/inf loss or grad norm instead of stopping
    stop_step: int = 0  # checkpoint and stop after this step (to split a run into jobs); 0: run to max_steps
    verify_shards: bool = False  # check every shard's sha256 against fineweb.py's manifest.json at start-up
    seed: int = 1337  # seeds the weights, the data order (--shuffle) and the samples


# A preset is only a dict of flag values; explicit flags still override it.
PRESETS = {
    # a 4-layer GPT on tiny shakespeare that trains on a 2-core CPU in about 5 minutes
    "shakespeare": dict(
        data="input.txt", n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16,
        total_batch_size=4096, max_lr=4e-3, warmup_steps=20, max_steps=300, eval_interval=50,
        optimizer="muon", muon_lr=0.02, lr_schedule="wsd", decay_fraction=0.3, min_lr_ratio=0.0,  # val 5.60 -> 4.99
        checkpoint_interval=100, num_samples=2, sample_tokens=48, sample_prompt="ROMEO:",
        compile=True,  # on a CPU too: ~1.6x faster steps after a ~30 s compile
    ),
    # 124M with Muon + WSD at the settings of modded-nanogpt's Oct 2024 Muon records (a 124M GPT-2 then),
    # for 2B tokens; measured at small scale only (README: "Fewer tokens")
    "gpt2-fast": dict(optimizer="muon", max_lr=0.0036, weight_decay=0.0, warmup_steps=0,
                      lr_schedule="wsd", decay_fraction=0.28, min_lr_ratio=0.0, max_steps=3814, hellaswag=True),
}


class ConfigError(ValueError):
    """Bad user input: the message names the flag or file and says what to do."""


def _parse_value(name, text, typ):
    if typ is bool or typ == typing.Optional[bool]:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        if typ != bool and low in ("auto", "none", ""):
            return None
        raise ConfigError(f"--{name}={text}: expected true/false/1/0")
    try:
        return typ(text)
    except ValueError:
        raise ConfigError(f"--{name}={text}: expected a value of type {typ.__name__}") from None


def parse_args(argv):
    """Builds a TrainConfig from --name=value flags, after applying --preset if given."""
    hints = typing.get_type_hints(TrainConfig)
    flags = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --name=value")
        name, has_value, text = arg[2:].partition("=")
        if name not in hints:
            valid = " ".join(f"--{f}" for f in hints)
            raise ConfigError(f"unknown flag --{name}; valid flags: {valid}")
        if not has_value:  # a bare flag: true for booleans, "latest" for --resume
            if name == "resume":
                text = "latest"
            elif hints[name] in (bool, typing.Optional[bool]):
                text = "true"
            else:
                raise ConfigError(f"--{name} needs a value: --{name}=VALUE")
        flags[name] = _parse_value(name, text, hints[name])
    values = {}
    if flags.get("preset"):
        if flags["preset"] not in PRESETS:
            raise ConfigError(f"--preset={flags['preset']}: unknown preset; choose from {', '.join(PRESETS)}")
        values.update(PRESETS[flags["preset"]])
    values.update(flags)
    return TrainConfig(**values)


def validate_config(cfg):
    """Every flag checked before anything is built or read: numbers finite and > 0 (these) or >= 0 (the rest)."""
    positive = {"n_layer", "n_head", "n_embd", "block_size", "total_batch_size", "max_steps",
                "val_tokens", "max_lr", "dist_timeout"}
    for name, typ in typing.get_type_hints(TrainConfig).items():
        v = getattr(cfg, name)
        if typ in (int, float) and not (math.isfinite(v) and (v > 0 if name in positive else v >= 0)):
            raise ConfigError(f"--{name}={v}: must be a finite number {'>' if name in positive else '>='} 0")
    if cfg.min_lr_ratio > 1 or max(cfg.beta1, cfg.beta2) >= 1:
        raise ConfigError(f"--min_lr_ratio={cfg.min_lr_ratio} must be <= 1, --beta1/--beta2 < 1")
    if cfg.muon_momentum >= 1:  # 1 freezes the momentum buffer at 0, and so every update
        raise ConfigError(f"--muon_momentum={cfg.muon_momentum}: must be in [0, 1), e.g. 0.95")
    if cfg.seed >= 2**32:
        raise ConfigError(f"--seed={cfg.seed}: must be below 2**32, numpy's seed range")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd={cfg.n_embd} is not a multiple of --n_head={cfg.n_head}; change one of them")
    for name, choices in (("dtype", ("bfloat16", "float32")), ("optimizer", ("adamw", "muon")),
                          ("lr_schedule", ("cosine", "wsd"))):
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"--{name}={getattr(cfg, name)}: expected {' or '.join(choices)}")
    if not (cfg.dropout < 1 and cfg.decay_fraction <= 1):
        raise ConfigError("--dropout must be in [0, 1) and --decay_fraction in [0, 1]")
    if cfg.optimizer == "muon" and cfg.zero1:
        raise ConfigError("--zero1 shards AdamW's state only; drop it with --optimizer=muon")
    if re.fullmatch(r"(openai-community/)?gpt2(-medium|-large|-xl)?", cfg.init_from) and cfg.block_size > 1024:
        raise ConfigError(f"--block_size={cfg.block_size} exceeds {cfg.init_from}'s 1024; pass --block_size=1024")
    if cfg.num_samples and not cfg.sample_prompt:
        raise ConfigError("--sample_prompt is empty: give samples a prompt to continue, or pass --num_samples=0")
    if cfg.data.endswith(".npy"):
        raise ConfigError(f"--data={cfg.data} is one shard; pass its folder: --data={os.path.dirname(cfg.data) or '.'}")
    check_writable(cfg.log_dir, "--log_dir")


# ----------------------------------------------------------------------------------------------
# The model: GPT-2, with Hugging Face's module names so OpenAI's weights load by a plain copy


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_multiple: int = 64  # embedding rows are padded to a multiple of this (50257 -> 50304)
    flash: bool = True  # attention through F.scaled_dot_product_attention; False: written out
    dropout: float = 0.0  # training only: embeddings, attention weights, residual branches (HF GPT-2's places)

    @property
    def padded_vocab_size(self):
        # 50304 = 2**7 * 393 tiles evenly on GPUs; the padded rows are never predicted or sampled
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


class KVCache:
    """Keys and values of every layer, preallocated at block_size and masked past the filled positions:
    a decode step has the same shapes at every position, so it compiles once and fits in a CUDA graph."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        # a tensor per layer and k/v, written in place (compiled, a slice of one big tensor is copied whole);
        # zeros, not empty: masked slots still meet the values in softmax @ v, and 0 * NaN is NaN
        self.k, self.v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)] for _ in "kv")
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # positions filled, kept on the device

    def update(self, layer, k, v):
        """Writes k, v (B, nh, T, hs) at positions pos..; returns all keys, values and the (T, block_size) mask."""
        q_pos = self.pos + torch.arange(k.size(2), device=k.device)
        self.k[layer].index_copy_(2, q_pos, k)
        self.v[layer].index_copy_(2, q_pos, v)
        mask = torch.arange(self.k[layer].size(2), device=k.device) <= q_pos[:, None]  # key j visible to query i
        return self.k[layer], self.v[layer], mask


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout  # on the attention weights, inside SDPA
        self.n_head = config.n_head
        self.flash = config.flash
        self.layer_idx = layer_idx

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        mask = None  # None: causal over this chunk alone
        if cache is not None:  # attend to the whole preallocated cache, masked to the filled positions
            k, v, mask = cache.update(self.layer_idx, k, v)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # the textbook version, kept for the speed ladder in bench.py
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = F.dropout(F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1), self.dropout, self.training) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        # pre-LayerNorm (GPT-2): the residual stream itself is never normalized
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class ChunkedCrossEntropy(torch.autograd.Function):
    """
    Mean cross-entropy of x @ weight.T against targets, weight's padded rows (>= vocab_size) left out,
    without the (N, vocab) logits ever existing in full. On a small GPT the head and its loss are most
    of a step, and the plain path writes and re-reads those logits in fp32 several times over.
    Rows go through in chunks; the loss is the end of the graph, so each chunk's gradient
    (softmax - onehot) is taken at once in the forward and backward only scales it: no recompute.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk_rows):
        device_type = x.device.type
        # the matmuls run in the autocast dtype like any nn.Linear would; the softmax in fp32
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        with torch.autocast(device_type, enabled=False):
            xd, w = x.to(dtype), weight[:vocab_size].to(dtype)  # (N, C), (V, C)
            loss = torch.zeros((), device=x.device)
            grad_x = []
            grad_wt = torch.zeros(w.size(1), w.size(0), device=x.device)  # (C, V): x.T @ g beat g.T @ x here
            for i in range(0, x.size(0), chunk_rows):
                xc, yc = xd[i:i + chunk_rows], targets[i:i + chunk_rows]
                logits = xc @ w.t()  # (rows, V)
                target_logit = logits.gather(1, yc[:, None]).squeeze(1).float()
                # one exp per logit: e = exp(logits - max) is kept as it is, and softmax's 1/sum
                # goes onto the small operands of the two matmuls below instead of onto e
                m = logits.amax(dim=-1).float()
                e = logits.float().sub_(m[:, None]).exp_()
                s = e.sum(dim=-1)
                loss += (m + s.log() - target_logit).sum()  # logsumexp - target logit
                g = e.to(dtype)
                # (softmax - onehot) * s: the target's entry in fp32, not as a difference of rounded numbers
                g[torch.arange(len(yc), device=x.device), yc] = (torch.exp(target_logit - m) - s).to(dtype)
                inv_s = 1.0 / s
                grad_x.append((g @ w).float() * inv_s[:, None])
                grad_wt += (xc.float() * inv_s[:, None]).to(dtype).t().contiguous() @ g
        ctx.save_for_backward(torch.cat(grad_x), grad_wt)
        ctx.padded_vocab_size = weight.size(0)
        return loss / x.size(0)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_wt = ctx.saved_tensors
        scale = grad_loss / grad_x.size(0)  # the mean over rows
        # transposed back and padded here, where compile fuses it with adding wte's own gradient
        grad_w = F.pad(grad_wt.t() * scale, (0, 0, 0, ctx.padded_vocab_size - grad_wt.size(1)))
        return grad_x * scale, grad_w, None, None, None


def chunked_cross_entropy(x, weight, targets, vocab_size, chunk_rows=None):
    """F.cross_entropy(x @ weight[:vocab_size].T, targets) for x (..., C), targets (...), in chunks of rows."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if chunk_rows is None and x.device.type == "cpu":
        # a chunk's biggest temporary (the fp32 softmax eagerly; under compile, which fuses the
        # softmax, the matmul's output) stays under 32 MiB, glibc's largest mmap threshold: bigger
        # blocks come back as fresh pages on every call, each one zeroed by the kernel
        itemsize = 2 if torch.compiler.is_compiling() and torch.is_autocast_enabled("cpu") else 4
        chunk_rows = 2 ** max(0, (2**25 // (vocab_size * itemsize)).bit_length() - 1)  # a power of two
    chunk_rows = chunk_rows or 8192  # a GPU wants big matmuls; 8192 rows of bf16 logits are 0.8 GB
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, chunk_rows)
    return token_losses(x, weight, targets, vocab_size, chunk_rows).mean()  # evaluation: loss only


@torch.no_grad()
def token_losses(x, weight, targets, vocab_size, chunk_rows=None):
    """
    Cross-entropy (N,) of x (N, C) @ weight.T against targets (N,), no grad, chunk_rows rows at a time:
    on a CPU a chunk's logits (128 x 50304 fp32, 26 MB) stay in the last-level cache while logsumexp
    reads them, and no (N, V) log-softmax is ever written out. Used by val loss and HellaSwag.
    """
    chunk_rows = chunk_rows or (128 if x.device.type == "cpu" else 8192)
    losses = []
    for i in range(0, x.size(0), chunk_rows):
        # all of weight's rows, padded ones too: a width that is a multiple of 64 makes the matmul
        # faster than a sliced weight would, and slicing the logits is free
        logits = (x[i:i + chunk_rows] @ weight.t())[:, :vocab_size].float()
        target_logit = logits.gather(1, targets[i:i + chunk_rows, None]).squeeze(1)
        # logsumexp in place on this chunk's own logits: no temporary as big as they are
        m = logits.amax(dim=1)
        losses.append(logits.sub_(m[:, None]).exp_().sum(dim=1).log_().add_(m) - target_logit)
    return torch.cat(losses) if losses else x.new_zeros(0)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                # each block adds two projections to the residual stream: keep its variance flat
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size) and the mean cross-entropy if targets."""
        x = self.hidden_states(idx, cache)
        if targets is not None:
            # training and evaluation only need the loss: the head and the loss go through in chunks
            # without the full logits (see ChunkedCrossEntropy), so none are returned
            return None, chunked_cross_entropy(x, self.lm_head.weight, targets, self.config.vocab_size)
        # the padded vocab rows make the matmul fast; slicing them off means no padded id is
        # ever predicted, sampled or counted in the loss
        logits = self.lm_head(x)[..., :self.config.vocab_size]
        return logits, None

    def hidden_states(self, idx, cache=None):
        """The final LayerNorm's output (B, T, C): what the head reads (HellaSwag heads only a few rows)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        # with a cache, positions start at cache.pos, a device tensor: no host sync, one graph for all positions
        pos = torch.arange(T, device=idx.device) + (cache.pos if cache is not None else 0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    # HF GPT-2 stores these as Conv1D, i.e. (in, out): they are transposed on the way in and out
    _TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """OpenAI GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local Hugging Face GPT-2 dir."""
        from transformers import GPT2LMHeadModel
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        except OSError as e:  # offline, or no such name or folder
            raise ConfigError(f"{name_or_path}: could not load it ({str(e).strip().splitlines()[0]})") from None
        c = hf.config
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or c.scale_attn_by_inverse_layer_idx:
            raise ConfigError(f"{name_or_path}: only standard GPT-2 checkpoints load (tanh GELU, plain attention)")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                           n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, dropout=dropout)
        model = cls(config)
        model.load_hf_state_dict(hf.state_dict())
        return model

    def load_hf_state_dict(self, hf_sd):
        sd = self.state_dict()
        V = self.config.vocab_size
        for key in sd:
            src = hf_sd[key]
            with torch.no_grad():
                if key.endswith(self._TRANSPOSED):
                    sd[key].copy_(src.t())
                elif key in ("transformer.wte.weight", "lm_head.weight"):
                    sd[key][:V].copy_(src[:V])
                    sd[key][V:].zero_()
                else:
                    sd[key].copy_(src)

    def hf_state_dict(self):
        """Our weights under Hugging Face GPT-2 names and layouts, padded vocab rows removed."""
        out = {}
        for key, t in self.state_dict().items():
            if key.endswith(self._TRANSPOSED):
                t = t.t()
            elif key in ("transformer.wte.weight", "lm_head.weight"):
                t = t[:self.config.vocab_size]
            out[key] = t.detach().contiguous().clone()
        return out

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type, zero1=False, muon=None):
        """AdamW; with muon (Muon's keyword arguments) the blocks' matrices go to Muon, the rest to AdamW."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        to_muon = lambda n, p: muon is not None and n.startswith("transformer.h.") and p.dim() == 2  # noqa: E731
        # decay matmul weights and embeddings (2-D); never biases or LayerNorm gains (1-D)
        decay = [p for n, p in named if p.dim() >= 2 and not to_muon(n, p)]
        no_decay = [p for n, p in named if p.dim() < 2]
        # fused AdamW: one kernel for all parameters instead of a loop of small ones
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        kwargs = dict(lr=learning_rate, betas=betas, eps=eps, fused=fused)
        if zero1:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            adamw = ZeroRedundancyOptimizer(decay, optimizer_class=torch.optim.AdamW, weight_decay=weight_decay,
                                            **kwargs)
            adamw.add_param_group({"params": no_decay, "weight_decay": 0.0})
        else:
            adamw = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], **kwargs)
        if muon is None:
            return adamw
        # c_attn holds q, k and v as one (3C, C) weight: three maps, orthogonalized one by one
        groups = [{"params": [p for n, p in named if to_muon(n, p) and ("c_attn" in n) == qkv],
                   "split": 3 if qkv else 1} for qkv in (False, True)]
        return Optimizers(Muon(groups, **muon), adamw)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self):
        # 6N for the matmuls of forward + backward, plus attention scores (PaLM paper, appendix B)
        L, H, Q, T = self.config.n_layer, self.config.n_head, self.config.n_embd // self.config.n_head, self.config.block_size
        return 6 * self.num_params() + 12 * L * H * Q * T

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, use_cache=True, compile=False):
        """Appends max_new_tokens to idx (B, T). temperature 0 is greedy; otherwise top-k sampling. Cached: the
        prompt in one forward, then a fixed-shape decode step per token, no host sync; compile=True compiles it
        (on CUDA: one CUDA graph launch a token), worth it for long runs. Past block_size, or use_cache=False,
        each token recomputes the cropped window."""
        was_training = self.training
        self.eval()
        (B, P), V = idx.shape, self.config.vocab_size
        n = min(max_new_tokens, self.config.block_size + 1 - P) if use_cache else 0  # tokens the cache holds
        if n > 0:
            out, cache, noise, weights, step = self._decoder(B, idx.device, compile)
            for name, w in weights.items():  # this call's weights, cast once here rather than every token
                w.copy_(self.get_parameter(name))
            cache.pos.zero_()
            out[:, :P] = idx
            if temperature:
                noise.exponential_(generator=generator)
            x = self.hidden_states(idx, cache)[:, -1]  # the head only at the last position
            out[:, P] = sample_next(self.lm_head(x)[:, :V], temperature, top_k, noise)
            for _ in range(n - 1):
                if temperature:
                    noise.exponential_(generator=generator)  # the caller's generator, outside the graph
                step(out, cache, noise, weights, temperature, top_k)
            idx = out[:, :P + n].clone()
        for _ in range(max_new_tokens - max(n, 0)):
            logits, _ = self(idx[:, -self.config.block_size:])
            noise = torch.empty(B, V, device=idx.device).exponential_(generator=generator) if temperature else None
            idx = torch.cat((idx, sample_next(logits[:, -1], temperature, top_k, noise)[:, None]), dim=1)
        self.train(was_training)
        return idx

    def _decode_step(self, out, cache, noise, weights, temperature, top_k):
        """Feeds the token at position cache.pos of out (B, block_size + 1) and writes the next one after it."""
        at = cache.pos.repeat(out.size(0), 1)  # (B, 1), a copy: cache.pos moves on in the forward
        logits, _ = torch.func.functional_call(self, weights, (out.gather(1, at),), {"cache": cache}, tie_weights=False)
        out.scatter_(1, at + 1, sample_next(logits[:, -1], temperature, top_k, noise)[:, None])

    def _decoder(self, batch_size, device, compile):
        """(tokens, KV cache, noise, weights, step), kept between calls: fixed addresses, one CUDA graph capture.
        weights: matmul weights in autocast's dtype, cast once per call; compiled, autocast recasts every token."""
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)  # k, v's dtype
                 else self.transformer.wte.weight.dtype)
        key = (batch_size, str(device), dtype, compile)
        if getattr(self, "_decode_state", (None,))[0] != key:
            out = torch.zeros(batch_size, self.config.block_size + 1, dtype=torch.long, device=device)
            cache = KVCache(self.config, batch_size, device, dtype)
            noise = torch.ones(batch_size, self.config.vocab_size, device=device)
            weights = {f"{name}.weight": torch.empty_like(m.weight, dtype=dtype) for name, m in self.named_modules()
                       if isinstance(m, nn.Linear) and compile and m.weight.dtype != dtype}
            step = self._decode_step
            if compile:
                for t in (out, *cache.k, *cache.v, cache.pos, noise, *weights.values()):  # used in place, not copied
                    torch._dynamo.mark_static_address(t)
                step = torch.compile(step, fullgraph=True, dynamic=False,
                                     mode="reduce-overhead" if device.type == "cuda" else None)
            self._decode_state = (key, (out, cache, noise, weights, step))
        return self._decode_state[1]


def sample_next(logits, temperature, top_k, noise):
    """Next ids (B,) from logits (B, V): argmax at temperature 0, else a top-k sample as argmax(probs / noise),
    noise ~ Exp(1) drawn outside (the exponential race: i wins with probability probs[i]); no RNG in a graph."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # the same index in any dtype: no fp32 copy
    logits = logits.float() / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    return (F.softmax(logits, dim=-1) / noise.clamp(min=1e-30)).argmax(dim=-1)

# ----------------------------------------------------------------------------------------------
# Data: one token stream over tiny shakespeare or FineWeb-Edu shards, sliced across ranks

EOT = 50256  # <|endoftext|>: fineweb.py puts it before every document
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def load_text_tokens(path, val_fraction=0.1):
    """A text file as GPT-2 tokens: (train, val), the val split being the last val_fraction."""
    if not os.path.exists(path):
        if os.path.basename(path) != "input.txt":
            raise ConfigError(f"--data={path}: no such file or folder")
        download_shakespeare(path)
    try:
        with open(path, encoding="utf-8") as f:
            tokens = np.array(get_tokenizer().encode_ordinary(f.read()), dtype=np.uint16)
    except UnicodeDecodeError as e:
        raise ConfigError(f"--data={path}: not UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    n_val = max(1, int(len(tokens) * val_fraction))  # build_data checks both splits against one batch
    return tokens[:-n_val], tokens[-n_val:]


def download_shakespeare(path):
    import requests
    print(f"{path} not found: downloading tiny shakespeare from {SHAKESPEARE_URL}")
    try:
        resp = requests.get(SHAKESPEARE_URL, timeout=30)
        resp.raise_for_status()
    except requests.RequestException as e:
        raise ConfigError(f"could not download tiny shakespeare ({e.__class__.__name__}); "
                          f"save {SHAKESPEARE_URL} as {path} and run again") from None
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(resp.text)
    os.replace(tmp, path)


def load_shard(path, vocab_size=50257, ids=True):
    """A shard memory-mapped, checked: 1-D uint16, the size its header says (no token read), ids < vocab_size."""
    fix = "rebuild the folder with fineweb.py (delete it, rerun the same command)"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # shorter than its header says (the mmap fails), not a .npy, ...
        raise ConfigError(f"shard {path} is unreadable or truncated ({e}); {fix}") from None
    if arr.dtype != np.uint16 or arr.ndim != 1:
        raise ConfigError(f"shard {path} holds {arr.dtype} {arr.shape}, not a 1-D uint16 token array; {fix}")
    if len(arr) == 0 or arr.offset + arr.nbytes != os.path.getsize(path):
        raise ConfigError(f"shard {path} is empty or longer than its header says; {fix}")
    if ids and int(arr.max()) >= vocab_size:
        raise ConfigError(f"shard {path} holds token ids >= {vocab_size}; {fix}")
    return arr


def find_shards(folder):
    """(train shard paths, val shard paths) of a fineweb.py output folder, told apart by the exact name pattern."""
    hint = "create it with: python fineweb.py (or pass --data=input.txt)"
    if not os.path.isdir(folder):
        raise ConfigError(f"--data={folder}: no such shard folder; {hint}")
    # fineweb.py's names, PREFIX_val_000000.npy and PREFIX_train_000001.npy: a prefix may contain "val" too
    found = [m for m in (re.fullmatch(r"(.+)_(train|val)_\d+\.npy", n) for n in sorted(os.listdir(folder))) if m]
    train, val = ([os.path.join(folder, m[0]) for m in found if m[2] == split] for split in ("train", "val"))
    if not train or not val:
        raise ConfigError(f"--data={folder}: needs *train*.npy and *val*.npy shards, found "
                          f"{len(train)} and {len(val)}; {hint}")
    return train, val


class Source:
    """A token array split into documents at each <|endoftext|>, readable in a permuted order."""

    def __init__(self, load, length=None):
        self._load, self._arr, self._starts, self._len = load, None, None, length

    @property
    def arr(self):
        if self._arr is None:
            self._arr = self._load()  # opened (and checked) on first use, not at start-up
        return self._arr

    def __len__(self):
        return self._len if self._len is not None else len(self.arr)

    def doc_bounds(self):
        if self._starts is None:
            starts = np.flatnonzero(np.asarray(self.arr) == EOT)
            if len(starts) == 0 or starts[0] != 0:  # a leading fragment is a document too
                starts = np.concatenate(([0], starts))
            self._starts = np.append(starts, len(self.arr))
        return self._starts

    def read(self, offset, n, perm=None):
        """n tokens from offset, in document order perm (None: as stored)."""
        if perm is None:
            return np.asarray(self.arr[offset:offset + n])
        bounds = self.doc_bounds()
        lengths = np.diff(bounds)[perm]
        ends = np.cumsum(lengths)
        i = int(np.searchsorted(ends, offset, side="right"))
        pieces, skip = [], offset - (ends[i - 1] if i > 0 else 0)
        while n > 0:
            d = perm[i]
            piece = self.arr[bounds[d] + skip:min(bounds[d + 1], bounds[d] + skip + n)]
            pieces.append(np.asarray(piece))
            n -= len(piece)
            i, skip = i + 1, 0
        return np.concatenate(pieces)


class DataLoaderLite:
    """
    Reads (B, T) inputs and targets from a list of sources as one endless stream: a batch that
    runs off the end of a source continues in the next, and after the last the next epoch starts.
    Rank r of W takes the r-th B*T window of every W consecutive ones, so ranks are disjoint and
    together cover the stream. The position is global (in tokens), so it does not depend on W.
    """

    def __init__(self, sources, B, T, rank=0, world_size=1, shuffle=False, seed=0):
        self.sources, self.B, self.T = sources, B, T
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.source, self.offset = 0, 0, 0
        self._orders, self._perms = {}, {}

    def _order(self, epoch):
        """The source order of an epoch: as given, or a permutation derived from (seed, epoch)."""
        if not self.shuffle:
            return list(range(len(self.sources)))
        if epoch not in self._orders:
            self._orders = {}  # keep one epoch's orders in memory
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.sources)).tolist()
        return self._orders[epoch]

    def _doc_perm(self, epoch, i):
        """Document order inside source i in an epoch; made when first read, as it scans the shard."""
        if not self.shuffle:
            return None
        key = (epoch, i)
        if key not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            n_docs = len(self.sources[i].doc_bounds()) - 1
            self._perms[key] = np.random.default_rng([self.seed, epoch, i]).permutation(n_docs)
        return self._perms[key]

    def _walk(self, pos, n, read):
        """Advances pos = (epoch, slot, offset) by n tokens; collects them when read is True."""
        epoch, slot, offset = pos
        pieces = []
        while n > 0:
            i = self._order(epoch)[slot]
            src = self.sources[i]
            take = min(n, len(src) - offset)
            if read and take > 0:
                pieces.append(src.read(offset, take, self._doc_perm(epoch, i)))
            offset, n = offset + take, n - take
            if offset == len(src):
                epoch, slot, offset = (epoch + (slot + 1) // len(self.sources), (slot + 1) % len(self.sources), 0)
        return (epoch, slot, offset), (np.concatenate(pieces) if read else None)

    def next_batch(self):
        B, T = self.B, self.T
        pos = (self.epoch, self.source, self.offset)
        mine, _ = self._walk(pos, B * T * self.rank, read=False)
        _, buf = self._walk(mine, B * T + 1, read=True)
        (self.epoch, self.source, self.offset), _ = self._walk(pos, B * T * self.world_size, read=False)
        buf = torch.from_numpy(buf.astype(np.int64))
        return buf[:-1].view(B, T), buf[1:].view(B, T)  # targets are the inputs shifted by one

    def state_dict(self):
        return {"epoch": self.epoch, "source": self.source, "offset": self.offset,
                "shuffle": self.shuffle, "seed": self.seed, "sources": len(self.sources)}

    def load_state_dict(self, state):
        if state.get("sources", len(self.sources)) != len(self.sources) or state["source"] >= len(self.sources):
            raise ConfigError(f"the checkpoint read {state.get('sources', 'more')} train shards/files, --data now "
                              f"has {len(self.sources)}; resume with the --data it was trained on")
        if state["shuffle"] != self.shuffle or state["seed"] != self.seed:
            raise ConfigError(f"--shuffle/--seed differ from the checkpoint's ({state['shuffle']}, "
                              f"{state['seed']}): resume with the same ones to continue the same data order")
        self.epoch, self.source, self.offset = state["epoch"], state["source"], state["offset"]


def val_windows(sources, B, T, val_tokens):
    """How many B*T windows the validation stream gives, capped at val_tokens."""
    total = sum(len(s) for s in sources)
    n = min(val_tokens, total - 1) // (B * T)
    if n == 0:
        raise ConfigError(f"--val_tokens={val_tokens} or the val split ({total} tokens) is smaller than one batch of "
                          f"--batch_size*--block_size={B * T} tokens; raise --val_tokens or lower --batch_size")
    return n


def build_data(cfg, B, T, rank, world_size):
    """(train loader, val sources) for --data: a text file or a fineweb.py shard folder."""
    if os.path.isdir(cfg.data) or not os.path.splitext(cfg.data)[1]:
        import fineweb
        paths = find_shards(cfg.data)
        # each shard's header and size, and the manifest, now; its ids (a full read) when it is first read
        train, val = ([Source(lambda p=p: load_shard(p), len(load_shard(p, ids=False))) for p in ps] for ps in paths)
        fineweb.verify_shards(cfg.data, [os.path.basename(p) for p in sum(paths, [])], cfg.verify_shards, ConfigError)
    else:
        tr, va = load_text_tokens(cfg.data)
        train, val = [Source(lambda: tr)], [Source(lambda: va)]
    if sum(len(s) for s in train) <= B * T:
        raise ConfigError(f"--data={cfg.data}: its train split is smaller than one batch of --batch_size*--block_size"
                          f"={B * T} tokens; lower --batch_size or add data")
    if cfg.eval_interval > 0:
        val_windows(val, B, T, cfg.val_tokens)  # now, not at the first eval
    loader = DataLoaderLite(train, B, T, rank, world_size, shuffle=cfg.shuffle, seed=cfg.seed)
    return loader, val

# ----------------------------------------------------------------------------------------------
# Evaluation, sampling, checkpoints


def get_lr(step, cfg):
    """Linear warmup from max_lr/warmup_steps (never 0), then down to max_lr * min_lr_ratio at max_steps:
    cosine, or wsd: constant at max_lr, then linear over the last decay_fraction of the run."""
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    if cfg.lr_schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        return min_lr + min(1.0, (cfg.max_steps - step) / decay_steps) * (cfg.max_lr - min_lr)
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.max_lr - min_lr)


@torch.no_grad()
def evaluate_loss(model, val_sources, B, T, val_tokens, dist_info, autocast):
    """Mean loss over the first val_tokens of the val split, windows dealt round-robin to ranks."""
    model.eval()
    n = val_windows(val_sources, B, T, val_tokens)
    loader = DataLoaderLite(val_sources, B, T, dist_info.rank, dist_info.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=dist_info.device)  # loss sum, windows
    for first in range(0, n, dist_info.world_size):
        x, y = loader.next_batch()
        if first + dist_info.rank < n:
            with autocast:
                _, loss = model(x.to(dist_info.device), y.to(dist_info.device))
            total += torch.stack([loss.double(), torch.ones_like(loss, dtype=torch.float64)])
    if dist_info.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    model.train()
    return (total[0] / total[1]).item()


def sample_texts(model, prompt, num_samples, max_new_tokens, device, seed=42, use_cache=True):
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode(prompt)] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, top_k=50, generator=gen, use_cache=use_cache)
    return [enc.decode(row.tolist()) for row in out]


def save_checkpoint(path, state):
    """torch.save to this process's temp name, then an atomic rename: a crash never leaves half a checkpoint."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed (disk full, Ctrl-C): no 500 MB leftover
            os.remove(tmp)


def list_checkpoints(log_dir):
    """The checkpoints of log_dir's current line (see run_dir.py), oldest first: [-1] is what --resume takes."""
    rec = run_dir.read_record(log_dir)
    return [path for _, _, path in run_dir.checkpoints(log_dir, rec.get("tag", "") if rec else None)]


def first_nonfinite(state, name=""):
    """The name of the first tensor or float in a nested state dict that is NaN or inf, else None."""
    if isinstance(state, dict):
        state = state.items()
    elif isinstance(state, (list, tuple)):
        state = enumerate(state)
    elif isinstance(state, (torch.Tensor, float)):
        return None if torch.isfinite(torch.as_tensor(state)).all() else name
    else:
        return None
    return next((bad for k, v in state if (bad := first_nonfinite(v, f"{name}.{k}".lstrip(".")))), None)


class UnreadableCheckpoint(ConfigError):
    """A checkpoint file that torch.load cannot read (truncated, say)."""


def load_checkpoint(path, keys=("model", "model_config")):
    """One of our checkpoints, with at least keys in it; anything else is a one-line ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().split("\n")[0]  # torch's messages run to many lines
        raise UnreadableCheckpoint(f"checkpoint {path} could not be read ({first}); "
                                   f"pass a ckpt_*.pt from a --log_dir") from None
    missing = sorted(set(keys) - (set(ckpt) if isinstance(ckpt, dict) else set()))
    if missing:
        raise ConfigError(f"{path} is not a train_gpt2.py checkpoint (no {', '.join(missing)} in it); "
                          f"pass a ckpt_*.pt from a --log_dir")
    return ckpt


def model_from_checkpoint(path, device="cpu"):
    """A GPT with the weights of one of our checkpoints (for sampling, eval, export)."""
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def check_model_config(saved, current, source):
    for key, value in saved.items():
        if current.get(key) != value:
            raise ConfigError(f"{source} was trained with {key}={value}, this run has {key}={current.get(key)}; "
                              f"drop --{key} or pass --{key}={value}")


def rng_state():
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "gauss": np_state[4]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate(state["python"])
    s = state["numpy"]
    np.random.set_state(("MT19937", s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Distributed setup and small helpers


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: str
    device_type: str  # "cuda", "mps" or "cpu": what autocast and the fused checks want
    master: bool


def setup_distributed(device="auto", backend="auto", timeout_s=600):
    """Reads torchrun's environment; one process without it. NCCL on CUDA, gloo on CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    device_type = device.split(":")[0]
    if device_type not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"--device={device}: expected auto, cpu, cuda, cuda:N or mps")
    if not {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[device_type]:
        raise ConfigError(f"--device={device}: no {device_type.upper()} device is available here; use --device=cpu")
    if "RANK" not in os.environ:
        return DistInfo(0, 0, 1, device, device_type, True)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    # a rank that waits longer than timeout_s for the others fails the job instead of hanging it
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, local_rank, world, device, device_type, rank == 0)


def attention_kernels():
    """SDPA kernels by preference: cuDNN's (fastest on Hopper, yet tried last by default since PyTorch 2.5.1),
    flash, memory-efficient, math; each skipped where absent (CPU, older GPUs). Compile fixes it at tracing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


def auto_batch_size(cfg, d):
    """--batch_size=0: 64 off CUDA; on a GPU the largest of 128, 64, ... that divides the step and whose peak fits
    80% of free memory, predicted from 24.9 GB measured for 124M at B=64, T=1024 on an H100: 16 bytes per
    parameter (weights, grads, AdamW moments) + 40 per token, layer and channel. 124M: 128 on 80 GB."""
    if d.device_type != "cuda":
        return 64
    free = torch.cuda.mem_get_info(d.device)[0]
    L, C, T = cfg.n_layer, cfg.n_embd, cfg.block_size
    return next((b for b in (128, 64, 32, 16, 8, 4, 2) if cfg.total_batch_size % (b * T * d.world_size) == 0
                 and 16 * (12 * L * C * C + 50304 * C) + 40 * b * T * L * C <= 0.8 * free), 1)


def measure_peak_flops(device, dtype, n=2048, seconds=0.5):
    """FLOP/s of a large square matmul in dtype on device: the honest ceiling for MFU here."""
    gen = torch.Generator(device=device).manual_seed(0)  # leave the global RNG alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def reuse_freed_memory():
    """
    Have glibc's malloc keep freed blocks of up to 32 MiB in the process for the next step instead of
    handing them back to the kernel. A CPU step frees and reallocates the same tens of MB every time
    (the head's chunk buffers, wte's gradient), and pages that were given back come back zeroed, one
    page fault per 4 KiB: on the 4-layer bench model that was ~180 MB of faults a step, and the step
    ran ~7% faster without them.
    Setting any threshold turns off glibc's self-tuning of both, so both are set. Returns whether
    they took; False (nothing changed) where the C library is not glibc.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # 32 MiB is the largest mmap threshold glibc accepts; 1 GiB of free heap before it trims
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 25)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def check_writable(folder, flag):
    """Makes folder and writes a probe file in it (root passes os.access, not a read-only mount or chattr +i)."""
    try:
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f".probe.{os.getpid()}"), "w").close()
        os.remove(os.path.join(folder, f".probe.{os.getpid()}"))
    except OSError as e:
        why = "it is a file" if os.path.isfile(folder) else e.strerror
        raise ConfigError(f"{flag}={folder}: cannot write there ({why}); choose a writable folder") from None


def append_log(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def fmt_count(x):
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"

# ----------------------------------------------------------------------------------------------
# Training


def resolve_resume(cfg, explicit):
    """The checkpoint to resume from, and the run config: the checkpoint's, with explicit flags on top."""
    path = cfg.resume if cfg.resume != "latest" else run_dir.latest_checkpoint(cfg.log_dir)
    if path is None:
        raise ConfigError(f"--resume: no checkpoint (ckpt_*.pt) in --log_dir={cfg.log_dir}; "
                          f"start without --resume or pass --resume=PATH")
    try:
        ckpt = load_checkpoint(path, ("model", "optimizer", "step", "config", "model_config", "loader", "rng",
                                      "log_pos"))
    except UnreadableCheckpoint as e:
        # a damaged file (truncated, say): name the newest older checkpoint of its line that loads
        m = run_dir.CKPT_RE.fullmatch(os.path.basename(path))
        step, tag = (int(m[1]), m[2] or "") if m else (math.inf, None)
        older = [p for s, _, p in reversed(run_dir.checkpoints(os.path.dirname(path) or ".", tag)) if s < step]
        intact = next((p for p in older if _loads(p)), None)
        raise ConfigError(f"{e}; " + (f"the newest intact one before it is {intact}: resume with --resume={intact}"
                                      if intact else "no older intact checkpoint is there")) from None
    if first_nonfinite(ckpt["model"]):  # only an older version wrote such files
        raise ConfigError(f"--resume={path}: weight {first_nonfinite(ckpt['model'])} is NaN or inf; "
                          f"resume from an older checkpoint with --resume=PATH")
    # stop_step, start_over and verify_shards belong to one invocation (one job of a split run), not to the run
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"stop_step", "start_over", "verify_shards"}
    values = {k: v for k, v in ckpt["config"].items() if k in known}
    values.update(explicit)
    values["resume"] = path
    return ckpt, TrainConfig(**values)


def _loads(path):
    try:
        return load_checkpoint(path) is not None
    except ConfigError:
        return False


def train(cfg, explicit=None):
    """Runs (or resumes) one training run; returns a summary dict. Called by main() on every rank."""
    ckpt = None
    if cfg.resume:
        ckpt, cfg = resolve_resume(cfg, explicit if explicit is not None else {})
    validate_config(cfg)
    d = setup_distributed(cfg.device, cfg.backend, cfg.dist_timeout)
    print0 = print if d.master else (lambda *a, **k: None)
    B, T = cfg.batch_size or auto_batch_size(cfg, d), cfg.block_size
    if cfg.total_batch_size % (B * T * d.world_size) != 0:
        raise ConfigError(f"--total_batch_size={cfg.total_batch_size} is not a multiple of --batch_size * "
                          f"--block_size * world size = {B}*{T}*{d.world_size}; make it a multiple of "
                          f"{B * T * d.world_size}")
    grad_accum = cfg.total_batch_size // (B * T * d.world_size)
    # rank 0 locks log_dir (a second trainer there is refused) and picks this run's checkpoint names
    run = run_dir.RunDir(cfg.log_dir, ckpt, cfg.resume or None, cfg.start_over) if d.master else None

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
    if d.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~8x fp32 on A100/H100
        torch.backends.cudnn.allow_tf32 = True
    elif d.device_type == "cpu":
        reuse_freed_memory()  # the step's freed buffers stay for the next step, no page faults
        # compiled CPU kernels add the embeddings' gradients with atomics, in an order that varies from
        # run to run; in deterministic mode inductor uses the ordered kernel, and a CPU run repeats bitwise
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN-filling of new tensors
    autocast = (torch.autocast(device_type=d.device_type, dtype=torch.bfloat16)
                if cfg.dtype == "bfloat16" else nullcontext())

    loader, val_sources = build_data(cfg, B, T, d.rank, d.world_size)  # bad --data fails before the model

    # model: raw_model holds the weights; model is what training calls (compiled, DDP-wrapped)
    if ckpt is None and cfg.init_from != "scratch":
        raw_model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
    else:  # a checkpoint holds every weight: an --init_from source is never read again
        wanted = GPTConfig(block_size=T, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                           dropout=cfg.dropout)
        if ckpt is not None and cfg.init_from == "scratch":
            check_model_config(ckpt["model_config"], dataclasses.asdict(wanted), cfg.resume)
        raw_model = GPT(GPTConfig(**ckpt["model_config"]) if ckpt is not None else wanted)
    if T > raw_model.config.block_size:
        raise ConfigError(f"--block_size={T} exceeds {cfg.resume or cfg.init_from}'s {raw_model.config.block_size}; "
                          f"pass --block_size={raw_model.config.block_size} or less")
    model_config = dataclasses.asdict(raw_model.config)
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
    raw_model.to(d.device)
    compiled = torch.compile(raw_model) if (cfg.compile if cfg.compile is not None else d.device_type == "cuda") \
        else raw_model
    model = compiled
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(compiled, device_ids=[d.local_rank] if d.device_type == "cuda" else None)
    # Newton-Schulz in bf16 if the run is (not MPS); compiled with the model, on CUDA only: on a CPU a
    # ~16 s compile saves ~15% of it, 5 ms a step of the shakespeare preset
    muon = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay,
                ns_dtype=getattr(torch, cfg.dtype) if d.device_type != "mps" else torch.float32,
                compile=compiled is not raw_model and d.device_type == "cuda")
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps,
                                               d.device_type, zero1=cfg.zero1 and d.world_size > 1,
                                               muon=muon if cfg.optimizer == "muon" else None)

    log_path = os.path.join(cfg.log_dir, "log.txt")
    start_step, val_loss = 0, None
    if ckpt is not None:
        if ckpt["config"]["total_batch_size"] != cfg.total_batch_size:
            raise ConfigError(f"--total_batch_size={cfg.total_batch_size} differs from the checkpoint's "
                              f"{ckpt['config']['total_batch_size']}: the LR schedule and data position are "
                              f"counted in its steps; keep it (--batch_size and GPU count may change)")
        if ckpt["config"].get("optimizer", "adamw") != cfg.optimizer:
            raise ConfigError(f"--optimizer={cfg.optimizer} differs from the checkpoint's; resume with its own")
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        start_step, val_loss = ckpt["step"], ckpt["val_loss"]
    if d.master:
        run.begin()

    hellaswag_items = None
    if cfg.hellaswag:
        import hellaswag
        if d.world_size > 1 and not d.master:
            dist.barrier()  # rank 0 downloads the file first, the others then read it
        try:
            hellaswag_items = hellaswag.load_items(cfg.hellaswag_path or None)
        except hellaswag.HellaSwagError as e:
            raise ConfigError(f"--hellaswag_path: {e}") from None
        if d.world_size > 1 and d.master:
            dist.barrier()

    flops_per_step = raw_model.flops_per_token() * cfg.total_batch_size
    peak = measure_peak_flops(d.device, torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
    print0(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    print0(f"model: {raw_model.num_params() / 1e6:.2f}M params | device {d.device} x {d.world_size} | "
           f"grad accum {grad_accum} | micro-batch {B}{'' if cfg.batch_size else ' (auto)'} | "
           f"{cfg.total_batch_size} tokens/step | measured peak "
           f"{peak / 1e12:.2f} TFLOP/s per device" + (f" | resuming at step {start_step}" if ckpt else ""))
    if cfg.warmup_steps >= cfg.max_steps:
        print0(f"warning: --warmup_steps={cfg.warmup_steps} >= --max_steps={cfg.max_steps}: the LR never leaves its "
               f"warmup (it ends at {get_lr(cfg.max_steps - 1, cfg):.1e}, not {cfg.max_lr:.1e}); lower --warmup_steps")
    if ckpt is not None and ckpt["config"]["max_steps"] != cfg.max_steps:
        was = dataclasses.replace(cfg, max_steps=ckpt["config"]["max_steps"])
        print0(f"warning: --max_steps={cfg.max_steps} differs from the checkpoint's {was.max_steps}: the cosine LR "
               f"schedule is redrawn over the new length (step {start_step}: lr {get_lr(start_step, cfg):.1e}, "
               f"{get_lr(start_step, was):.1e} in the original schedule)")

    # preemption and Ctrl-C: finish the step, checkpoint, exit; a second signal kills at once
    stop = {"signal": 0}

    def on_signal(signum, frame):
        stop["signal"] = signum
        signal.signal(signum, signal.SIG_DFL)
    if d.master or d.world_size > 1:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, on_signal)

    def nonfinite_error(step, what):
        good = (run.latest or "none") if run else "(see rank 0)"
        return FloatingPointError(f"step {step}: {what}; last good checkpoint: {good} -- resume from it with "
                                  f"--resume and a lower --max_lr, or start again with one")

    def checkpoint(step):
        if cfg.zero1 and d.world_size > 1:
            optimizer.consolidate_state_dict(to=0)  # collective: every rank takes part
        bad = first_nonfinite(raw_model.state_dict())  # the same on every rank, so all stop together
        if bad:
            raise nonfinite_error(step, f"weight {bad} is NaN or inf, so no checkpoint is written")
        if not d.master:
            return
        state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "config": dataclasses.asdict(cfg), "model_config": model_config, "val_loss": val_loss,
                 "loader": loader.state_dict(), "rng": rng_state(), "run": run.run, "tag": run.tag,
                 "log_pos": os.path.getsize(log_path) if os.path.exists(log_path) else 0}
        bad = first_nonfinite(state["optimizer"])  # AdamW's dict, or Muon's and AdamW's in a list
        if bad:
            raise nonfinite_error(step, f"optimizer state {bad} is NaN or inf, so no checkpoint is written")
        save_checkpoint(run.path(step), state)
        run.saved(run.path(step), cfg.keep_checkpoints)
        print0(f"checkpoint: {run.path(step)}")

    step_times, step = [], start_step
    for step in range(start_step, cfg.max_steps):
        last_step = step == cfg.max_steps - 1
        if cfg.eval_interval > 0 and (step % cfg.eval_interval == 0 or last_step):
            val_loss = evaluate_loss(compiled, val_sources, B, T, cfg.val_tokens, d, autocast)
            print0(f"step {step} | val loss {val_loss:.4f}")
            if d.master:
                append_log(log_path, f"{step} val {val_loss:.4f}")
            if hellaswag_items is not None:
                import hellaswag
                counts = hellaswag.evaluate_counts(raw_model, hellaswag_items, d.device, d.rank, d.world_size,
                                                   autocast=autocast, batch_size=max(1, B // 4))
                acc_norm = counts["correct_norm"] / max(1, counts["total"])
                print0(f"step {step} | hellaswag acc_norm {acc_norm:.4f} ({counts['correct_norm']}/{counts['total']})")
                if d.master:
                    append_log(log_path, f"{step} hella {acc_norm:.4f}")
            if d.master and cfg.num_samples > 0:
                with autocast:
                    for text in sample_texts(raw_model, cfg.sample_prompt, cfg.num_samples, cfg.sample_tokens,
                                             d.device, seed=cfg.seed + step):
                        print(f"sample: {text!r}")

        # one optimizer step over grad_accum micro-batches
        t0 = time.perf_counter()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=d.device)
        for micro_step in range(grad_accum):
            x, y = loader.next_batch()
            if d.device_type == "cuda":  # page-locked, so the copies are truly async: no host sync in this loop
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            # sync gradients across ranks only on the last micro-step; no_sync() must cover the
            # forward too, since DDP arms its reducer there
            sync = d.world_size == 1 or micro_step == grad_accum - 1
            with (nullcontext() if sync else model.no_sync()):
                with autocast, (attention_kernels() if cfg.cudnn_attention else nullcontext()):
                    _, loss = model(x, y)
                # the mean over the whole batch is the mean of micro-batch means / grad_accum
                loss = loss / grad_accum
                loss_accum += loss.detach()
                loss.backward()
        if d.world_size > 1:
            dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)  # gloo has no AVG
            loss_accum /= d.world_size
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:  # Muon's groups: the same schedule, from --muon_lr
            group["lr"] = lr * cfg.muon_lr / cfg.max_lr if group.get("muon") else lr
        loss_val, norm_val = loss_accum.item(), norm.item()  # same on every rank: all-reduced
        if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
            what = f"non-finite loss {loss_val} / grad norm {norm_val}"
            bad = first_nonfinite(raw_model.state_dict())
            if bad:  # skipping cannot help: the weights themselves are gone
                raise nonfinite_error(step, f"{what}: weight {bad} is NaN or inf")
            if not cfg.skip_nonfinite:
                raise nonfinite_error(step, what + " (--skip_nonfinite=true skips such steps)")
            print0(f"step {step}: {what} -- step skipped (--skip_nonfinite)")
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
        if d.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step_times.append(dt)
        tok_per_s = cfg.total_batch_size / dt
        mfu = flops_per_step / dt / (peak * d.world_size)
        print0(f"step {step}/{cfg.max_steps} | loss {loss_val:.4f} | lr {lr:.1e} | norm {norm_val:.2f} | "
               f"dt {dt * 1000:.0f}ms | tok/s {fmt_count(tok_per_s)} | mfu {mfu * 100:.0f}%")
        if d.master:
            append_log(log_path, f"{step} train {loss_val:.6f}")

        # all ranks agree on stopping: a signal seen by any rank stops them all after this step
        flag = torch.tensor([stop["signal"]], device=d.device)
        if d.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopping = bool(flag.item()) or (cfg.stop_step > 0 and step + 1 >= cfg.stop_step)
        if stopping or last_step or (cfg.checkpoint_interval > 0 and (step + 1) % cfg.checkpoint_interval == 0):
            checkpoint(step + 1)
        if stopping:
            print0(f"stopped after step {step + 1}" + (f" on signal {int(flag.item())}" if flag.item() else "")
                   + "; continue with --resume")
            break

    timed = step_times[1:] or step_times  # the first step pays for compile and warm-up
    # step: the last one run, numbered from 0 as in log.txt (ckpt_{N} and "resuming at step N" count steps done)
    summary = {"step": step, "val_loss": val_loss, "mean_step_ms": 1000 * sum(timed) / max(1, len(timed))}
    if d.device_type == "cuda":
        summary["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print0("done: " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    if d.world_size > 1:
        # leave together: a rank that tears gloo down while rank 0 still writes the checkpoint
        # can abort ("terminate called without an active exception") and fail the whole job
        dist.barrier()
        dist.destroy_process_group()
    if run:
        run.close()
    return summary


def main(argv):
    if "-h" in argv or "--help" in argv:
        # each flag's description is the comment beside its field in TrainConfig
        notes = dict(re.findall(r"^ +(\w+): [^=\n]+=[^#\n]*# *(.*)$", inspect.getsource(TrainConfig), re.M))
        print(__doc__.rstrip() + "\n\nflags (default, description):")
        for f in dataclasses.fields(TrainConfig):
            print(f"  {f'--{f.name}={f.default}':<28} {notes.get(f.name, '')}")
        print(f"presets: {', '.join(PRESETS)}")
        return 0
    try:
        cfg = parse_args(argv)
        explicit = {k: v for k, v in dataclasses.asdict(cfg).items()
                    if any(a.startswith(f"--{k}=") or a == f"--{k}" for a in argv)
                    or (cfg.preset and k in PRESETS[cfg.preset])}
        train(cfg, explicit)
    except (ConfigError, run_dir.RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
