#!/usr/bin/env bash
# Installs the Node.js packages of the socket.io tests and benchmark (tests/socketio/:
# socket.io-client and socket.io, pinned in package-lock.json) with `npm ci`. Installs
# Node.js itself with apt when it is missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "Node.js not found: installing it with apt"
    apt-get update
    apt-get install -y nodejs npm
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 18 ]; then
    echo "the socket.io tests need Node.js 18 or newer (found $(node --version))" >&2
    exit 1
fi
npm ci --prefix tests/socketio --no-audit --no-fund
