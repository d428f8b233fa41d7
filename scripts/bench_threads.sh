#!/usr/bin/env bash
# The default run idle and beside one busy process (`while True: pass`), alternating, 3 pairs, then once beside
# it with torch's default threads (cpu_threads=null): wall seconds and the thread count cpu_threads=auto chose.
#   bash scripts/bench_threads.sh
set -u
cd "$(dirname "$0")/.."
out=$(mktemp -d)
busy() { python -c "while True: pass" & B=$!; sleep 1; }
timed() {  # name, overrides...
  local name=$1; shift
  local s e; s=$(date +%s.%N); python -m finetune "$@" hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1; e=$(date +%s.%N)
  echo "$name $(echo "$e - $s" | bc) s $(grep -o "auto: [0-9] thread(s)" "$out/$name/finetune.log")"
}
for i in 1 2 3; do
  timed "idle$i"
  busy; timed "busy$i"; kill $B; wait $B 2>/dev/null
done
busy; timed busy-null cpu_threads=null; kill $B; wait $B 2>/dev/null
rm -rf "$out"
