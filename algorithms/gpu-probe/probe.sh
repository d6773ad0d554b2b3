#!/bin/sh
# Write what `nvidia-smi -L` says (one "GPU <i>: <name> (UUID: GPU-...)" line per GPU the
# run sees) into the output file; exit with nvidia-smi's status.
out=${OUTPUT_FILE:-/mnt/task/output}
case $out in /*) ;; *) out=/mnt/task/output ;; esac  # base32-encoded by a node: the default
nvidia-smi -L >"$out" 2>&1
status=$?
cat "$out"
exit $status
