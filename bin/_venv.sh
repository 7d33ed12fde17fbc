# Sourced by bin/run and bin/test: make ./.venv and install the project into it
# when it is missing or setup.py changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
    echo "simzmq: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.simzmq-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ]; then
    echo "simzmq: installing the project and its dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" >&2
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# Debian packages, as root (or through sudo), when missing.
apt_install() {
    echo "simzmq: installing $* (apt)" >&2
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}
# The web chat's crypto library, from the npm registry (package-lock.json).
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
if [ ! -d "$ROOT/node_modules" ] || [ "$ROOT/package-lock.json" -nt "$ROOT/node_modules/.package-lock.json" ]; then
    echo "simzmq: installing the web chat's npm packages" >&2
    (cd "$ROOT" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
# The tests drive a real Chromium: Debian's, never one Playwright downloads.
if [ "$(basename "$0")" = "test" ] && [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
fi
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
