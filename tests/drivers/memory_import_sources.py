#!/usr/bin/env python3
"""Small memory layers in the public layouts of their source implementations, written for spex's
tests from those layouts (the source packages cannot be installed here), with random float32
weights standing in for trained ones. For each case: OUTDIR/<case>.pt or .safetensors (the state
dict, whole-model prefix included), OUTDIR/<case>.json (the importer's --from and --config: the
source constructor's keyword arguments) and OUTDIR/<case>.io.safetensors (x and the eval output y).
tests/memory_import.sh imports each with tools/spex_import.py and requires spex's infer(x) to give y.

Sources (each module's state dict names and layouts; eval mode, no dropout):
  xlm-pkm        facebookresearch/XLM's HashingMemory (pq_fast): query_proj.query_mlps.0 (Linear,
                 rows (h p d)), .1 (BatchNorm1d, optional), keys [heads, 2, n, half], values
                 (EmbeddingBag [n^2, v_dim]); softmax over each head's knn.
  memory-plus    facebookresearch/memory's HashingMemory: the same query and keys ([2 heads n, half]),
                 values or values_u / values_v (peer_variant), value_proj(read * silu(
                 swilu_projection(x))), gating (sigmoid); mem_share_values: one table in the first
                 layer's state.
  pkm-lucidrains lucidrains' PKM: to_queries rows (p h d), LayerNorm(dim_head) per half, keys
                 [heads, num_keys, 2, dim_head], values EmbeddingBag [num_keys^2, dim].
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
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from import_cases import write_case  # noqa: E402

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


class HashingQuery(nn.Module):
    """HashingMemory's QueryMLP with one layer: query_mlps = Sequential(Linear[, BatchNorm1d])."""

    def __init__(self, d_in, out, bias, batchnorm):
        super().__init__()
        layers = [nn.Linear(d_in, out, bias=bias)] + ([nn.BatchNorm1d(out)] if batchnorm else [])
        self.query_mlps = nn.Sequential(*layers)

    def forward(self, x):
        return self.query_mlps(x)


class HashingMemory(nn.Module):
    """Meta's HashingMemory as XLM's pq_fast (xlm=True: keys [heads, 2, n, half], the read is the
    output) and Memory+ (keys [2 * heads * n, half]; swilu_projection: value_proj(read *
    silu(swilu_projection(x))); peer_variant: values_u / values_v GELU neurons; mem_gated: a
    sigmoid gate). Softmax over each head's knn scores; values summed over heads. `values`: a
    module to share (mem_share_values) or None."""

    def __init__(self, c, xlm, values=None):
        super().__init__()
        d_in, d_out = c["input_dim"], c.get("output_dim", c["input_dim"])
        self.heads, self.knn = c.get("mem_heads", 4), c.get("mem_knn", 32)
        self.k_dim, self.n = c.get("mem_k_dim", 256 if xlm else 512), c.get("mem_n_keys", 512 if xlm else 1024)
        v_dim = c.get("mem_v_dim", -1)
        v_dim = v_dim if v_dim > 0 else d_out
        half = self.k_dim // 2
        self.query_proj = HashingQuery(d_in, self.heads * self.k_dim, c.get("mem_query_bias", True), c.get("mem_query_batchnorm", False))
        shape = (self.heads, 2, self.n, half) if xlm else (2 * self.heads * self.n, half)
        self.keys = nn.Parameter(torch.randn(*shape) / half ** 0.5)
        self.peer = c.get("peer_variant", False)
        if values is not None:
            self.shared = values  # a module of another layer: not in this state dict
        elif self.peer:
            self.values_u = nn.Embedding(self.n ** 2, v_dim)
            self.values_v = nn.Embedding(self.n ** 2, v_dim)
        else:
            self.values = nn.EmbeddingBag(self.n ** 2, v_dim, mode="sum")
        self.swilu = not xlm and not self.peer and c.get("swilu_projection", True)
        if self.swilu:
            self.value_proj = nn.Linear(v_dim, d_out)
            self.swilu_projection = nn.Linear(d_in, v_dim)
        if c.get("mem_gated", False):
            self.gating = nn.Linear(d_in, 1)

    def owner(self):
        return self.shared if hasattr(self, "shared") else self

    def forward(self, x):
        b, h, k, half = x.shape[0], self.heads, self.knn, self.k_dim // 2
        q = self.query_proj(x).view(b, h, self.k_dim)
        keys = self.keys.view(h, 2, self.n, half)
        s1, i1 = torch.einsum("bhd,hnd->bhn", q[..., :half], keys[:, 0]).topk(k, dim=-1)
        s2, i2 = torch.einsum("bhd,hnd->bhn", q[..., half:], keys[:, 1]).topk(k, dim=-1)
        all_s = (s1[..., :, None] + s2[..., None, :]).flatten(-2)
        all_i = (i1[..., :, None] * self.n + i2[..., None, :]).flatten(-2)
        scores, pick = all_s.topk(k, dim=-1)
        ids = all_i.gather(-1, pick).view(b, h * k)
        g = scores.softmax(-1).view(b, h * k)
        o = self.owner()
        if self.peer:
            a = F.gelu(torch.einsum("bd,bld->bl", x, o.values_u(ids)))
            out = torch.einsum("bl,bld->bd", a * g, o.values_v(ids))
        else:
            out = o.values(ids, per_sample_weights=g)
        if self.swilu:
            out = self.value_proj(out * F.silu(self.swilu_projection(x)))
        if hasattr(self, "gating"):
            out = torch.sigmoid(self.gating(x)) * out
        return out


class LucidrainsPKM(nn.Module):
    """lucidrains' product-key-memory PKM: to_queries [2 * heads * dim_head, dim] with rows (p h d),
    LayerNorm(dim_head) over each head's half, keys [heads, num_keys, 2, dim_head], values
    EmbeddingBag(num_keys^2, dim); softmax (or ReLU: non_competitive_gates) over the topk."""

    def __init__(self, c):
        super().__init__()
        dim, self.h, self.n, self.k, self.dh = c["dim"], c.get("heads", 4), c.get("num_keys", 128), c.get("topk", 32), c.get("dim_head", 128)
        self.to_queries = nn.Linear(dim, 2 * self.h * self.dh, bias=False)
        self.norm = nn.LayerNorm(self.dh)
        self.keys = nn.Parameter(torch.randn(self.h, self.n, 2, self.dh) / self.dh ** 0.5)
        self.values = nn.EmbeddingBag(self.n ** 2, dim, mode="sum")
        self.relu = c.get("non_competitive_gates", False)

    def forward(self, x):
        b = x.shape[0]
        q = self.norm(self.to_queries(x).view(b, 2, self.h, self.dh))  # (p h d), each half normalized
        dots = torch.einsum("bphd,hnpd->bhpn", q, self.keys)
        s, i = dots.topk(self.k, dim=-1)
        all_s = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).flatten(-2)
        all_i = (i[:, :, 0, :, None] * self.n + i[:, :, 1, None, :]).flatten(-2)
        scores, pick = all_s.topk(self.k, dim=-1)
        ids = all_i.gather(-1, pick).view(b, -1)
        g = (F.relu(scores) if self.relu else scores.softmax(-1)).view(b, -1)
        return self.values(ids, per_sample_weights=g)


def trained_like(m):
    """Weights away from their initial values (gains and biases not 1 and 0)."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm.bias") or "query_mlps.1" in name:
                p.add_(0.2 * torch.randn_like(p))
        for name, b in m.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
            elif name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn_like(b))
    return m


# name: (source, module factory, state prefix, file extension, source constructor arguments)
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
    "xlm_pkm": ("xlm-pkm", lambda c: trained_like(HashingMemory(c, True)), "memories.0.", ".pt",
                dict(input_dim=16, output_dim=16, mem_heads=3, mem_knn=4, mem_k_dim=8, mem_n_keys=6)),
    "xlm_pkm_batchnorm": ("xlm-pkm", lambda c: trained_like(HashingMemory(c, True)), "", ".pt",
                          dict(input_dim=12, mem_heads=2, mem_knn=3, mem_k_dim=6, mem_n_keys=5, mem_query_batchnorm=True,
                               mem_query_bias=False)),
    # Memory+'s defaults: SiLU-gated projection from the values' width, here with the sigmoid gate.
    "memory_plus": ("memory-plus", lambda c: trained_like(HashingMemory(c, False)), "layers.1.mem.", ".safetensors",
                    dict(input_dim=16, output_dim=16, mem_heads=2, mem_knn=4, mem_k_dim=8, mem_n_keys=6, mem_v_dim=10,
                         mem_gated=True)),
    "memory_plus_peer": ("memory-plus", lambda c: trained_like(HashingMemory(c, False)), "", ".pt",
                         dict(input_dim=12, output_dim=12, mem_heads=2, mem_knn=3, mem_k_dim=6, mem_n_keys=5, peer_variant=True)),
    "pkm_lucidrains": ("pkm-lucidrains", lambda c: trained_like(LucidrainsPKM(c)), "", ".pt",
                       dict(dim=16, heads=2, num_keys=6, topk=3, dim_head=5)),
    "pkm_lucidrains_relu": ("pkm-lucidrains", lambda c: trained_like(LucidrainsPKM(c)), "pkm.", ".safetensors",
                            dict(dim=12, heads=3, num_keys=5, topk=4, dim_head=4, non_competitive_gates=True)),
    "peer_pytorch_all": ("peer-pytorch", peer_pytorch_case, "", ".pt",
                         dict(dim=10, heads=3, num_experts=36, num_experts_per_head=4, dim_key=4, non_competing_scores=False,
                              separate_embed_per_head=True, pre_rmsnorm=True, activation="ReLU")),
}


def shared_values_case(out):
    """Memory+ with mem_share_values: two layers of a model read one value table, which lives in the
    first layer's state; the second layer imports with --values-prefix."""
    cfg = dict(input_dim=12, output_dim=12, mem_heads=2, mem_knn=3, mem_k_dim=6, mem_n_keys=5)
    first = trained_like(HashingMemory(cfg, False)).eval()
    second = trained_like(HashingMemory(cfg, False, values=first)).eval()
    state = {"layers.0.mem." + k: v for k, v in first.state_dict().items()}
    state.update({"layers.3.mem." + k: v for k, v in second.state_dict().items() if not k.startswith("shared.")})
    x = torch.randn(40, 12)
    with torch.no_grad():
        y = second(x)
    write_case(out, "memory_plus_shared", "memory-plus", cfg, state, x, y,
               args=["--prefix", "layers.3.mem.", "--values-prefix", "layers.0.mem."])


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    for name, (source, make, prefix, ext, cfg) in CASES.items():
        m = make(cfg).eval()
        dim = cfg["dim"] if "dim" in cfg else cfg["input_dim"]
        x = torch.randn(40, dim)
        with torch.no_grad():
            y = m(x)
        state = {prefix + k: v for k, v in m.state_dict().items()}
        if prefix:
            state["embed.weight"] = torch.randn(5, dim)  # the rest of a model: not imported
        write_case(out, name, source, cfg, state, x, y, ext)
    shared_values_case(out)


if __name__ == "__main__":
    main()
