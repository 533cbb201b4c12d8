#!/usr/bin/env bash
# Headless screenshots of the built site, as a user sees it, offline: the pages load MathJax from a CDN, so a copy
# of site/ is served with MathJax from a local npm install instead. Needs Debian's chromium and npm's mathjax@3:
#   apt-get install -y chromium;  (mkdir -p /tmp/mathjax_local && cd /tmp/mathjax_local && npm install mathjax@3)
# Usage: bash docs/build && bash docs/scripts/screenshots.sh [OUT_DIR]   (default /tmp/docs_shots)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/docs_shots}; PORT=${PORT:-8765}; MATHJAX=${MATHJAX:-/tmp/mathjax_local/node_modules/mathjax/es5}
COPY=$(mktemp -d)
mkdir -p "$OUT" && cp -r site/. "$COPY/" && mkdir -p "$COPY/_mathjax" && cp -r "$MATHJAX"/. "$COPY/_mathjax/"
find "$COPY" -name '*.html' -exec sed -i 's#https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js#/_mathjax/tex-mml-chtml.js#' {} +
(cd "$COPY" && exec python3 -m http.server "$PORT" >/dev/null 2>&1) & SERVER=$!
trap 'kill $SERVER; rm -rf "$COPY"' EXIT
sleep 1
shot() { chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=8000 \
         --window-size=1280,"$3" --screenshot="$OUT/$1.png" "http://localhost:$PORT/$2" 2>/dev/null; }
shot landing "" 2200
shot dbmtl reference/balancers/dbmtl/ 2200
shot mgda reference/balancers/mgda/ 2400
shot chooser chooser/ 2000
shot qm9 results/qm9/ 2400
echo "screenshots in $OUT"
