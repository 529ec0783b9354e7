"""
Train GPT-2 (124M) from scratch, in one file.

    python train_gpt2.py --preset=shakespeare                  # a small GPT on tiny shakespeare, on a CPU
    python fineweb.py                                          # FineWeb-Edu 10B -> edu_fineweb10B/
    torchrun --standalone --nproc_per_node=8 train_gpt2.py     # the GPT-2 124M reproduction, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --resume   # continue from the newest checkpoint

Every field of TrainConfig below is a flag, --name=value or --name value (--help lists them).
Importing this file runs nothing: `from train_gpt2 import GPT, GPTConfig`.
"""

import dataclasses
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

import flags
import run_dir
from chunked_loss import chunked_cross_entropy  # the head and its loss, with no full logits
from device import DistInfo, auto_batch_size, measure_peak_flops, set_numerics, setup_distributed
from flags import ConfigError
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
    batch_size: int = 0  # sequences per micro-batch per rank (B); 0: auto, 64 or what the GPU fits
    total_batch_size: int = 524_288  # tokens per optimizer step, 2**19 ~ 0.5M as in GPT-3 Small
    dropout: float = 0.0  # on embeddings, attention weights and residual branches (HF GPT-2's places)
    # optimizer and schedule (GPT-3 paper, table 2.1 and appendix B)
    optimizer: str = "adamw"  # adamw, or muon: Muon for the blocks' matrices, AdamW (max_lr) for the rest
    muon_lr: float = 0.0018  # Muon's peak LR (update RMS 0.2 * lr), on max_lr's schedule
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_weight_decay: float = 0.1  # Muon's decoupled decay: p *= 1 - lr * wd a step (Moonlight's 0.1)
    max_lr: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # the schedule ends at max_lr * min_lr_ratio
    lr_schedule: str = "cosine"  # cosine, or wsd: warmup, constant, then linear decay (Hu et al. 2024)
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays linearly
    warmup_steps: int = 715  # steps of linear LR warmup: 375M tokens / 2**19 tokens per step
    max_steps: int = 19_073  # steps in all: 10B tokens / 2**19 per step = one epoch of FineWeb-Edu 10B
    weight_decay: float = 0.1  # AdamW, on 2-D tensors (matmuls, embeddings) only
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    eps: float = 1e-8  # AdamW
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    # evaluation, sampling, logging, checkpoints
    eval_interval: int = 250  # steps between val loss / HellaSwag / samples
    hellaswag: bool = False  # HellaSwag acc_norm at each eval (needs hellaswag.py and its data)
    hellaswag_path: str = ""  # local hellaswag_val.jsonl; empty downloads it
    eval_only: bool = False  # score --resume's or --init_from's weights (val, --hellaswag), log them, exit
    num_samples: int = 4  # samples printed at each eval
    sample_tokens: int = 32  # tokens per sample
    sample_prompt: str = "Hello, I'm a language model,"  # the samples continue this text
    log_dir: str = "log"  # log.txt, metrics.jsonl, config.json and checkpoints go here
    wandb_project: str = ""  # also log to this Weights & Biases project (nanoGPT's wandb_project, wandb_log)
    wandb_run_name: str = ""  # the W&B run's name; empty: wandb picks one
    checkpoint_interval: int = 5000  # steps between checkpoints; one is always written at the end
    keep_checkpoints: int = 3  # newest checkpoints kept in log_dir; 0 keeps all
    resume: str = ""  # "--resume" alone: newest checkpoint of the run in log_dir; or a checkpoint path
    start_over: bool = False  # a fresh run in a log_dir holding checkpoints moves them into log_dir/old_N/
    # system
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    backend: str = "auto"  # torch.distributed backend: auto (nccl on cuda, gloo otherwise), nccl, gloo
    dist_timeout: int = 600  # seconds a rank waits for the others in a collective before the job fails
    dtype: str = "bfloat16"  # autocast dtype: bfloat16 or float32 (no autocast)
    compile: typing.Optional[bool] = None  # torch.compile; unset: on for cuda only
    zero1: bool = False  # shard optimizer state across ranks (ZeroRedundancyOptimizer)
    skip_nonfinite: bool = False  # skip a step with a NaN/inf loss or grad norm instead of stopping
    stop_step: int = 0  # checkpoint and stop once this many steps are done (after step N-1; a run in jobs)
    verify_shards: bool = False  # check every shard's sha256 against fineweb.py's manifest.json at start-up
    seed: int = 1337  # seeds the weights, the data order (--shuffle) and the samples


SMALL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, total_batch_size=4096,
             max_lr=4e-3, warmup_steps=20, max_steps=300, eval_interval=50, optimizer="muon", muon_lr=0.02,
             lr_schedule="wsd", decay_fraction=0.3, min_lr_ratio=0.0, checkpoint_interval=100, num_samples=2,
             sample_tokens=48, compile=True)  # compiled on a CPU too: faster steps after a ~30 s compile
PRESETS = {  # a preset is only a dict of flag values; explicit flags still override it
    # a 4-layer GPT on tiny shakespeare that trains on a 2-core CPU in a few minutes (docs/muon.md)
    "shakespeare": dict(SMALL, data="input.txt", muon_weight_decay=0.0, sample_prompt="ROMEO:"),
    # the same on your own fineweb.py shards (--data=FOLDER): 20 warmup steps, not 715; 64k val tokens
    "tiny-shards": dict(SMALL, val_tokens=65_536),
    # 124M, Muon + WSD at modded-nanogpt's Oct 2024 Muon record settings, 2B tokens (docs/muon.md)
    "gpt2-fast": dict(optimizer="muon", max_lr=0.0036, weight_decay=0.0, muon_weight_decay=0.0,
                      warmup_steps=0, lr_schedule="wsd", decay_fraction=0.28, min_lr_ratio=0.0,
                      max_steps=3814, hellaswag=True),
}


def parse_args(argv):
    """A TrainConfig: the defaults, then --preset's values, then the flags given (flags.py)."""
    given = flags.parse_flags(TrainConfig, argv, bare={"resume": "latest"})
    if given.get("preset") and given["preset"] not in PRESETS:
        raise ConfigError(f"--preset={given['preset']}: unknown preset; choose from {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS.get(given.get("preset") or "", {}), **given})


def validate_config(cfg):
    """Every flag checked before anything is built or read; numbers finite and > 0 (these) or >= 0."""
    positive = {"n_layer", "n_head", "n_embd", "block_size", "total_batch_size", "max_steps",
                "val_tokens", "max_lr", "dist_timeout"}
    for name, typ in typing.get_type_hints(TrainConfig).items():
        v = getattr(cfg, name)  # a resumed checkpoint's config is typed by nothing but this check
        ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(typ, (bool, type(None)))
        if not isinstance(v, ok) or (isinstance(v, bool) and typ in (int, float)) or "\0" in str(v):
            raise ConfigError(f"--{name}={v!r:.80}: expected a {getattr(typ, '__name__', 'bool')} value")
        if typ in (int, float) and not (math.isfinite(v) and (v > 0 if name in positive else v >= 0)):
            raise ConfigError(f"--{name}={v}: must be a finite number {'>' if name in positive else '>='} 0")
    if cfg.min_lr_ratio > 1 or max(cfg.beta1, cfg.beta2) >= 1:
        raise ConfigError(f"--min_lr_ratio={cfg.min_lr_ratio} must be <= 1, --beta1/--beta2 < 1")
    if cfg.muon_momentum >= 1:  # 1 freezes the momentum buffer at 0, and so every update
        raise ConfigError(f"--muon_momentum={cfg.muon_momentum}: must be in [0, 1), e.g. 0.95")
    if cfg.seed >= 2**32:
        raise ConfigError(f"--seed={cfg.seed}: must be below 2**32, numpy's seed range")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd={cfg.n_embd} is not a multiple of --n_head={cfg.n_head}; change one")
    for name, choices in (("dtype", ("bfloat16", "float32")), ("optimizer", ("adamw", "muon")),
                          ("lr_schedule", ("cosine", "wsd")), ("backend", ("auto", "gloo", "nccl"))):
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"--{name}={getattr(cfg, name)}: expected {' or '.join(choices)}")
    if not (cfg.dropout < 1 and cfg.decay_fraction <= 1):
        raise ConfigError("--dropout must be in [0, 1) and --decay_fraction in [0, 1]")
    if cfg.optimizer == "muon" and cfg.zero1:
        raise ConfigError("--zero1 shards AdamW's state only; drop it with --optimizer=muon")
    openai = re.fullmatch(r"(openai-community/)?gpt2(-medium|-large|-xl)?", cfg.init_from)
    if openai and cfg.block_size > 1024:
        raise ConfigError(f"--block_size={cfg.block_size} exceeds {cfg.init_from}'s 1024; "
                          f"pass --block_size=1024")
    if cfg.num_samples and not cfg.sample_prompt:
        raise ConfigError("--sample_prompt is empty: give samples a prompt, or pass --num_samples=0")
    if cfg.data.endswith(".npy"):
        raise ConfigError(f"--data={cfg.data} is one shard; pass its folder: "
                          f"--data={os.path.dirname(cfg.data) or '.'}")
    if cfg.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--backend=nccl needs CUDA GPUs, and none is available here; use --backend=gloo")
    run_dir.check_writable(cfg.log_dir, "--log_dir")
    if not cfg.resume and not cfg.eval_only:  # resolve_resume checks a resumed run's folder
        run_dir.check_folder(cfg.log_dir, start_over=cfg.start_over)


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
    dropout: float = 0.0  # training only: embeddings, attention weights, residual branches (as HF GPT-2)

    @property
    def padded_vocab_size(self):
        # 50304 = 2**7 * 393 tiles evenly on GPUs; the padded rows are never predicted or sampled
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


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
        mask = None  # no cache: causal over this chunk alone
        if cache is not None:  # sampling (sample.py): the keys so far, and which each query sees (None: all)
            k, v, mask = cache.update(self.layer_idx, k, v)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cache is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # the textbook version, kept for the speed ladder in bench.py
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if cache is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = F.dropout(F.softmax(att, dim=-1), self.dropout, self.training) @ v
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
            # training and evaluation need only the loss: in chunks, no full logits (chunked_loss.py)
            return None, chunked_cross_entropy(x, self.lm_head.weight, targets, self.config.vocab_size)
        # the padded vocab rows make the matmul fast; sliced off, no padded id is ever predicted or sampled
        logits = self.lm_head(x)[..., :self.config.vocab_size]
        return logits, None

    def hidden_states(self, idx, cache=None):
        """The final LayerNorm's output (B, T, C): what the head reads (HellaSwag heads only a few rows)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        # with a cache (sample.py), positions start at cache.pos: an int, or a device tensor when compiled
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
            why = str(e).strip().splitlines()[0]
            raise ConfigError(f"{name_or_path}: could not load it ({why})") from None
        c = hf.config
        standard = c.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        if c.scale_attn_by_inverse_layer_idx or not standard:
            raise ConfigError(f"{name_or_path}: only standard GPT-2 checkpoints load (tanh GELU, plain attn)")
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                              n_head=c.n_head, n_embd=c.n_embd, dropout=dropout))
        model.load_hf_state_dict(hf.state_dict())
        return model

    @torch.no_grad()
    def load_hf_state_dict(self, hf_sd):
        """Hugging Face GPT-2 weights into ours; the padded vocab rows are zeros."""
        for key, t in self.state_dict().items():
            src = hf_sd[key].t() if key.endswith(self._TRANSPOSED) else hf_sd[key]
            t.zero_()[:src.size(0)].copy_(src)  # wte and lm_head: the padded rows past HF's vocab stay 0

    def hf_state_dict(self):
        """Our weights under Hugging Face GPT-2 names and layouts, padded vocab rows removed."""
        out = {}
        for key, t in self.state_dict().items():
            t = t.t() if key.endswith(self._TRANSPOSED) else t[:self.config.vocab_size] if key in (
                "transformer.wte.weight", "lm_head.weight") else t
            out[key] = t.detach().contiguous().clone()
        return out

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type, zero1=False,
                             muon=None):
        """AdamW; with muon (Muon's keyword arguments) the blocks' matrices go to Muon, the rest to AdamW."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        def to_muon(n, p):
            return muon is not None and n.startswith("transformer.h.") and p.dim() == 2
        # decay matmul weights and embeddings (2-D); never biases or LayerNorm gains (1-D)
        decay = [p for n, p in named if p.dim() >= 2 and not to_muon(n, p)]
        no_decay = [p for n, p in named if p.dim() < 2]
        # fused AdamW: one kernel for all parameters instead of a loop of small ones
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        kwargs = dict(lr=learning_rate, betas=betas, eps=eps, fused=fused)
        if zero1:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            adamw = ZeroRedundancyOptimizer(decay, optimizer_class=torch.optim.AdamW,
                                            weight_decay=weight_decay, **kwargs)
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
        c = self.config
        L, H, Q, T = c.n_layer, c.n_head, c.n_embd // c.n_head, c.block_size
        return 6 * self.num_params() + 12 * L * H * Q * T

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
        """idx (B, T) + max_new_tokens, each recomputing the last block_size tokens: samples training prints
        (sample.py: the fast KV-cache engine, same draws). temperature 0: greedy; else top-k (0: all)."""
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            x = self.hidden_states(idx[:, -self.config.block_size:])[:, -1]  # the head at the last position
            logits = self.lm_head(x)[:, :self.config.vocab_size].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                # argmax(probs / noise), noise ~ Exp(1), draws i with probability probs[i] (exponential race)
                noise = torch.empty_like(logits).exponential_(generator=generator).clamp_(min=1e-30)
                nxt = (F.softmax(logits, dim=-1) / noise).argmax(dim=-1)
            idx = torch.cat((idx, nxt[:, None]), dim=1)
        self.train(was_training)
        return idx


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
        raise ConfigError(f"--data={path}: not UTF-8 ({e.reason} at byte {e.start}); convert it") from None
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
        ends = np.cumsum(np.diff(bounds)[perm])
        i = int(np.searchsorted(ends, offset, side="right"))
        pieces, skip = [], offset - (ends[i - 1] if i > 0 else 0)
        while n > 0:
            d = perm[i]
            pieces.append(np.asarray(self.arr[bounds[d] + skip:min(bounds[d + 1], bounds[d] + skip + n)]))
            n -= len(pieces[-1])
            i, skip = i + 1, 0
        return np.concatenate(pieces)


class DataLoaderLite:
    """(B, T) inputs and targets from a list of sources read as one endless stream, epoch after epoch. Rank
    r of W takes the r-th B*T window of every W: ranks are disjoint and together cover the stream. The
    position is global (in tokens), so it does not depend on W."""

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
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(len(self.sources)).tolist()
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
                epoch, slot = divmod(epoch * len(self.sources) + slot + 1, len(self.sources))
                offset = 0
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
        n = len(self.sources)
        if state.get("sources", n) != n or state["source"] >= n:
            raise ConfigError(f"the checkpoint read {state.get('sources', 'more')} train shards/files, "
                              f"--data now "
                              f"has {len(self.sources)}; resume with the --data it was trained on")
        if state["shuffle"] != self.shuffle or state["seed"] != self.seed:
            raise ConfigError(f"--shuffle/--seed differ from the checkpoint's ({state['shuffle']}, "
                              f"{state['seed']}): resume with the same ones to continue the same data order")
        size = len(self.sources[self._order(state["epoch"])[state["source"]]])
        if state["offset"] >= size:
            raise ConfigError(f"the checkpoint's data position (token {state['offset']} of train source "
                              f"{state['source']}) is past the end of that source in --data ({size} tokens); "
                              f"resume with the --data it was trained on")
        self.epoch, self.source, self.offset = state["epoch"], state["source"], state["offset"]


def val_windows(sources, B, T, val_tokens):
    """How many B*T windows the validation stream gives, capped at val_tokens."""
    total = sum(len(s) for s in sources)
    n = min(val_tokens, total - 1) // (B * T)
    if n == 0:  # a larger --val_tokens cannot help a split shorter than one batch
        short, fix = ((f"--val_tokens={val_tokens}", "raise --val_tokens") if val_tokens < total - 1 else
                      (f"the val split ({total} tokens)", "lower --batch_size or --block_size"))
        raise ConfigError(f"{short} is smaller than one batch of --batch_size*--block_size={B * T} tokens; "
                          f"{fix}")
    return n


def build_data(cfg, B, T, rank, world_size):
    """(train loader, val sources) for --data: a text file or a fineweb.py shard folder."""
    if os.path.isdir(cfg.data) or not os.path.splitext(cfg.data)[1]:
        import fineweb  # the shard format's owner: it writes, finds and checks them
        paths = fineweb.find_shards(cfg.data)
        # each shard's header and size, and the manifest, now; its ids (a full read) when it is first read
        train, val = ([Source(lambda p=p: fineweb.load_shard(p), len(fineweb.load_shard(p, ids=False)))
                       for p in ps] for ps in paths)
        names = [os.path.basename(p) for p in sum(paths, [])]
        fineweb.verify_shards(cfg.data, names, cfg.verify_shards, ConfigError)
    else:
        tr, va = load_text_tokens(cfg.data)
        train, val = [Source(lambda: tr)], [Source(lambda: va)]
    if sum(len(s) for s in train) <= B * T:
        raise ConfigError(f"--data={cfg.data}: its train split is smaller than one batch of "
                          f"--batch_size*--block_size"
                          f"={B * T} tokens; lower --batch_size or --block_size, or add data")
    if cfg.eval_interval > 0:
        val_windows(val, B, T, cfg.val_tokens)  # now, not at the first eval
    loader = DataLoaderLite(train, B, T, rank, world_size, shuffle=cfg.shuffle, seed=cfg.seed)
    return loader, val

# ----------------------------------------------------------------------------------------------
# Evaluation and sampling


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


def sample_texts(model, prompt, num_samples, max_new_tokens, device, seed=42):
    """num_samples continuations of prompt by GPT.generate, top-k 50, seeded: the samples training prints."""
    enc = get_tokenizer()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})  # a prompt may mark a document boundary
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, top_k=50, generator=gen)
    return [enc.decode(row.tolist()) for row in out]


def model_from_checkpoint(path, device="cpu"):
    """A GPT with the weights of one of our checkpoints (for sampling, eval, export)."""
    ckpt = run_dir.load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device)

# ----------------------------------------------------------------------------------------------
# Training


def fmt_count(x):
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def print0(*args, **kwargs):  # print on rank 0 only (torchrun's RANK; a single process is rank 0)
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


@dataclass
class Run:
    """What the steps of the loop share: the config, the machine, the model's three handles, the data."""
    cfg: TrainConfig
    d: DistInfo
    B: int  # sequences per micro-batch
    T: int  # tokens per sequence
    grad_accum: int  # micro-batches per optimizer step and rank
    autocast: typing.Any
    raw_model: typing.Any = None  # the weights: checkpoints, samples and HellaSwag read this one
    compiled: typing.Any = None  # raw_model compiled (or itself): evaluation calls this
    model: typing.Any = None  # compiled and, across ranks, DDP-wrapped: training calls this
    optimizer: typing.Any = None
    loader: typing.Any = None
    val_sources: list = None
    hellaswag_items: list = None
    folder: typing.Any = None  # run_dir.RunDir on rank 0, None on the others
    log: typing.Any = None  # run_dir.Log: log.txt, metrics.jsonl, W&B (writes on rank 0 only)


def resolve_resume(cfg, explicit):
    """The checkpoint to resume from, and the run config: the checkpoint's, with explicit flags on top."""
    path, ckpt = run_dir.load_resume_checkpoint(cfg.log_dir, cfg.resume)
    # stop_step, start_over and verify_shards belong to one invocation (a job of a split run), not the run
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"stop_step", "start_over", "verify_shards"}
    values = {k: v for k, v in ckpt["config"].items() if k in known}
    cfg = TrainConfig(**{**values, **explicit, "resume": path})
    validate_config(cfg)  # the checkpoint's values too, before they name a folder
    if not cfg.eval_only:  # on every rank, before anything is built
        run_dir.check_folder(cfg.log_dir, ckpt, path, cfg.start_over)
    return ckpt, cfg


def set_up(cfg):
    """The machine, the batch layout, the seeds and numerics: a Run with nothing built yet."""
    d = setup_distributed(cfg.device, cfg.backend, cfg.dist_timeout)
    B, T = cfg.batch_size or auto_batch_size(cfg, d), cfg.block_size
    if cfg.total_batch_size % (B * T * d.world_size) != 0:
        raise ConfigError(f"--total_batch_size={cfg.total_batch_size} is not a multiple of --batch_size * "
                          f"--block_size * world size = {B}*{T}*{d.world_size}; make it a multiple of "
                          f"{B * T * d.world_size}")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
    set_numerics(d.device_type)  # TF32 on CUDA; on a CPU, malloc that keeps freed memory, repeatable kernels
    autocast = (torch.autocast(device_type=d.device_type, dtype=torch.bfloat16)
                if cfg.dtype == "bfloat16" else nullcontext())
    return Run(cfg, d, B, T, cfg.total_batch_size // (B * T * d.world_size), autocast)


def build_model(r, ckpt):
    """raw_model from scratch, a pretrained model or a checkpoint; then compiled and DDP-wrapped."""
    cfg, d = r.cfg, r.d
    if ckpt is None and cfg.init_from != "scratch":
        raw_model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
    else:  # a checkpoint holds every weight: an --init_from source is never read again
        wanted = GPTConfig(block_size=r.T, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                           dropout=cfg.dropout)
        if ckpt is not None and cfg.init_from == "scratch":
            run_dir.check_model_config(ckpt["model_config"], dataclasses.asdict(wanted), cfg.resume)
        raw_model = GPT(GPTConfig(**ckpt["model_config"]) if ckpt is not None else wanted)
    if r.T > raw_model.config.block_size:
        n = raw_model.config.block_size
        raise ConfigError(f"--block_size={r.T} exceeds {cfg.resume or cfg.init_from}'s {n}; "
                          f"pass --block_size={n} or less")
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
    r.raw_model = raw_model.to(d.device)
    r.compiled = r.model = torch.compile(raw_model) if (
        cfg.compile if cfg.compile is not None else d.device_type == "cuda") else raw_model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # compile is lazy: the training graph is traced inside DDP's forward, where dynamo splits it at DDP's
        # buckets, so each bucket's all-reduce overlaps the rest of the backward (docs/performance.md)
        r.model = DDP(r.compiled, device_ids=[d.local_rank] if d.device_type == "cuda" else None)
    # Newton-Schulz in bf16 if the run is (not MPS); compiled with the model, on CUDA only (on a CPU its
    # compile does not pay back in a short run)
    muon = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay,
                ns_dtype=getattr(torch, cfg.dtype) if d.device_type != "mps" else torch.float32,
                compile=r.compiled is not raw_model and d.device_type == "cuda")
    r.optimizer = raw_model.configure_optimizers(
        cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps, d.device_type,
        zero1=cfg.zero1 and d.world_size > 1, muon=muon if cfg.optimizer == "muon" else None)


def restore(r, ckpt):
    """Optimizer, data position and RNG from a checkpoint this run may continue; (start step, val loss)."""
    if ckpt is None:
        return 0, None
    run_dir.check_compatible(ckpt, dataclasses.asdict(r.cfg))
    r.loader.load_state_dict(ckpt["loader"])
    try:
        r.optimizer.load_state_dict(ckpt["optimizer"])
        run_dir.set_rng_state(ckpt["rng"])
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"--resume={r.cfg.resume}: its optimizer or RNG state does not fit this run "
                          f"({why}); pass another checkpoint") from None
    return ckpt["step"], ckpt.get("val_loss")


def print_start(r, ckpt, start_step, peak):
    cfg = r.cfg
    print0(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    print0(f"model: {r.raw_model.num_params() / 1e6:.2f}M params | device {r.d.device} x {r.d.world_size} | "
           f"grad accum {r.grad_accum} | micro-batch {r.B}{'' if cfg.batch_size else ' (auto)'} | "
           f"{cfg.total_batch_size} tokens/step | measured peak {peak / 1e12:.2f} TFLOP/s per device"
           + (f" | {'evaluating' if cfg.eval_only else 'resuming'} at step {start_step}" if ckpt else ""))
    if cfg.warmup_steps >= cfg.max_steps:
        end = get_lr(cfg.max_steps - 1, cfg)
        print0(f"warning: --warmup_steps={cfg.warmup_steps} >= --max_steps={cfg.max_steps}: the LR never "
               f"leaves its warmup (it ends at {end:.1e}, not {cfg.max_lr:.1e}); lower --warmup_steps")
    if ckpt is not None and ckpt["config"]["max_steps"] != cfg.max_steps:
        was = dataclasses.replace(cfg, max_steps=ckpt["config"]["max_steps"])
        now, then = get_lr(start_step, cfg), get_lr(start_step, was)
        print0(f"warning: --max_steps={cfg.max_steps} differs from the checkpoint's {was.max_steps}: the LR "
               f"schedule is redrawn over the new length (step {start_step}: lr {now:.1e}, {then:.1e} in the "
               f"original one)")


class StopSignal:
    """Preemption, Ctrl-C: the step finishes, a checkpoint is written, the run exits; a second one kills."""

    signum = 0

    def __init__(self, install):
        for s in (signal.SIGTERM, signal.SIGINT) if install else ():
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)


def nonfinite_error(r, step, what):
    return run_dir.nonfinite_error(step, what, (r.folder.latest or "none") if r.folder else "(see rank 0)")


def evaluate(r, step):
    """Val loss (every rank), HellaSwag and samples at an eval step; returns the val loss."""
    cfg, d = r.cfg, r.d
    val_loss = evaluate_loss(r.compiled, r.val_sources, r.B, r.T, cfg.val_tokens, d, r.autocast)
    print0(f"step {step} | val loss {val_loss:.4f}")
    r.log.eval(step, "val", val_loss)
    if r.hellaswag_items is not None:
        import hellaswag
        c = hellaswag.evaluate_counts(r.raw_model, r.hellaswag_items, d.device, d.rank, d.world_size,
                                      autocast=r.autocast, batch_size=max(1, r.B // 4))
        print0(f"step {step} | hellaswag acc_norm {c['correct_norm'] / c['total']:.4f} "
               f"({c['correct_norm']}/{c['total']})")
        r.log.eval(step, "hella", c["correct_norm"] / c["total"], n=c["total"])
    if d.master and cfg.num_samples > 0:
        with r.autocast:
            for text in sample_texts(r.raw_model, cfg.sample_prompt, cfg.num_samples, cfg.sample_tokens,
                                     d.device, seed=cfg.seed + step):
                print(f"sample: {text!r}")
    return val_loss


def train_step(r, step):
    """Gradients of one optimizer step over grad_accum micro-batches, clipped; (mean loss, grad norm, lr)."""
    cfg, d, model = r.cfg, r.d, r.model
    model.train()
    r.optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=d.device)
    for micro_step in range(r.grad_accum):
        x, y = r.loader.next_batch()
        if d.device_type == "cuda":  # page-locked, so the copies are truly async: no host sync in this loop
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        # sync gradients across ranks only on the last micro-step; no_sync() must cover the
        # forward too, since DDP arms its reducer there
        sync = d.world_size == 1 or micro_step == r.grad_accum - 1
        with (nullcontext() if sync else model.no_sync()):
            with r.autocast:
                _, loss = model(x, y)
            # the mean over the whole batch is the mean of micro-batch means / grad_accum
            loss = loss / r.grad_accum
            loss_accum += loss.detach()
            loss.backward()
    if d.world_size > 1:
        dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)  # gloo has no AVG
        loss_accum /= d.world_size
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(r.raw_model.parameters(), clip)
    lr = get_lr(step, cfg)
    for group in r.optimizer.param_groups:  # Muon's groups: the same schedule, from --muon_lr
        group["lr"] = lr * cfg.muon_lr / cfg.max_lr if group.get("muon") else lr
    return loss_accum, norm, lr


def update(r, step, loss, norm, flag):
    """The optimizer step and the step's one host sync, (loss, grad norm, stop flag) as floats. The step is
    queued first, so the GPU never waits for the host to launch the optimizer; a NaN/inf then stops the run
    before any checkpoint. --skip_nonfinite reads first and steps only if all is finite."""
    skip = r.cfg.skip_nonfinite
    if not skip:
        r.optimizer.step()
    loss_val, norm_val, signum = torch.cat([loss.view(1), norm.view(1), flag]).tolist()  # same on every rank
    if math.isfinite(loss_val) and math.isfinite(norm_val):
        if skip:
            r.optimizer.step()
        return loss_val, norm_val, signum
    what = f"non-finite loss {loss_val} / grad norm {norm_val}"
    if not skip:
        raise nonfinite_error(r, step, what + " (--skip_nonfinite=true skips such steps)")
    bad = run_dir.first_nonfinite(r.raw_model.state_dict())
    if bad:  # skipping cannot help: the weights themselves are gone
        raise nonfinite_error(r, step, f"{what}: weight {bad} is NaN or inf")
    print0(f"step {step}: {what} -- step skipped (--skip_nonfinite)")
    r.optimizer.zero_grad(set_to_none=True)
    return loss_val, norm_val, signum


def checkpoint(r, steps_done, val_loss):
    """Every rank calls it (--zero1 gathers the state collectively); rank 0 writes it if it is all finite."""
    if r.cfg.zero1 and r.d.world_size > 1:
        r.optimizer.consolidate_state_dict(to=0)
    bad = run_dir.first_nonfinite(r.raw_model.state_dict())  # the same on every rank, so all stop together
    if bad:
        raise nonfinite_error(r, steps_done, f"weight {bad} is NaN or inf, so no checkpoint is written")
    if r.folder:
        path = r.folder.save({"model": r.raw_model.state_dict(), "optimizer": r.optimizer.state_dict(),
                              "step": steps_done, "config": dataclasses.asdict(r.cfg), "val_loss": val_loss,
                              "model_config": dataclasses.asdict(r.raw_model.config),
                              "loader": r.loader.state_dict()}, r.cfg.keep_checkpoints)
        print0(f"checkpoint: {path}")


def train(cfg, explicit=None):
    """Runs (or resumes) one training run; returns a summary dict. Called by main() on every rank."""
    # set up: everything that can refuse the command is checked before log_dir is touched
    ckpt = None
    if cfg.resume:
        ckpt, cfg = resolve_resume(cfg, explicit or {})
    if cfg.eval_only and ckpt is None and cfg.init_from == "scratch":
        raise ConfigError("--eval_only=true scores given weights: pass --resume=PATH or --init_from=NAME")
    validate_config(cfg)
    r = set_up(cfg)
    d = r.d
    r.loader, r.val_sources = build_data(cfg, r.B, r.T, d.rank, d.world_size)  # bad --data: before the model
    build_model(r, ckpt)
    start_step, val_loss = (ckpt["step"] if ckpt else 0, None) if cfg.eval_only else restore(r, ckpt)
    if ckpt is not None and not cfg.eval_only and start_step >= min(cfg.max_steps, cfg.stop_step or math.inf):
        n = start_step  # nothing to run, so nothing is written
        print0(f"{cfg.resume}: the run is complete at --max_steps={cfg.max_steps} ({n} steps done); to train "
               f"longer, pass --max_steps=N (N > {n}) with --resume" if n >= cfg.max_steps else
               f"{cfg.resume}: {n} steps are done, --stop_step={cfg.stop_step} asks for none; raise it")
        return {"step": n - 1, "val_loss": val_loss}
    if cfg.hellaswag:  # rank 0 downloads it first; a bad file stops every rank, with one line each
        import hellaswag
        r.hellaswag_items = hellaswag.load_items_on_ranks(cfg.hellaswag_path or None, d, run_dir.agree)
    if not cfg.eval_only:  # rank 0 locks log_dir, names this run's checkpoints, lines the log up
        r.folder = run_dir.open_run_dir(d.master, d.world_size, d.device, cfg.log_dir, ckpt,
                                        cfg.resume or None, cfg.start_over)
    flops_per_step = r.raw_model.flops_per_token() * cfg.total_batch_size
    peak = measure_peak_flops(d.device, torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
    print_start(r, ckpt, start_step, peak)
    r.log = run_dir.Log(cfg.log_dir, dataclasses.asdict(cfg), cfg.total_batch_size, d.master,
                        cfg.wandb_project, cfg.wandb_run_name, start=not cfg.eval_only)
    if cfg.eval_only:  # the weights scored and logged: no checkpoint written, no file moved
        return {"step": start_step, "val_loss": evaluate(r, start_step)}
    stop = StopSignal(install=d.master or d.world_size > 1)

    step_times, step = [], start_step
    scored = ckpt is not None and start_step == ckpt["config"]["max_steps"]  # its run's final eval: logged
    for step in range(start_step, cfg.max_steps):
        last_step = step == cfg.max_steps - 1
        if cfg.eval_interval > 0 and step % cfg.eval_interval == 0 and not (scored and step == start_step):
            val_loss = evaluate(r, step)
        t0 = time.perf_counter()  # one optimizer step
        loss_accum, norm, lr = train_step(r, step)
        # all ranks agree on stopping: a signal seen by any rank stops them all after this step
        flag = torch.full((1,), float(stop.signum), device=d.device)  # a fill kernel: no copy, no host sync
        if d.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        loss_val, norm_val, signum = update(r, step, loss_accum, norm, flag)  # the step's one host sync
        dt = time.perf_counter() - t0
        step_times.append(dt)
        mfu = flops_per_step / dt / (peak * d.world_size)
        print0(f"step {step}/{cfg.max_steps} | loss {loss_val:.4f} | lr {lr:.1e} | norm {norm_val:.2f} | "
               f"dt {dt * 1000:.0f}ms | tok/s {fmt_count(cfg.total_batch_size / dt)} | mfu {mfu * 100:.0f}%")
        r.log.train(step, loss_val, lr=lr, norm=norm_val, dt_ms=dt * 1000, tok_s=cfg.total_batch_size / dt)
        if last_step and cfg.eval_interval > 0:  # the weights the last checkpoint holds, after the last step
            val_loss = evaluate(r, step + 1)
        # checkpoint
        stopping = bool(signum) or (cfg.stop_step > 0 and step + 1 >= cfg.stop_step)
        due = cfg.checkpoint_interval > 0 and (step + 1) % cfg.checkpoint_interval == 0
        if stopping or last_step or due:
            checkpoint(r, step + 1, val_loss)
        if stopping:
            print0(f"stopped after step {step} ({step + 1} steps done)"
                   + (f" on signal {int(signum)}" if signum else "") + "; continue with --resume")
            break

    # finish
    timed = step_times[1:] or step_times  # the first step pays for compile and warm-up
    # step: the last one run, numbered from 0 as in log.txt (ckpt_N and "resuming at step N" count steps done)
    summary = {"step": step, "val_loss": val_loss, "mean_step_ms": 1000 * sum(timed) / max(1, len(timed))}
    if d.device_type == "cuda":
        summary["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print0("done: " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in summary.items()))
    if d.world_size > 1:
        # leave together: a rank that tears gloo down while rank 0 still writes the checkpoint
        # can abort ("terminate called without an active exception") and fail the whole job
        dist.barrier()
        dist.destroy_process_group()
    r.log.close()
    if r.folder:
        r.folder.close()
    return summary


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(flags.help_text(TrainConfig, __doc__, PRESETS))
        return 0
    try:
        cfg = parse_args(argv)
        # what overrides a resumed checkpoint's config: the preset's values and the flags given
        given = flags.parse_flags(TrainConfig, argv, {"resume": "latest"})
        explicit = {**PRESETS.get(cfg.preset, {}), **given}
        train(cfg, explicit)
    except (ConfigError, FloatingPointError) as e:  # bad input (RunDirError too): 2; a diverged run: 1
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
