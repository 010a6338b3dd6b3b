#!/usr/bin/env python3
"""Trains (a few Adam steps) and saves one PyTorch reference module of each spex layer kind, in
float64, with the inputs and PyTorch's eval-mode outputs beside it:
  OUTDIR/<case>.safetensors      the layer (weights, buffers, spex metadata): spex::load_layer
  OUTDIR/<case>.io.safetensors   x and y = module.eval()(x); for Peer, Pkm and TopK MoE also dy,
                                 the training-mode output y_train, the input and parameter
                                 gradients of sum(y_train * dy) (+ aux_loss: TopK) (dx,
                                 grad.<name>), aux, and with an expert bias the step's load and
                                 the bias after update_expert_bias(load, rate)
tests/torch_interop.sh loads each layer in spex and requires spex to reproduce all of it.
Usage: tools/export_reference.py OUTDIR
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spex_torch as st  # noqa: E402


def cases():
    yield "peer", st.PEER(d_in=12, n_keys=7, heads=3, top_k=4, d_key=6)
    yield "peer_per_head_sigmoid_relu", st.PEER(d_in=10, d_out=6, n_keys=5, heads=2, top_k=3, d_key=4, shared_keys=False,
                                                 score="sigmoid", activation="relu", query_bias=True)
    yield "peer_no_norm_silu", st.PEER(d_in=8, n_keys=6, heads=2, top_k=5, d_key=8, norm="none", activation="silu")
    yield "pkm", st.PKM(d_in=12, n_keys=7, heads=2, top_k=4, d_key=6)
    # PEER-pytorch's options: an input RMSNorm, one table per head, per-head keys, no query norm;
    # and GLU experts (UltraMemV2).
    yield "peer_rmsnorm_per_head_tables", st.PEER(d_in=10, n_keys=5, heads=3, top_k=2, d_key=6, norm="none", score="relu",
                                                   shared_keys=False, input_rmsnorm=True, per_head_tables=True)
    yield "peer_glu_rmsnorm", st.PEER(d_in=10, d_out=7, n_keys=6, heads=2, top_k=3, d_key=4, activation="silu", glu=True,
                                      input_rmsnorm=True)
    yield "peer_glu_per_head_tables", st.PEER(d_in=8, n_keys=5, heads=2, top_k=4, d_key=4, glu=True, per_head_tables=True)
    # Memory+: per-head keys, a query bias, no norm, its SiLU-gated output projecting d_value 9 to
    # d_out 12, and the sigmoid gate; the same head on PEER.
    yield "pkm_memory_plus", st.PKM(d_in=12, n_keys=6, heads=2, top_k=3, d_key=6, norm="none", shared_keys=False,
                                    query_bias=True, silu_output=True, sigmoid_gate=True, d_value=9)
    yield "peer_silu_output", st.PEER(d_in=10, n_keys=5, heads=2, top_k=3, d_key=4, silu_output=True, d_value=6)
    yield "pkm_sigmoid_gate", st.PKM(d_in=8, n_keys=5, heads=2, top_k=2, d_key=4, sigmoid_gate=True)
    # lucidrains' product-key-memory: LayerNorm over each product half, per-head keys, ReLU gates.
    yield "pkm_layernorm_halves", st.PKM(d_in=12, n_keys=6, heads=2, top_k=3, d_key=8, norm="layer", norm_per_half=True,
                                         shared_keys=False, score="relu")
    yield "pkm_rmsnorm_per_head_tables", st.PKM(d_in=12, n_keys=6, heads=2, top_k=3, d_key=6, input_rmsnorm=True,
                                                 per_head_tables=True)
    yield "remoe_swiglu", st.MoE(d_in=10, n_experts=6, hidden=8, experts_per_token=2, router="relu", lam=0.25)
    yield "topk_gelu", st.MoE(d_in=10, n_experts=6, hidden=8, experts_per_token=2, router="topk", ffn="gelu")
    yield "topk_renormalized", st.MoE(d_in=10, n_experts=5, hidden=6, experts_per_token=3, router="topk", renormalize=True)
    yield "topk_softmax_over_k", st.MoE(d_in=10, n_experts=5, hidden=6, experts_per_token=2, router="topk", pre_softmax=False)
    # DeepSeek-V3's routing: sigmoid, selection bias, 4 groups of which 2 (scored by their best 2),
    # renormalized and scaled, a sequence-wise loss, one shared expert.
    yield "topk_deepseek_v3", st.MoE(d_in=10, n_experts=8, hidden=6, experts_per_token=3, router="topk", score="sigmoid",
                                     renormalize=True, route_scale=2.5, expert_bias=True, n_groups=4, group_topk=2,
                                     group_score_experts=2, aux_coeff=0.0, seq_aux_coeff=0.01, seq_len=5, shared_experts=1)
    # Qwen2-MoE's: softmax top-k, not renormalized, a gated shared expert of its own width; z-loss.
    yield "topk_qwen2_moe", st.MoE(d_in=10, n_experts=6, hidden=5, experts_per_token=2, router="topk", z_coeff=0.01,
                                   shared_experts=1, shared_hidden=12, shared_gate=True)
    # Megatron-Core's sigmoid without renormalization, one group of 3 scored by k / group_topk, GELU, two
    # gated shared experts, both balancing losses.
    yield "topk_sigmoid_groups", st.MoE(d_in=10, n_experts=6, hidden=4, experts_per_token=2, router="topk", ffn="gelu",
                                        score="sigmoid", n_groups=3, group_topk=1, expert_bias=True, aux_coeff=0.05,
                                        seq_aux_coeff=0.02, seq_len=4, shared_experts=2, shared_hidden=3, shared_gate=True)


BIAS_RATE = 1e-3  # Megatron-Core's default --moe-router-bias-update-rate


def gradients(m, x):
    """dy, the training-mode output, its (and the aux loss's) gradients by autograd, and the expert
    bias update. A copy of m is put in training mode (BatchNorm: batch statistics)."""
    m = copy.deepcopy(m).train()
    torch.manual_seed(1)
    dy = torch.randn(x.shape[0], m.cfg["d_out"], dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    m.zero_grad()
    aux = m.aux_loss(xg) if hasattr(m, "aux_loss") else torch.zeros((), dtype=torch.float64)
    y = m(xg)
    ((y * dy).sum() + aux).backward()
    out = {"dy": dy, "y_train": y.detach(), "dx": xg.grad, "aux": aux.detach().reshape(1, 1)}
    for name, p in m.named_parameters():
        out["grad." + name] = p.grad if p.grad.dim() == 2 else p.grad.reshape(-1, 1)
    if hasattr(m, "router") and hasattr(m.router, "expert_bias"):
        with torch.no_grad():
            load = (m.gates(x) > 0).double().sum(0)
            bias = m.router.expert_bias
            out["load"] = load.reshape(-1, 1)
            out["bias_next"] = (bias + BIAS_RATE * torch.sign(load.mean() - load)).reshape(-1, 1)
            out["bias_rate"] = torch.tensor([[BIAS_RATE]], dtype=torch.float64)
    return out


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    for name, m in cases():
        m = m.double()
        d_in = m.cfg["d_in"]
        # Train briefly on a random regression target: weights and BatchNorm statistics move.
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        m.train()
        for _ in range(5):
            x = torch.randn(32, d_in, dtype=torch.float64)
            loss = ((m(x) - torch.sin(x[:, :1])) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        if hasattr(m, "router") and hasattr(m.router, "expert_bias"):  # a buffer: give it values that change selections
            m.router.expert_bias.copy_(0.05 * torch.randn(m.e, dtype=torch.float64))
        x = torch.randn(20, d_in, dtype=torch.float64)
        with torch.no_grad():
            y = m(x)
        io = {"x": x, "y": y}
        if m.spex_kind in ("TopKMoE", "Peer", "Pkm"):
            io.update(gradients(m, x))
        st.save_layer(os.path.join(out, name + ".safetensors"), m)
        st.write_safetensors(os.path.join(out, name + ".io.safetensors"), io, {"kind": m.spex_kind})
        print("exported", name, m.spex_kind, tuple(y.shape))


if __name__ == "__main__":
    main()
