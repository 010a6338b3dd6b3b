#!/usr/bin/env python3
"""Turns one run of scripts/bench.sh into the performance tables: spex (the build's GEMM
engines, and Eigen only) against the peers (PyTorch, FAISS) on the same shapes, the targets,
PEER against its roofline with the split of its forward, and the GEMM engine table.

Usage: report.py RUN_DIR [--update-docs docs/performance.md]
RUN_DIR holds machine.json, <binary>-<variant>.json (Google Benchmark, --benchmark_format=json
with repetitions) and peers-*.jsonl. Prints Markdown; --update-docs replaces the part of the
page between <!-- bench:begin --> and <!-- bench:end -->.
"""
import glob
import json
import os
import re
import sys

VARIANTS = ("engines", "eigen")


def load_benchmarks(run_dir):
    """{variant: {benchmark name: median entry}} and {(binary, variant): {...}} from the Google
    Benchmark JSON files <binary>-<variant>.json (the machine limits exist in every binary)."""
    merged, per_binary = {v: {} for v in VARIANTS}, {}
    for path in sorted(glob.glob(os.path.join(run_dir, "*-*.json"))):
        binary, variant = os.path.basename(path)[:-5].rsplit("-", 1)
        if variant not in merged:
            continue
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            if b.get("aggregate_name") == "median":
                merged[variant][b["run_name"]] = b
                per_binary.setdefault((binary, variant), {})[b["run_name"]] = b
    return merged, per_binary


def load_peers(run_dir):
    peers = {}
    for path in glob.glob(os.path.join(run_dir, "peers-*.jsonl")):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    peers[r["name"]] = r
    return peers


def fmt_rate(v):
    if v is None:
        return "-"
    return "{:,.0f}".format(v)


def fmt_ratio(v):
    return "-" if v is None else "%.2fx" % v


def bf16_kernel(benchmarks):
    """The kernel the searches score bf16 in ("AMX tiles", "VDPBF16PS"), from the benchmarks'
    labels (bench_common.hpp), or None."""
    for b in benchmarks:
        m = re.search(r"bf16 scores \(([^)]*)\)", b.get("label", ""))
        if m:
            return m.group(1)
    return None


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    run_dir = sys.argv[1]
    with open(os.path.join(run_dir, "machine.json")) as f:
        machine = json.load(f)
    bench, per_binary = load_benchmarks(run_dir)
    peers = load_peers(run_dir)

    def spex(variant, name, counter):
        b = bench[variant].get(name)
        return None if b is None else b.get(counter)

    def peer(name, key):
        r = peers.get(name)
        return None if r is None else r.get(key)

    lines = []
    w = lines.append
    def limit(variant, name, counter):
        b = per_binary.get(("bench_peer", variant), {}).get(name)
        return None if b is None else b.get(counter)
    copy = limit("engines", "BM_StreamCopy/real_time", "bytes/s")
    gemm = limit("engines", "BM_GemmPeak/real_time", "GFLOP/s")
    gemm_eigen = limit("eigen", "BM_GemmPeak/real_time", "GFLOP/s")
    w("Measured by `scripts/bench.sh` on **%s** (%s), %s threads, %s; GEMM engines of this build: %s."
      % (machine["cpu"], machine["isa"], machine["threads"], machine["date"], machine["engines"]))
    if machine.get("openblas_coretype"):
        w("OPENBLAS_CORETYPE=%s for spex and the peers alike: %s" % (machine["openblas_coretype"], machine["coretype_note"]))
    elif machine.get("openblas_kernel"):
        w("OpenBLAS's kernels (its own pick for this CPU, used by spex and the peers alike): %s."
          % machine["openblas_kernel"])
    w("Machine limits in the same binaries: streaming copy %.1f GB/s (read + write), float32 GEMM %.0f GFLOP/s "
      "(512 x 1024 x 512 through spex::gemm; %.0f with Eigen only). Peers: %s."
      % ((copy or 0) / 1e9, gemm or 0, gemm_eigen or 0, machine["peers"]))
    w("")
    w("| work (float32) | spex | spex, Eigen only | peer | peer rate | ratio | ratio, Eigen only | target |")
    w("|---|---|---|---|---|---|---|---|")

    def row(work, name, counter, peer_name, peer_key, peer_label, target):
        s_e, s_g = spex("engines", name, counter), spex("eigen", name, counter)
        p = peer(peer_name, peer_key) if peer_name else None
        ratio = s_e / p if s_e and p else None
        ratio_g = s_g / p if s_g and p else None
        verdict = ""
        if target and ratio is not None:
            verdict = "%s %s" % (target, "reached" if ratio >= float(target.strip(">= x")) else "missed")
        unit = "q/s" if counter == "queries/s" else "tok/s"
        w("| %s | %s %s | %s | %s | %s | %s | %s | %s |" % (work, fmt_rate(s_e), unit, fmt_rate(s_g), peer_label,
                                                          fmt_rate(p), fmt_ratio(ratio), fmt_ratio(ratio_g),
                                                          verdict or "-"))

    torch = "PyTorch %s" % machine.get("torch", "")
    row("dense FFN d 512, hidden 1024, batch 512, fwd", "BM_DenseFFN/1024/0/512/real_time", "tokens/s",
        "dense_ffn_fwd/1024", "tokens_per_s", torch, ">= 1.0x")
    for e, fwd_t, bwd_t in ((8, ">= 1.6x", ">= 2.5x"), (64, ">= 3x", ">= 4x")):
        hidden = 1024 if e == 8 else 128
        row("ReMoE E %d, hidden %d, 1/8 active, fwd" % (e, hidden), "BM_MoEForward_ReLU/%d/0/512/real_time" % e,
            "tokens/s", "remoe_fwd/%d" % e, "tokens_per_s", torch, fwd_t)
        row("ReMoE E %d, fwd+bwd" % e, "BM_MoEForwardBackward_ReLU/%d/0/512/real_time" % e, "tokens/s",
            "remoe_fwdbwd/%d" % e, "tokens_per_s", torch, bwd_t)
        row("TopK MoE E %d, k %d, fwd" % (e, e // 8), "BM_MoEForward_TopK/%d/0/512/real_time" % e, "tokens/s",
            "topk_fwd/%d" % e, "tokens_per_s", torch, "")
        row("TopK MoE E %d, fwd+bwd" % e, "BM_MoEForwardBackward_TopK/%d/0/512/real_time" % e, "tokens/s",
            "topk_fwdbwd/%d" % e, "tokens_per_s", torch, "")
        row("DeepSeek-style MoE E %d (sigmoid, bias, 1 shared), fwd" % e, "BM_MoEForward_DeepSeek/%d/0/512/real_time" % e, "tokens/s",
            "deepseek_fwd/%d" % e, "tokens_per_s", torch, "")
        row("DeepSeek-style MoE E %d, fwd+bwd" % e, "BM_MoEForwardBackward_DeepSeek/%d/0/512/real_time" % e, "tokens/s",
            "deepseek_fwdbwd/%d" % e, "tokens_per_s", torch, "")
    for config, desc, fwd_t, bwd_t in ((1, "N 1024², d 512, batch 256", ">= 6x", ">= 5x"),
                                       (0, "N 256², d 256, batch 512", "", "")):
        row("PEER %s, h 8, k 16, fwd" % desc, "BM_PeerForward/%d/real_time" % config, "tokens/s",
            "peer_fwd/%d" % config, "tokens_per_s", torch, fwd_t)
        row("PEER %s, fwd+bwd" % desc, "BM_PeerForwardBackward/%d/real_time" % config, "tokens/s",
            "peer_fwdbwd/%d" % config, "tokens_per_s", torch, bwd_t)
    faiss = "FAISS %s" % machine.get("faiss", "")
    row("product-key top-k N 1024², d_key 256, k 16, batch 256", "BM_ProductKeyTopK/1048576/256/16/real_time",
        "queries/s", "product_keys/1048576/256/16", "queries_per_s", faiss + " MultiIndexQuantizer", ">= 5x")
    row("exhaustive top-k, same", "BM_ExhaustiveTopK/1048576/256/16/real_time", "queries/s",
        "exhaustive/1048576/256/16", "queries_per_s", faiss + " IndexFlatIP", ">= 1.6x")
    w("")

    # The top-k targets against the GEMM: both searches compute their scores with a GEMM (product
    # keys: both halves, 2 x 1024 sub-keys of 128; exhaustive: all 1024² keys of 256), and no exact
    # search that computes them runs faster than that GEMM at the binary's measured peak.
    if gemm:
        parts = []
        for label, peer_name, flops_per_query, target in (
                ("product-key", "product_keys/1048576/256/16", 2.0 * 2 * 1024 * 128, 5.0),
                ("exhaustive", "exhaustive/1048576/256/16", 2.0 * 1048576 * 256, 1.6)):
            p = peer(peer_name, "queries_per_s")
            if p:
                ceiling = gemm * 1e9 / flops_per_query / p
                parts.append("%s %.2fx (its score GEMM alone at %.0f GFLOP/s: %.1f µs per query; target %.1fx %s)" % (
                    label, ceiling, gemm, 1e6 * flops_per_query / (gemm * 1e9), target,
                    "within it" if target <= ceiling else "beyond it"))
        if parts:
            w("Top-k ceilings over FAISS in this run, from the score GEMM alone: " + "; ".join(parts) + ".")
            retrieval = per_binary.get(("bench_retrieval", "engines"), {})
            bf16 = bf16_kernel(retrieval.values())
            if bf16:
                w("These ceilings bound the float GEMM path. This build scores in bf16 (" + bf16 + ") and rescores "
                  "exactly the keys that may rank (docs/product_keys.md), which is not bound by them; "
                  "the float GEMM path of the same binary: " + "; ".join(
                      "%s %s queries/s" % (what, fmt_rate(retrieval[name]["queries/s"]))
                      for what, name in (("product keys", "BM_ProductKeyTopK_gemm/1048576/256/16/real_time"),
                                         ("exhaustive", "BM_ExhaustiveTopK_gemm/1048576/256/16/real_time"))
                      if name in retrieval) + ".")
            w("")

    # MoE against spex's dense FFN of the same active size (hidden 1024 = 8 x 128 = 1 x 1024).
    parts = []
    for batch, target in ((512, 1.3), (4096, 1.2)):
        dense = {v: spex(v, "BM_DenseFFN/1024/0/%d/real_time" % batch, "tokens/s") for v in VARIANTS}
        for e in (8, 64):
            for v in VARIANTS:
                m = spex(v, "BM_MoEForward_ReLU/%d/0/%d/real_time" % (e, batch), "tokens/s")
                if m and dense[v]:
                    t = dense[v] / m
                    parts.append("E %d, batch %d: %.2fx (target <= %.1fx %s; %s)" % (
                        e, batch, t, target, "reached" if t <= target else "missed", "engines" if v == "engines" else "Eigen only"))
    w("ReMoE forward time over spex's dense FFN of the same active size: " + "; ".join(parts) + ".")
    w("")

    # PEER against its roofline.
    for config, desc, (d, n, batch, d_key) in ((1, "N 1024², d 512", (512, 1024, 256, 256)),
                                               (0, "N 256², d 256", (256, 256, 512, 128))):
        heads, k = 8, 16
        fwd = limit("engines", "BM_PeerForward/%d/real_time" % config, "real_time")
        copy_p, gemm_p = copy, gemm  # bench_peer's own limits: the same binary
        if not (fwd and copy_p and gemm_p):
            continue
        unit = bench["engines"]["BM_PeerForward/%d/real_time" % config]["time_unit"]
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
        flops = 2.0 * batch * d * heads * d_key + 2.0 * batch * heads * n * d_key  # query + both sub-key halves
        expert_bytes = batch * heads * k * 2 * d * 4.0
        t_gemm, t_rows = flops / (gemm_p * 1e9), expert_bytes / copy_p
        roof = t_gemm + t_rows
        measured = fwd * scale
        split = []
        total_parts = 0.0
        peer_bench = per_binary.get(("bench_peer", "engines"), {})
        bf16 = bf16_kernel(peer_bench.values())
        tiles = config == 1 and bool(bf16)

        def part_time(name):
            b = peer_bench.get("%s/%d/real_time" % (name, config))
            return b["real_time"] * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]] if b else None

        float_parts = (("sub-key scores", "BM_PeerPartSubkeyScores"), ("top-k", "BM_PeerPartTopK"),
                       ("k² step", "BM_PeerPartProductStep"))
        # With bf16 scores the forward's retrieval is one search that the float parts do not time.
        retrieval = (("retrieval (bf16 scores in %s, exact rescoring, k² step)" % bf16, "BM_PeerPartRetrieval"),) if tiles else float_parts
        for label, name in (("query GEMM", "BM_PeerPartQuery"),) + retrieval + (("expert step", "BM_PeerExpertStep"),):
            t = part_time(name)
            if t is not None:
                total_parts += t
                split.append("%s %.2f ms" % (label, t * 1e3))
        split.append("the rest %.2f ms" % ((measured - total_parts) * 1e3))
        if tiles:
            floats = ["%s %.2f ms" % (label, part_time(name) * 1e3) for label, name in float_parts if part_time(name) is not None]
            gemm_fwd = part_time("BM_PeerForward_gemm")
            split.append("(the float GEMM path of the same binary: %s%s)" % (
                ", ".join(floats), "; the forward with it %.2f ms" % (gemm_fwd * 1e3) if gemm_fwd else ""))
        target = " (target >= 70%%: %s)" % ("reached" if roof / measured >= 0.7 else "missed") if config == 1 else ""
        # The measured limit of the row term: the same rows read in the step's order with nothing
        # computed (BM_PeerRowRead, the same binary). Random rows cost more than their bytes.
        read = limit("engines", "BM_PeerRowRead/%d/real_time" % config, "bytes/s")
        read_roof = ("; with the expert rows at the rate this binary reads them in the step's order with nothing "
                     "computed (`BM_PeerRowRead/%d`: %.1f GB/s, %.0f%% of the copy) the roofline is %.2f ms, %.0f%% of it"
                     % (config, read / 1e9, 100 * read / copy_p, (t_gemm + expert_bytes / read) * 1e3,
                        100 * (t_gemm + expert_bytes / read) / measured)) if read else ""
        w("PEER %s forward: %.2f ms per batch of %d, roofline %.2f ms (GEMMs %.2f ms at %.0f GFLOP/s + expert rows "
          "%.1f MB at %.1f GB/s = %.2f ms): **%.0f%% of the roofline**%s%s. Split: %s."
          % (desc, measured * 1e3, batch, roof * 1e3, t_gemm * 1e3, gemm_p, expert_bytes / 1e6, copy_p / 1e9,
             t_rows * 1e3, 100 * roof / measured, target, read_roof, ", ".join(split)))
        w("")

    # GEMM engines, one thread, per shape class.
    engine_rows = {}
    for name, b in bench["engines"].items():
        m = re.match(r"BM_GemmEngine/(\d+)/(\d+)/real_time", name)
        if m:
            label = b.get("label", "")
            engine, what = label.split(": ", 1) if ": " in label else (m.group(1), label)
            what = what.rsplit(", ", 1)[0]
            chosen = what.endswith(" (chosen)")
            what = what.replace(" (chosen)", "")
            engine_rows.setdefault(int(m.group(2)), {"what": what, "rates": {}})["rates"][engine] = (
                b.get("GFLOP/s"), chosen)
    if engine_rows:
        engines = sorted({e for r in engine_rows.values() for e in r["rates"]})
        w("GEMM engines, one thread, GFLOP/s (the chosen one in bold; `bench_gemm`):")
        w("")
        w("| shape (C = A B, one tile) | " + " | ".join(engines) + " |")
        w("|---|" + "---|" * len(engines))
        for _, r in sorted(engine_rows.items()):
            cells = []
            for e in engines:
                rate, chosen = r["rates"].get(e, (None, False))
                cell = "-" if rate is None else "%.0f" % rate
                cells.append("**%s**" % cell if chosen else cell)
            w("| %s | %s |" % (r["what"], " | ".join(cells)))
        w("")

    text = "\n".join(lines)
    print(text)
    if "--update-docs" in sys.argv:
        readme = sys.argv[sys.argv.index("--update-docs") + 1]
        with open(readme) as f:
            content = f.read()
        begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
        if begin not in content or end not in content:
            sys.exit("report.py: %s has no %s ... %s markers" % (readme, begin, end))
        head, rest = content.split(begin, 1)
        _, tail = rest.split(end, 1)
        with open(readme, "w") as f:
            f.write(head + begin + "\n" + text + "\n" + end + tail)


if __name__ == "__main__":
    main()
