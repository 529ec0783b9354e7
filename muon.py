"""
Muon, the optimizer train_gpt2.py's --optimizer=muon uses for the blocks' weight matrices (AdamW keeps
the embeddings, the tied head, biases and LayerNorm gains), and Optimizers, which steps, schedules and
checkpoints the two as one. Importing runs nothing.
"""
import torch
import torch.distributed as dist


class Muon(torch.optim.Optimizer):
    """
    Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon): SGD with Nesterov momentum whose update,
    per 2-D weight, is replaced by the nearest semi-orthogonal matrix U V^T (of its SVD U S V^T), so every
    direction of the matrix moves at the same rate, rare ones included. A group's "split" cuts each
    weight into that many row blocks, orthogonalized apart. The update has RMS 0.2 * lr, AdamW's usual
    size, on any width and shape; weight decay is decoupled, p *= 1 - lr * weight_decay, the pairing of
    Liu et al. 2025 ("Muon is scalable for LLM training") and torch.optim.Muon.

    Under torch.distributed each rank orthogonalizes only its share of the matrices and one all-gather
    hands every rank all the updates, bit for bit. Each update is computed by one rank with a single
    process's maths and every rank applies all of them, so ranks stay bitwise identical to each other
    and to one process. Every rank keeps every momentum buffer (two elementwise ops a matrix), so any
    rank's state_dict is the whole state. compile=True runs Newton-Schulz through torch.compile.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=torch.bfloat16,
                 weight_decay=0.1, compile=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, split=1, muon=True))
        self.ns_dtype = ns_dtype  # bf16 is enough for the iteration (not for the weights)
        # one graph per matrix shape (4 in GPT-2); it fuses the casts and the scaling, the matmuls stay BLAS
        self.ns = self.orthogonalize
        if compile:
            self.ns = torch.compile(self.orthogonalize, fullgraph=True, dynamic=False)

    @staticmethod
    def orthogonalize(G, steps, dtype):
        """~U V^T of G (k, m, n) by a quintic Newton-Schulz iteration whose coefficients (Jordan's) drive
        the singular values into ~[0.7, 1.2] in 5 steps rather than to exactly 1: fast, and trains as well."""
        a, b, c = 3.4445, -4.7750, 2.0315
        X = G.to(dtype).mT if G.size(-2) > G.size(-1) else G.to(dtype)  # wide: X X^T is the small Gram matrix
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
        for _ in range(steps):  # X <- aX + b(XX^T)X + c(XX^T)^2 X, each sum fused into its matmul
            A = X @ X.mT
            X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
        return X.mT if G.size(-2) > G.size(-1) else X

    @staticmethod
    def owners(shapes, world_size):
        """The rank that orthogonalizes each matrix, given as (rows, cols, split): the costliest first, each
        onto the least loaded rank, by Newton-Schulz FLOPs (4 m^2 n + 2 m^3 a step for an m x n block,
        m <= n). It reads shapes only, so every rank draws the same plan."""
        def flops(shape):
            m, n = sorted((shape[0] // shape[2], shape[1]))
            return shape[2] * (4 * m * m * n + 2 * m ** 3)
        load, owner = [0] * world_size, [0] * len(shapes)
        for i in sorted(range(len(shapes)), key=lambda i: -flops(shapes[i])):  # stable: ties in list order
            owner[i] = min(range(world_size), key=load.__getitem__)
            load[owner[i]] += flops(shapes[i])
        return owner

    def all_gather(self, updates, params, owner, world_size):
        """{index: update} of this rank's matrices -> {index: flat update} of all of them, by one all_gather
        of equal-sized buffers: each rank's updates back to back, padded to the largest share. Every matrix
        has its slot, with a gradient or not, so the layout is the same on every rank."""
        offset, share = [], [0] * world_size
        for p, r in zip(params, owner):
            offset.append(share[r])
            share[r] += p.numel()
        device = params[0].device
        send = torch.empty(max(share), dtype=self.ns_dtype, device=device)
        for i, u in updates.items():  # u may be a transposed view: one strided copy into place
            send[offset[i]:offset[i] + u.numel()].view(u.shape).copy_(u)
        recv = torch.empty(world_size * send.numel(), dtype=self.ns_dtype, device=device)  # gloo: flat only
        dist.all_gather_single(recv, send)
        start = [owner[i] * send.numel() + offset[i] for i in range(len(params))]
        return {i: recv[start[i]:start[i] + p.numel()] for i, p in enumerate(params)}

    @staticmethod
    def ranks():
        """(this rank, the number sharing the work): (0, 1) unless torch.distributed runs several."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @torch.no_grad()
    def step(self):
        work = [(p, group) for group in self.param_groups for p in group["params"]]  # one order on all ranks
        if not work:
            return
        rank, world_size = self.ranks()
        owner = self.owners([(p.size(0), p.size(1), g["split"]) for p, g in work], world_size)
        updates = {}
        for i, (p, group) in enumerate(work):
            if p.grad is None:
                continue
            if (buf := self.state[p].get("momentum_buffer")) is None:
                buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buf.lerp_(p.grad, 1 - group["momentum"])  # buf = m * buf + (1 - m) * g
            if owner[i] == rank:
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf  # Nesterov: look ahead
                g = g.view(group["split"], -1, p.size(1))  # (blocks, m, n)
                updates[i] = self.ns(g, group["ns_steps"], self.ns_dtype)
        if world_size > 1:
            updates = self.all_gather(updates, [p for p, _ in work], owner, world_size)
        for i, (p, group) in enumerate(work):
            if p.grad is None:
                continue
            if wd := group.get("weight_decay", 0.0):  # groups from a checkpoint without the key: no decay
                p.mul_(1 - group["lr"] * wd)
            # an orthogonal m x n block has RMS 1/sqrt(max(m, n)): scale it to 0.2
            scale = 0.2 * max(p.size(0) // group["split"], p.size(1)) ** 0.5
            p.add_(updates[i].reshape_as(p), alpha=-group["lr"] * scale)


class Optimizers:
    """Several optimizers stepped, zeroed, scheduled and checkpointed as one."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # read anew: load_state_dict replaces an optimizer's groups
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states):
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)
