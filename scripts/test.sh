#!/usr/bin/env bash
# Run the test suite; pytest's "no tests collected" (exit 5) is a failure of its own kind.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: check the tests/ folder and the arguments" >&2
  exit 1
fi
exit "$rc"
