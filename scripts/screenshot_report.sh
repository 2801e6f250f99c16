#!/usr/bin/env bash
# Screenshot a report page (or any local HTML file) with headless Chromium, to look at it as a
# browser draws it. Offline: every network feature Chromium has is switched off.
#
#   scripts/screenshot_report.sh REPORT.html [OUT.png] [WIDTH] [HEIGHT]
#
# Defaults: OUT = REPORT.png beside the page, 1400 x 3000 pixels. Needs Debian's chromium
# (`apt-get install -y chromium`); exits 2 with one line when it or the page is missing.
set -euo pipefail

page="${1:-}"
if [[ -z "$page" || ! -f "$page" ]]; then
    echo "usage: $0 REPORT.html [OUT.png] [WIDTH] [HEIGHT] (the page must exist)" >&2
    exit 2
fi
out="${2:-${page%.*}.png}"
width="${3:-1400}"
height="${4:-3000}"

browser=""
for candidate in chromium chromium-browser google-chrome; do
    if command -v "$candidate" >/dev/null 2>&1; then browser="$candidate"; break; fi
done
if [[ -z "$browser" ]]; then
    echo "error: no chromium found: install it with 'apt-get install -y chromium' (as root)" >&2
    exit 2
fi

profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
url="file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")"
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" --screenshot="$out_abs" \
    --window-size="${width},${height}" "$url" >/dev/null 2>&1 || true

if [[ ! -s "$out_abs" ]]; then
    echo "error: $browser wrote no screenshot for $url" >&2
    exit 1
fi
echo "$out_abs"
