#!/usr/bin/env bash
# The main job: install what is needed, then generate with the engine (arguments are passed on).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
exec "$root/.venv/bin/python" -m pagedattn.integrations.main "$@"
