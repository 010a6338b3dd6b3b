#!/usr/bin/env bash
# Dense FFN, TopK MoE, ReMoE, PEER and PKM trained against each other:
#   scripts/compare.sh --quick        (under a minute)
#   scripts/compare.sh                (the default run, a few minutes)
exec "$(dirname "$0")/example.sh" compare_layers "$@"
