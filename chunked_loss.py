"""
The GPT head and its cross-entropy in chunks of rows, for train_gpt2.py: the (N, vocab) logits never exist
in full. On a small GPT the head and its loss are most of a step, and the plain path
(F.cross_entropy(lm_head(x), y)) writes and re-reads those logits in fp32 several times over.
Importing runs nothing.
"""
import torch
import torch.nn.functional as F


class ChunkedCrossEntropy(torch.autograd.Function):
    """
    Mean cross-entropy of x @ weight.T against targets, weight's padded rows (>= vocab_size) left out,
    without the (N, vocab) logits ever existing in full. On a small GPT the head and its loss are most
    of a step, and the plain path writes and re-reads those logits in fp32 several times over.
    A target of -1 is ignored (nanoGPT's convention, F.cross_entropy's ignore_index=-1): the mean is
    over the other rows, and ignored rows get no gradient.
    Rows go through in chunks; the loss is the end of the graph, so each chunk's gradient
    (softmax - onehot) is taken at once in the forward and backward only scales it: no recompute.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk_rows, padded):
        device_type = x.device.type
        # the matmuls run in the autocast dtype like any nn.Linear would; the softmax in fp32
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else weight.dtype)
        with torch.autocast(device_type, enabled=False):
            # padded: all of weight's rows (50304 = 2**7 * 393 tiles evenly on a GPU; 50257 is odd, so every
            # bf16 row of the logits would be misaligned), the padded logits masked out of the softmax
            xd, w = x.to(dtype), (weight if padded else weight[:vocab_size]).to(dtype)  # (N, C), (V, C)
            loss = torch.zeros((), device=x.device)
            grad_x = []
            grad_wt = torch.zeros(w.size(1), w.size(0), device=x.device)  # (C, V): x.T @ g beat g.T @ x here
            kept = targets != -1  # a mask, not a branch on it: no host sync, one graph
            for i in range(0, x.size(0), chunk_rows):
                xc, yc = xd[i:i + chunk_rows], targets[i:i + chunk_rows].clamp(min=0)
                kc = kept[i:i + chunk_rows]
                logits = xc @ w.t()  # (rows, V)
                logits[:, vocab_size:] = float("-inf")  # exp() is then exactly 0: no probability, no gradient
                target_logit = logits.gather(1, yc[:, None]).squeeze(1).float()
                # one exp per logit: e = exp(logits - max) is kept as it is, and softmax's 1/sum
                # goes onto the small operands of the two matmuls below instead of onto e
                m = logits.amax(dim=-1).float()
                e = logits.float().sub_(m[:, None]).exp_()
                s = e.sum(dim=-1)
                loss += ((m + s.log() - target_logit) * kc).sum()  # logsumexp - target logit
                g = e.to(dtype)
                # (softmax - onehot) * s: the target's entry in fp32, not as a difference of rounded numbers
                g[torch.arange(len(yc), device=x.device), yc] = (torch.exp(target_logit - m) - s).to(dtype)
                inv_s = kc / s  # 0 on an ignored row: no gradient from it to x or to weight
                grad_x.append((g @ w).float() * inv_s[:, None])
                grad_wt += (xc.float() * inv_s[:, None]).to(dtype).t().contiguous() @ g
        n = kept.sum()  # rows counted in the mean (all ignored: 0/0, NaN, as F.cross_entropy)
        ctx.save_for_backward(torch.cat(grad_x), grad_wt, n)
        ctx.padded_vocab_size = weight.size(0)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_wt, n = ctx.saved_tensors
        scale = grad_loss / n  # the mean over the rows kept
        # transposed back (and padded, where the matmuls ran unpadded) here, where compile fuses it with
        # adding wte's own gradient
        grad_w = F.pad(grad_wt.t() * scale, (0, 0, 0, ctx.padded_vocab_size - grad_wt.size(1)))
        return grad_x * scale, grad_w, None, None, None, None


def chunked_cross_entropy(x, weight, targets, vocab_size, chunk_rows=None, padded=None):
    """
    F.cross_entropy(x @ weight[:vocab_size].T, targets, ignore_index=-1) for x (..., C), targets (...), in
    chunks of rows.
    padded: the matmuls at all of weight's rows, the padded logits masked; default on CUDA only, since on a
    CPU the padded width measured slower (461-496 ms against 415-419 ms a step, bench.py's 4-layer model).
    """
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    padded = x.device.type == "cuda" if padded is None else padded
    if chunk_rows is None and x.device.type == "cpu":
        # a chunk's biggest temporary (the fp32 softmax eagerly; under compile, which fuses the
        # softmax, the matmul's output) stays under 32 MiB, glibc's largest mmap threshold: bigger
        # blocks come back as fresh pages on every call, each one zeroed by the kernel
        itemsize = 2 if torch.compiler.is_compiling() and torch.is_autocast_enabled("cpu") else 4
        chunk_rows = 2 ** max(0, (2**25 // (vocab_size * itemsize)).bit_length() - 1)  # a power of two
    chunk_rows = chunk_rows or 8192  # a GPU wants big matmuls; 8192 rows of bf16 logits are 0.8 GB
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, chunk_rows, padded)
    losses = token_losses(x, weight, targets, vocab_size, chunk_rows)  # evaluation: loss only
    return losses.sum() / (targets != -1).sum()


@torch.no_grad()
def token_losses(x, weight, targets, vocab_size, chunk_rows=None):
    """
    Cross-entropy (N,) of x (N, C) @ weight.T against targets (N,), no grad, chunk_rows rows at a time:
    on a CPU a chunk's logits (128 x 50304 fp32, 26 MB) stay in the last-level cache while logsumexp
    reads them, and no (N, V) log-softmax is ever written out. Used by val loss and HellaSwag. A target of
    -1 is ignored: its loss is 0 (F.cross_entropy's reduction="none", ignore_index=-1).
    """
    chunk_rows = chunk_rows or (128 if x.device.type == "cpu" else 8192)
    losses = []
    for i in range(0, x.size(0), chunk_rows):
        # all of weight's rows, padded ones too: a width that is a multiple of 64 makes the matmul
        # faster than a sliced weight would, and slicing the logits is free
        logits = (x[i:i + chunk_rows] @ weight.t())[:, :vocab_size].float()
        yc = targets[i:i + chunk_rows]
        target_logit = logits.gather(1, yc.clamp(min=0)[:, None]).squeeze(1)
        # logsumexp in place on this chunk's own logits: no temporary as big as they are
        m = logits.amax(dim=1)
        losses.append((logits.sub_(m[:, None]).exp_().sum(dim=1).log_().add_(m) - target_logit) * (yc != -1))
    return torch.cat(losses) if losses else x.new_zeros(0)
