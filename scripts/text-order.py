#!/usr/bin/env python3
"""Regenerates release/text-order.txt: the functions the gateway runs, in the order release
builds lay them out (build.rs, `release_layout`; BENCHMARKS.md, issue #21, thirteenth session).

Runs the given release `chitin` under `valgrind --tool=callgrind` on a state dir of its own
(~/chitin-text-order; default settings, so the vault is unlocked through the kernel keyring)
with a zero-latency fake model: start, `GET /ready`, 65 s idle so that the minute timers fire
(first dump), then 30 chat turns over three sessions, streamed and not (second dump). Then, if
`perf` is installed, the same start and idle natively under `perf record -e page-faults`: code
valgrind does not run (the sandbox check, which fails under valgrind as it does not know
seccomp's user notification; CPU-specific paths such as SHA extensions) shows as faults on text
pages, one function for each page first touched outside the listed code. Writes the binary's
functions run at start (callgrind's, then those the faults add), then those first run by the
turns, in callgrind's order, one symbol name per line (mangled, as the linker sees them). A
function left out is only placed after the listed ones. The native pass sees more on a binary
already laid out by the current list, and sees nothing of what that list already holds: the
functions of the previous list that neither pass saw and the binary still has are kept, after
the start's. So the list only grows; to start over, delete it, build, run this, build with the
new list and run this again (the second run's native pass finds what the first left out).

Use a binary built by `cargo build --release` (or `cargo install`): `cargo bench` builds the
workspace with its dev-dependencies' features, which changes the symbols' hashes, so a bench
build matches only part of the list.

Rerun it after a rustc or dependency upgrade or a large change: names the linker no longer
finds are skipped, so a stale list costs idle memory, never correctness.

usage: scripts/text-order.py /path/to/release/chitin [out]   (out: release/text-order.txt)
"""
import http.client, os, re, shutil, signal, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import Gateway, fake_model

if len(sys.argv) not in (2, 3): sys.exit(__doc__)
binary = os.path.realpath(sys.argv[1])
out_path = sys.argv[2] if len(sys.argv) == 3 else os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'release', 'text-order.txt')

IDLE = 65   # seconds: the minute timers (retention, schedules) fire once while idle
root = os.path.expanduser('~/chitin-text-order')
gw = Gateway('text-order', root, fake_model(), fast_vault=False)   # the default vault: its code is run
p, _ = gw.start([binary], '/ready'); p.terminate(); p.wait()   # creates the state dir
cg = os.path.join(root, 'callgrind.out')
p, port = gw.start(['valgrind', '--tool=callgrind', '--demangle=no', '--compress-strings=no', '--show-below-main=yes',
                    f'--callgrind-out-file={cg}', binary], '/health')
def ready(port):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=60); c.request('GET', '/ready'); c.getresponse().read()
ready(port)
time.sleep(IDLE)
def ctl(*a): subprocess.run(['callgrind_control', *a, str(p.pid)], capture_output=True, check=True)
ctl('-d', 'start')
chat = gw.client(binary, port)
for i in range(30): chat(user=f'session-{i % 3}', stream=i % 2 == 1)
ctl('-d', 'turns')
p.terminate(); p.wait()

def functions(path):
    """The binary's functions in a callgrind dump (`'N` marks a recursion depth, not a name)."""
    names, ob = [], None
    for line in open(path):
        if line.startswith('ob='): ob = line[3:].strip()
        elif line.startswith('fn=') and ob == binary and not line.startswith('fn=0x'):   # 0x...: no symbol
            names.append(re.sub(r"'\d+$", '', line[3:].strip()))
    return names

def faulted():
    """The binary's functions that faulted a page of its text in during a native start."""
    usable = shutil.which('perf') and subprocess.run(
        ['perf', 'record', '-q', '-e', 'page-faults', '-o', '/dev/null', '--', 'true'], capture_output=True).returncode == 0
    if not usable:
        print('perf is missing or may not record page faults here (perf_event_paranoid?): '
              'the list holds what callgrind saw only'); return []
    data = os.path.join(root, 'faults.data')
    p, port = gw.start(['perf', 'record', '-q', '-e', 'page-faults', '-c', '1', '-d', '-o', data, '--', binary], '/ready')
    ready(port); time.sleep(IDLE)
    # Killed, not stopped: the shutdown's code would be listed with the start's.
    (gateway,) = open(f'/proc/{p.pid}/task/{p.pid}/children').read().split()
    os.kill(int(gateway), signal.SIGKILL)
    p.wait()
    script = subprocess.run(['perf', 'script', '--no-demangle', '-i', data, '-F', 'pid,addr,ip,sym,dso'],
                            capture_output=True, text=True, check=True).stdout
    names = []
    for line in script.splitlines():
        # The gateway's own faults (not its probes'), on instruction fetch: the faulting
        # address is in the function being run.
        m = re.match(r'\s*(\d+)\s+[0-9a-f]+ (\S+) \((\S+)\)\s+[0-9a-f]+ (\S+) \((\S+)\)$', line)
        if (m and m.group(1) == gateway and m.group(2) == m.group(4) and not m.group(2).startswith('[')
                and m.group(3) == m.group(5) == binary):
            names.append(m.group(2))
    return names

sizes = {}
for line in subprocess.run(['nm', '-S', '--defined-only', binary], capture_output=True, text=True, check=True).stdout.splitlines():
    f = line.split()
    if len(f) == 4 and f[2] in 'tTwW': sizes[f[3]] = max(sizes.get(f[3], 0), int(f[1], 16))

at_start, in_turns, by_faults = functions(f'{cg}.1'), functions(f'{cg}.2'), faulted()
seen = set(at_start) | set(in_turns) | set(by_faults)
# The faults only show code outside the listed code: what an earlier run found that way (and
# the binary still has) is kept, after the start's.
earlier = [n.strip() for n in open(out_path)] if os.path.exists(out_path) else []
kept = [n for n in earlier if n in sizes and n not in seen]
# Only names the binary defines: callgrind also names code outside any symbol.
order = [n for n in dict.fromkeys(at_start + by_faults + kept + in_turns) if n in sizes]
started = len(set(at_start))
if started < 1000: sys.exit(f'only {started} functions at start: is {binary} a release chitin? see {root}/gateway.err')
size = sum(sizes.get(n, 0) for n in order)
open(out_path, 'w').write('\n'.join(order) + '\n')
print(f'{out_path}: {len(order)} functions ({started} at start under callgrind, {len(set(by_faults) - set(at_start))} more '
      f'from native faults, {len(kept)} kept from the previous list), {size / 2**20:.1f} MiB of the '
      f'{sum(sizes.values()) / 2**20:.1f} MiB of functions in {binary}')
