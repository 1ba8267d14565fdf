#!/usr/bin/env bash
# Installs Debian's chromium for the browser test when it is missing and we may (root + apt-get). Never fails the build.
set -u
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (Debian package) for the web-page test…"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the web-page test will be skipped"
else
  echo "note: chromium not found and cannot be installed here; the web-page test will be skipped"
fi
exit 0
