#!/bin/sh
# The Ray token of cluster/gpu.yaml: made once on this machine, readable by you only, never printed.
# `ray up` copies it to every node (file_mounts); export RAY_AUTH_MODE=token and
# RAY_AUTH_TOKEN_PATH=~/.ray/dda-ray-gpu.token before `ray job submit` / `ray job logs`.
set -eu
token="${DDA_RAY_TOKEN:-$HOME/.ray/dda-ray-gpu.token}"
umask 077
mkdir -p "$(dirname "$token")"
if [ -s "$token" ]; then
  echo "token: $token (kept)"
else
  python3 -c 'import secrets; print(secrets.token_hex(32))' > "$token"
  echo "token: $token (new)"
fi
