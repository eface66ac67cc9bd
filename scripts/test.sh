#!/usr/bin/env bash
# The whole test suite. Works on a fresh Debian machine with only the Rust toolchain:
# it installs the few system tools the tests drive (age for interoperability, chromium for the
# web chat page, PostgreSQL for the storage tests) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# Tests run sandboxed tools in workspaces under target/tmp, and the sandbox gives every tool its
# own empty /tmp, /var/tmp and /dev/shm: a checkout below one of those cannot be a workspace.
case "$(pwd -P)/" in
  /tmp/*|/var/tmp/*|/dev/shm/*)
    echo "scripts/test.sh: this checkout is under $(pwd -P | cut -d/ -f1-2); clone it elsewhere (e.g. under your home directory): sandboxed test workspaces cannot live in a temp dir" >&2
    exit 2;;
esac
command -v age >/dev/null || (apt-get update && apt-get install -y age)
# headless Chromium drives the web chat page in tests/webchat_browser.rs
command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
# PostgreSQL on 127.0.0.1:5432 for the storage tests (tests/store_*.rs, tests/approvals.rs):
# started from Debian's packages when none answers.
./scripts/pg-test-server.sh
cargo test --workspace --all-targets
