#!/usr/bin/env bash
# The main job: install what is needed, then run pagedattn's demo (arguments are passed on).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
exec "$root/.venv/bin/python" -m pagedattn.demo "$@"
