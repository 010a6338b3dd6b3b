"""PyTorch reference modules whose weights load into spex, and safetensors I/O without the
safetensors package (Debian 12 has none): the standard library, numpy and torch only.

Each module's state_dict() names, shapes and layouts are exactly what spex's layers load
(docs/files.md, "Models trained in PyTorch"); spex_metadata() records the layer's kind and config so
that spex::load_layer<L>(path) builds the layer from the file alone:

    peer = PEER(d_in=64, n_keys=32, heads=4, top_k=8, d_key=32)
    ...train...
    save_layer("peer.safetensors", peer)          # -> spex::load_layer<spex::Peer<float>>(...)

The modules compute in the dtype of their parameters; in eval mode they are spex's `infer`.
"""
import json
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32"}
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: torch.Tensor}; metadata: {str: str}. Little-endian, contiguous, no gaps."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the raw 16-bit patterns
            raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
        else:
            raw = t.numpy().astype(np.dtype(_NUMPY[_DTYPES[t.dtype]]).newbyteorder("<")).tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header).encode()
    text += b" " * ((-(8 + len(text))) % 64)  # the data section starts 64-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    """Returns ({name: torch.Tensor}, metadata)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", {})
    base, out = 8 + n, {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        raw = data[base + begin:base + end]
        if e["dtype"] == "BF16":
            t = torch.from_numpy(np.frombuffer(raw, dtype="<i2").copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(_NUMPY[e["dtype"]]).newbyteorder("<")).copy())
        out[name] = t.reshape(e["shape"])
    return out, metadata


def spex_metadata(layers):
    """layers: {prefix: (kind, dtype, config dict[, state dict])} -> the '__metadata__' entry."""
    doc = {"format": "spex", "version": [1, 0], "layers": {}}
    for prefix, entry in layers.items():
        kind, dtype, config = entry[:3]
        e = {"kind": kind, "dtype": dtype, "config": config}
        if len(entry) > 3:
            e["state"] = entry[3]
        doc["layers"][prefix] = e
    return {"spex": json.dumps(doc)}


def save_layer(path, module, prefix=""):
    """Weights and buffers (not BatchNorm's num_batches_tracked) plus the layer's metadata."""
    tensors = {prefix + k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    dtype = _DTYPES[next(module.parameters()).dtype]
    state = module.spex_state() if hasattr(module, "spex_state") else None
    entry = (module.spex_kind, dtype, module.spex_config()) + ((state,) if state else ())
    write_safetensors(path, tensors, spex_metadata({prefix: entry}))


_ACTIVATIONS = {"identity": lambda a: a, "relu": F.relu, "gelu_erf": F.gelu,
                "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"), "silu": F.silu, "sigmoid": torch.sigmoid}


class SubKeys(nn.Module):
    def __init__(self, n, half):
        super().__init__()
        self.c1 = nn.Parameter(torch.randn(n, half) / half ** 0.5)
        self.c2 = nn.Parameter(torch.randn(n, half) / half ** 0.5)


class ProductKeyRetrieval(nn.Module):
    """query Linear -> BatchNorm / none -> h heads of exact product-key top-k -> gates.
    state_dict: query.weight [h*d_key, d_in] (query.bias), norm.weight/bias/running_mean/
    running_var [h*d_key], keys.c1 / keys.c2 [n, d_key/2] (shared) or keys.h<i>.c1 / .c2."""

    def __init__(self, d_in, n_keys, heads, top_k, d_key, score="softmax", norm="batch", shared_keys=True,
                 query_bias=False, norm_eps=1e-5, norm_momentum=0.1):
        super().__init__()
        assert norm in ("batch", "none"), "this reference implements BatchNorm and no norm"
        self.n, self.h, self.k, self.dk, self.score = n_keys, heads, top_k, d_key, score
        self.query = nn.Linear(d_in, heads * d_key, bias=query_bias)
        if norm == "batch":
            self.norm = nn.BatchNorm1d(heads * d_key, eps=norm_eps, momentum=norm_momentum)
        self.shared = shared_keys
        if shared_keys:
            self.keys = SubKeys(n_keys, d_key // 2)
        else:
            self.keys = nn.ModuleDict({"h%d" % i: SubKeys(n_keys, d_key // 2) for i in range(heads)})
        self.norm_kind = norm

    def retrieve(self, x):
        q = self.query(x)
        if self.norm_kind == "batch":
            q = self.norm(q)
        ids, scores = [], []
        half = self.dk // 2
        for h in range(self.h):
            keys = self.keys if self.shared else self.keys["h%d" % h]
            qh = q[:, h * self.dk:(h + 1) * self.dk]
            v1, i1 = (qh[:, :half] @ keys.c1.t()).topk(self.k, dim=1)
            v2, i2 = (qh[:, half:] @ keys.c2.t()).topk(self.k, dim=1)
            sums = (v1[:, :, None] + v2[:, None, :]).reshape(x.shape[0], -1)  # exact: top-k of sums
            s, j = sums.topk(self.k, dim=1)
            ids.append(i1.gather(1, j // self.k) * self.n + i2.gather(1, j % self.k))
            scores.append(s)
        ids, scores = torch.stack(ids, 1), torch.stack(scores, 1)  # B x h x k
        if self.score == "softmax":
            gates = scores.softmax(-1)
        elif self.score == "sigmoid":
            gates = torch.sigmoid(scores)
        else:
            gates = F.relu(scores)
        return ids.reshape(x.shape[0], -1), gates.reshape(x.shape[0], -1)


class _ProductKeyLayer(ProductKeyRetrieval):
    def __init__(self, d_in, d_out, n_keys, heads, top_k, d_key, activation="gelu_erf", **kw):
        super().__init__(d_in, n_keys, heads, top_k, d_key, **kw)
        self.cfg = dict(d_in=d_in, d_out=d_out or d_in, n_keys=n_keys, n_experts=n_keys * n_keys, heads=heads, top_k=top_k,
                        d_key=d_key, activation=activation, score=kw.get("score", "softmax"), norm=kw.get("norm", "batch"),
                        shared_keys=kw.get("shared_keys", True), query_bias=kw.get("query_bias", False),
                        check_finite=True, norm_eps=kw.get("norm_eps", 1e-5), norm_momentum=kw.get("norm_momentum", 0.1))

    def spex_config(self):
        return dict(self.cfg)


class PEER(_ProductKeyLayer):
    """PEER: y = sum_j g_j act(u_{e_j} . x) v_{e_j}. experts.down [N, d_in], experts.up [N, d_out]."""
    spex_kind = "Peer"

    def __init__(self, d_in, n_keys, heads=8, top_k=16, d_key=128, d_out=0, activation="gelu_erf", **kw):
        super().__init__(d_in, d_out, n_keys, heads, top_k, d_key, activation, **kw)
        n = n_keys * n_keys
        self.experts = nn.Module()
        self.experts.down = nn.Parameter(torch.randn(n, d_in) / d_in ** 0.5)
        self.experts.up = nn.Parameter(torch.randn(n, self.cfg["d_out"]) / self.cfg["d_out"] ** 0.5)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x):
        ids, gates = self.retrieve(x)
        a = torch.einsum("bmd,bd->bm", self.experts.down[ids], x)
        return torch.einsum("bm,bmd->bd", gates * self.act(a), self.experts.up[ids])


class PKM(_ProductKeyLayer):
    """Product-key memory: y = sum_j g_j v_{e_j}. experts.values [N, d_out]."""
    spex_kind = "Pkm"

    def __init__(self, d_in, n_keys, heads=8, top_k=16, d_key=128, d_out=0, **kw):
        super().__init__(d_in, d_out, n_keys, heads, top_k, d_key, "gelu_erf", **kw)
        self.experts = nn.Module()
        self.experts.values = nn.Parameter(torch.randn(n_keys * n_keys, self.cfg["d_out"]) / self.cfg["d_out"] ** 0.5)

    def forward(self, x):
        ids, gates = self.retrieve(x)
        return torch.einsum("bm,bmd->bd", gates, self.experts.values[ids])


class MoE(nn.Module):
    """ReMoE (router="relu": gates = ReLU(x W_r^T)) or TopK (softmax, top-k) over E bias-free FFN
    experts. router.weight [E, d_in]; experts.w1 [E*h1, d_in] (SwiGLU: per expert `hidden` rows
    of the SiLU half a, then `hidden` rows of the linear half b; GELU: h1 = hidden), experts.w2
    [E*d_out, hidden]. Expert e owns rows [e*h1, (e+1)*h1) of w1 and [e*d_out, (e+1)*d_out) of w2."""

    def __init__(self, d_in, n_experts, hidden, experts_per_token=1, router="relu", ffn="swiglu", d_out=0,
                 pre_softmax=True, renormalize=False, lam=0.0):
        super().__init__()
        self.spex_kind = "ReMoE" if router == "relu" else "TopKMoE"
        d_out = d_out or d_in
        self.e, self.h, self.k, self.d_out, self.ffn = n_experts, hidden, experts_per_token, d_out, ffn
        self.pre_softmax, self.renormalize, self.lam = pre_softmax, renormalize, lam
        self.router = nn.Linear(d_in, n_experts, bias=False)
        h1 = 2 * hidden if ffn == "swiglu" else hidden
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.randn(n_experts * h1, d_in) / d_in ** 0.5)
        self.experts.w2 = nn.Parameter(torch.randn(n_experts * d_out, hidden) / hidden ** 0.5)
        self.cfg = dict(d_in=d_in, d_out=d_out, n_experts=n_experts, hidden=hidden, experts_per_token=experts_per_token,
                        granularity=1, ffn=ffn, pre_softmax=pre_softmax, renormalize=renormalize, capacity_factor=0.0)

    def spex_config(self):
        return dict(self.cfg)

    def spex_state(self):
        return {"lambda": self.lam} if self.spex_kind == "ReMoE" else None

    def gates(self, x):
        logits = self.router(x)
        if self.spex_kind == "ReMoE":
            return F.relu(logits)
        if self.pre_softmax:
            p = logits.softmax(-1)
            v, i = p.topk(self.k, dim=1)
            if self.renormalize:
                v = v / v.sum(-1, keepdim=True)
        else:
            v, i = logits.topk(self.k, dim=1)
            v = v.softmax(-1)
        return torch.zeros_like(logits).scatter(1, i, v)

    def forward(self, x):
        g = self.gates(x)
        h1 = self.experts.w1.shape[0] // self.e
        y = torch.zeros(x.shape[0], self.d_out, dtype=x.dtype)
        for e in range(self.e):
            hid = x @ self.experts.w1[e * h1:(e + 1) * h1].t()
            a = F.silu(hid[:, :self.h]) * hid[:, self.h:] if self.ffn == "swiglu" else F.gelu(hid)
            y = y + g[:, e:e + 1] * (a @ self.experts.w2[e * self.d_out:(e + 1) * self.d_out].t())
        return y
