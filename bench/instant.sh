#!/bin/sh
# Benchmark function script: answers at once with a copy of the bundle as <id>.png.
set -eu
id=$(basename "$INPUT_FILE_PATH" .tar.gz)
cp "$INPUT_FILE_PATH" "$TMP_OUTPUT_DIR/$id.png"
