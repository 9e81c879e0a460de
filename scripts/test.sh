#!/usr/bin/env bash
# The test command: install what is needed, then run the test suite (arguments go to pytest).
# On a machine without CUDA the Triton kernels run under the interpreter and GPU tests skip.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
