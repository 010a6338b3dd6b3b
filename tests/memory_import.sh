#!/usr/bin/env bash
# Writes memory layers in the layouts of their source implementations (PEER-pytorch, lucidrains'
# product-key-memory, XLM's PKM, Memory+ with and without shared values)
# (tests/drivers/memory_import_sources.py), imports each with tools/spex_import.py and checks spex
# reproduces its output (tests/drivers/import_check.cpp). Also: the importer's refusals.
# Exit 77 (ctest: skipped) when no python3 with torch is found.
# Usage: memory_import.sh CHECKER OUTDIR
set -euo pipefail
checker=$1 out=$2
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tests/torch_python.sh
. "$here/torch_python.sh"
rm -rf "$out"
"$python" "$here/drivers/memory_import_sources.py" "$out"
failures=0
for json in "$out"/*.json; do
  case=$(basename "$json" .json)
  read -r source config input args < <("$python" -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['from'], json.dumps(d['config'], separators=(',',':')), d['input'], ' '.join(d.get('args', [])))" "$json")
  # shellcheck disable=SC2086  # args: the case's extra importer options, words without spaces
  "$python" "$here/../tools/spex_import.py" --from "$source" --config "$config" $args "$input" "$out/$case.spex.safetensors"
  "$checker" "$out/$case.spex.safetensors" "$out/$case.io.safetensors" || failures=$((failures + 1))
done
# Refusals, which write nothing: an approximate source search, and a config that does not match.
refuse() {  # refuse EXPECTED_TEXT --from ... --config ... IN
  local expected=$1
  shift
  if "$python" "$here/../tools/spex_import.py" "$@" "$out/refused.safetensors" 2>"$out/refused.txt"; then
    echo "FAILED: accepted: $*"
    failures=$((failures + 1))
  elif ! grep -q "$expected" "$out/refused.txt"; then
    echo "FAILED: '$expected' not said for: $*"
    cat "$out/refused.txt"
    failures=$((failures + 1))
  fi
  [ ! -e "$out/refused.safetensors" ] && [ ! -e "$out/refused.safetensors.partial" ] || { echo "FAILED: a refused import wrote a file"; failures=$((failures + 1)); }
}
refuse "spex's retrieval is exact" --from peer-pytorch \
  --config '{"dim":12,"heads":3,"num_experts":49,"num_experts_per_head":3,"dim_key":5,"product_key_topk":2,"non_competing_scores":false}' \
  "$out/peer_pytorch_softmax.pt"
refuse "has shape \[30, 12\], the config gives \[36, 12\]" --from peer-pytorch \
  --config '{"dim":12,"heads":3,"num_experts":49,"num_experts_per_head":3,"non_competing_scores":false}' "$out/peer_pytorch_softmax.pt"
refuse "config lacks dim" --from peer-pytorch --config '{"heads":3}' "$out/peer_pytorch_softmax.pt"
refuse "pass --values-prefix" --from memory-plus --prefix layers.3.mem. \
  --config '{"input_dim":12,"output_dim":12,"mem_heads":2,"mem_knn":3,"mem_k_dim":6,"mem_n_keys":5}' "$out/memory_plus_shared.pt"
refuse "mem_score_subtract = 'min'" --from xlm-pkm \
  --config '{"input_dim":16,"mem_heads":3,"mem_knn":4,"mem_k_dim":8,"mem_n_keys":6,"mem_score_subtract":"min"}' "$out/xlm_pkm.pt"
refuse "pre_layernorm = true: apply the LayerNorm to the input" --from pkm-lucidrains \
  --config '{"dim":16,"heads":2,"num_keys":6,"topk":3,"dim_head":5,"pre_layernorm":true}' "$out/pkm_lucidrains.pt"
[ "$failures" -eq 0 ]
