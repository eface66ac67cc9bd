#!/usr/bin/env python3
"""Fine-grained interleaved A/B of `chitin` release builds (BENCHMARKS.md, issue #21, eighth
session). One fake model (the `agent_turn` bench binary with `--serve-fake-model`, from
`cargo bench --no-run --bench agent_turn`), one gateway per variant kept running (state under
$BENCH_AB_HOME, default ~/chitin-bench-ab/<name>); rounds of N sequential chat requests per
variant in turn, order reversed every other round; gateway CPU per request (utime + stime
from /proc) and p50. Then restarts to /ready (RESTARTS, default 10), interleaved likewise.

usage: scripts/bench-ab.py ROUNDS N name=/path/to/chitin [name=/path/to/chitin ...]
"""
import http.client, json, os, socket, subprocess, sys, time, statistics
rounds, n = int(sys.argv[1]), int(sys.argv[2])
variants = [a.split('=', 1) for a in sys.argv[3:]]
deps = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'target', 'release', 'deps')
fake_bin = [l for l in os.listdir(deps) if l.startswith('agent_turn-') and not l.endswith('.d')][0]
fake = subprocess.Popen([os.path.join(deps, fake_bin), '--serve-fake-model'], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
base_url = fake.stdout.readline().strip()
tick = os.sysconf('SC_CLK_TCK')
def cpu(pid):
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p
def env(home):
    return dict(os.environ, CHITIN_HOME=home, CHITIN_PASSPHRASE='bench-pass', CHITIN_LOG='warn')
def start(name, binary):
    home = os.path.join(os.environ.get('BENCH_AB_HOME', os.path.expanduser('~/chitin-bench-ab')), name)
    os.makedirs(home, mode=0o700, exist_ok=True)
    if True:
        cfg = f'{home}/chitin.toml'
        open(cfg, 'w').write(f'[gateway]\nworkspace = "../ws"\nauth_max_failures = 100000\n\n[agent]\nmodel = "fake/m"\nmax_concurrent_runs = 64\n\n[[providers]]\nname = "fake"\nkind = "openai"\nbase_url = "{base_url}"\n')
        os.chmod(cfg, 0o600)
    port = free_port()
    t = time.perf_counter()
    p = subprocess.Popen([binary, 'gateway', '--bind', f'127.0.0.1:{port}'], env=env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            c = http.client.HTTPConnection('127.0.0.1', port, timeout=5); c.request('GET', '/ready'); r = c.getresponse(); r.read()
            if r.status == 200: break
        except OSError: pass
        time.sleep(0.0002)
    ready = time.perf_counter() - t
    tok = subprocess.run([binary, 'token', 'show'], env=env(home), capture_output=True, text=True).stdout.strip()
    return p, port, tok, ready
gws = {}
for name, binary in variants:
    p, port, tok, _ = start(name, binary)
    gws[name] = (p, port, tok, http.client.HTTPConnection('127.0.0.1', port))
def chat(name, user):
    p, port, tok, c = gws[name]
    body = json.dumps({"model": "chitin", "user": user, "messages": [{"role": "user", "content": "What is on my list today?"}]})
    t = time.perf_counter()
    c.request('POST', '/v1/chat/completions', body, {'Authorization': 'Bearer ' + tok, 'Content-Type': 'application/json'})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
    return time.perf_counter() - t
res = {name: {'cpu': [], 'p50': []} for name, _ in variants}
for name, _ in variants:
    for i in range(20): chat(name, f'warm{i}')
for rd in range(rounds):
    order = variants if rd % 2 == 0 else variants[::-1]
    for name, _ in order:
        pid = gws[name][0].pid
        c0 = cpu(pid); d = []
        for i in range(n): d.append(chat(name, f'r{rd}-{i}'))
        res[name]['cpu'].append((cpu(pid) - c0) / n * 1000)
        res[name]['p50'].append(statistics.median(d) * 1000)
for name, _ in variants:
    c, q = res[name]['cpu'], res[name]['p50']
    print(f'{name:6} cpu/request median {statistics.median(c):.3f} ms (min {min(c):.3f}, max {max(c):.3f}); p50 median {statistics.median(q):.3f} ms')
for name, _ in variants:
    gws[name][0].kill(); gws[name][0].wait()
# restarts
rs = {name: [] for name, _ in variants}
for rd in range(int(os.environ.get('RESTARTS', '10'))):
    for name, binary in (variants if rd % 2 == 0 else variants[::-1]):
        p, _, _, ready = start(name, binary)
        rs[name].append(ready * 1000); p.kill(); p.wait()
for name, _ in variants:
    print(f'{name:6} restart to /ready median {statistics.median(rs[name]):.1f} ms (p25 {sorted(rs[name])[len(rs[name])//4]:.1f}, p75 {sorted(rs[name])[3*len(rs[name])//4]:.1f})')
fake.stdin.close(); fake.wait()
