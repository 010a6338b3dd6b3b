#!/usr/bin/env bash
# A PEER layer grown and frozen task by task, sparse memory finetuning, full finetuning, growth
# without freezing, a layer trained on task 1 only and a dense block, on a stream of
# associative-recall tasks (--seeds 7,8,9: three runs and their summary):
#   scripts/lifelong.sh --quick       (seconds)
#   scripts/lifelong.sh               (the default run)
exec "$(dirname "$0")/example.sh" lifelong "$@"
