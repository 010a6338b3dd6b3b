#!/usr/bin/env python3
"""Small memory layers in the public layouts of their source implementations, written for spex's
tests from those layouts (the source packages cannot be installed here), with random float32
weights standing in for trained ones. For each case: OUTDIR/<case>.pt or .safetensors (the state
dict, whole-model prefix included), OUTDIR/<case>.json (the importer's --from and --config: the
source constructor's keyword arguments) and OUTDIR/<case>.io.safetensors (x and the eval output y).
tests/memory_import.sh imports each with tools/spex_import.py and requires spex's infer(x) to give y.

Sources:
  peer-pytorch   lucidrains' PEER-pytorch `PEER(dim, heads, num_experts, num_experts_per_head,
                 activation, dim_key, product_key_topk, separate_embed_per_head, pre_rmsnorm,
                 non_competing_scores)`: state norm.gamma (pre_rmsnorm; the gain is 1 + gamma),
                 weight_down_embed.weight / weight_up_embed.weight [num_experts * sets, dim] (sets =
                 heads with separate_embed_per_head: head h reads rows h * num_experts + id),
                 to_queries.0.weight [2 * heads * dim_key, dim] with rows ordered (p h d): both
                 product halves of all heads, half first; keys [heads, sqrt(num_experts), 2, dim_key].
                 Scores: top product_key_topk per half, their sums, top num_experts_per_head (1 with
                 non_competing_scores, then ReLU; else softmax).
Usage: memory_import_sources.py OUTDIR
"""
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
import spex_torch as st  # noqa: E402

ACTIVATIONS = {"GELU": nn.GELU, "ReLU": nn.ReLU, "SiLU": nn.SiLU, "Sigmoid": nn.Sigmoid, "Identity": nn.Identity}


class PeerRMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1]) * (1 + self.gamma)


class PeerPytorch(nn.Module):
    """PEER-pytorch's PEER block (its state dict names and layouts; eval mode, no dropout)."""

    def __init__(self, c):
        super().__init__()
        dim, self.heads, self.n = c["dim"], c.get("heads", 8), c.get("num_experts", 1_000_000)
        per_head = c.get("num_experts_per_head", 16)
        self.dim_key = c.get("dim_key") or dim // 2
        self.pk_topk = c.get("product_key_topk") or per_head
        self.non_competing = c.get("non_competing_scores", True)
        self.final_k = 1 if self.non_competing else per_head
        self.separate = c.get("separate_embed_per_head", False)
        self.num_keys = int(math.isqrt(self.n))
        if c.get("pre_rmsnorm", False):
            self.norm = PeerRMSNorm(dim)
        sets = self.heads if self.separate else 1
        self.weight_down_embed = nn.Embedding(self.n * sets, dim)
        self.weight_up_embed = nn.Embedding(self.n * sets, dim)
        self.act = ACTIVATIONS[c.get("activation", "GELU")]()
        self.to_queries = nn.Sequential(nn.Linear(dim, 2 * self.heads * self.dim_key, bias=False))
        self.keys = nn.Parameter(torch.randn(self.heads, self.num_keys, 2, self.dim_key) * 0.3)

    def forward(self, x):
        if hasattr(self, "norm"):
            x = self.norm(x)
        b = x.shape[0]
        q = self.to_queries(x).view(b, 2, self.heads, self.dim_key)  # (p h d)
        sim = torch.einsum("bphd,hkpd->pbhk", q, self.keys)
        sx, ix = sim[0].topk(self.pk_topk, dim=-1)
        sy, iy = sim[1].topk(self.pk_topk, dim=-1)
        all_s = (sx[..., :, None] + sy[..., None, :]).flatten(-2)
        all_i = (ix[..., :, None] * self.num_keys + iy[..., None, :]).flatten(-2)
        scores, pick = all_s.topk(self.final_k, dim=-1)
        ids = all_i.gather(-1, pick)  # b h k
        if self.separate:
            ids = ids + torch.arange(self.heads)[None, :, None] * self.n
        down, up = self.weight_down_embed(ids), self.weight_up_embed(ids)  # b h k d
        h = self.act(torch.einsum("bd,bhkd->bhk", x, down))
        g = F.relu(scores) if self.non_competing else scores.softmax(-1)
        return torch.einsum("bhk,bhkd->bd", h * g, up)


def peer_pytorch_case(cfg):
    m = PeerPytorch(cfg)
    with torch.no_grad():  # weights of a trained model: not the initial ones
        if hasattr(m, "norm"):
            m.norm.gamma.normal_(0, 0.3)
        m.weight_down_embed.weight.mul_(cfg["dim"] ** -0.5)
        m.weight_up_embed.weight.mul_(cfg["dim"] ** -0.5)
    return m


# name: (source, module factory, state prefix, file extension, source constructor arguments)
CASES = {
    # The library's defaults: non-competing ReLU top-1 scores per head, dim_key = dim / 2.
    "peer_pytorch_default": ("peer-pytorch", peer_pytorch_case, "", ".pt",
                             dict(dim=16, heads=4, num_experts=36, num_experts_per_head=4)),
    # Softmax over k, dim_key != dim / 2, product_key_topk above k (still exact), SiLU.
    "peer_pytorch_softmax": ("peer-pytorch", peer_pytorch_case, "", ".pt",
                             dict(dim=12, heads=3, num_experts=49, num_experts_per_head=3, dim_key=5, product_key_topk=5,
                                  non_competing_scores=False, activation="SiLU")),
    # One table per head and the input RMSNorm, in a whole model's safetensors file.
    "peer_pytorch_separate_rmsnorm": ("peer-pytorch", peer_pytorch_case, "layers.2.ff.", ".safetensors",
                                      dict(dim=16, heads=2, num_experts=25, num_experts_per_head=2,
                                           separate_embed_per_head=True, pre_rmsnorm=True)),
    "peer_pytorch_all": ("peer-pytorch", peer_pytorch_case, "", ".pt",
                         dict(dim=10, heads=3, num_experts=36, num_experts_per_head=4, dim_key=4, non_competing_scores=False,
                              separate_embed_per_head=True, pre_rmsnorm=True, activation="ReLU")),
}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    for name, (source, make, prefix, ext, cfg) in CASES.items():
        m = make(cfg).eval()
        dim = cfg["dim"]
        x = torch.randn(40, dim)
        with torch.no_grad():
            y = m(x)
        state = {prefix + k: v for k, v in m.state_dict().items()}
        if prefix:
            state["embed.weight"] = torch.randn(5, dim)  # the rest of a model: not imported
        path = os.path.join(out, name + ext)
        if ext == ".pt":
            torch.save(state, path)
        else:
            st.write_safetensors(path, state)
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump({"from": source, "config": cfg, "input": path}, f)
        st.write_safetensors(os.path.join(out, name + ".io.safetensors"), {"x": x, "y": y})
        print("wrote", name, source, path)


if __name__ == "__main__":
    main()
