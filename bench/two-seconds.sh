#!/bin/sh
# Benchmark function script: a job whose GPU work takes two seconds, then a small result.
set -eu
id=$(basename "$INPUT_FILE_PATH" .tar.gz)
sleep 2
echo result >"$TMP_OUTPUT_DIR/$id.png"
