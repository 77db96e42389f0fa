#!/usr/bin/env bash
# Peers on docs/bits/prompts.jsonl (docs/bits/peers.jsonl), one configuration after another, resumable; no new
# configuration starts after 18:40 UTC. Run from the checkout's root: nohup bash docs/bits/peers_run.sh &
set -u
export OMP_NUM_THREADS=1
RUN=(.venv-peers/bin/python benchmarks/peers/kvpress_runner.py --prompts docs/bits/prompts.jsonl
     --out docs/bits/peers.jsonl --settings agnostic --threads 1)
step() {
    if [ "$(date -u +%H%M)" -ge 1840 ]; then echo "$(date -u +%T) not started (past 18:40 UTC): $*"; return; fi
    echo "$(date -u +%T) start: $*"
    "${RUN[@]}" "$@" 2>&1 | grep --line-buffered -v "Loading weights"
    echo "$(date -u +%T) end (rc ${PIPESTATUS[0]}): $*"
}
step --presses none --ratios 0 --caches quanto4            # hf-quanto-4 (~72% saved)
step --presses none --ratios 0 --caches quanto2            # hf-quanto-2 (~84%)
step --presses snapkv --ratios 0.11,0.64 --caches quanto4  # snapkv+q4: ~75%, ~90%
step --presses kvzip --ratios 0.64 --caches quanto4        # kvzip+q4: ~90% (nominal: KVzip masks keys)
step --presses kvzip --ratios 0.9 --caches dense           # kvzip alone: 90% (nominal)
