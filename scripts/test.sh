#!/usr/bin/env bash
# The whole test suite. Works on a fresh Debian machine with only the Rust toolchain:
# it installs the few system tools the tests drive (age for interoperability, chromium for the
# web chat page) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v age >/dev/null || (apt-get update && apt-get install -y age)
# headless Chromium drives the web chat page in tests/webchat_browser.rs
command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
cargo test --workspace --all-targets
