#!/usr/bin/env python3
"""Trains (a few Adam steps) and saves one PyTorch reference module of each spex layer kind, in
float64, with the inputs and PyTorch's eval-mode outputs beside it:
  OUTDIR/<case>.safetensors      the layer (weights, buffers, spex metadata): spex::load_layer
  OUTDIR/<case>.io.safetensors   x and y = module.eval()(x)
tests/torch_interop.sh loads each layer in spex and requires spex's infer(x) to equal y.
Usage: tools/export_reference.py OUTDIR
"""
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
    yield "remoe_swiglu", st.MoE(d_in=10, n_experts=6, hidden=8, experts_per_token=2, router="relu", lam=0.25)
    yield "topk_gelu", st.MoE(d_in=10, n_experts=6, hidden=8, experts_per_token=2, router="topk", ffn="gelu")
    yield "topk_renormalized", st.MoE(d_in=10, n_experts=5, hidden=6, experts_per_token=3, router="topk", renormalize=True)
    yield "topk_softmax_over_k", st.MoE(d_in=10, n_experts=5, hidden=6, experts_per_token=2, router="topk", pre_softmax=False)


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
        x = torch.randn(20, d_in, dtype=torch.float64)
        with torch.no_grad():
            y = m(x)
        st.save_layer(os.path.join(out, name + ".safetensors"), m)
        st.write_safetensors(os.path.join(out, name + ".io.safetensors"), {"x": x, "y": y}, {"kind": m.spex_kind})
        print("exported", name, m.spex_kind, tuple(y.shape))


if __name__ == "__main__":
    main()
