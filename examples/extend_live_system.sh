#!/usr/bin/env bash
# Continual development on one living system: run the base method on the offline benchmark, then
# extend the SAME store with one method extension at a time. Nothing is retrained from scratch: each
# stage's agents resume from their task's published model and the whole system. Cycle counts are
# cumulative (an agent continues until its cycle counter reaches --cycles).
#
#   bash examples/extend_live_system.sh [STORE] [TASKS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STORE=${1:-continual-store}
TASKS=${2:-mnist5k,uci_digits,fashion_mnist,animal_mnist,glyphs_latin,glyphs_greek,glyphs_cyrillic,glyphs_hebrew}
stage() {  # stage PRESET CYCLES
  echo "=== $1 until cycle $2 ==="
  "$PY" launch/run_swarm.py --store "$STORE" --tasks "$TASKS" --preset "$1" --cycles "$2"
}
stage demo@base 2                                   # clone-only base method
stage demo@base+autotune 3                          # + learned mutation probabilities, hparam moves
stage demo@base+autotune+adapters 4                 # + residual adapters
stage demo@base+autotune+adapters+layers+imagesize 5  # = µ2Net+ as published
stage demo@base+autotune+adapters+layers+imagesize+continue 6  # + continue: one schedule per lineage
stage demo 7                                        # + hurdle: the project's default method
stage demo+penalty 8                                # + size/compute penalty (s = 0.9)
"$PY" launch/query.py --store "$STORE" report --out "$STORE-report.html"
echo "report: $STORE-report.html (+ .json)"
