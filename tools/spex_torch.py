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


def _raw(t):
    """A tensor's little-endian bytes as a buffer (no copy on a little-endian machine; bfloat16: its
    raw 16-bit patterns, numpy having no bfloat16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return np.ascontiguousarray(t.view(torch.int16).numpy(), dtype="<i2").data
    return np.ascontiguousarray(t.numpy(), dtype=np.dtype(_NUMPY[_DTYPES[t.dtype]]).newbyteorder("<")).data


def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: torch.Tensor}; metadata: {str: str}. Little-endian, contiguous, no gaps.
    The header comes from the shapes; the data is written one tensor at a time, so the memory
    beyond the tensors themselves is one tensor's bytes."""
    header, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header).encode()
    text += b" " * ((-(8 + len(text))) % 64)  # the data section starts 64-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors.values():
            f.write(_raw(t))


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
    doc = {"format": "spex", "version": [1, 5], "layers": {}}
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


class InputRMSNorm(nn.Module):
    """x / max(||x||, 1e-12) * sqrt(d) * (1 + gamma); state_dict: gamma [d] (zeros at first)."""

    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return F.normalize(x, dim=-1) * x.shape[-1] ** 0.5 * (1 + self.gamma)


class GroupLayerNorm(nn.Module):
    """LayerNorm over each group of `group` consecutive features, with a weight and bias per
    feature (spex's norm = "layer": group = d_key, or d_key / 2 with norm_per_half)."""

    def __init__(self, features, group, eps):
        super().__init__()
        self.group, self.eps = group, eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, q):
        g = q.view(q.shape[0], -1, self.group)
        g = F.layer_norm(g, (self.group,), eps=self.eps)
        return g.reshape(q.shape) * self.weight + self.bias


class ProductKeyRetrieval(nn.Module):
    """[input RMSNorm ->] query Linear -> BatchNorm / none -> h heads of exact product-key top-k
    -> gates. state_dict: input_norm.gamma [d_in] (input_rmsnorm), query.weight [h*d_key, d_in]
    (query.bias), norm.weight/bias/running_mean/running_var [h*d_key], keys.c1 / keys.c2
    [n, d_key/2] (shared) or keys.h<i>.c1 / .c2."""

    def __init__(self, d_in, n_keys, heads, top_k, d_key, score="softmax", norm="batch", shared_keys=True,
                 query_bias=False, norm_eps=1e-5, norm_momentum=0.1, input_rmsnorm=False, per_head_tables=False,
                 norm_per_half=False):
        super().__init__()
        assert norm in ("batch", "layer", "none")
        self.n, self.h, self.k, self.dk, self.score = n_keys, heads, top_k, d_key, score
        self.per_head_tables = per_head_tables
        if input_rmsnorm:
            self.input_norm = InputRMSNorm(d_in)
        self.query = nn.Linear(d_in, heads * d_key, bias=query_bias)
        if norm == "batch":
            self.norm = nn.BatchNorm1d(heads * d_key, eps=norm_eps, momentum=norm_momentum)
        elif norm == "layer":
            self.norm = GroupLayerNorm(heads * d_key, d_key // 2 if norm_per_half else d_key, norm_eps)
        self.shared = shared_keys
        if shared_keys:
            self.keys = SubKeys(n_keys, d_key // 2)
        else:
            self.keys = nn.ModuleDict({"h%d" % i: SubKeys(n_keys, d_key // 2) for i in range(heads)})
        self.norm_kind = norm

    def normalize_input(self, x):
        return self.input_norm(x) if hasattr(self, "input_norm") else x

    def table_rows(self, ids):
        """The table row of each pick (B x h*k): its id, or with per-head tables id * h + head."""
        if not self.per_head_tables:
            return ids
        head = torch.arange(self.h).repeat_interleave(self.k)
        return ids * self.h + head

    def retrieve(self, x):
        q = self.query(x)
        if self.norm_kind != "none":
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


class GatedOutput(nn.Module):
    """Memory+'s output head: silu: y = proj(m * silu(silu(x))); sigmoid: y <- sigmoid(gate(x)) y.
    state_dict: silu.weight [d_value, d_in], silu.bias, proj.weight [d_out, d_value], proj.bias,
    gate.weight [1, d_in], gate.bias."""

    def __init__(self, d_in, d_value, d_out, silu, sigmoid):
        super().__init__()
        if silu:
            self.silu = nn.Linear(d_in, d_value)
            self.proj = nn.Linear(d_value, d_out)
        if sigmoid:
            self.gate = nn.Linear(d_in, 1)

    def forward(self, x, m):
        y = self.proj(m * F.silu(self.silu(x))) if hasattr(self, "silu") else m
        return torch.sigmoid(self.gate(x)) * y if hasattr(self, "gate") else y


class _ProductKeyLayer(ProductKeyRetrieval):
    def __init__(self, d_in, d_out, n_keys, heads, top_k, d_key, activation="gelu_erf", glu=False, silu_output=False,
                 sigmoid_gate=False, d_value=0, **kw):
        super().__init__(d_in, n_keys, heads, top_k, d_key, **kw)
        d_value = d_value or d_out or d_in
        # The sub-keys are parameters here: learn_keys, so that spex lists them with gradients too.
        self.cfg = dict(d_in=d_in, d_out=d_out or d_in, n_keys=n_keys, n_experts=n_keys * n_keys, heads=heads, top_k=top_k,
                        d_key=d_key, activation=activation, score=kw.get("score", "softmax"), norm=kw.get("norm", "batch"),
                        norm_per_half=kw.get("norm_per_half", False),
                        shared_keys=kw.get("shared_keys", True), learn_keys=True, query_bias=kw.get("query_bias", False),
                        input_rmsnorm=kw.get("input_rmsnorm", False), per_head_tables=kw.get("per_head_tables", False),
                        glu=glu, silu_output=silu_output, sigmoid_gate=sigmoid_gate, d_value=d_value, check_finite=True,
                        norm_eps=kw.get("norm_eps", 1e-5), norm_momentum=kw.get("norm_momentum", 0.1))
        self.table_size = n_keys * n_keys * (heads if self.per_head_tables else 1)
        self.d_value = d_value
        if silu_output or sigmoid_gate:
            self.output = GatedOutput(d_in, d_value, self.cfg["d_out"], silu_output, sigmoid_gate)

    def head(self, x, m):
        return self.output(x, m) if hasattr(self, "output") else m

    def spex_config(self):
        return dict(self.cfg)


class PEER(_ProductKeyLayer):
    """PEER: y = sum_j g_j act(u_{e_j} . x) v_{e_j} (glu: times w_{e_j} . x), x after the input
    norm when there is one. experts.down [R, d_in], experts.up [R, d_out] (glu: experts.down_linear
    [R, d_in]) with R = N rows, or heads * N with per-head tables (row id * heads + head)."""
    spex_kind = "Peer"

    def __init__(self, d_in, n_keys, heads=8, top_k=16, d_key=128, d_out=0, activation="gelu_erf", glu=False, **kw):
        super().__init__(d_in, d_out, n_keys, heads, top_k, d_key, activation, glu, **kw)
        rows = self.table_size
        self.experts = nn.Module()
        self.experts.down = nn.Parameter(torch.randn(rows, d_in) / d_in ** 0.5)
        self.experts.up = nn.Parameter(torch.randn(rows, self.d_value) / self.d_value ** 0.5)
        if glu:
            self.experts.down_linear = nn.Parameter(torch.randn(rows, d_in) / d_in ** 0.5)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x):
        x = self.normalize_input(x)
        ids, gates = self.retrieve(x)
        rows = self.table_rows(ids)
        z = self.act(torch.einsum("bmd,bd->bm", self.experts.down[rows], x))
        if hasattr(self.experts, "down_linear"):
            z = z * torch.einsum("bmd,bd->bm", self.experts.down_linear[rows], x)
        return self.head(x, torch.einsum("bm,bmd->bd", gates * z, self.experts.up[rows]))


class PKM(_ProductKeyLayer):
    """Product-key memory: y = sum_j g_j v_{e_j}. experts.values [R, d_out] (R as PEER's)."""
    spex_kind = "Pkm"

    def __init__(self, d_in, n_keys, heads=8, top_k=16, d_key=128, d_out=0, **kw):
        super().__init__(d_in, d_out, n_keys, heads, top_k, d_key, "gelu_erf", **kw)
        self.experts = nn.Module()
        self.experts.values = nn.Parameter(torch.randn(self.table_size, self.d_value) / self.d_value ** 0.5)

    def forward(self, x):
        x = self.normalize_input(x)
        ids, gates = self.retrieve(x)
        return self.head(x, torch.einsum("bm,bmd->bd", gates, self.experts.values[self.table_rows(ids)]))


class MoE(nn.Module):
    """ReMoE (router="relu": gates = ReLU(x W_r^T)) or TopK over E bias-free FFN experts, with
    the TopK router's options (docs/topk_moe.md) and shared experts. router.weight [E, d_in]
    (router.expert_bias [E], a buffer, with expert_bias); experts.w1 [E*h1, d_in] (SwiGLU: per
    expert `hidden` rows of the SiLU half a, then `hidden` rows of the linear half b; GELU:
    h1 = hidden), experts.w2 [E*d_out, hidden]; expert e owns rows [e*h1, (e+1)*h1) of w1 and
    [e*d_out, (e+1)*d_out) of w2. Shared experts: shared.w1 [h1s, d_in], shared.w2 [d_out, hs]
    with hs = shared_experts * shared_hidden, and shared.gate.weight [1, d_in] when gated.
    aux_loss(x) is the router's balancing and z losses (TopK)."""

    def __init__(self, d_in, n_experts, hidden, experts_per_token=1, router="relu", ffn="swiglu", d_out=0,
                 pre_softmax=True, renormalize=False, lam=0.0, score="softmax", route_scale=1.0, expert_bias=False,
                 n_groups=1, group_topk=0, group_score_experts=0, aux_coeff=0.01, seq_aux_coeff=0.0, seq_len=0,
                 z_coeff=0.0, shared_experts=0, shared_hidden=0, shared_gate=False):
        super().__init__()
        self.spex_kind = "ReMoE" if router == "relu" else "TopKMoE"
        d_out = d_out or d_in
        self.e, self.h, self.k, self.d_out, self.ffn = n_experts, hidden, experts_per_token, d_out, ffn
        self.pre_softmax, self.renormalize, self.lam = pre_softmax, renormalize, lam
        self.score, self.route_scale, self.n_groups = score, route_scale, n_groups
        self.group_topk = group_topk or n_groups
        self.group_m = group_score_experts or max(1, experts_per_token // self.group_topk)
        self.aux_coeff, self.seq_aux_coeff, self.seq_len, self.z_coeff = aux_coeff, seq_aux_coeff, seq_len, z_coeff
        self.router = nn.Linear(d_in, n_experts, bias=False)
        if expert_bias:
            self.router.register_buffer("expert_bias", torch.zeros(n_experts))
        h1 = 2 * hidden if ffn == "swiglu" else hidden
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.randn(n_experts * h1, d_in) / d_in ** 0.5)
        self.experts.w2 = nn.Parameter(torch.randn(n_experts * d_out, hidden) / hidden ** 0.5)
        self.shared_hidden = shared_experts * (shared_hidden or hidden)
        if shared_experts:
            hs = self.shared_hidden
            self.shared = nn.Module()
            self.shared.w1 = nn.Parameter(torch.randn((2 if ffn == "swiglu" else 1) * hs, d_in) / d_in ** 0.5)
            self.shared.w2 = nn.Parameter(torch.randn(d_out, hs) / hs ** 0.5)
            if shared_gate:
                self.shared.gate = nn.Linear(d_in, 1, bias=False)
        self.cfg = dict(d_in=d_in, d_out=d_out, n_experts=n_experts, hidden=hidden, experts_per_token=experts_per_token,
                        granularity=1, ffn=ffn, pre_softmax=pre_softmax, renormalize=renormalize, capacity_factor=0.0)
        if router != "relu":
            self.cfg.update(score=score, route_scale=route_scale, expert_bias=expert_bias, n_groups=n_groups,
                            group_topk=group_topk, group_score_experts=group_score_experts, aux_coeff=aux_coeff,
                            seq_aux_coeff=seq_aux_coeff, seq_len=seq_len, z_coeff=z_coeff)
        self.cfg.update(shared_experts=shared_experts, shared_hidden=shared_hidden, shared_gate=shared_gate)

    def spex_config(self):
        return dict(self.cfg)

    def spex_state(self):
        return {"lambda": self.lam} if self.spex_kind == "ReMoE" else None

    def _route(self, x):
        """(gates [B, E], selected ids [B, k], P [B, E] of the balancing losses, logits)."""
        logits = self.router(x)
        if self.spex_kind == "ReMoE":
            return F.relu(logits), None, None, logits
        if self.score == "sigmoid":
            s = torch.sigmoid(logits)
            p = s / (s.sum(-1, keepdim=True) + 1e-20)
            key = s
        else:
            s = p = logits.softmax(-1)
            key = p if self.pre_softmax else logits
        key = key.detach()  # selection is piecewise constant
        if hasattr(self.router, "expert_bias"):
            key = key + self.router.expert_bias
        if self.n_groups > 1:
            b = x.shape[0]
            group_scores = key.view(b, self.n_groups, -1).topk(self.group_m, dim=-1)[0].sum(-1)
            groups = group_scores.topk(self.group_topk, dim=-1)[1]
            mask = torch.zeros_like(group_scores).scatter(1, groups, 1).bool()
            mask = mask[:, :, None].expand(b, self.n_groups, self.e // self.n_groups).reshape(b, -1)
            key = key.masked_fill(~mask, float("-inf"))
        i = key.topk(self.k, dim=1)[1]
        if self.score == "softmax" and not self.pre_softmax:
            v = logits.gather(1, i).softmax(-1)
        else:
            v = s.gather(1, i)
            if self.renormalize:
                v = v / (v.sum(-1, keepdim=True) + (1e-20 if self.score == "sigmoid" else 0.0))
        v = v * self.route_scale
        return torch.zeros_like(logits).scatter(1, i, v), i, p, logits

    def gates(self, x):
        return self._route(x)[0]

    def aux_loss(self, x):
        """Switch aux + sequence-wise aux + z-loss of the batch x (TopK)."""
        _, i, p, logits = self._route(x)
        if i is None:
            return torch.zeros((), dtype=x.dtype)
        t, e, k = x.shape[0], self.e, self.k
        counts = torch.zeros(t, e, dtype=x.dtype).scatter(1, i, 1.0)
        loss = self.aux_coeff * e / (k * t * t) * (p.sum(0) * counts.sum(0)).sum()
        if self.seq_aux_coeff > 0:
            n, length = t // self.seq_len, self.seq_len
            c = counts.view(n, length, e).sum(1)
            ps = p.view(n, length, e).sum(1)
            loss = loss + self.seq_aux_coeff * (e / (k * length * length) * (c * ps).sum(1)).mean()
        if self.z_coeff > 0:
            loss = loss + self.z_coeff * (torch.logsumexp(logits, -1) ** 2).mean()
        return loss

    def _ffn(self, x, w1, w2, hidden):
        hid = x @ w1.t()
        a = F.silu(hid[:, :hidden]) * hid[:, hidden:] if self.ffn == "swiglu" else F.gelu(hid)
        return a @ w2.t()

    def forward(self, x):
        g = self.gates(x)
        h1 = self.experts.w1.shape[0] // self.e
        y = torch.zeros(x.shape[0], self.d_out, dtype=x.dtype)
        for e in range(self.e):
            w1 = self.experts.w1[e * h1:(e + 1) * h1]
            w2 = self.experts.w2[e * self.d_out:(e + 1) * self.d_out]
            y = y + g[:, e:e + 1] * self._ffn(x, w1, w2, self.h)
        if hasattr(self, "shared"):
            out = self._ffn(x, self.shared.w1, self.shared.w2, self.shared_hidden)
            if hasattr(self.shared, "gate"):
                out = torch.sigmoid(self.shared.gate(x)) * out
            y = y + out
        return y
