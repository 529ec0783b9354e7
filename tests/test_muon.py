"""Muon: equals torch.optim.Muon, orthogonalizes q, k, v apart, takes the right weights; DDP ranks stay equal."""
import textwrap

import pytest
import torch

from helpers_run import ENV
from train_gpt2 import GPT, GPTConfig, Muon, Optimizers


def test_orthogonalize_puts_singular_values_near_one():
    G = torch.randn(3, 40, 100, generator=torch.Generator().manual_seed(0))
    for g in (G, G.mT):  # wide and tall
        s = torch.linalg.svdvals(Muon.orthogonalize(g, 5, torch.float32))
        assert s.min() > 0.6 and s.max() < 1.2, s  # Jordan's coefficients: ~[0.7, 1.2], not exactly 1


def test_equals_torch_muon_with_adamw_rms_matching():
    """torch.optim.Muon (bf16 Newton-Schulz, Moonshot's 0.2 * sqrt(max dim) scale) on plain 2-D weights."""
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(48, 16, generator=gen, requires_grad=True),  # tall and wide
            torch.randn(16, 64, generator=gen, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = Muon(ours, lr=0.05, momentum=0.9)
    b = torch.optim.Muon(theirs, lr=0.05, momentum=0.9, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
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
        qkv.grad = torch.randn(qkv.shape, generator=gen) * torch.tensor([1.0, 10.0, 0.1]).repeat_interleave(C)[:, None]
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
    assert "transformer.wte.weight" in in_adamw and "transformer.wpe.weight" in in_adamw  # wte is the tied head
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # every parameter exactly once


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from torch.nn.parallel import DistributedDataParallel as DDP
    from train_gpt2 import GPT, GPTConfig, setup_distributed
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
    import subprocess
    import sys

    from conftest import ROOT
    script = tmp_path / "ddp_muon.py"
    script.write_text(DDP_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), ROOT], capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0 and out.stdout.count("ranks identical") == 2, out.stderr[-3000:]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_optimizers_state_round_trips_through_a_plain_state_dict(tmp_path, dropout):
    """Checkpointed state is plain tensors and numbers: torch.load(weights_only=True) restores the same steps."""
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
    torch.save({"opt": opt_a.state_dict(), "model": a.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "c.pt")
    run(a, opt_a, 2)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    run(b, opt_b, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
