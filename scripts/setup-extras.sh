#!/usr/bin/env bash
# Optional set-up beyond the Python environment, run by `make demo` and `make test`:
#  - OpenSeadragon for the web viewer, from the npm registry, pinned by package-lock.json;
#  - Debian's Chromium for the viewer's browser test (only as root with apt; otherwise that test skips).
# Nothing here is required: each step that cannot run says so and the caller goes on.
set -u
cd "$(dirname "$0")/.."

if [ -f package-lock.json ] && [ ! -d node_modules/openseadragon ]; then
  if command -v npm >/dev/null 2>&1; then
    npm ci --no-audit --no-fund --loglevel=error || echo "setup: npm ci failed; the viewer falls back to the pinned CDN copy"
  else
    echo "setup: npm not found; the viewer falls back to the pinned CDN copy of OpenSeadragon"
  fi
fi

if [ "${1:-}" = "--browser" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will skip"
  else
    echo "setup: /usr/bin/chromium missing and apt-get unavailable (not root?); the browser test will skip"
  fi
fi
exit 0
