"""Muon: equals torch.optim.Muon, orthogonalizes q, k, v apart, takes the right weights; DDP ranks stay equal,
and equal to one process, while each orthogonalizes only its share."""
import subprocess
import sys
import textwrap

import pytest
import torch

import train_gpt2
from conftest import ROOT
from helpers_run import ENV
from test_bad_input import TINY, one_error_line, text_file
from train_gpt2 import GPT, GPTConfig, Muon, Optimizers


def test_orthogonalize_puts_singular_values_near_one():
    G = torch.randn(3, 40, 100, generator=torch.Generator().manual_seed(0))
    for g in (G, G.mT):  # wide and tall
        s = torch.linalg.svdvals(Muon.orthogonalize(g, 5, torch.float32))
        assert s.min() > 0.6 and s.max() < 1.2, s  # Jordan's coefficients: ~[0.7, 1.2], not exactly 1


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_equals_torch_muon_with_adamw_rms_matching(weight_decay):
    """torch.optim.Muon (bf16 Newton-Schulz, Moonshot's 0.2 * sqrt(max dim) scale, decoupled decay
    p *= 1 - lr * wd) on plain 2-D weights."""
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(48, 16, generator=gen, requires_grad=True),  # tall and wide
            torch.randn(16, 64, generator=gen, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = Muon(ours, lr=0.05, momentum=0.9, weight_decay=weight_decay)
    b = torch.optim.Muon(theirs, lr=0.05, momentum=0.9, weight_decay=weight_decay,
                         adjust_lr_fn="match_rms_adamw")
    for _ in range(4):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


def test_split_orthogonalizes_q_k_v_separately():
    gen = torch.Generator().manual_seed(0)
    C = 16
    qkv = torch.randn(3 * C, C, generator=gen, requires_grad=True)
    parts = [qkv.detach()[i * C:(i + 1) * C].clone().requires_grad_() for i in range(3)]
    a = Muon([{"params": [qkv], "split": 3}], lr=0.1, ns_dtype=torch.float32)
    b = Muon(parts, lr=0.1, ns_dtype=torch.float32)
    for _ in range(3):
        qkv.grad = torch.randn(qkv.shape, generator=gen)
        qkv.grad *= torch.tensor([1.0, 10.0, 0.1]).repeat_interleave(C)[:, None]
        for i, p in enumerate(parts):
            p.grad = qkv.grad[i * C:(i + 1) * C].clone()
        a.step()
        b.step()
    torch.testing.assert_close(qkv.detach(), torch.cat([p.detach() for p in parts]), atol=1e-6, rtol=0)


def test_q_k_v_move_alike_though_their_gradients_differ_100_fold():
    C = 32
    grad = torch.randn(3 * C, C, generator=torch.Generator().manual_seed(0))
    grad *= torch.tensor([1.0, 10.0, 0.1]).repeat_interleave(C)[:, None]
    rms = {}
    for split in (1, 3):
        w = torch.zeros(3 * C, C, requires_grad=True)
        w.grad = grad.clone()
        Muon([{"params": [w], "split": split}], lr=1.0, ns_dtype=torch.float32).step()
        rms[split] = w.detach().view(3, C, C).pow(2).mean(dim=(1, 2)).sqrt()
    assert rms[3].max() / rms[3].min() < 1.5  # each block orthogonalized: RMS ~0.2 apiece
    assert rms[1].max() / rms[1].min() > 5  # the stacked (3C, C) matrix: k's gradient takes the update


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=16))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", muon=dict(lr=0.02, momentum=0.95))
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.optimizers
    names = {p: n for n, p in model.named_parameters()}
    in_muon = [names[p] for g in muon.param_groups for p in g["params"]]
    assert sorted(in_muon) == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert [g["split"] for g in muon.param_groups] == [1, 3]
    assert all(names[p].endswith("c_attn.weight") for p in muon.param_groups[1]["params"])
    in_adamw = [names[p] for g in adamw.param_groups for p in g["params"]]
    # wte is the tied head
    assert "transformer.wte.weight" in in_adamw and "transformer.wpe.weight" in in_adamw
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # every parameter exactly once


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from torch.nn.parallel import DistributedDataParallel as DDP
    from device import setup_distributed
    from train_gpt2 import GPT, GPTConfig
    d = setup_distributed("cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32))
    ddp = DDP(model)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", muon=dict(lr=0.05, momentum=0.95))
    gen = torch.Generator().manual_seed(100 + d.rank)  # each rank its own data
    for _ in range(3):
        x = torch.randint(0, 100, (2, 16), generator=gen)
        _, loss = ddp(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(d.world_size)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered), "ranks differ"
    dist.barrier()  # leave together: a rank tearing gloo down early can abort the other (see train())
    dist.destroy_process_group()
    print("ranks identical")
""")


def test_ddp_ranks_end_every_step_bitwise_identical(tmp_path):
    script = tmp_path / "ddp_muon.py"
    script.write_text(DDP_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), ROOT], capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0 and out.stdout.count("ranks identical") == 2, out.stderr[-3000:]


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from muon import Muon
    from train_gpt2 import GPT, GPTConfig
    if "RANK" in os.environ:  # under torchrun; else one process
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    calls, orthogonalize = [], Muon.orthogonalize
    Muon.orthogonalize = staticmethod(lambda G, *a: calls.append(G.shape) or orthogonalize(G, *a))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=3, n_head=2, n_embd=32))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu",
                                     muon=dict(lr=0.05, weight_decay=0.2))
    frozen = model.transformer.h[1].mlp.c_fc.weight
    gen = torch.Generator().manual_seed(1)  # the same gradients on every rank, as DDP's all-reduce leaves
    for step in range(3):
        for p in model.parameters():
            p.grad = None if p is frozen and step == 1 else torch.randn(p.shape, generator=gen)
        opt.step()
    torch.save({"params": [p.detach() for p in model.parameters()], "calls": len(calls)},
               os.path.join(sys.argv[2], f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
""")


def test_sharded_ranks_are_bitwise_one_process_and_split_the_work(tmp_path):
    """2 gloo ranks: every rank's weights bitwise those of 1 process, with each rank orthogonalizing only some
    of the 12 matrices (and a matrix without a gradient on one step left alone by all)."""
    script = tmp_path / "sharded_muon.py"
    script.write_text(SHARDED_SCRIPT)
    for nproc, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        out.mkdir()
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        done = subprocess.run([sys.executable, *(torchrun if nproc > 1 else []), str(script), ROOT, str(out)],
                              capture_output=True, text=True, timeout=300, env=ENV)
        assert done.returncode == 0, done.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert one["calls"] == 12 * 3 - 1  # 4 matrices a layer, 3 steps, less the frozen one's
    # equal FLOPs: 5 of the 9 jobs of 18 C^3 a step, or 4 and the 3 of 6 C^3; less the frozen one's
    assert [r["calls"] for r in ranks] == [5 * 3 - 1, 7 * 3]
    for r in ranks:
        assert all(torch.equal(p, q) for p, q in zip(one["params"], r["params"]))


def test_owners_balance_gpt2_124m_on_8_ranks_exactly():
    """GPT-2 124M's 48 matrices (c_attn as three 768 x 768 blocks): equal Newton-Schulz FLOPs a rank."""
    C = 768
    shapes = [(3 * C, C, 3), (C, C, 1), (4 * C, C, 1), (C, 4 * C, 1)] * 12
    owner = Muon.owners(shapes, 8)
    per_rank = [[s for s, r in zip(shapes, owner) if r == rank] for rank in range(8)]
    # FLOPs / C^3 a step: 18 for c_attn (3 x 6), c_fc and mlp.c_proj (4 * 4 + 2), 6 for attn.c_proj
    blocks = lambda ss: sum(18 if s[0] != s[1] or s[2] == 3 else 6 for s in ss)  # noqa: E731
    assert [blocks(ss) for ss in per_rank] == [90] * 8  # 720 C^3 in all
    assert Muon.owners(shapes, 1) == [0] * 48


def test_weight_decay_shrinks_by_one_minus_lr_wd_per_step():
    w = torch.ones(8, 8, requires_grad=True)
    opt = Muon([w], lr=0.1, weight_decay=0.5, momentum=0.0, nesterov=False)
    w.grad = torch.zeros(8, 8)  # a zero gradient orthogonalizes to a zero update: decay alone remains
    for _ in range(3):
        opt.step()
    # lr * wd, not the update's 0.2 * sqrt(8) * lr: the decay does not grow with the matrix
    torch.testing.assert_close(w.detach(), torch.full((8, 8), (1 - 0.1 * 0.5) ** 3), atol=0, rtol=1e-6)


def test_compiled_newton_schulz_matches_eager():
    G = torch.randn(1, 24, 40, generator=torch.Generator().manual_seed(0))
    a = Muon([torch.zeros(1)], compile=True).ns(G, 5, torch.float32)
    torch.testing.assert_close(a, Muon.orthogonalize(G, 5, torch.float32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("momentum", ["1", "1.5"])
def test_muon_momentum_of_1_or_more_is_refused(tmp_path, capsys, momentum):
    """At 1 the momentum buffer stays 0 and so does every update; past 1 it diverges."""
    rc = train_gpt2.main([f"--data={text_file(tmp_path / 'input.txt')}", f"--log_dir={tmp_path / 'log'}",
                          *TINY, "--optimizer=muon", f"--muon_momentum={momentum}"])
    one_error_line(capsys, rc, f"--muon_momentum={momentum}", "[0, 1)")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_optimizers_state_round_trips_through_a_plain_state_dict(tmp_path, dropout):
    """Checkpointed state is plain tensors and numbers: torch.load(weights_only=True) restores the same
    steps."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16, dropout=dropout)
    x = torch.randint(0, 100, (2, 16))

    def run(model, opt, n):
        for _ in range(n):
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def make():
        model = GPT(cfg)
        return model, model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", muon=dict(lr=0.05))
    a, opt_a = make()
    b, opt_b = make()
    b.load_state_dict(a.state_dict())
    run(a, opt_a, 2)
    torch.save({"opt": opt_a.state_dict(), "model": a.state_dict(), "rng": torch.get_rng_state()},
               tmp_path / "c.pt")
    run(a, opt_a, 2)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    run(b, opt_b, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
