#!/usr/bin/env bash
# A batch of GPU-machine commands that outlives one `device` call (each call may run 10 minutes; the machine stays held
# ~30 s after it): the first call starts the batch detached, every call waits for it up to SECONDS, then packs all it
# has written into one tarball under $OUT (the device sends back few files, and empties $OUT after each call).
#
#   bash tools/gpu_batch.sh COMMANDS_FILE [SECONDS]   # each line of COMMANDS_FILE: "name: shell command", run in order
#
# A command's stdout and stderr go to $RESULTS/<name>.log; it may write more files under $RESULTS (exported).
set -u
export RESULTS=${RESULTS:-$HOME/gpu-batch}  # another folder starts another batch on a machine still held
mkdir -p "$RESULTS"
if [ ! -f "$RESULTS/started" ]; then
  touch "$RESULTS/started"
  setsid nohup bash -c '
    source tools/gpu_env.sh
    while IFS= read -r line; do
      [ -z "$line" ] && continue
      name=${line%%:*}; cmd=${line#*:}
      echo "$(date +%T) start $name" >> "$RESULTS/progress"
      bash -c "$cmd" > "$RESULTS/$name.log" 2>&1
      echo "$(date +%T) $name rc=$?" >> "$RESULTS/progress"
    done < "$0"
    touch "$RESULTS/done"' "$1" > "$RESULTS/batch.log" 2>&1 &
fi
end=$((SECONDS + ${2:-540}))
while [ $SECONDS -lt $end ] && [ ! -f "$RESULTS/done" ]; do sleep 5; done
cat "$RESULTS/progress" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$RESULTS" .
