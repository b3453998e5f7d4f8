#!/usr/bin/env bash
# Headless browser for the dashboard tests: Debian chromium + chromium-driver (selenium is a test extra).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
apt_install chromium chromium-driver fonts-dejavu-core
