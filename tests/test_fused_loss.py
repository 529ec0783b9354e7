"""The chunked head + cross-entropy equals the plain path: full logits, F.cross_entropy, autograd."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from chunked_loss import chunked_cross_entropy, token_losses
from train_gpt2 import GPT, GPTConfig

N, C, V, V_PADDED = 300, 32, 1000, 1024  # 300 rows: chunks of 128 leave a short last one


def inputs(scale=1.0, confident=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g)
    w = torch.randn(V_PADDED, C, generator=g) * scale
    w[V:] = 100.0  # padded rows: would dominate every softmax if they ever entered one
    targets = torch.randint(0, V, (N,), generator=g)
    if confident:  # targets at each row's argmax, logits large: p(target) near 1, the hard case for rounding
        targets = (x @ w[:V].t()).argmax(dim=-1)
    return x, w, targets


def loss_and_grads(fn, x, w, targets, autocast=False):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(x, w, targets)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def plain(x, w, targets):
    """What GPT.forward used to do: the full logits, the padded columns sliced off, fp32 loss."""
    return F.cross_entropy((x @ w.t())[:, :V].float(), targets)


def chunked(chunk_rows, padded=False):
    return lambda x, w, targets: chunked_cross_entropy(x, w, targets, V, chunk_rows=chunk_rows, padded=padded)


# the head's matmuls at the unpadded width (the CPU default) and at all of weight's rows (the CUDA default)
WIDTHS = pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@WIDTHS
@pytest.mark.parametrize("chunk_rows", [N, 128, 7])
def test_fp32_equals_plain(chunk_rows, padded):
    x, w, targets = inputs()
    loss, gx, gw = loss_and_grads(chunked(chunk_rows, padded), x, w, targets)
    ref_loss, ref_gx, ref_gw = loss_and_grads(plain, x, w, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-7)
    assert torch.all(gw[V:] == 0)  # the padded rows never enter the softmax: exactly zero gradient


@WIDTHS
@pytest.mark.parametrize("confident", [False, True], ids=["random", "confident"])
def test_bf16_autocast_is_as_close_to_fp32_as_the_plain_path(confident, padded):
    x, w, targets = inputs(confident=confident)
    exact = loss_and_grads(plain, x, w, targets)  # fp32
    ours = loss_and_grads(chunked(128, padded), x, w, targets, autocast=True)
    theirs = loss_and_grads(plain, x, w, targets, autocast=True)
    for name, a, b, ref in zip(("loss", "grad x", "grad w"), ours, theirs, exact):
        assert a.dtype == ref.dtype, name  # gradients come back in the parameters' dtype
        # within bf16 rounding of the plain bf16 path, and no further from fp32 than it is
        assert rel_err(a, b) < 2e-2, name
        assert rel_err(a, ref) < 1.5 * rel_err(b, ref) + 1e-4, name
    assert torch.all(ours[2][V:] == 0)


@WIDTHS
def test_scaled_loss_and_no_grad_evaluation(padded):
    x, w, targets = inputs()
    # backward scales by the incoming gradient (the training loop divides by grad accumulation steps)
    _, gx, gw = loss_and_grads(lambda *a: 0.25 * chunked(128, padded)(*a), x, w, targets)
    _, ref_gx, ref_gw = loss_and_grads(lambda *a: 0.25 * plain(*a), x, w, targets)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-8)
    with torch.no_grad():  # evaluation takes the loss-only path
        torch.testing.assert_close(chunked(128)(x, w, targets), plain(x, w, targets), rtol=1e-6, atol=1e-6)


def test_gpt_forward_uses_it_and_keeps_logits_without_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=C))  # 1000 -> 1024 rows
    idx, targets = torch.randint(0, V, (2, 3, 32))
    logits, no_loss = model(idx)
    assert logits.shape == (3, 32, V) and no_loss is None
    none, loss = model(idx, targets)
    assert none is None
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(idx)[0].flatten(0, 1), targets.flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():  # the tied wte/lm_head weight included
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


class MatmulWidths(TorchDispatchMode):
    """Records the output width of every matmul that runs inside it."""

    def __init__(self):
        super().__init__()
        self.widths = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.widths.append(out.size(1))
        return out


@pytest.mark.parametrize("padded, width", [(None, V), (False, V), (True, V_PADDED)])
def test_head_matmuls_run_at_the_chosen_width(padded, width):
    """The logits matmul is (rows, width): on a CPU (padded=None) the vocab's; padded=True all weight rows."""
    x, w, targets = inputs()
    with MatmulWidths() as mode:
        loss_and_grads(lambda *a: chunked_cross_entropy(*a, V, chunk_rows=128, padded=padded), x, w, targets)
    # per chunk of 128 rows: the logits (rows, width), grad x (rows, C), grad w.T (C, width)
    chunks = -(-N // 128)
    assert sorted(mode.widths) == sorted([width, C, width] * chunks), mode.widths


def test_under_torch_compile():
    x, w, targets = inputs()
    # aot_eager: dynamo and AOT autograd trace the autograd.Function as inductor would see it, and importing
    # inductor on a CPU pulls in torch.utils.mkldnn, whose torch.jit.script_method decorators warn
    for padded in (False, True):
        compiled = torch.compile(chunked(128, padded), backend="aot_eager")
        for autocast in (False, True):
            got = loss_and_grads(compiled, x, w, targets, autocast=autocast)
            want = loss_and_grads(chunked(128, padded), x, w, targets, autocast=autocast)
            for a, b in zip(got, want):
                assert rel_err(a, b) < (1e-5 if not autocast else 1e-2)


def ignoring(targets, every=3):
    """targets with every 3rd row set to -1 (nanoGPT's ignore_index), the last 7 rows all ignored."""
    targets = targets.clone()
    targets[::every] = -1
    targets[-7:] = -1
    return targets


@WIDTHS
@pytest.mark.parametrize("chunk_rows", [N, 128, 7])
def test_ignore_index_minus_1_equals_f_cross_entropy(chunk_rows, padded):
    x, w, targets = inputs()
    targets = ignoring(targets)
    loss, gx, gw = loss_and_grads(chunked(chunk_rows, padded), x, w, targets)
    ref = lambda x, w, t: F.cross_entropy((x @ w.t())[:, :V].float(), t, ignore_index=-1)  # noqa: E731
    ref_loss, ref_gx, ref_gw = loss_and_grads(ref, x, w, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)  # the mean over the rows kept
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-7)
    assert torch.all(gx[targets == -1] == 0)  # an ignored row: exactly no gradient
    with torch.no_grad():  # the evaluation path and the per-token losses
        torch.testing.assert_close(chunked(chunk_rows)(x, w, targets), ref_loss, rtol=1e-6, atol=1e-6)
        per_token = token_losses(x, w, targets, V, chunk_rows)
        want = F.cross_entropy((x @ w.t())[:, :V], targets, ignore_index=-1, reduction="none")
        torch.testing.assert_close(per_token, want, rtol=1e-5, atol=1e-6)
        assert torch.all(per_token[targets == -1] == 0)


def test_all_ignored_is_nan_as_f_cross_entropy():
    x, w, targets = inputs()
    targets = torch.full_like(targets, -1)
    assert F.cross_entropy((x @ w.t())[:, :V], targets, ignore_index=-1).isnan()
    loss, gx, _ = loss_and_grads(chunked(128), x, w, targets)
    assert loss.isnan()
    with torch.no_grad():
        assert chunked(128)(x, w, targets).isnan()
