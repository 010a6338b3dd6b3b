#!/usr/bin/env bash
# The retrieval demo: product-key top-k over N = 1024^2 keys against exhaustive search.
exec "$(dirname "$0")/example.sh" retrieval_demo "$@"
