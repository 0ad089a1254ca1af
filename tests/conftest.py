"""Shared fixtures. Every test runs offline: tiktoken's cache is seeded from the BPE files in data/,
the Hub is a loopback server, and downloads go to a temporary cache."""
import gzip
import hashlib
import http.server
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TIKTOKEN_URL = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'


@pytest.fixture(scope='session')
def tiktoken_cache(tmp_path_factory):
    """A tiktoken cache folder holding GPT-2's BPE files, copied from data/ (tiktoken checks their sha256).
    The file names are tiktoken's cache keys: the sha1 of the download URL."""
    cache = tmp_path_factory.mktemp('tiktoken')
    from load import DATA, GPT2_BPE_FILES
    for ours, name, _ in GPT2_BPE_FILES:
        shutil.copy(os.path.join(DATA, ours), cache / hashlib.sha1((TIKTOKEN_URL + name).encode()).hexdigest())
    return str(cache)


@pytest.fixture(scope='session')
def kernel_cache(tmp_path_factory):
    """fast_cpu's compiled kernels and kernel choices (cache_dir()), one folder for the whole session: the
    kernels compile once (~15 s), not once per test, and never into the user's own cache."""
    return str(tmp_path_factory.mktemp('torch-extensions'))


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path, tiktoken_cache, kernel_cache):
    """No test may reach the internet: the Hub endpoint is a closed loopback port unless a test starts a
    server, and the download cache is private to the test."""
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', tiktoken_cache)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', kernel_cache)
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf-home'))  # no test sees the user's Hugging Face cache
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    monkeypatch.delenv('HF_TOKEN', raising=False)


def make_hf_gpt2(n_layer=3, n_head=2, n_embd=32, n_positions=32, vocab_size=50257, seed=0):
    """A small random GPT2LMHeadModel with weights far from their init, so that greedy decoding varies from
    token to token: at init the tied embedding dominates the residual stream and every position predicts
    its own token again. Scaling the blocks' matrices by 32 lets attention and MLPs decide instead."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=vocab_size)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and '.h.' in name:
                p.mul_(32.0)
            elif name.endswith('.weight'):  # LayerNorm gains
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return hf


@pytest.fixture(scope='session')
def hf_tiny(tmp_path_factory):
    """(folder written by save_pretrained, the transformers model)."""
    hf = make_hf_gpt2()
    folder = tmp_path_factory.mktemp('tiny-gpt2')
    hf.save_pretrained(folder)
    return str(folder), hf


@pytest.fixture(scope='session')
def hf_plain(tmp_path_factory):
    """(folder, model) of a small GPT-2 with transformers' own random init: activations of GPT-2's scale,
    for precision comparisons (the scaled hf_tiny exaggerates rounding errors)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=64, n_positions=32)).eval()
    folder = tmp_path_factory.mktemp('plain-gpt2')
    hf.save_pretrained(folder)
    return str(folder), hf


@torch.no_grad()
def greedy_reference(model, idx, n):
    """nanoGPT's generation loop, greedy and without a cache: at every step the whole text (its last
    block_size tokens, for a model with a context limit) goes through forward again. The reference that
    every cached or stateful generate must equal."""
    for _ in range(n):
        context = idx if model.block_size is None else idx[:, -model.block_size:]
        idx = torch.cat([idx, model(context)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def run_script(script, *args, cwd=None, env=None, timeout=300):
    """Run one of our scripts as a user would, with these command-line arguments; returns a CompletedProcess
    (text mode). It runs in this process, as `python script` runs it (a fresh module namespace from runpy,
    sys.argv, the folder, stdout and stderr, SystemExit's message and status), because starting Python and
    torch costs ~2 s a run; a test that changes the environment (env) gets a real subprocess."""
    if env is not None:
        return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                              cwd=cwd or ROOT, env={**os.environ, **env}, timeout=timeout)
    import contextlib
    import io
    import runpy
    import signal
    import traceback
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = (sys.argv, os.getcwd(), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
             torch.random.get_rng_state())
    sys.argv = [os.path.join(ROOT, script), *args]
    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(sys.argv[0], run_name='__main__')
            except SystemExit as e:  # what the interpreter does with it
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except BaseException:  # a traceback, as Python would print it
                traceback.print_exc()
                code = 1
    finally:
        import load
        for f in load._claims.values():  # the folders the script claimed, released as its exit would
            f.close()
        load._claims.clear()
        sys.argv = saved[0]
        os.chdir(saved[1])
        signal.signal(signal.SIGINT, saved[2])
        signal.signal(signal.SIGTERM, saved[3])
        torch.random.set_rng_state(saved[4])
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, *phrases):
    """A user error: non-zero exit, one line on stderr after the 'overriding' echoes, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith('overriding')]
    assert len(lines) == 1, proc.stderr
    assert 'Traceback' not in proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


class HubServer:
    """A loopback HTTP server in the Hub's URL layout: GET /{org}/{name}/resolve/main/{file} (and
    /datasets/{org}/{name}/resolve/main/{file} for dataset repos).
    Large files are served like the Hub serves LFS files: a 302 redirect carrying X-Linked-Size and
    X-Linked-Etag (the sha256), then the bytes from another path, honoring Range requests.
    And the servers a download meets in the wild, per file key ('org/name/file'):
    drop_after[key] = n: the next response stops after n bytes and closes the connection (once);
    drop_every[key] = n: every response stops after n bytes; ignore_range: always the whole file, 200;
    no_size: no Content-Length, the body ends when the connection closes; announce[key] = n: claims n bytes;
    trickle[key] = s: one byte every s seconds; pace[key] = s: 64 KB every s seconds; gzip: Content-Encoding
    gzip; silent: accepts the request and never answers."""

    def __init__(self):
        self.files = {}  # 'org/name/file' -> bytes
        self.lfs = set()  # keys served through a redirect with sha256 headers
        self.bad_sha = set()  # keys whose announced sha256 is wrong
        self.drop_after, self.drop_every, self.announce, self.trickle, self.pace = {}, {}, {}, {}, {}
        self.ignore_range, self.no_size, self.gzip, self.silent = set(), set(), set(), set()
        self.log = []  # (path, Range header or None)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *a):
                pass

            def do_GET(self):
                server.log.append((self.path, self.headers.get('Range')))
                if self.path.startswith('/cdn/'):
                    return self.send_bytes(self.path[len('/cdn/'):])
                parts = self.path.lstrip('/').split('/')
                n = 3 if parts[0] == 'datasets' else 2  # dataset repos live under /datasets/org/name
                if len(parts) < n + 3 or parts[n:n + 2] != ['resolve', 'main']:
                    return self.send_error(404)
                key = '/'.join(parts[:n] + parts[n + 2:])
                if key in server.silent:
                    time.sleep(30)
                    return
                if key not in server.files:
                    self.send_response(404)
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                if key in server.lfs:
                    data = server.files[key]
                    sha = hashlib.sha256(data).hexdigest()
                    if key in server.bad_sha:
                        sha = '0' * 64
                    self.send_response(302)
                    self.send_header('Location', f'/cdn/{key}')
                    self.send_header('X-Linked-Size', str(server.announce.get(key, len(data))))
                    self.send_header('X-Linked-Etag', f'"{sha}"')
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                self.send_bytes(key)

            def send_bytes(self, key):
                data = server.files[key]
                if key in server.gzip:
                    data = gzip.compress(data)
                start = 0
                rng = None if key in server.ignore_range else self.headers.get('Range')
                if rng:
                    start = int(rng.split('=')[1].split('-')[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header('Content-Length', '0')
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                else:
                    self.send_response(200)
                if key in server.gzip:
                    self.send_header('Content-Encoding', 'gzip')
                if key in server.no_size:
                    self.send_header('Transfer-Encoding', 'chunked')
                else:
                    self.send_header('Content-Length', str(server.announce.get(key, len(data)) - start))
                self.end_headers()
                body = data[start:]
                cut = server.drop_after.pop(key, server.drop_every.get(key))
                step = 1 if key in server.trickle else 1 << 16 if key in server.pace else len(body) or 1
                try:
                    for i in range(0, len(body) if cut is None else min(cut, len(body)), step):
                        piece = body[i:min(i + step, len(body) if cut is None else cut)]
                        self.wfile.write(b'%x\r\n%s\r\n' % (len(piece), piece) if key in server.no_size else piece)
                        self.wfile.flush()
                        time.sleep(server.trickle.get(key) or server.pace.get(key) or 0)
                    if key in server.no_size and cut is None:
                        self.wfile.write(b'0\r\n\r\n')  # the last chunk: the body is complete
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up
                if cut is not None:  # a dropped connection, as a network drops it: a reset, not a clean end
                    self.close_connection = True
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
                elif key in server.announce:  # all it has, then a clean close, short of what it announced
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_WR)

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_folder(self, repo, folder, lfs=('model.safetensors', 'pytorch_model.bin')):
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), 'rb') as f:
                self.files[f'{repo}/{name}'] = f.read()
            if name in lfs:
                self.lfs.add(f'{repo}/{name}')

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub(monkeypatch):
    server = HubServer()
    monkeypatch.setenv('HF_ENDPOINT', server.url)
    yield server
    server.close()


def script_functions(script, *names):
    """The named top-level functions of a flat script, without running the script: their definitions are
    executed alone, with the script's imports (scripts read their settings from sys.argv when run)."""
    import ast
    path = os.path.join(ROOT, script)
    tree = ast.parse(open(path).read(), path)
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) or
            isinstance(n, ast.FunctionDef) and n.name in names]
    ns = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, 'exec'), ns)
    return [ns[n] for n in names]


def block_matplotlib(tmp_path):
    """An environment in which `import matplotlib` fails, as on a machine without it."""
    fake = tmp_path / 'no_matplotlib'
    (fake / 'matplotlib').mkdir(parents=True)
    (fake / 'matplotlib' / '__init__.py').write_text("raise ImportError('No module named matplotlib')\n")
    return {'PYTHONPATH': str(fake)}


def story_text(n_docs=160, seed=0):
    """TinyStories-like documents from a small grammar, separated by <|endoftext|> lines."""
    rng = random.Random(seed)
    names, things = ['Tom', 'Lily', 'Ben', 'Mia', 'Sam'], ['ball', 'cat', 'tree', 'boat', 'cake', 'dog']
    docs = []
    for _ in range(n_docs):
        name = rng.choice(names)
        s = [f"Once upon a time, {name} had a {rng.choice(things)}."]
        for _ in range(rng.randint(2, 5)):
            s.append(f"{rng.choice(names)} {rng.choice(['saw', 'liked', 'found', 'lost'])} the {rng.choice(things)}.")
        docs.append(' '.join(s))
    return ''.join(d + '\n<|endoftext|>\n' for d in docs)


@pytest.fixture(scope='session')
def datasets(tmp_path_factory):
    """Prepared data folders: stories with a compacted vocabulary and with GPT-2's, and number lines."""
    root = tmp_path_factory.mktemp('data')
    (root / 'stories.txt').write_text(story_text())
    (root / 'numbers.txt').write_text(''.join(' '.join(str(a + i) for i in range(12)) + '\n' for a in range(300)))
    out = {}
    for name, src, extra in (('compact', 'stories.txt', ['--compact_vocab=True']), ('full', 'stories.txt', []),
                             ('numbers', 'numbers.txt', ['--compact_vocab=True'])):
        proc = run_script('data/prepare.py', f'--source={root / src}', f'--out_dir={root / name}', *extra)
        assert proc.returncode == 0, proc.stderr
        out[name] = str(root / name)
    out['stories.txt'] = str(root / 'stories.txt')
    return out
