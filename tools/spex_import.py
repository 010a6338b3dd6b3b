#!/usr/bin/env python3
"""Converts one MoE block's or memory layer's PyTorch state dict into a spex file that
spex::load_layer reads.

    python3 tools/spex_import.py --from SOURCE --config '<JSON>' IN OUT.safetensors

SOURCE and --config:
  mixtral | qwen2-moe | deepseek-v3 | megatron   an MoE block; --config: the source model's
      config under its own names (docs/topk_moe.md, "Importing a model")
  peer-pytorch   lucidrains' PEER block; --config: the PEER(...) constructor's keyword arguments
      (activation by its torch.nn class name: "GELU") (docs/from_peer_pytorch.md)
  pkm-lucidrains lucidrains' product-key-memory PKM; --config: PKM(...)'s keyword arguments
      (docs/from_pkm_lucidrains.md)
  xlm-pkm        facebookresearch/XLM's HashingMemory; --config: its mem_* parameters by name, with
      input_dim and output_dim (docs/from_xlm_pkm.md)
  memory-plus    facebookresearch/memory's HashingMemory (Memory+); --config: its constructor's
      keyword arguments, with input_dim and output_dim (docs/from_memory_plus.md)

IN is a `.pt` file of `state_dict()` (torch.save) or a `.safetensors` file, of the block itself
or of a whole model: the keys of one block are found by a key every block of the source has
(`gate.weight`, `router.weight`, `weight_down_embed.weight`, `query_proj.query_mlps.0.weight`,
`to_queries.weight`) and any prefix before it
(`model.layers.3.block_sparse_moe.`) is stripped; with several blocks in one file, pass --prefix
to pick one. OUT holds the layer under prefix "":
    spex::load_layer<spex::MoE<float, spex::TopKRouter<float>>>("OUT.safetensors")
(ReLU routing: spex::MoE<float>, spex::ReluRouter; PEER: spex::Peer<float>; PKM: spex::Pkm<float>).

Memory: OUT is written tensor by tensor, expert by expert and, for expert tables, in blocks of
rows (the header first, from the shapes): beyond what IN takes to read, at most one source tensor
or table block is held at a time. A safetensors IN is memory-mapped; a .pt IN is loaded by torch
(torch 1.13 cannot map it).
Dtypes: F32 and F64 are kept; F16 and BF16 are widened to F32 (spex computes in float or double).
"""
import argparse
import json
import math
import mmap
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spex_torch as st  # noqa: E402

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


class Source:
    """Tensors of IN by name, read one at a time (as float32/float64 numpy arrays)."""

    def __init__(self, path):
        self.path = path
        if path.endswith(".safetensors"):
            self._file = open(path, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            (n,) = struct.unpack("<Q", self._map[:8])
            header = json.loads(self._map[8:8 + n])
            header.pop("__metadata__", None)
            self._base, self._header, self._state = 8 + n, header, None
            self.names = list(header)
        else:
            state = torch.load(path, map_location="cpu")
            if not isinstance(state, dict):
                raise SystemExit(f"{path}: not a state dict (a dict of tensors), but {type(state).__name__}")
            self._state = {k: v for k, v in state.items() if torch.is_tensor(v)}
            self.names = list(self._state)

    def shape(self, name):
        return tuple(self._header[name]["shape"]) if self._state is None else tuple(self._state[name].shape)

    def dtype(self, name):
        if self._state is None:
            return self._header[name]["dtype"]
        return "F64" if self._state[name].dtype == torch.float64 else "F32"

    def get(self, name):
        return self.rows(name, None)

    def rows(self, name, index):
        """The tensor (index None), or the rows `index` (a slice or an integer array) of its first
        dimension, converted to float32/float64: only those rows are read and converted."""
        if self._state is not None:
            t = self._state[name] if index is None else self._state[name][torch.as_tensor(index) if not isinstance(index, slice) else index]
            return (t.double() if t.dtype == torch.float64 else t.float()).numpy()
        e = self._header[name]
        begin, end = e["data_offsets"]
        raw = memoryview(self._map)[self._base + begin:self._base + end]
        kind = e["dtype"]
        if kind == "BF16":
            a = np.frombuffer(raw, dtype="<u2")
        elif kind in _NP:
            a = np.frombuffer(raw, dtype=np.dtype(_NP[kind]).newbyteorder("<"))
        else:
            raise SystemExit(f"{self.path}: tensor {name} has dtype {kind}; expected F64, F32, F16 or BF16")
        a = a.reshape(e["shape"])  # a view of the mapped file
        if index is not None:
            a = a[index]
        if kind == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float64 if kind == "F64" else np.float32)


class Plan:
    """The output tensors, each a shape and a list of callables returning its row blocks."""

    def __init__(self, source, prefix):
        self.source, self.prefix, self.tensors, self.used = source, prefix, {}, set()

    def key(self, name):
        return self.prefix + name

    def has(self, name):
        return self.key(name) in self.source.names

    def need(self, name, shape=None):
        k = self.key(name)
        self.used.add(k)
        if k not in self.source.names:
            raise SystemExit(f"{self.source.path}: no tensor '{k}' (the layout expects it)")
        if shape is not None and self.source.shape(k) != tuple(shape):
            raise SystemExit(f"{self.source.path}: '{k}' has shape {list(self.source.shape(k))}, the config gives {list(shape)}")
        return k

    def add(self, out, rows, cols, blocks, shape=None):
        """shape: the tensor's shape in OUT when not [rows, cols] (a vector: [rows])."""
        self.tensors[out] = (rows, cols, blocks, shape or ([rows] if out == "router.expert_bias" else [rows, cols]))

    def copy(self, out, name, shape):
        k = self.need(name, shape)
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (shape[0], 1)
        self.add(out, rows, cols, [lambda k=k, r=rows, c=cols: self.source.get(k).reshape(r, c)], list(shape))

    def copy_rows(self, out, name, shape, order=None):
        """A table copied in blocks of rows (at most ~64 MB read at a time); row r of OUT is row
        order(r) of the source (order: a function of an array of rows; None: the same rows)."""
        k = self.need(name, shape)
        rows, cols = shape
        step = max(1, (1 << 24) // max(1, cols))
        blocks = []
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            index = slice(r0, r1) if order is None else order(np.arange(r0, r1))
            blocks.append(lambda index=index: self.source.rows(k, index))
        self.add(out, rows, cols, blocks)


def find_prefix(source, router_suffixes, prefix):
    if prefix is not None:
        return prefix
    found = sorted({n[:-len(s)] for n in source.names for s in router_suffixes if n.endswith(s)})
    # a key ending in a router suffix may itself be longer (shared_expert_gate.weight ends in gate.weight)
    found = [p for p in found if not any(p.endswith(x) for x in ("shared_expert_", "shared_experts.", "linear_fc1."))]
    if not found:
        raise SystemExit(f"{source.path}: no key ending in {', '.join(router_suffixes)} found (is --from right?)")
    if len(found) > 1:
        raise SystemExit(f"{source.path}: {len(found)} blocks ({', '.join(repr(p) for p in found[:4])}...): pass --prefix")
    return found[0]


def need_keys(cfg, names, source):
    missing = [n for n in names if n not in cfg]
    if missing:
        raise SystemExit(f"--config lacks {', '.join(missing)} ({source} config names)")


def glu_experts(plan, n, ff, d, gate, up, down, w1="experts.w1", w2="experts.w2"):
    """SwiGLU experts from per-expert gate/up [ff, d] and down [d, ff] names (format with e)."""
    blocks1, blocks2 = [], []
    for e in range(n):
        g, u, o = plan.need(gate.format(e), (ff, d)), plan.need(up.format(e), (ff, d)), plan.need(down.format(e), (d, ff))
        blocks1 += [lambda g=g: plan.source.get(g), lambda u=u: plan.source.get(u)]
        blocks2.append(lambda o=o: plan.source.get(o))
    plan.add(w1, 2 * ff * n, d, blocks1)
    plan.add(w2, d * n, ff, blocks2)


def from_mixtral(plan, c):
    need_keys(c, ["hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok"], "MixtralConfig")
    if c.get("router_jitter_noise", 0.0):
        raise SystemExit("router_jitter_noise > 0 is training noise spex does not have: import with 0")
    d, ff, n = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]
    plan.copy("router.weight", "gate.weight", (n, d))
    glu_experts(plan, n, ff, d, "experts.{}.w1.weight", "experts.{}.w3.weight", "experts.{}.w2.weight")
    return "TopKMoE", dict(d_in=d, n_experts=n, hidden=ff, experts_per_token=c["num_experts_per_tok"], ffn="swiglu",
                           score="softmax", pre_softmax=True, renormalize=True, aux_coeff=c.get("router_aux_loss_coef", 0.001))


def from_qwen2_moe(plan, c):
    need_keys(c, ["hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok"], "Qwen2MoeConfig")
    d, ff, n = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"]
    plan.copy("router.weight", "gate.weight", (n, d))
    glu_experts(plan, n, ff, d, "experts.{}.gate_proj.weight", "experts.{}.up_proj.weight", "experts.{}.down_proj.weight")
    cfg = dict(d_in=d, n_experts=n, hidden=ff, experts_per_token=c["num_experts_per_tok"], ffn="swiglu", score="softmax",
               pre_softmax=True, renormalize=bool(c.get("norm_topk_prob", False)), aux_coeff=c.get("router_aux_loss_coef", 0.001))
    sh = c.get("shared_expert_intermediate_size", 0)
    if sh:
        glu_experts(plan, 1, sh, d, "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight",
                    "shared.w1", "shared.w2")
        plan.copy("shared.gate.weight", "shared_expert_gate.weight", (1, d))
        cfg.update(shared_experts=1, shared_hidden=sh, shared_gate=True)
    return "TopKMoE", cfg


def from_deepseek(plan, c):
    need_keys(c, ["hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"], "DeepseekV3Config / DeepseekV2Config")
    d, ff, n, k = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"], c["num_experts_per_tok"]
    scoring = c.get("scoring_func", "sigmoid")
    method = c.get("topk_method", "noaux_tc" if scoring == "sigmoid" else "greedy")
    if scoring not in ("sigmoid", "softmax") or method not in ("noaux_tc", "group_limited_greedy", "greedy"):
        raise SystemExit(f"scoring_func = {scoring!r}, topk_method = {method!r}: spex imports sigmoid/softmax with noaux_tc, "
                         "group_limited_greedy or greedy")
    plan.copy("router.weight", "gate.weight", (n, d))
    glu_experts(plan, n, ff, d, "experts.{}.gate_proj.weight", "experts.{}.up_proj.weight", "experts.{}.down_proj.weight")
    cfg = dict(d_in=d, n_experts=n, hidden=ff, experts_per_token=k, ffn="swiglu", score=scoring, pre_softmax=True,
               renormalize=bool(c.get("norm_topk_prob", scoring == "sigmoid")) and k > 1,
               route_scale=float(c.get("routed_scaling_factor", 1.0)), aux_coeff=0.0)
    if method == "noaux_tc":  # the bias selects; groups scored by their best two
        plan.copy("router.expert_bias", "gate.e_score_correction_bias", (n,))
        cfg.update(expert_bias=True)
    if method != "greedy" and c.get("n_group", 1) > 1:
        cfg.update(n_groups=c["n_group"], group_topk=c.get("topk_group", c["n_group"]),
                   group_score_experts=2 if method == "noaux_tc" else 1)
    if c.get("aux_loss_alpha", 0.0) and c.get("seq_aux", False):
        cfg.update(seq_aux_coeff=float(c["aux_loss_alpha"]), seq_len=int(c.get("seq_len", 0)) or 1)
    shared = c.get("n_shared_experts", 0) or 0
    if shared:
        glu_experts(plan, 1, ff * shared, d, "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
                    "shared_experts.down_proj.weight", "shared.w1", "shared.w2")
        cfg.update(shared_experts=shared, shared_hidden=ff)
    return "TopKMoE", cfg


def from_megatron(plan, c):
    need_keys(c, ["hidden_size", "moe_ffn_hidden_size", "num_experts", "moe_router_topk"], "Megatron-Core argument")
    d, ff, n, k = c["hidden_size"], c["moe_ffn_hidden_size"], c["num_experts"], c["moe_router_topk"]
    glu = bool(c.get("swiglu", True))
    h1 = 2 * ff if glu else ff
    plan.copy("router.weight", "router.weight", (n, d))
    # Expert weights: SequentialMLP (local_experts.{e}.linear_fc1/2.weight), TEGroupedMLP
    # (linear_fc1.weight{e}), or the legacy GroupedMLP (weight1 [d, E*h1], weight2 [E*ff, d]).
    if plan.has("experts.local_experts.0.linear_fc1.weight"):
        fc1, fc2 = "experts.local_experts.{}.linear_fc1.weight", "experts.local_experts.{}.linear_fc2.weight"
    elif plan.has("experts.linear_fc1.weight0"):
        fc1, fc2 = "experts.linear_fc1.weight{}", "experts.linear_fc2.weight{}"
    else:
        fc1 = fc2 = None
    if fc1:
        names1 = [plan.need(fc1.format(e), (h1, d)) for e in range(n)]
        names2 = [plan.need(fc2.format(e), (d, ff)) for e in range(n)]
        plan.add("experts.w1", n * h1, d, [lambda x=x: plan.source.get(x) for x in names1])
        plan.add("experts.w2", n * d, ff, [lambda x=x: plan.source.get(x) for x in names2])
    else:
        w1, w2 = plan.need("experts.weight1", (d, n * h1)), plan.need("experts.weight2", (n * ff, d))
        plan.add("experts.w1", n * h1, d, [lambda e=e: plan.source.get(w1)[:, e * h1:(e + 1) * h1].T for e in range(n)])
        plan.add("experts.w2", n * d, ff, [lambda e=e: plan.source.get(w2)[e * ff:(e + 1) * ff].T for e in range(n)])
    cfg = dict(d_in=d, n_experts=n, hidden=ff, experts_per_token=k, ffn="swiglu" if glu else "gelu")
    if c.get("remoe", False):  # ReMoE's Megatron fork: ReLU routing (no TopK options)
        return "ReMoE", cfg
    score = c.get("moe_router_score_function", "softmax")
    cfg.update(score=score, pre_softmax=bool(c.get("moe_router_pre_softmax", False)) or score == "sigmoid",
               renormalize=score == "sigmoid" and k > 1, route_scale=float(c.get("moe_router_topk_scaling_factor") or 1.0),
               aux_coeff=float(c.get("moe_aux_loss_coeff", 0.0)), z_coeff=float(c.get("moe_z_loss_coeff") or 0.0))
    if c.get("moe_router_enable_expert_bias", False):
        plan.copy("router.expert_bias", "router.expert_bias", (n,))
        cfg.update(expert_bias=True)
    if (c.get("moe_router_num_groups") or 1) > 1:
        cfg.update(n_groups=c["moe_router_num_groups"], group_topk=c.get("moe_router_group_topk") or 0)
    sh = c.get("moe_shared_expert_intermediate_size") or 0
    if sh:
        plan.copy("shared.w1", "shared_experts.linear_fc1.weight", (2 * sh if glu else sh, d))
        plan.copy("shared.w2", "shared_experts.linear_fc2.weight", (d, sh))
        cfg.update(shared_experts=1, shared_hidden=sh)
        if c.get("moe_shared_expert_gate", False):
            plan.copy("shared.gate.weight", "shared_experts.gate_weight", (1, d))
            cfg.update(shared_gate=True)
    return "TopKMoE", cfg


# PEER-pytorch's activation classes (its `activation` argument, a class: passed by name) -> spex's.
_PEER_ACTIVATIONS = {"GELU": "gelu_erf", "ReLU": "relu", "SiLU": "silu", "Sigmoid": "sigmoid", "Identity": "identity"}


def from_peer_pytorch(plan, c):
    """lucidrains' PEER-pytorch PEER block (docs/from_peer_pytorch.md)."""
    need_keys(c, ["dim"], "PEER(...) keyword")
    dim, heads, n = c["dim"], c.get("heads", 8), c.get("num_experts", 1_000_000)
    per_head = c.get("num_experts_per_head", 16)
    dim_key = c.get("dim_key") or dim // 2
    non_competing = c.get("non_competing_scores", True)
    k = 1 if non_competing else per_head
    pk_topk = c.get("product_key_topk") or per_head
    if pk_topk < k:
        raise SystemExit(f"product_key_topk = {pk_topk} is below the {k} experts each head keeps: the source then searches "
                         "approximately (a best pair may lie outside both halves' top lists), and spex's retrieval is exact, "
                         "so spex would pick other experts. Import a model whose product_key_topk >= num_experts_per_head")
    keys = int(math.isqrt(n))
    if keys * keys != n:
        raise SystemExit(f"num_experts = {n} is not a square")
    act = c.get("activation", "GELU")
    if act not in _PEER_ACTIVATIONS:
        raise SystemExit(f"activation = {act!r}: spex imports {', '.join(_PEER_ACTIVATIONS)} (the torch.nn class name)")
    if c.get("dropout", 0.0):
        print("dropout: a training regularizer, not imported (eval output is unaffected)")
    separate, rms = bool(c.get("separate_embed_per_head", False)), bool(c.get("pre_rmsnorm", False))
    sets = heads if separate else 1
    if rms:
        plan.copy("input_norm.gamma", "norm.gamma", (dim,))
    # Queries: the source's rows are (p h d), both halves of all heads with the half outermost;
    # spex's are (h p d), head by head. Row (h, p, d) of spex's is row (p, h, d) of the source's.
    qname = plan.need("to_queries.0.weight", (2 * heads * dim_key, dim))
    perm = np.arange(2 * heads * dim_key).reshape(2, heads, dim_key).transpose(1, 0, 2).reshape(-1)
    plan.add("query.weight", 2 * heads * dim_key, dim, [lambda: plan.source.get(qname)[perm]])
    kname = plan.need("keys", (heads, keys, 2, dim_key))
    for h in range(heads):
        for half in range(2):
            plan.add(f"keys.h{h}.c{half + 1}", keys, dim_key, [lambda h=h, half=half: plan.source.get(kname)[h, :, half, :]])
    # Tables: the source's row of head h's expert i is h * N + i, spex's i * heads + h.
    order = None if not separate else (lambda r: (r % heads) * n + r // heads)
    plan.copy_rows("experts.down", "weight_down_embed.weight", (n * sets, dim), order)
    plan.copy_rows("experts.up", "weight_up_embed.weight", (n * sets, dim), order)
    return "Peer", dict(d_in=dim, d_out=dim, n_experts=n, heads=heads, top_k=k, d_key=2 * dim_key, activation=_PEER_ACTIVATIONS[act],
                        score="relu" if non_competing else "softmax", norm="none", shared_keys=False, learn_keys=True,
                        query_bias=False, input_rmsnorm=rms, per_head_tables=separate)


def hashing_memory(plan, heads, n_keys, k_dim, v_dim, d_in, query_bias, batchnorm, values_prefix, peer=False):
    """The query MLP, keys and values of Meta's HashingMemory (XLM's PKM and Memory+): its
    query rows are (h p d) as spex's, its keys [heads, 2, n, half] (or [2 * heads * n, half])."""
    plan.copy("query.weight", "query_proj.query_mlps.0.weight", (heads * k_dim, d_in))
    if query_bias:
        plan.copy("query.bias", "query_proj.query_mlps.0.bias", (heads * k_dim,))
    if batchnorm:
        for t in ("weight", "bias", "running_mean", "running_var"):
            plan.copy("norm." + t, "query_proj.query_mlps.1." + t, (heads * k_dim,))
    half = k_dim // 2
    kname = plan.need("keys")
    if plan.source.shape(kname) not in ((heads, 2, n_keys, half), (2 * heads * n_keys, half)):
        raise SystemExit(f"{plan.source.path}: 'keys' has shape {list(plan.source.shape(kname))}, the config gives "
                         f"{[heads, 2, n_keys, half]} (or {[2 * heads * n_keys, half]})")
    for h in range(heads):
        for p in range(2):
            plan.add(f"keys.h{h}.c{p + 1}", n_keys, half,
                     [lambda h=h, p=p: plan.source.get(kname).reshape(heads, 2, n_keys, half)[h, p]])
    size = n_keys * n_keys
    # Shared values (mem_share_values) live in one layer's state: --values-prefix names it.
    values = Plan(plan.source, values_prefix if values_prefix is not None else plan.prefix)
    names = ["values_u.weight", "values_v.weight"] if peer else ["values.weight"]
    for name in names:
        if not values.has(name):
            raise SystemExit(f"{plan.source.path}: no '{values.key(name)}': with mem_share_values the values live under the "
                             "layer that created them; pass --values-prefix with that layer's prefix")
    outs = ["experts.down", "experts.up"] if peer else ["experts.values"]
    for out, name in zip(outs, names):
        values.copy_rows(out, name, (size, v_dim))
        plan.tensors[out] = values.tensors[out]
        plan.used.add(values.key(name))


def from_xlm_pkm(plan, c, values_prefix=None):
    """facebookresearch/XLM's HashingMemory (mem_implementation pq_fast or pq_default): docs/from_xlm_pkm.md."""
    need_keys(c, ["input_dim"], "HashingMemory (XLM) argument")
    d_in = c["input_dim"]
    d_out = c.get("output_dim", d_in)
    heads, knn, k_dim, n_keys = c.get("mem_heads", 4), c.get("mem_knn", 32), c.get("mem_k_dim", 256), c.get("mem_n_keys", 512)
    v_dim = c.get("mem_v_dim", -1)
    v_dim = v_dim if v_dim > 0 else d_out
    if v_dim != d_out:
        raise SystemExit(f"mem_v_dim = {v_dim} differs from output_dim = {d_out}: XLM returns the values as they are")
    for key, ok, why in [("mem_implementation", ("pq_fast", "pq_default"), "flat memories have no product keys"),
                         ("mem_query_layer_sizes", ("0,0", [0, 0]), "spex's query network is one Linear"),
                         ("mem_use_different_keys", (True,), "spex keeps sub-keys per head (or one set shared by all)"),
                         ("mem_score_softmax", (True,), "spex's PKM gates are softmax, sigmoid or ReLU of the scores"),
                         ("mem_temperature", (1, 1.0), "a temperature is not a spex option"),
                         ("mem_score_subtract", ("",), "score subtraction is not a spex option"),
                         ("mem_score_normalize", (False,), "score normalization is not a spex option"),
                         ("mem_normalize_query", (False,), "query normalization by norm is not a spex option"),
                         ("mem_modulo_size", (-1,), "index modulo is not a spex option"),
                         ("mem_shuffle_indices", (False,), "shuffled indices are not a spex option"),
                         ("mem_multi_query_net", (False,), "one query network per head is not a spex option"),
                         ("mem_input2d", (False,), "convolutional query networks are not a spex option")]:
        if key in c and c[key] not in ok:
            raise SystemExit(f"{key} = {c[key]!r}: {why}")
    batchnorm = bool(c.get("mem_query_batchnorm", False))
    hashing_memory(plan, heads, n_keys, k_dim, v_dim, d_in, bool(c.get("mem_query_bias", True)), batchnorm, values_prefix)
    return "Pkm", dict(d_in=d_in, d_out=d_out, n_keys=n_keys, heads=heads, top_k=knn, d_key=k_dim, score="softmax",
                       norm="batch" if batchnorm else "none", shared_keys=False, learn_keys=bool(c.get("mem_keys_learn", True)),
                       query_bias=bool(c.get("mem_query_bias", True)))


def from_memory_plus(plan, c, values_prefix=None):
    """facebookresearch/memory's HashingMemory (Memory+): docs/from_memory_plus.md."""
    need_keys(c, ["input_dim", "output_dim"], "HashingMemory (memory) argument")
    d_in, d_out = c["input_dim"], c["output_dim"]
    heads, knn, k_dim, n_keys = c.get("mem_heads", 4), c.get("mem_knn", 32), c.get("mem_k_dim", 512), c.get("mem_n_keys", 1024)
    v_dim = c.get("mem_v_dim", -1)
    v_dim = v_dim if v_dim > 0 else d_out
    peer, swilu = bool(c.get("peer_variant", False)), bool(c.get("swilu_projection", True))
    if not peer and not swilu and v_dim != d_out:
        raise SystemExit(f"mem_v_dim = {v_dim} with swilu_projection = false: a plain value projection is not a spex option "
                         "(spex projects with the SiLU-gated output only)")
    batchnorm = bool(c.get("mem_query_batchnorm", False))
    hashing_memory(plan, heads, n_keys, k_dim, v_dim, d_in, bool(c.get("mem_query_bias", True)), batchnorm, values_prefix, peer)
    cfg = dict(d_in=d_in, d_out=d_out, n_keys=n_keys, heads=heads, top_k=knn, d_key=k_dim, score="softmax",
               norm="batch" if batchnorm else "none", shared_keys=False, learn_keys=True, query_bias=bool(c.get("mem_query_bias", True)))
    if peer:  # values_u / values_v as GELU neurons; no SiLU projection in this variant
        cfg.update(activation="gelu_erf")
    elif swilu:
        plan.copy("output.silu.weight", "swilu_projection.weight", (v_dim, d_in))
        plan.copy("output.silu.bias", "swilu_projection.bias", (v_dim,))
        plan.copy("output.proj.weight", "value_proj.weight", (d_out, v_dim))
        plan.copy("output.proj.bias", "value_proj.bias", (d_out,))
        cfg.update(silu_output=True, d_value=v_dim)
    if c.get("mem_gated", False):
        plan.copy("output.gate.weight", "gating.weight", (1, d_in))
        plan.copy("output.gate.bias", "gating.bias", (1,))
        cfg.update(sigmoid_gate=True)
    return ("Peer" if peer else "Pkm"), cfg


def from_pkm_lucidrains(plan, c, values_prefix=None):
    """lucidrains' product-key-memory PKM: docs/from_pkm_lucidrains.md."""
    need_keys(c, ["dim"], "PKM(...) keyword")
    dim, heads, n_keys, k, dim_head = c["dim"], c.get("heads", 4), c.get("num_keys", 128), c.get("topk", 32), c.get("dim_head", 128)
    for key, why in [("pre_layernorm", "apply the LayerNorm to the input before spex's layer"),
                     ("concat_values_and_combine", "per-head values combined by a Linear are not a spex option"),
                     ("norm_output", "apply the LayerNorm to the layer's output after spex's layer"),
                     ("differentiable_topk", "spex's top-k is exact, not the coordinate-descent relaxation")]:
        if c.get(key, False):
            raise SystemExit(f"{key} = true: {why}")
    if not c.get("use_layernorm", True):
        raise SystemExit("use_layernorm = false: the source's BatchNorm1d(dim_head) over (b p h, t, d) normalizes over the "
                         "sequence axis; import a model trained with its default LayerNorm")
    d_key = 2 * dim_head
    qname = plan.need("to_queries.weight", (heads * d_key, dim))
    perm = np.arange(heads * d_key).reshape(2, heads, dim_head).transpose(1, 0, 2).reshape(-1)  # (p h d) -> (h p d)
    plan.add("query.weight", heads * d_key, dim, [lambda: plan.source.get(qname)[perm]])
    # LayerNorm(dim_head): one weight and bias shared by every head and half; spex holds them per feature.
    for t in ("weight", "bias"):
        name = plan.need("norm." + t, (dim_head,))
        plan.add("norm." + t, heads * d_key, 1, [lambda name=name: np.tile(plan.source.get(name), 2 * heads)], [heads * d_key])
    kname = plan.need("keys", (heads, n_keys, 2, dim_head))
    for h in range(heads):
        for p in range(2):
            plan.add(f"keys.h{h}.c{p + 1}", n_keys, dim_head, [lambda h=h, p=p: plan.source.get(kname)[h, :, p, :]])
    plan.copy_rows("experts.values", "values.weight", (n_keys * n_keys, dim))
    return "Pkm", dict(d_in=dim, d_out=dim, n_keys=n_keys, heads=heads, top_k=k, d_key=d_key,
                       score="relu" if c.get("non_competitive_gates", False) else "softmax", norm="layer", norm_per_half=True,
                       shared_keys=False, learn_keys=True, query_bias=False)


SOURCES = {"mixtral": (from_mixtral, ["gate.weight"]), "qwen2-moe": (from_qwen2_moe, ["gate.weight"]),
           "deepseek-v3": (from_deepseek, ["gate.weight"]), "megatron": (from_megatron, ["router.weight"]),
           "peer-pytorch": (from_peer_pytorch, ["weight_down_embed.weight"]),
           "xlm-pkm": (from_xlm_pkm, ["query_proj.query_mlps.0.weight"]),
           "memory-plus": (from_memory_plus, ["query_proj.query_mlps.0.weight"]),
           "pkm-lucidrains": (from_pkm_lucidrains, ["to_queries.weight"])}
MEMORY_SOURCES = ("xlm-pkm", "memory-plus", "pkm-lucidrains")


def write(path, plan, kind, cfg, dtype):
    """The header from the planned shapes, then each tensor block by block."""
    np_type = np.float64 if dtype == "F64" else np.float32
    size = 8 if dtype == "F64" else 4
    header, offset = {}, 0
    for name, (rows, cols, _, shape) in plan.tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + rows * cols * size]}
        offset += rows * cols * size
    entry = (kind, dtype, cfg) + (({"lambda": 0.0},) if kind == "ReMoE" else ())
    header["__metadata__"] = st.spex_metadata({"": entry})
    text = json.dumps(header).encode()
    text += b" " * ((-(8 + len(text))) % 64)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, (rows, cols, blocks, _) in plan.tensors.items():
            written = 0
            for block in blocks:
                a = np.ascontiguousarray(np.asarray(block(), dtype=np_type).reshape(-1, cols))
                if not np.isfinite(a).all():
                    raise SystemExit(f"{plan.source.path}: {name} holds NaN or Inf")
                f.write(a.astype(np.dtype(np_type).newbyteorder("<")).tobytes())
                written += a.shape[0]
            if written != rows:
                raise SystemExit(f"internal: {name} got {written} rows, planned {rows}")
    os.replace(tmp, path)  # all or nothing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", required=True, choices=sorted(SOURCES))
    ap.add_argument("--config", required=True, help="the source model's config as JSON, under its own names")
    ap.add_argument("--prefix", default=None, help="the block's key prefix in IN (default: found from the router key)")
    ap.add_argument("--values-prefix", default=None,
                    help="xlm-pkm, memory-plus with mem_share_values: the prefix of the layer that holds the shared values")
    ap.add_argument("input")
    ap.add_argument("output")
    a = ap.parse_args(argv)
    try:
        config = json.loads(a.config)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--config is not JSON: {e}")
    convert, router = SOURCES[a.source]
    source = Source(a.input)
    plan = Plan(source, find_prefix(source, router, a.prefix))
    if a.values_prefix is not None and a.source not in MEMORY_SOURCES[:2]:
        raise SystemExit("--values-prefix is for xlm-pkm and memory-plus (shared value tables)")
    kind, cfg = convert(plan, config, a.values_prefix) if a.source in MEMORY_SOURCES else convert(plan, config)
    dtype = "F64" if all(source.dtype(n) == "F64" for n in plan.used) else "F32"
    unused = [n for n in source.names if n.startswith(plan.prefix) and n not in plan.used]
    write(a.output, plan, kind, cfg, dtype)
    print(f"{a.output}: {kind} from {a.source} ({plan.prefix or 'no prefix'}), {len(plan.tensors)} tensors, {dtype}")
    if unused:
        print(f"not imported: {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}")


if __name__ == "__main__":
    main()
