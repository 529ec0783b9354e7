"""
Muon, the optimizer train_gpt2.py's --optimizer=muon uses for the blocks' weight matrices (AdamW keeps
the embeddings, the tied head, biases and LayerNorm gains), and Optimizers, which steps, schedules and
checkpoints the two as one. Importing runs nothing.
"""
import torch


class Muon(torch.optim.Optimizer):
    """
    Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon): SGD with Nesterov momentum whose update,
    per 2-D weight, is replaced by the nearest semi-orthogonal matrix U V^T (of its SVD U S V^T), so every
    direction of the matrix moves at the same rate, rare ones included. A group's "split" cuts each
    weight into that many row blocks, orthogonalized apart. The update has RMS 0.2 * lr, AdamW's usual
    size (Liu et al. 2025, "Muon is scalable for LLM training"), on any width and shape. Every DDP rank
    computes the same update from the same all-reduced gradient: ranks stay bitwise identical.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, split=1,
                                      muon=True))
        self.ns_dtype = ns_dtype  # bf16 is enough for the iteration (not for the weights)

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

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                if (buf := self.state[p].get("momentum_buffer")) is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.lerp_(p.grad, 1 - group["momentum"])  # buf = m * buf + (1 - m) * g
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf  # Nesterov: look ahead
                g = g.view(group["split"], -1, p.size(1))  # (blocks, m, n)
                update = self.orthogonalize(g, group["ns_steps"], self.ns_dtype).view_as(p)
                # an orthogonal m x n matrix has RMS 1/sqrt(max(m, n)): scale it to 0.2
                p.add_(update.to(p.dtype), alpha=-group["lr"] * 0.2 * max(g.size(-2), g.size(-1)) ** 0.5)


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
