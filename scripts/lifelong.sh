#!/usr/bin/env bash
# A PEER layer grown and frozen task by task, against a fixed layer, growth without freezing and
# a dense block, on a stream of associative-recall tasks:
#   scripts/lifelong.sh --quick       (seconds)
#   scripts/lifelong.sh               (the default run)
exec "$(dirname "$0")/example.sh" lifelong "$@"
