#!/usr/bin/env bash
# Create .venv and install pagedattn with its test extras. Idempotent: a second run with an
# unchanged pyproject.toml and constraints only checks a stamp. Sourced by main.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PAGEDATTN_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.pagedattn-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing into $venv (first run takes a few minutes)" >&2
  pip_install() {  # quiet, minus this machine's notes about index folders it does not have
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$root/scripts/constraints.txt" "$@" \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  }
  # torch first, pinned, so no other requirement pulls a multi-GB CUDA build
  pip_install torch
  pip_install -e "$root[test,hf]"
  echo "$want" > "$stamp"
fi
