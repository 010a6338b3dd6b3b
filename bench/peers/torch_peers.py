#!/usr/bin/env python3
"""The PyTorch CPU modules a user would otherwise pick, on the shapes of spex's benchmarks
(bench_moe, bench_peer): a dense FFN, ReMoE and TopK MoE with sparse per-expert dispatch, and
PEER with product-key top-k, softmax gates, GELU single-neuron experts and row-sparse u/v
gradients (nn.Embedding(sparse=True)). Prints one JSON object per line:
{"name": ..., "tokens_per_s": median over repetitions}.

Usage: torch_peers.py [--threads N] [--repetitions R] [--only PREFIX]
Threads default to OMP_NUM_THREADS. Exit 77 (skip) without python3-torch.
"""
import argparse
import json
import os
import sys

from timing import timed

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("torch_peers: python3-torch is not installed; skipped", file=sys.stderr)
    sys.exit(77)

D, MOE_BATCH = 512, 512


def moe_input(seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(MOE_BATCH, D, generator=g)
    x[:, 0] = 1.0  # as bench_moe: feature 0 sets the ReLU router's threshold
    return x


class DenseFFN(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.w1 = nn.Linear(D, hidden, bias=False)
        self.w2 = nn.Linear(hidden, D, bias=False)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class SparseMoE(nn.Module):
    """Router + E GELU FFN experts, tokens gathered per expert (index_select), weighted and
    scattered back (index_add_): the dispatch of the ReMoE and Megatron references on CPU."""

    def __init__(self, experts, hidden, router, k=1, shared=False):
        super().__init__()
        self.e, self.router_kind, self.k = experts, router, k
        if router == "sigmoid":  # DeepSeek-V3: the bias selects, the renormalized scores weigh
            self.register_buffer("expert_bias", torch.zeros(experts))
        self.shared = DenseFFN(hidden) if shared else None
        self.router = nn.Linear(D, experts, bias=False)
        nn.init.normal_(self.router.weight, std=D ** -0.5)
        # One parameter per expert: slicing one stacked tensor would give every expert a
        # full-size gradient in backward.
        self.w1 = nn.ParameterList([nn.Parameter(torch.randn(hidden, D) / D ** 0.5) for _ in range(experts)])
        self.w2 = nn.ParameterList([nn.Parameter(torch.randn(D, hidden) / hidden ** 0.5) for _ in range(experts)])

    def calibrate(self, x, active=1 / 8):
        """As bench_moe: shift the ReLU threshold so that `active` of the pairs are non-zero."""
        with torch.no_grad():
            self.router.weight[:, 0] = 0
            logits = self.router(x)
            self.router.weight[:, 0] = -torch.quantile(logits.flatten(), 1 - active)

    def gates(self, x):
        logits = self.router(x)
        if self.router_kind == "relu":
            return F.relu(logits)
        if self.router_kind == "sigmoid":
            s = torch.sigmoid(logits)
            i = (s.detach() + self.expert_bias).topk(self.k, dim=1)[1]
            v = s.gather(1, i)
            if self.k > 1:
                v = v / (v.sum(-1, keepdim=True) + 1e-20)
            return torch.zeros_like(s).scatter(1, i, v)
        p = logits.softmax(-1)
        v, i = p.topk(self.k, dim=1)
        return torch.zeros_like(p).scatter(1, i, v)

    def forward(self, x):
        g = self.gates(x)
        y = torch.zeros_like(x)
        for e in range(self.e):
            idx = torch.nonzero(g[:, e], as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            h = F.gelu(x.index_select(0, idx) @ self.w1[e].t())
            y.index_add_(0, idx, (h @ self.w2[e].t()) * g.index_select(0, idx)[:, e:e + 1])
        return y + self.shared(x) if self.shared is not None else y


class Peer(nn.Module):
    """PEER as in the paper's pseudo-code: query projection, per head exact product-key top-k
    (top-k of each half, top-k of the k x k sums), softmax gates, experts u, v as sparse
    embeddings: y = sum_j g_j gelu(u_j . x) v_j."""

    def __init__(self, d, n, heads, k, d_key):
        super().__init__()
        self.n, self.h, self.k, self.dk = n, heads, k, d_key
        self.query = nn.Linear(d, heads * d_key, bias=False)
        self.c1 = nn.Parameter(torch.randn(n, d_key // 2) / (d_key // 2) ** 0.5)
        self.c2 = nn.Parameter(torch.randn(n, d_key // 2) / (d_key // 2) ** 0.5)
        self.u = nn.Embedding(n * n, d, sparse=True)
        self.v = nn.Embedding(n * n, d, sparse=True)
        nn.init.normal_(self.u.weight, std=d ** -0.5)
        nn.init.normal_(self.v.weight, std=d ** -0.5)

    def forward(self, x):
        b, half = x.shape[0], self.dk // 2
        q = self.query(x).view(b, self.h, self.dk)
        s1 = q[..., :half] @ self.c1.t()  # b x h x n
        s2 = q[..., half:] @ self.c2.t()
        v1, i1 = s1.topk(self.k, dim=-1)
        v2, i2 = s2.topk(self.k, dim=-1)
        sums = (v1[..., :, None] + v2[..., None, :]).view(b, self.h, -1)
        s, j = sums.topk(self.k, dim=-1)
        ids = i1.gather(-1, j // self.k) * self.n + i2.gather(-1, j % self.k)  # b x h x k
        gates = s.softmax(-1).view(b, -1)
        ids = ids.view(b, -1)
        a = torch.einsum("bmd,bd->bm", self.u(ids), x)
        return torch.einsum("bm,bmd->bd", gates * F.gelu(a), self.v(ids))


def forward_backward(module, x, dy):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)
    return step


def inference(module, x):
    def step():
        with torch.inference_mode():
            module(x)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1)

    def report(name, tokens, seconds):
        print(json.dumps({"name": name, "tokens_per_s": tokens / seconds, "threads": torch.get_num_threads()}), flush=True)

    cases = []
    x = moe_input()
    dy = torch.randn(MOE_BATCH, D)
    cases.append(("dense_ffn_fwd/1024", lambda: (MOE_BATCH, inference(DenseFFN(1024), x))))
    for experts, hidden in ((8, 1024), (64, 128)):
        def relu(experts=experts, hidden=hidden):
            m = SparseMoE(experts, hidden, "relu")
            m.calibrate(x)
            return m
        cases.append(("remoe_fwd/%d" % experts, lambda relu=relu: (MOE_BATCH, inference(relu(), x))))
        cases.append(("remoe_fwdbwd/%d" % experts, lambda relu=relu: (MOE_BATCH, forward_backward(relu(), x, dy))))
        cases.append(("topk_fwd/%d" % experts, lambda e=experts, h=hidden: (
            MOE_BATCH, inference(SparseMoE(e, h, "topk", k=e // 8), x))))
        cases.append(("topk_fwdbwd/%d" % experts, lambda e=experts, h=hidden: (
            MOE_BATCH, forward_backward(SparseMoE(e, h, "topk", k=e // 8), x, dy))))
        cases.append(("deepseek_fwd/%d" % experts, lambda e=experts, h=hidden: (
            MOE_BATCH, inference(SparseMoE(e, h, "sigmoid", k=e // 8, shared=True), x))))
        cases.append(("deepseek_fwdbwd/%d" % experts, lambda e=experts, h=hidden: (
            MOE_BATCH, forward_backward(SparseMoE(e, h, "sigmoid", k=e // 8, shared=True), x, dy))))
    # bench_peer's configurations: (d, n, batch, d_key), h = 8, k = 16.
    for config, (d, n, batch, d_key) in enumerate(((256, 256, 512, 128), (512, 1024, 256, 256))):
        def peer_case(bwd, d=d, n=n, batch=batch, d_key=d_key):
            layer = Peer(d, n, 8, 16, d_key)
            xs = [torch.randn(batch, d) for _ in range(8)]  # 8 batches cycled, as bench_peer
            dyp = torch.randn(batch, d)
            it = [0]

            def step():
                xb = xs[it[0] % 8]
                it[0] += 1
                (forward_backward if bwd else inference)(layer, xb, *((dyp,) if bwd else ()))()
            return batch, step
        cases.append(("peer_fwd/%d" % config, lambda p=peer_case: p(False)))
        cases.append(("peer_fwdbwd/%d" % config, lambda p=peer_case: p(True)))

    for name, make in cases:
        if args.only and not name.startswith(args.only):
            continue
        tokens, step = make()
        report(name, tokens, timed(step, args.repetitions))


if __name__ == "__main__":
    main()
