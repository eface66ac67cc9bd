"""Shared by scripts/bench-flat.py and scripts/text-order.py: a zero-latency fake
OpenAI-compatible model (a thread in the calling process; Python, so its cost is not in the
gateway's counts) and a gateway on a state dir of its own that uses it as its model."""
import http.client, json, os, shutil, socket, subprocess, sys, threading, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

WORDS = ["Hello", ", ", "this ", "is ", "an ", "answer."]
def chunk(delta, finish=None, usage=None):
    c = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage: c["usage"] = usage
    return b'data: ' + json.dumps(c).encode() + b'\n\n'
class Fake(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def log_message(self, *a): pass
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))) or b'{}')
        usage = {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}
        if req.get('stream'):
            out = b''.join(chunk({"content": w}) for w in WORDS) + chunk({}, "stop", usage) + b'data: [DONE]\n\n'
            ctype = 'text/event-stream'
        else:
            out = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "usage": usage,
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": "".join(WORDS)}}]}).encode()
            ctype = 'application/json'
        self.send_response(200); self.send_header('Content-Type', ctype)
        self.send_header('Content-Length', str(len(out))); self.end_headers(); self.wfile.write(out)

def fake_model():
    """Starts the fake model; returns its base URL."""
    fake = ThreadingHTTPServer(('127.0.0.1', 0), Fake)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    return f'http://127.0.0.1:{fake.server_address[1]}/v1'

def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p

TICK = os.sysconf('SC_CLK_TCK')
def cpu_of(pid):
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK

class Gateway:
    """A state dir at `root` (emptied first) whose agent uses the fake model at `base_url`.
    The root must not be under /tmp: the gateway refuses a state dir others can write beside.
    `fast_vault`: the passphrase backend with a small scrypt work factor (for runs under
    valgrind that open the vault); else the default backend ("auto", the kernel keyring)."""
    def __init__(self, name, root, base_url, fast_vault=True):
        self.name, self.root = name, root
        shutil.rmtree(root, ignore_errors=True)
        home = os.path.join(root, 'home'); os.makedirs(home, mode=0o700)
        cfg = os.path.join(home, 'chitin.toml')
        vault = '[secrets]\nbackend = "passphrase"\nscrypt_work_factor = 16\n\n' if fast_vault else ''
        open(cfg, 'w').write(f'{vault}[gateway]\nworkspace = "../ws"\n'
                             f'auth_max_failures = 100000\n\n[agent]\nmodel = "fake/m"\n\n[[providers]]\nname = "fake"\n'
                             f'kind = "openai"\nbase_url = "{base_url}"\n')
        os.chmod(cfg, 0o600)
        self.env = dict(os.environ, CHITIN_HOME=home, CHITIN_PASSPHRASE='bench-pass', CHITIN_LOG='warn')

    def start(self, cmd, path):
        """Runs `cmd gateway` on a free port until `path` answers 200; returns (process, port)."""
        port = free_port()
        p = subprocess.Popen(cmd + ['gateway', '--bind', f'127.0.0.1:{port}'], env=self.env,
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.root, 'gateway.err'), 'w'))
        while True:
            try:
                c = http.client.HTTPConnection('127.0.0.1', port, timeout=5); c.request('GET', path)
                r = c.getresponse(); r.read()
                if r.status == 200: return p, port
            except OSError: pass
            if p.poll() is not None: sys.exit(f'{self.name}: the gateway exited; see {self.root}/gateway.err')
            time.sleep(0.05)

    def client(self, binary, port):
        """A function that sends one chat turn (`user` names the session) and checks its 200."""
        tok = subprocess.run([binary, 'token', 'show'], env=self.env, capture_output=True, text=True).stdout.strip()
        conn = http.client.HTTPConnection('127.0.0.1', port)
        def chat(user='long', stream=False):
            body = json.dumps({"model": "chitin", "user": user, "stream": stream,
                               "messages": [{"role": "user", "content": "What is on my list today?"}]})
            conn.request('POST', '/v1/chat/completions', body, {'Authorization': 'Bearer ' + tok, 'Content-Type': 'application/json'})
            r = conn.getresponse(); r.read()
            if r.status != 200: sys.exit(f'{self.name}: status {r.status}')
        return chat
