#!/usr/bin/env python3
"""FAISS on the shapes of spex's bench_retrieval: exhaustive inner-product top-k (IndexFlatIP)
and product-key top-k (MultiIndexQuantizer: 2 sub-quantizers of n = sqrt(N) centroids, the
exact top-k of N = n^2 combinations; it ranks by L2 distance where spex ranks by inner
product, the same work). Prints one JSON object per line: {"name": ..., "queries_per_s": ...}.

Usage: faiss_peers.py [--threads N] [--repetitions R]
Threads default to OMP_NUM_THREADS. Exit 77 (skip) without python3-faiss.
"""
import argparse
import json
import os
import sys

import numpy as np

from timing import timed

try:
    import faiss
except ImportError:
    print("faiss_peers: python3-faiss is not installed; skipped", file=sys.stderr)
    sys.exit(77)

BATCH = 256


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    ap.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()
    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(1)
    n, d_key, k = 1024, 256, 16
    queries = rng.standard_normal((BATCH, d_key), dtype=np.float32)

    # Product keys: sub-key tables set directly as the quantizer's centroids (no training).
    c1 = rng.standard_normal((n, d_key // 2), dtype=np.float32)
    c2 = rng.standard_normal((n, d_key // 2), dtype=np.float32)
    miq = faiss.MultiIndexQuantizer(d_key, 2, 10)
    faiss.copy_array_to_vector(np.concatenate([c1, c2]).ravel(), miq.pq.centroids)
    miq.is_trained = True
    miq.ntotal = n * n
    t = timed(lambda: miq.search(queries, k), args.repetitions)
    print(json.dumps({"name": "product_keys/%d/%d/%d" % (n * n, d_key, k), "queries_per_s": BATCH / t}), flush=True)

    # Exhaustive: the N = n^2 full keys c1[i] ++ c2[j].
    full = np.concatenate([np.repeat(c1, n, axis=0), np.tile(c2, (n, 1))], axis=1)
    flat = faiss.IndexFlatIP(d_key)
    flat.add(full)
    del full
    t = timed(lambda: flat.search(queries, k), args.repetitions, min_seconds=2.0)
    print(json.dumps({"name": "exhaustive/%d/%d/%d" % (n * n, d_key, k), "queries_per_s": BATCH / t}), flush=True)


if __name__ == "__main__":
    main()
