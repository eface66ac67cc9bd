#!/usr/bin/env python3
"""Gateway start, interleaved between release builds (BENCHMARKS.md, issue #21, ninth session).
For each variant a state dir under ~/chitin-rs/<name> (created by a first start that is not
counted); then N rounds, each starting every variant once (order reversed every other round):
spawn `chitin gateway` to the first 200 from GET /ready (a client polling every 0.2 ms), then
1 s idle, then VmRSS and the process's CPU (utime + stime, clock ticks) from /proc; then stop.

usage: scripts/bench-start.py N name=/path/to/chitin [name=/path/to/chitin ...]
"""
import os, subprocess, sys, time, http.client, socket, statistics
n = int(sys.argv[1]); variants = [a.split('=',1) for a in sys.argv[2:]]
def start(name, binary):
    home = os.path.expanduser(f'~/chitin-rs/{name}')
    os.makedirs(home, mode=0o700, exist_ok=True)
    if not os.path.exists(f'{home}/chitin.toml'):
        open(f'{home}/chitin.toml','w').write('[gateway]\nworkspace = "../ws"\n\n[agent]\nmodel = "fake/m"\n\n[[providers]]\nname = "fake"\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n')
        os.chmod(f'{home}/chitin.toml', 0o600)
    env = dict(os.environ, CHITIN_HOME=home, CHITIN_PASSPHRASE='bench-pass', CHITIN_LOG='warn')
    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
    t = time.perf_counter()
    p = subprocess.Popen([binary, 'gateway', '--bind', f'127.0.0.1:{port}'], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            c = http.client.HTTPConnection('127.0.0.1', port, timeout=5); c.request('GET', '/ready'); r = c.getresponse(); r.read()
            if r.status == 200: break
        except OSError: pass
        time.sleep(0.0002)
    ready = (time.perf_counter() - t) * 1000
    time.sleep(1.0)
    rss = int([l for l in open(f'/proc/{p.pid}/status') if l.startswith('VmRSS')][0].split()[1]) / 1024
    f = open(f'/proc/{p.pid}/stat').read().rsplit(')', 1)[1].split()
    cpu = (int(f[11]) + int(f[12])) * 1000 / os.sysconf('SC_CLK_TCK')
    p.terminate(); p.wait()
    return ready, rss, cpu
for name, b in variants: start(name, b)  # first start creates the state
res = {name: [] for name, _ in variants}
for i in range(n):
    for name, b in (variants if i % 2 == 0 else variants[::-1]):
        res[name].append(start(name, b))
for name, _ in variants:
    r = sorted(x[0] for x in res[name]); m = sorted(x[1] for x in res[name]); c = sorted(x[2] for x in res[name])
    print(f'{name:6} restart to /ready median {statistics.median(r):.1f} ms (p25 {r[len(r)//4]:.1f}, p75 {r[3*len(r)//4]:.1f}); idle RSS median {statistics.median(m):.1f} MiB; CPU to 1 s after ready median {statistics.median(c):.0f} ms')
