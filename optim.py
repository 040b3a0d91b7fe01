"""optim.py: Muon + AdamW in one torch.optim.Optimizer (GPT.configure_optimizers builds it).

Muon (Keller Jordan's: momentum, then Newton-Schulz orthogonalisation) for the hidden matrices, AdamW for the
embedding, lm_head and norms. Pure torch, no knowledge of the model: the groups say which rule applies.
"""
import torch
from torch.optim.adam import adam as adam_update  # torch's functional Adam/AdamW math


def zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float32):
    """Approximately orthogonalise a matrix G (U S V^T -> ~U V^T), Keller Jordan's quintic iteration.

    The coefficients (3.4445, -4.7750, 2.0315) push singular values towards ~[0.7, 1.2] fast
    rather than to exactly 1, which is all Muon needs. bfloat16 is safe here on GPUs.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide side: X @ X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A, fused into the matmul
        X = torch.addmm(X, B, X, beta=a)           # a*X + B@X
    return X.mT if tall else X


class MuonAdamW(torch.optim.Optimizer):
    """Groups with kind='muon' get Muon (Nesterov momentum, then Newton-Schulz), kind='adamw' get AdamW.

    One object, so GradScaler.unscale_/step, state_dict/load_state_dict and the LR schedule see one
    optimizer. Under DDP the wrapper has already averaged the gradients, so every rank computes
    the same update without extra collectives. ns_dtype is a runtime choice (bfloat16 only on
    GPUs with bf16 hardware), so it lives on the object, not in the saved param groups.
    """

    def __init__(self, param_groups, ns_dtype=torch.float32):
        # every key any group may use, so load_state_dict and the trainer find them on all groups
        defaults = dict(lr=0.0, base_lr=0.0, kind="adamw", weight_decay=0.0, betas=(0.9, 0.95),
                        eps=1e-8, momentum=0.95, nesterov=True, ns_steps=5, cautious=False)
        super().__init__(param_groups, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group):
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mom)  # EMA of gradients
            # Nesterov: look ahead along the momentum, as in Keller Jordan's and nanochat's Muon
            g = p.grad.lerp(buf, mom) if group["nesterov"] else buf
            u = zeropower_via_newtonschulz5(g, group["ns_steps"], self.ns_dtype)
            if wd and group["cautious"]:
                # cautious weight decay: only where the update itself shrinks the weight (the same sign as it),
                # so decay never fights the gradient (nanochat's Muon)
                p.sub_(p * (u.to(p.dtype) * p > 0), alpha=lr * wd)
            elif wd:  # decoupled, scaled by lr like AdamW's, so the schedule also anneals it
                p.mul_(1 - lr * wd)
            # NS gives unit spectral norm; tall matrices get sqrt(rows/cols) so their per-entry
            # update size matches square ones (Keller Jordan's scaling)
            p.add_(u.to(p.dtype), alpha=-lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)

    def _adamw_step(self, group):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, device=p.device)  # a tensor, as torch's adam expects
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            elif state["step"].device != p.device:
                # load_state_dict moves exp_avg* to the param's device but leaves 'step' where it was
                # saved; the fused kernel wants it next to the param
                state["step"] = state["step"].to(p.device)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        # torch's own AdamW math (decoupled decay). The fused kernel makes one pass over each
        # tensor: on 2 CPU cores it updates 26M embedding+lm_head weights in ~10 ms vs ~100 ms
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        adam_update(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=fused, foreach=not fused,
                    decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
