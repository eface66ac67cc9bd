#!/usr/bin/env python3
"""Flat in session length, in instructions (BENCHMARKS.md, issue #21, eleventh session).

One session of N text turns through the real gateway run under `valgrind --tool=callgrind`
(instrumentation on only for the two windows), against a zero-latency fake OpenAI-compatible
model in this process (a thread; Python, so its cost is not in the gateway's counts). Prints
the gateway's instructions per turn for turns 1..W and N-W+1..N, and how much of each window
went to the request sent to the model (`Router::chat`, which carries the whole conversation)
and to the audit checkpoint (every 1,000 records: the window that holds one pays for 1,000);
"the rest" is the agent's turn with the HTTP request around it, auth and the audit records.
Each window's mean stands for its middle turn (25 against 975 by default).
Instruction counts are stable on a shared machine where CPU time is not. The callgrind files
are left in $BENCH_FLAT_DIR (default ~/chitin-bench-flat/<name>) for `callgrind_annotate`.

Under valgrind the sandbox check fails (valgrind does not know seccomp's user notification),
so the gateway is waited for on `/health`, not `/ready`; text turns do not use the sandbox.

`--cpu ROUNDS`: the same session run natively instead, ROUNDS times per variant
(interleaved), printing the gateway's CPU time per turn in each window (utime + stime from
/proc, 10 ms ticks: use windows of 100 turns or more) and the median over the rounds.

usage: scripts/bench-flat.py [--turns N] [--window W] [--cpu ROUNDS] name=/path/to/chitin [...]
"""
import os, re, subprocess, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import Gateway, cpu_of, fake_model

args = sys.argv[1:]
turns, window, cpu_rounds = 1000, 50, 0
while args and args[0].startswith('--'):
    flag, val = args[0], int(args[1]); args = args[2:]
    if flag == '--turns': turns = val
    elif flag == '--window': window = val
    elif flag == '--cpu': cpu_rounds = val
    else: sys.exit(__doc__)
variants = [a.split('=', 1) for a in args]
if not variants or turns < 2 * window: sys.exit(__doc__)

base_url = fake_model()

def run(name, binary, native=False):
    root = os.path.join(os.environ.get('BENCH_FLAT_DIR', os.path.expanduser('~/chitin-bench-flat')), name)
    gw = Gateway(name, root, base_url)
    start = gw.start
    p, _ = start([binary], '/ready'); p.terminate(); p.wait()   # creates the state dir
    if native:
        p, port = start([binary], '/ready')
        turn = gw.client(binary, port)
        turn()
        per_turn = []
        for before in (0, turns - 2 * window):
            for _ in range(before): turn()
            c0 = cpu_of(p.pid)
            for _ in range(window): turn()
            per_turn.append((cpu_of(p.pid) - c0) / window)
        p.terminate(); p.wait()
        return per_turn
    out = os.path.join(root, 'callgrind.out')
    p, port = start(['valgrind', '--tool=callgrind', '--instr-atstart=no', f'--callgrind-out-file={out}', binary], '/health')
    chat = gw.client(binary, port)
    def ctl(*a): subprocess.run(['callgrind_control', *a, str(p.pid)], capture_output=True, check=True)
    chat()   # turn 0: first use of every path
    dumps = []
    for label, before in (('first', 0), ('last', turns - 2 * window)):
        for _ in range(before): chat()
        ctl('-i', 'on'); ctl('-z')
        for _ in range(window): chat()
        ctl('-d', label); ctl('-i', 'off')
        dumps.append(f'{out}.{len(dumps) + 1}')
    p.terminate(); p.wait()
    return [summarize(d) for d in dumps]

def summarize(path):
    total = int(re.search(r'^summary: (\d+)', open(path).read(), re.M).group(1))
    incl = subprocess.run(['callgrind_annotate', '--inclusive=yes', '--threshold=100', path], capture_output=True, text=True).stdout
    def inclusive(fn):
        best = 0
        for l in incl.splitlines():
            m = re.match(r'^\s*([0-9,]+) \(.*?\)\s+\S*?' + re.escape(fn) + r'(?: |$)', l)
            if m: best = max(best, int(m.group(1).replace(',', '')))
        return best
    provider = inclusive('chitin::providers::router::Router::chat::{{closure}}')
    if provider == 0:
        # Inlined away or printed differently: the split would silently be wrong.
        sys.exit(f'{path}: no inclusive cost found for Router::chat; read it with callgrind_annotate')
    return total, provider, inclusive('chitin_audit::log::Writer::write_checkpoint')

if cpu_rounds:
    import statistics
    res = {name: [] for name, _ in variants}
    for rd in range(cpu_rounds):
        order = variants if rd % 2 == 0 else variants[::-1]
        for name, binary in order:
            f, l = run(name, binary, native=True)
            res[name].append((f, l))
            print(f'round {rd} {name}: gateway CPU per turn {f * 1e3:.3f} / {l * 1e3:.3f} ms ({l / f:.2f}x)', flush=True)
    for name, _ in variants:
        f = statistics.median(x[0] for x in res[name]); l = statistics.median(x[1] for x in res[name])
        print(f'{name}: median gateway CPU per turn, turns 1-{window} / {turns - window + 1}-{turns}: '
              f'{f * 1e3:.3f} / {l * 1e3:.3f} ms ({l / f:.2f}x)')
    sys.exit(0)

for name, binary in variants:
    (t1, p1, c1), (t2, p2, c2) = run(name, binary)
    w = window
    print(f'{name}: instructions per turn, turns 1-{w} / {turns - w + 1}-{turns} (ratio)')
    print(f'  whole gateway           {t1 / w / 1e6:6.2f}M / {t2 / w / 1e6:6.2f}M  ({t2 / t1:.2f}x)')
    print(f'  request to the model    {p1 / w / 1e6:6.2f}M / {p2 / w / 1e6:6.2f}M')
    print(f'  audit checkpoint        {c1 / w / 1e6:6.2f}M / {c2 / w / 1e6:6.2f}M')
    a1, a2 = t1 - p1 - c1, t2 - p2 - c2
    print(f'  the rest                {a1 / w / 1e6:6.2f}M / {a2 / w / 1e6:6.2f}M  ({a2 / a1:.2f}x)', flush=True)
