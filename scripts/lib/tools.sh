# Sourced by scripts/test: system tools some tests use, installed where the machine
# allows it (Debian's packages, as root); where it does not, those tests skip.
if ! command -v haproxy >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  echo "== installing haproxy (the deploy tests check deploy/haproxy.cfg with it)"
  export DEBIAN_FRONTEND=noninteractive
  if ! timeout 180 apt-get install -y -q --no-install-recommends haproxy >/dev/null 2>&1; then
    timeout 180 apt-get update -q >/dev/null 2>&1 || true
    timeout 180 apt-get install -y -q --no-install-recommends haproxy >/dev/null 2>&1 \
      || echo "haproxy could not be installed: its tests skip"
  fi
fi
# Debian's Chromium for the web app's browser tests (tests/browser), driven by Playwright.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  echo "== installing chromium (the web app's browser tests drive it)"
  export DEBIAN_FRONTEND=noninteractive
  if ! timeout 300 apt-get install -y -q chromium >/dev/null 2>&1; then
    timeout 180 apt-get update -q >/dev/null 2>&1 || true
    timeout 300 apt-get install -y -q chromium >/dev/null 2>&1 \
      || echo "chromium could not be installed: the browser tests will fail"
  fi
fi
