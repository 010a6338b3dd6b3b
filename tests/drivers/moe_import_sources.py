#!/usr/bin/env python3
"""Small MoE blocks in the public layouts of Mixtral, Qwen2-MoE, DeepSeek-V3 and Megatron-Core
(TEGroupedMLP experts with sigmoid routing; GroupedMLP experts with ReMoE's ReLU routing),
written for spex's tests from those layouts (the source packages cannot be installed here), with
random float32 weights. For each case: OUTDIR/<case>.pt (or .safetensors: the state dict under a
model-level prefix), OUTDIR/<case>.json (the importer's --from and --config) and
OUTDIR/<case>.io.safetensors (x and the block's output y). tests/moe_import.sh imports each with
tools/spex_import.py and requires spex's infer(x) to give y.
Usage: moe_import_sources.py OUTDIR
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from import_cases import write_case  # noqa: E402


class GluMLP(nn.Module):
    """gate_proj / up_proj / down_proj (Qwen2-MoE, DeepSeek)."""

    def __init__(self, d, ff):
        super().__init__()
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MixtralExpert(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.w1 = nn.Linear(d, ff, bias=False)
        self.w2 = nn.Linear(ff, d, bias=False)
        self.w3 = nn.Linear(d, ff, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def combine(experts, x, idx, w):
    y = torch.zeros_like(x)
    for j in range(idx.shape[1]):
        for e, expert in enumerate(experts):
            m = idx[:, j] == e
            if m.any():
                y[m] += w[m, j:j + 1] * expert(x[m])
    return y


class Mixtral(nn.Module):
    """block_sparse_moe: softmax over E, top-k, renormalized."""

    def __init__(self, c):
        super().__init__()
        self.k = c["num_experts_per_tok"]
        self.gate = nn.Linear(c["hidden_size"], c["num_local_experts"], bias=False)
        self.experts = nn.ModuleList(MixtralExpert(c["hidden_size"], c["intermediate_size"]) for _ in range(c["num_local_experts"]))

    def forward(self, x):
        w, idx = self.gate(x).softmax(-1).topk(self.k, dim=-1)
        return combine(self.experts, x, idx, w / w.sum(-1, keepdim=True))


class Qwen2Moe(nn.Module):
    """mlp: softmax top-k (renormalized with norm_topk_prob) + sigmoid-gated shared expert."""

    def __init__(self, c):
        super().__init__()
        d = c["hidden_size"]
        self.k, self.norm = c["num_experts_per_tok"], c.get("norm_topk_prob", False)
        self.gate = nn.Linear(d, c["num_experts"], bias=False)
        self.experts = nn.ModuleList(GluMLP(d, c["moe_intermediate_size"]) for _ in range(c["num_experts"]))
        self.shared_expert = GluMLP(d, c["shared_expert_intermediate_size"])
        self.shared_expert_gate = nn.Linear(d, 1, bias=False)

    def forward(self, x):
        w, idx = self.gate(x).softmax(-1).topk(self.k, dim=-1)
        if self.norm:
            w = w / w.sum(-1, keepdim=True)
        return combine(self.experts, x, idx, w) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DeepseekGate(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, d) / d ** 0.5)
        self.register_buffer("e_score_correction_bias", 0.1 * torch.randn(n))


class DeepseekV3(nn.Module):
    """mlp: sigmoid scores, selection bias, groups scored by their best two, top-k,
    renormalized, scaled; shared experts of n_shared * moe_intermediate_size."""

    def __init__(self, c):
        super().__init__()
        d, n = c["hidden_size"], c["n_routed_experts"]
        self.c = c
        self.gate = DeepseekGate(d, n)
        self.experts = nn.ModuleList(GluMLP(d, c["moe_intermediate_size"]) for _ in range(n))
        self.shared_experts = GluMLP(d, c["moe_intermediate_size"] * c["n_shared_experts"])

    def forward(self, x):
        c, b = self.c, x.shape[0]
        s = torch.sigmoid(x @ self.gate.weight.t())
        choice = s + self.gate.e_score_correction_bias
        g = c["n_group"]
        group_scores = choice.view(b, g, -1).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(c["topk_group"], dim=-1)[1], 1)
        mask = keep[:, :, None].expand(b, g, s.shape[1] // g).reshape(b, -1).bool()
        idx = choice.masked_fill(~mask, float("-inf")).topk(c["num_experts_per_tok"], dim=-1)[1]
        w = s.gather(1, idx)
        if c["norm_topk_prob"]:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return combine(self.experts, x, idx, w * c["routed_scaling_factor"]) + self.shared_experts(x)


class MegatronRouter(nn.Module):
    def __init__(self, d, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, d) / d ** 0.5)
        if bias:
            self.register_buffer("expert_bias", 0.1 * torch.randn(n))


class MegatronFc(nn.Module):
    """linear_fc1 [2ff, d] = [gate; up] (swiglu: silu of the first half times the second), fc2 [d, ff]."""

    def __init__(self, d, ff):
        super().__init__()
        self.linear_fc1 = nn.Linear(d, 2 * ff, bias=False)
        self.linear_fc2 = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        a, b = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(a) * b)


class MegatronExperts(nn.Module):
    """TEGroupedMLP's parameter names: linear_fc1.weight{e}, linear_fc2.weight{e}."""

    def __init__(self, n, d, ff):
        super().__init__()
        self.n, self.ff = n, ff
        self.linear_fc1 = nn.Module()
        self.linear_fc2 = nn.Module()
        for e in range(n):
            self.linear_fc1.register_parameter(f"weight{e}", nn.Parameter(torch.randn(2 * ff, d) / d ** 0.5))
            self.linear_fc2.register_parameter(f"weight{e}", nn.Parameter(torch.randn(d, ff) / ff ** 0.5))

    def expert(self, e):
        def run(x):
            a, b = (x @ getattr(self.linear_fc1, f"weight{e}").t()).chunk(2, dim=-1)
            return (F.silu(a) * b) @ getattr(self.linear_fc2, f"weight{e}").t()
        return run


class SharedMegatron(MegatronFc):
    def __init__(self, d, ff, gated):
        super().__init__(d, ff)
        self.gated = gated
        if gated:
            self.gate_weight = nn.Parameter(torch.randn(1, d) / d ** 0.5)

    def forward(self, x):
        y = super().forward(x)
        return torch.sigmoid(x @ self.gate_weight.t()) * y if self.gated else y


class Megatron(nn.Module):
    """Megatron-Core MoELayer: sigmoid scores (selection bias, groups scored by k / group_topk),
    renormalized for k > 1, scaled; gated shared expert."""

    def __init__(self, c):
        super().__init__()
        d, n = c["hidden_size"], c["num_experts"]
        self.c = c
        self.router = MegatronRouter(d, n, c["moe_router_enable_expert_bias"])
        self.experts = MegatronExperts(n, d, c["moe_ffn_hidden_size"])
        self.shared_experts = SharedMegatron(d, c["moe_shared_expert_intermediate_size"], c["moe_shared_expert_gate"])

    def forward(self, x):
        c, b = self.c, x.shape[0]
        k, g, gk = c["moe_router_topk"], c["moe_router_num_groups"], c["moe_router_group_topk"]
        s = torch.sigmoid(x @ self.router.weight.t())
        choice = s + self.router.expert_bias
        group_scores = choice.view(b, g, -1).topk(k // gk, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(gk, dim=-1)[1], 1)
        mask = keep[:, :, None].expand(b, g, s.shape[1] // g).reshape(b, -1).bool()
        idx = choice.masked_fill(~mask, float("-inf")).topk(k, dim=-1)[1]
        w = s.gather(1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * c["moe_router_topk_scaling_factor"]
        experts = [self.experts.expert(e) for e in range(self.experts.n)]
        y = torch.zeros_like(x)
        for j in range(k):
            for e, run in enumerate(experts):
                m = idx[:, j] == e
                if m.any():
                    y[m] += w[m, j:j + 1] * run(x[m])
        return y + self.shared_experts(x)


class GroupedMLP(nn.Module):
    """Megatron-Core's legacy GroupedMLP: weight1 [d, E * 2ff] (expert e's columns
    [e*2ff, (e+1)*2ff), the gate half then the up half), weight2 [E * ff, d]."""

    def __init__(self, n, d, ff):
        super().__init__()
        self.n, self.ff = n, ff
        self.weight1 = nn.Parameter(torch.randn(d, n * 2 * ff) / d ** 0.5)
        self.weight2 = nn.Parameter(torch.randn(n * ff, d) / ff ** 0.5)

    def expert(self, e, x):
        a, b = (x @ self.weight1[:, e * 2 * self.ff:(e + 1) * 2 * self.ff]).chunk(2, dim=-1)
        return (F.silu(a) * b) @ self.weight2[e * self.ff:(e + 1) * self.ff]


class MegatronReMoE(nn.Module):
    """ReMoE's Megatron fork: gates = ReLU(router(x)), every expert with a positive gate."""

    def __init__(self, c):
        super().__init__()
        d, n = c["hidden_size"], c["num_experts"]
        self.router = MegatronRouter(d, n, False)
        self.experts = GroupedMLP(n, d, c["moe_ffn_hidden_size"])

    def forward(self, x):
        g = F.relu(x @ self.router.weight.t())
        return sum(g[:, e:e + 1] * self.experts.expert(e, x) for e in range(self.experts.n))


CASES = {
    "mixtral": ("mixtral", Mixtral, "model.layers.3.block_sparse_moe.", ".pt",
                dict(hidden_size=16, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2-moe", Qwen2Moe, "model.layers.1.mlp.", ".pt",
                  dict(hidden_size=16, moe_intermediate_size=12, shared_expert_intermediate_size=40, num_experts=8,
                       num_experts_per_tok=3, norm_topk_prob=False)),
    "deepseek_v3": ("deepseek-v3", DeepseekV3, "model.layers.5.mlp.", ".safetensors",
                    dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                         topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                         scoring_func="sigmoid", topk_method="noaux_tc")),
    "megatron": ("megatron", Megatron, "decoder.layers.2.mlp.", ".pt",
                 dict(hidden_size=16, moe_ffn_hidden_size=10, num_experts=8, moe_router_topk=2, moe_router_score_function="sigmoid",
                      moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
                      moe_router_topk_scaling_factor=1.5, moe_shared_expert_intermediate_size=12, moe_shared_expert_gate=True,
                      swiglu=True)),
    "megatron_remoe": ("megatron", MegatronReMoE, "decoder.layers.0.mlp.", ".pt",
                       dict(hidden_size=16, moe_ffn_hidden_size=6, num_experts=6, moe_router_topk=1, swiglu=True, remoe=True)),
}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    for name, (source, cls, prefix, ext, cfg) in CASES.items():
        m = cls(cfg).eval()
        x = torch.randn(40, cfg["hidden_size"])
        with torch.no_grad():
            y = m(x)
        state = {prefix + k: v for k, v in m.state_dict().items()}
        state["model.embed_tokens.weight"] = torch.randn(5, cfg["hidden_size"])  # the rest of a model: not imported
        write_case(out, name, source, cfg, state, x, y, ext)


if __name__ == "__main__":
    main()
