#!/usr/bin/env bash
# Writes MoE blocks in the layouts of Mixtral, Qwen2-MoE, DeepSeek-V3 and Megatron-Core (sigmoid
# routing with TEGroupedMLP experts; ReMoE's ReLU routing with GroupedMLP experts)
# (tests/drivers/moe_import_sources.py), imports each with tools/spex_import.py and checks spex
# reproduces its output (tests/drivers/import_check.cpp). Also: the importer's refusals.
# Exit 77 (ctest: skipped) when no python3 with torch is found.
# Usage: moe_import.sh CHECKER OUTDIR
set -euo pipefail
checker=$1 out=$2
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tests/torch_python.sh
. "$here/torch_python.sh"
rm -rf "$out"
"$python" "$here/drivers/moe_import_sources.py" "$out"
failures=0
for case in mixtral qwen2_moe deepseek_v3 megatron megatron_remoe; do
  read -r source config input < <("$python" -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['from'], json.dumps(d['config'], separators=(',',':')), d['input'])" "$out/$case.json")
  "$python" "$here/../tools/spex_import.py" --from "$source" --config "$config" "$input" "$out/$case.spex.safetensors"
  "$checker" "$out/$case.spex.safetensors" "$out/$case.io.safetensors" || failures=$((failures + 1))
done
# Refusals: a config that does not match the tensors, and a missing config field, write nothing.
if "$python" "$here/../tools/spex_import.py" --from mixtral --config '{"hidden_size":16,"intermediate_size":25,"num_local_experts":6,"num_experts_per_tok":2}' \
     "$out/mixtral.pt" "$out/refused.safetensors" 2>"$out/refused.txt" || true; then :; fi
grep -q "has shape \[24, 16\], the config gives \[25, 16\]" "$out/refused.txt" || { echo "FAILED: shape mismatch not named"; cat "$out/refused.txt"; failures=$((failures + 1)); }
"$python" "$here/../tools/spex_import.py" --from mixtral --config '{"hidden_size":16}' "$out/mixtral.pt" "$out/refused.safetensors" 2>"$out/refused.txt" || true
grep -q "config lacks intermediate_size" "$out/refused.txt" || { echo "FAILED: missing field not named"; cat "$out/refused.txt"; failures=$((failures + 1)); }
[ ! -e "$out/refused.safetensors" ] && [ ! -e "$out/refused.safetensors.partial" ] || { echo "FAILED: a refused import wrote a file"; failures=$((failures + 1)); }
[ "$failures" -eq 0 ]
