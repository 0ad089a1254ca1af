"""
Bytes into and out of models, beside model.py (which knows nothing of them): downloads from the Hub and the
Hugging Face cache, checkpoints, tokenizers (GPT-2's BPE, compacted id maps, nanoGPT's character vocabularies),
data folders, export to the Hub's layout, and load_model(init_from), the model every script starts from.
The two weight readers GPT.from_pretrained needs, load_safetensors and safe_torch_load, are model.py's, so
that model.py alone still loads a local folder; everything here uses them.
"""

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from dataclasses import fields

import numpy as np
import torch
import torch.nn as nn

from model import (CONV1D, GPT, HF_ACTIVATIONS, SAFETENSORS_DTYPES, GPTConfig, KGramMLPSeqModel, LSTMSeqModel,
                   check_config, check_shapes, safe_torch_load, tensors_in)

ROOT = os.path.dirname(os.path.abspath(__file__))  # this repo; bundled folders are prepared into ROOT/data
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')  # the bundled text and GPT-2's BPE files

# -----------------------------------------------------------------------------
# The Hub

GPT2_NAMES = {n: f'openai-community/{n}' for n in ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')}
HF_ENDPOINT = 'https://huggingface.co'


def cache_dir():
    """Where downloads go: $XDG_CACHE_HOME/gpt-lab, else ~/.cache/gpt-lab."""
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'gpt-lab')


def hf_cache_snapshot(repo):
    """The folder of a complete snapshot of a model repo in the Hugging Face cache, or None. The cache lives at
    $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub, laid out as models--org--name/ with
    refs/main (the commit) and snapshots/<commit>/ (links to the files). It is only ever read."""
    hub = os.environ.get('HF_HUB_CACHE') or os.path.join(
        os.environ.get('HF_HOME') or os.path.join(os.path.expanduser('~'), '.cache', 'huggingface'), 'hub')
    repo_dir = os.path.join(hub, 'models--' + repo.replace('/', '--'))
    try:
        with open(os.path.join(repo_dir, 'refs', 'main')) as f:
            commit = f.read().strip()
    except OSError:
        return None
    folder = os.path.join(repo_dir, 'snapshots', commit)
    # complete: config.json and a weight file whose links resolve (a download still under way has no link yet)
    if re.fullmatch(r'[0-9a-f]{40}', commit) and os.path.isfile(os.path.join(folder, 'config.json')) and any(
            os.path.isfile(os.path.join(folder, f)) for f in ('model.safetensors', 'pytorch_model.bin')):
        return folder
    return None


def hub_snapshot(name):
    """A local folder with a Hub repo's config.json and weights: a complete snapshot in the Hugging Face cache
    if there is one, else our own cache, downloaded once from the Hub (or $HF_ENDPOINT). A second call finds
    the files and touches no network."""
    repo = GPT2_NAMES.get(name, name)
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', repo) or '..' in repo:
        raise ValueError(f"init_from={name!r} is not a GPT-2 name ({', '.join(GPT2_NAMES)}), a Hub repo id "
                         f"(org/name), an existing folder, or a .pt checkpoint")
    # transformers caches GPT-2 under its old id 'gpt2' as well as under 'openai-community/gpt2'
    cached = hf_cache_snapshot(repo) or (hf_cache_snapshot(name) if name in GPT2_NAMES else None)
    if cached:
        return cached
    folder = os.path.join(cache_dir(), 'hub', repo.replace('/', '--'))
    hub_download(repo, 'config.json', folder)
    # (hub_download checks a file it finds by its format, so a cached file that is not whole is fetched again)
    if os.path.exists(os.path.join(folder, 'model.safetensors')) or not os.path.exists(
            os.path.join(folder, 'pytorch_model.bin')):
        try:
            hub_download(repo, 'model.safetensors', folder)
            return folder
        except NotOnHub:  # older repos have only the PyTorch pickle
            pass
    hub_download(repo, 'pytorch_model.bin', folder)
    return folder


class NotOnHub(FileNotFoundError):
    """The server answered 401, 403 or 404 for a file: it is not there (or not for us)."""


STALL_SECONDS, STALL_BYTES = 60, 1024  # a transfer that brings fewer than 1 KB in a minute is stalled, and so
# is a server whose answer (its headers) takes longer than a minute
ATTEMPTS = 5  # attempts in a row that bring nothing new before a download gives up (progress resets the count)
LOCK_SECONDS = 120  # a process waiting for another's download of the same file gives up when its .part has not
# grown for this long (the other's own waits are bounded as this one's are, so it is stuck)
# the most a file may hold when the server announces no size (config.json is ~1 KB, gpt2-xl's weights 6.4 GB,
# TinyStories' train text 1.9 GB): a compressed body that inflates past it is cut off, not written out
MAX_BYTES, MAX_BYTES_OTHER = {'.json': 16 << 20, '.txt': 8 << 30}, 32 << 30


@contextlib.contextmanager
def file_lock(path, patience=None, progress=None):
    """An exclusive lock on the file path (created if need be) while the block runs, so that of several
    processes wanting one download, one downloads and the others wait for it. Released when the file closes,
    also when the process dies; the holder writes its pid into the file. With patience (seconds), a process
    that has to wait says once whose lock it waits for, and gives up (TimeoutError) when progress() (a sign
    of the holder's work, such as the size of its .part file) has not changed for that long."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a+b') as f:
        t0 = t_seen = time.time()
        seen = progress() if progress else None
        said = False
        while not _try_lock(f):
            try:
                f.seek(0)
                pid = f.read(20).decode(errors='replace').strip()
            except OSError:  # (Windows: the holder's locked byte cannot be read)
                pid = ''
            who = f"process {pid}" if pid.isdigit() else "another process"
            if patience is not None and not said:
                print(f"waiting for {who}, which holds {path}", file=sys.stderr)
                said = True
            now = progress() if progress else None
            if now != seen:
                seen, t_seen = now, time.time()
            if patience is not None and time.time() - t_seen > patience:
                raise TimeoutError(f"gave up waiting for {path}, which {who} holds: nothing changed in {patience} s "
                                   f"(waited {time.time() - t0:.0f} s); if that process is stuck, end it"
                                   f"{f' (kill {pid})' if pid.isdigit() else ''} and run again")
            time.sleep(0.1)
        f.seek(0)
        f.truncate(0)
        f.write(b'%d\n' % os.getpid())
        f.flush()
        yield


def _try_lock(f):
    try:
        if os.name == 'nt':
            import msvcrt
            f.seek(0)  # (Windows locks bytes from the file's position: every process locks byte 0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def hub_download(repo, filename, folder):
    """Download {endpoint}/{repo}/resolve/main/{filename} into folder, unless it is there already.
    - One process at a time: a lock file beside the target; a process that waited finds the file done.
    - Bytes go to a .part file as they arrive (nothing read is thrown away); a dropped connection resumes
      with an HTTP Range request, in this call or in the next run, when the server answers with the range
      asked for (another range starts the file over).
    - The file is renamed into place only when complete: as long as the server announced, with the sha256
      the server gives (the Hub's X-Linked-Etag), and whole by its own format (_problem: JSON parses, a
      .safetensors file is as long as its header says); a server that announces no size must have ended the
      transfer cleanly. A file in the cache that is not whole by its format is downloaded again.
    - Every wait has a wall-clock bound (_Deadline): an answer within STALL_SECONDS, then at least
      STALL_BYTES of the file in every STALL_SECONDS; a compressed body may inflate to no more than the size
      announced (else MAX_BYTES for its kind). ATTEMPTS attempts in a row that bring no new bytes, or stall,
      end it with one line (the .part stays, to resume later)."""
    path = os.path.join(folder, filename)
    if os.path.exists(path) and _problem(path, filename) is None:
        return path
    os.makedirs(folder, exist_ok=True)
    part = path + '.part'
    with file_lock(path + '.lock', LOCK_SECONDS, lambda: (os.path.exists(path), _size(part))):
        if os.path.exists(path):  # another process finished it while this one waited, or an old damaged file
            problem = _problem(path, filename)
            if problem is None:
                return path
            print(f"{path} is damaged ({problem}); downloading it again", file=sys.stderr)
            os.remove(path)
        _download(repo, filename, path)
    return path


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:  # (not there, or not yet)
        return -1


def _download(repo, filename, path):
    import requests  # only downloads need it
    import urllib3  # (installed with requests, which is built on it: its errors arrive unwrapped mid-body)
    endpoint = os.environ.get('HF_ENDPOINT', HF_ENDPOINT).rstrip('/')
    url = f"{endpoint}/{repo}/resolve/main/{filename}"
    auth = {'Authorization': f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get('HF_TOKEN') else {}
    part, name = path + '.part', f"{repo}/{filename}"
    cap = MAX_BYTES.get(os.path.splitext(filename)[1], MAX_BYTES_OTHER)
    no_answer = (f"{endpoint} did not answer within {STALL_SECONDS} s (downloading {name}); try again later, or "
                 f"put the model's files in a folder and use --init_from=that/folder")
    failures, best, why, resume = 0, -1, '', True
    while failures < ATTEMPTS:
        have = os.path.getsize(part) if resume and os.path.exists(part) else 0
        headers = {**auth, 'Accept-Encoding': 'gzip, deflate'}  # (the two that _inflate undoes)
        if have:
            headers['Range'] = f'bytes={have}-'
        deadline = _Deadline(STALL_SECONDS)
        session = _watched_session(deadline)
        try:
            r = session.get(url, stream=True, timeout=(10, STALL_SECONDS), headers=headers)
        except requests.RequestException as e:
            session.close()
            deadline.close()
            if isinstance(e, requests.TooManyRedirects):
                raise ConnectionError(f"{name}: {endpoint} redirects in a loop (more than 30 redirects); a broken "
                                      f"mirror or proxy? check HF_ENDPOINT, or put the model's files in a folder and "
                                      f"use --init_from=that/folder") from None
            if deadline.expired or isinstance(e, requests.Timeout):
                raise ConnectionError(no_answer) from None
            raise ConnectionError(f"cannot reach {endpoint} to download {name} ({type(e).__name__}); offline? put "
                                  f"config.json and model.safetensors in a folder and use --init_from=path/to/folder"
                                  ) from None
        with session, r, deadline:
            if deadline.expired:  # its headers took all the time there was (the socket is shut: the body is lost)
                raise ConnectionError(no_answer)
            if r.status_code in (401, 403, 404):
                hint = 'private or gated? set HF_TOKEN' if r.status_code != 404 else 'check the repo id'
                raise NotOnHub(f"{repo}: file {filename} not found on {endpoint} (HTTP {r.status_code}; {hint})")
            if r.status_code == 416:  # our .part is as long as the file, or longer: start over
                if not have:
                    raise ConnectionError(f"{name}: {endpoint} answered HTTP 416 (range not satisfiable) to a request "
                                          f"for the whole file; a broken mirror or proxy? check HF_ENDPOINT")
                os.remove(part)
                failures, why = failures + 1, 'the server refused to resume it'
                continue
            if r.status_code not in (200, 206):
                raise ConnectionError(f"{name}: {endpoint} answered HTTP {r.status_code}")
            if r.status_code == 200:
                have = 0  # the server sent the whole file, not the range asked for
            size, sha256 = _hub_file_info(r, have, name)
            if r.status_code == 206 and _content_range(r)[0] != have:
                # bytes from elsewhere in the file (or another file) cannot be appended: start over, whole
                with contextlib.suppress(FileNotFoundError):
                    os.remove(part)
                failures, resume = failures + 1, False
                why = f"the server answered a request for bytes {have}- with {r.headers.get('Content-Range')!r}"
                continue
            layers = _decoders(r, name)
            encoded = bool(layers)  # its ranges count other bytes than the file's: it cannot resume
            limit = size if size is not None else cap
            deadline.extend()  # it answered: from here on the stall window counts
            complete, stalled, done, t0, t_print = False, False, have, time.time(), 0.0
            window_bytes, expect = 0, None
            # the body as it came over the wire (decode_content=False): _inflate bounds what it decodes to
            read = getattr(r.raw, 'read1', None) or (lambda n, **kw: r.raw.read(1 << 14, **kw))  # urllib3 < 2
            with open(part, 'ab' if have else 'wb') as f:
                try:
                    # read1 returns whatever has arrived (up to 1 MB), so a connection that drops loses nothing
                    # and a trickle is seen as one
                    while not deadline.expired:
                        raw = read(1 << 20, decode_content=False)
                        for piece in _inflate(layers, raw, name):
                            if done + len(piece) > limit:
                                what = 'its header gives' if expect and limit == expect else 'it announced' if \
                                    size is not None else f"a {os.path.splitext(filename)[1] or 'such'} file may hold"
                                raise _Refused(f"{name}: {endpoint} sent more than the {limit} bytes {what} (at "
                                               f"least {done + len(piece)}); removed it; a broken mirror or proxy? "
                                               f"check HF_ENDPOINT")
                            f.write(piece)
                            done, window_bytes = done + len(piece), window_bytes + len(piece)
                            if window_bytes >= STALL_BYTES:
                                deadline.extend()
                                window_bytes = 0
                        if expect is None and filename.endswith('.safetensors') and done >= 8:
                            f.flush()
                            try:
                                expect = _safetensors_size(part)  # its header says how long it is
                            except ValueError as e:
                                raise _Refused(f"{name}: what {endpoint} sent is not a safetensors file ({e}); "
                                               f"removed it; check HF_ENDPOINT, or put the model's files in a "
                                               f"folder and use --init_from=that/folder") from None
                            limit = min(limit, expect or limit)
                        if time.time() - t_print > 0.5 and (size or done) > 1e6:  # quiet for small files
                            t_print = time.time()
                            total = f"/{size / 1e6:.1f}" if size else ""
                            print(f"\rdownloading {name}: {done / 1e6:.1f}{total} MB, "
                                  f"{(done - have) / 1e6 / max(t_print - t0, 1e-6):.1f} MB/s", end='', file=sys.stderr,
                                  flush=True)
                        if not raw:
                            complete = all(d.eof for d in layers)  # a compressed stream says where it ends
                            break
                except _Refused as e:
                    f.close()
                    os.remove(part)
                    raise ValueError(str(e)) from None
                except (urllib3.exceptions.HTTPError, requests.RequestException, ConnectionError) as e:
                    why = f"the connection broke ({type(e).__name__})"
        got, announced = os.path.getsize(part), size is not None
        if size is None:
            size = expect
        if deadline.expired and got != size:  # (the deadline shut the socket: what looked like the end was not)
            complete, stalled = False, True
            why = f"stalled (fewer than {STALL_BYTES} bytes in {STALL_SECONDS} s)"
        if t_print:
            print(f"\rdownloading {name}: {got / 1e6:.1f} MB{'' if complete else ', ' + why + '; resuming'}",
                  file=sys.stderr)
        if complete and (got == size if size is not None else True):
            problem = _problem(part, filename)
            if problem is not None:
                os.remove(part)
                raise ValueError(f"{name}: what {endpoint} sent is not a whole {filename} ({problem}); removed it: "
                                 f"a proxy's or Wi-Fi network's login page, or a cut transfer? run again once the "
                                 f"network is open, or put the model's files in a folder and use --init_from=that/folder")
            if sha256 is not None and _sha256(part) != sha256:
                os.remove(part)
                raise ValueError(f"{name}: sha256 of the download does not match the server's; removed it, run again "
                                 f"to download it afresh")
            os.replace(part, path)
            return
        if complete:
            why = f"the server announced {size} bytes but sent {got}" if announced else \
                f"the server ended it at {got} of the {size} bytes its header gives"
        else:
            why = f"{why} at {got} of {size if size is not None else 'an unknown number of'} bytes"
        if encoded:
            os.remove(part)  # compressed: its ranges count other bytes, so it cannot resume; start over
            got = 0
        failures, best = (0, got) if got > best and not stalled else (failures + 1, max(best, got))
    raise ConnectionError(f"{name}: {why}; {ATTEMPTS} attempts in a row brought nothing new; run again to resume")


class _Refused(Exception):
    """A body that is not the file, found out during the transfer: its message is the one line to say."""


class _Deadline:
    """A wall-clock bound on every wait of one request, which requests cannot give: its timeout bounds each
    read of the socket, so headers sent a byte a second or a chunk-size line that never ends never trip it,
    and a gzip stream that inflates to nothing keeps the reads busy. A thread shuts the request's socket down
    once the deadline passes (extend() moves it on, as the file arrives), so that whatever read is waiting,
    inside requests or urllib3, ends at once; then expired is True."""

    def __init__(self, seconds):
        import threading
        self.seconds, self.sock, self.expired, self.done = seconds, None, False, threading.Event()
        self.extend()
        threading.Thread(target=self._watch, daemon=True).start()

    def extend(self):
        self.at = time.monotonic() + self.seconds

    def _watch(self):
        import socket
        while not self.done.wait(max(0.05, self.at - time.monotonic())):
            if time.monotonic() >= self.at:
                self.expired = True
                if self.sock is not None:  # (None while it connects, which its own 10 s timeout bounds)
                    with contextlib.suppress(OSError, TypeError):
                        socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # (the fd's: also under TLS)
                    return

    def close(self):
        self.done.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _watched_session(deadline):
    """A requests Session whose connections give their socket to deadline (a _Deadline), through urllib3's
    connection classes (connect() is where a socket is made), also through an HTTP proxy."""
    import requests
    import urllib3

    class Watched:
        def connect(self):
            super().connect()
            deadline.sock = self.sock

    class HTTP(Watched, urllib3.connection.HTTPConnection):
        pass

    class HTTPS(Watched, urllib3.connection.HTTPSConnection):
        pass

    pools = {'http': type('HTTPPool', (urllib3.HTTPConnectionPool,), {'ConnectionCls': HTTP}),
             'https': type('HTTPSPool', (urllib3.HTTPSConnectionPool,), {'ConnectionCls': HTTPS})}

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy, **kwargs):
            manager = super().proxy_manager_for(proxy, **kwargs)
            if not proxy.lower().startswith('socks'):  # (SOCKS proxies have pools of their own)
                manager.pool_classes_by_scheme = pools
            return manager

    session = requests.Session()
    session.mount('http://', Adapter())
    session.mount('https://', Adapter())
    return session


def _decoders(r, name):
    """One zlib decompressor per Content-Encoding of the response, the last applied (listed last) first."""
    codings = [c.strip().lower() for c in r.headers.get('Content-Encoding', '').split(',')]
    codings = [c for c in codings if c not in ('', 'identity')]
    for c in codings:
        if c not in ('gzip', 'x-gzip', 'deflate'):
            raise ValueError(f"{name}: the server sent it in an encoding that was not asked for ({c}); a broken "
                             f"mirror or proxy? check HF_ENDPOINT")
    import zlib
    return [zlib.decompressobj(32 + 15) for _ in reversed(codings)]  # (32: a gzip or a zlib header, either)


def _inflate(layers, data, name, piece=1 << 20):
    """The bytes that data decodes to through the zlib decompressors layers (the outermost first), at most
    piece bytes at a time, so that a small body that inflates a thousandfold (twice, with 'gzip, gzip') is
    never in memory whole and is cut off as it grows. b'' drains what the decompressors still hold."""
    import zlib
    if not layers:
        if data:
            yield data
        return
    d = layers[0]
    while True:
        if d.eof and (d.unused_data or data):  # gzip allows several members one after the other
            data, d = d.unused_data + data, zlib.decompressobj(32 + 15)
            layers[0] = d
        try:
            out = d.decompress(data, piece)
        except zlib.error as e:
            raise _Refused(f"{name}: the server's compressed body does not decode ({e}); a broken mirror or proxy? "
                           f"check HF_ENDPOINT") from None
        data = d.unconsumed_tail
        yield from _inflate(layers[1:], out, name, piece)
        if not data and len(out) < piece and not (d.eof and d.unused_data):
            return


def _hub_file_info(r, offset, name):
    """(total size or None, sha256 or None) of a file from the response headers. The Hub answers a resolve URL
    of a large (LFS) file with a redirect whose X-Linked-Size / X-Linked-Etag give the size and the sha256."""
    hdrs = [h.headers for h in r.history] + [r.headers]
    size = sha = None
    for h in hdrs:
        if size is None and h.get('X-Linked-Size'):
            size = _header_int(h, 'X-Linked-Size', name)
        for key in ('X-Linked-Etag', 'ETag'):
            tag = h.get(key, '').removeprefix('W/').strip('"')
            if sha is None and re.fullmatch(r'[0-9a-f]{64}', tag):
                sha = tag
    if size is None:  # bytes 100-999/1000 (a total of * is unknown)
        size = _content_range(r)[1]
    if size is None and r.headers.get('Content-Length') and 'Content-Encoding' not in r.headers:
        size = offset + _header_int(r.headers, 'Content-Length', name)
    return size, sha


def _header_int(h, key, name):
    if not re.fullmatch(r'\s*\d+\s*', h[key]):
        raise ValueError(f"{name}: the server's {key} header is {h[key]!r}, not a size; a broken mirror or proxy? "
                         f"check HF_ENDPOINT")
    return int(h[key])


def _content_range(r):
    """(where the bytes of a 206 answer start in the file, the file's total size) from its Content-Range
    (bytes 100-999/1000); None for what it does not say (a total of *), or for both without the header."""
    m = re.fullmatch(r'bytes (\d+)-\d+/(\d+|\*)', r.headers.get('Content-Range', '').strip())
    return (int(m[1]), None if m[2] == '*' else int(m[2])) if m else (None, None)


def _safetensors_size(path):
    """The size a .safetensors file must have by its header (8 bytes of header length N, N bytes of JSON, then
    the tensors: 8 + N + the end of the last), or None while fewer than 8 + N bytes are there; ValueError if
    those bytes are no safetensors header."""
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        if n > 100 << 20:  # (the format's own limit on its header)
            raise ValueError(f"its header length {n} is not a safetensors header's")
        head = f.read(n)
    if len(head) < n:
        return None
    try:
        header = json.loads(head)
        ends = [info['data_offsets'][1] for k, info in header.items() if k != '__metadata__']
        if not all(type(e) is int and e >= 0 for e in ends):
            raise ValueError
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, UnicodeDecodeError):
        raise ValueError("it does not begin with a safetensors header") from None
    return 8 + n + max(ends, default=0)


def _problem(path, filename):
    """Why the file at path is not a whole file of its kind by its own format, or None: JSON must parse, a
    .safetensors file must be as long as its header says, a pytorch_model.bin (torch.save) must be a zip with
    its directory or torch's older pickle. These checks read little; other files are not checked."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(48)
    begins = f"it begins {head.decode('utf-8', 'replace')!r}"
    if filename.endswith('.json'):
        try:
            with open(path, 'rb') as f:
                json.loads(f.read())
        except ValueError:  # (UnicodeDecodeError is one)
            return f"not JSON; {begins}"
        except RecursionError:
            return "JSON nested too deep to read"
    elif filename.endswith('.safetensors'):
        try:
            need = _safetensors_size(path)
        except ValueError as e:
            return f"{e}; {begins}"
        if need != size:
            return f"its header gives {need} bytes, the file has {size}"
    elif filename == 'pytorch_model.bin':
        import zipfile
        if head.startswith(b'PK'):
            try:
                zipfile.ZipFile(path).close()
            except (zipfile.BadZipFile, OSError) as e:
                return f"a cut or damaged zip ({e})"
        elif not head.startswith(b'\x80'):  # torch's format before the zip: a pickle
            return f"neither torch.save's zip nor its pickle; {begins}"
    return None


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Output files: what a script writes into a run or export folder (checkpoints, log.csv, loss.png, exports)


def refuse_link(path):
    """ValueError if path is a symbolic link (dangling ones too): a script writes its own files, never through a
    link into a file the user keeps elsewhere."""
    if os.path.islink(path):
        raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}); the scripts write their own files, "
                         f"never through a link: remove it, or give another folder")


@contextlib.contextmanager
def output_file(path):
    """Write path safely: yields a temporary path beside it (same folder, same extension, an unpredictable name) for
    the caller to write, then renames it over path, so a crash or a full disk never leaves half a file and the
    old one stays until the new one is whole. Refuses (ValueError) when path is a symbolic link."""
    refuse_link(path)
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}.tmp-{os.getpid()}-{os.urandom(4).hex()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def append_to(path):
    """path opened to append text (log.csv's rows), refusing (ValueError) a symbolic link: O_NOFOLLOW makes the
    check and the open one step, so a link made in between is refused too."""
    refuse_link(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0) |
                     getattr(os, 'O_BINARY', 0), 0o666)  # (binary: csv writes its own line ends, on Windows too)
    except OSError:
        refuse_link(path)  # (a link made since the check above)
        raise
    return os.fdopen(fd, 'a', newline='')


_claims = {}  # folder -> its open lock file, for each folder this process claimed, kept open until it exits


def claim_folder(folder, what):
    """Claim folder for this process (until it exits) with an exclusive lock on folder/.lock that records its pid,
    so that two runs started together can never both write it: the second gets ValueError naming the first.
    The kernel drops the lock when the process ends, however it ends, so a crash leaves nothing to clean up."""
    if os.path.realpath(folder) in _claims:  # (a script run again in this process: a notebook's %run)
        return
    path = os.path.join(folder, '.lock')
    refuse_link(path)
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_BINARY', 0),
                          0o666), 'r+b')
    if not _try_lock(f):  # (file_lock's lock, without the wait)
        try:
            f.seek(0)
            holder = f.read(20).decode(errors='replace').strip()
        except OSError:  # (Windows: the holder's locked byte cannot be read)
            holder = ''
        f.close()
        raise ValueError(f"{folder} is in use by another {what} (pid {holder or '?'}); wait for it to end, or give "
                         f"another folder")
    f.seek(0)
    f.truncate(0)
    f.write(b'%d\n' % os.getpid())
    f.flush()
    _claims[os.path.realpath(folder)] = f


# -----------------------------------------------------------------------------
# Checkpoints

MODEL_TYPES = {'gpt': GPT, 'transformer': GPT, 'gpt2': GPT, 'lstm': LSTMSeqModel, 'kgram_mlp': KGramMLPSeqModel}


def build_model(model_type, model_args, weights=None, where='model_args'):
    """A fresh model of a type in MODEL_TYPES from its constructor arguments (as a checkpoint stores them). With
    weights ({name: tensor}), the arguments are first checked against them without allocating anything
    (model.check_shapes): sizes the weights lack are refused with one line, before they could exhaust memory."""
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r:.40} is not one of: {', '.join(MODEL_TYPES)}")
    if not isinstance(model_args, dict) or not all(isinstance(k, str) for k in model_args):
        raise ValueError(f"{where} is not a dict of settings")
    cls = MODEL_TYPES[model_type]
    if cls is GPT:
        unknown = sorted(set(model_args) - {f.name for f in fields(GPTConfig)})
        if unknown:
            raise ValueError(f"model_args has fields this model.py does not know: {', '.join(unknown)}")
        config = GPTConfig(**model_args)
        check_config(config)
        if weights is not None:
            check_shapes(config, weights, where)  # the count of blocks first: building 10**5 takes minutes
    elif cls is KGramMLPSeqModel and weights is not None:
        n = len([k for k in weights if re.fullmatch(r'net\.\d+\.weight', k)]) - 1
        if n != model_args.get('num_inner_layers', 1):
            raise ValueError(f"{where}: num_inner_layers={model_args.get('num_inner_layers', 1)} but the weights "
                             f"hold {n} inner layers")
    make = (lambda: GPT(config)) if cls is GPT else (lambda: cls(**model_args))
    try:
        with torch.device('meta'):  # shapes only, no memory
            meta = make()
    except (TypeError, ValueError, RuntimeError) as e:  # (the course's models take their arguments as they come)
        raise ValueError(f"{where}: cannot build a {cls.__name__} from {model_args!r:.100} ({str(e)[:100]})") from None
    if weights is not None:
        check_shapes(meta, weights, where)
    # what the model will take (weights and buffers such as RoPE's tables) against this machine's memory, before
    # it is allocated: past that, Linux lets the allocation succeed and kills the process later
    need = sum(t.numel() * t.element_size() for t in [*meta.parameters(), *meta.buffers()])
    if memory_bytes() and need > 0.8 * memory_bytes():
        raise ValueError(f"{where}: this {cls.__name__} needs {need / 1e9:.1f} GB for its weights and buffers alone, "
                         f"and this machine has {memory_bytes() / 1e9:.1f} GB")
    return make()


def load_checkpoint(path):
    """A model from a checkpoint written by our train.py (any model_type) or by nanoGPT's (keys model,
    model_args, config). Returns (model, checkpoint dict). Its model_args are checked against its weights
    before anything is built for real (build_model)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict) or not isinstance(
            ckpt.get('model_args'), dict):
        raise ValueError(f"{path} is not a training checkpoint (it needs the keys 'model' and 'model_args', dicts)")
    # tensors only where a checkpoint keeps them: the model's (checked against it below) and the optimizer's
    # state, and scalars (nanoGPT's best_val_loss); others are refused rather than loaded for nothing
    stray = [k for k, v in ckpt.items() if k not in ('model', 'optimizer') and
             any(t.numel() > 1 for t in tensors_in(v))]
    if stray:
        raise ValueError(f"{path}: refused: it holds tensors under {stray[0]!r}, which no checkpoint of "
                         f"train.py or nanoGPT has (only 'model' and 'optimizer' hold tensors)")
    model_type = ckpt.get('model_type', 'gpt')
    args = dict(ckpt['model_args'])
    if isinstance(model_type, str) and MODEL_TYPES.get(model_type) is GPT:  # (build_model refuses other types)
        # nanoGPT's checkpoints predate our architecture fields: they were trained with the exact GELU
        args.setdefault('activation', 'gelu')
    # torch.compile prefixes every key with _orig_mod.; old nanoGPT models also saved their causal mask
    sd = {str(k).removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items() if isinstance(v, torch.Tensor)}
    sd = {k: v for k, v in sd.items() if not k.endswith('.attn.bias')}  # (ours: c_attn.bias, never .attn.bias)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # (save_checkpoint never writes these: this file came from elsewhere, or from a diverged run)
        raise ValueError(f"{path}: {len(bad)} of its {len(sd)} weight tensors are NaN or infinite ({bad[0]}, ...); "
                         f"the model it holds cannot compute anything: use an earlier checkpoint")
    try:
        model = build_model(model_type, args, sd, path)
        model.load_state_dict(sd)
    except (ValueError, TypeError) as e:
        raise ValueError(e if str(e).startswith(path) else f"{path}: {e}") from None
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(f"{path}: weights do not match model_args: {lines[1] if len(lines) > 1 else lines[0]}") from None
    if 'layer_ids' in ckpt:  # (prune.py's: which blocks of the original model these are)
        ids = ckpt['layer_ids']
        if not (isinstance(ids, list) and len(ids) == len(getattr(model, 'layer_ids', ())) and
                all(type(i) is int and i >= 0 for i in ids)):
            raise ValueError(f"{path}: layer_ids={ids!r:.60} is not a list of one block index per block")
        model.layer_ids = list(ids)
    return model, ckpt


def save_checkpoint(ckpt, path):
    """Write a training checkpoint so that nothing good is lost: refused (ValueError) when its weights are not
    finite, since a diverged run must not replace the last good state; written to a temporary file and renamed,
    so a crash never leaves half a file; and on a failed write (disk full) the temporary file is removed and the
    old checkpoint stays (OSError, one line)."""
    bad = [k for k, v in ckpt['model'].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"not saved: {len(bad)} of {len(ckpt['model'])} weight tensors are NaN or infinite (the run "
                         f"diverged); {path} keeps {'the last good state' if os.path.exists(path) else 'nothing'}")
    try:
        with output_file(path) as tmp:
            torch.save(ckpt, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        what = getattr(e, 'strerror', None) or str(e).splitlines()[0][:100]
        raise OSError(f"could not write {path} ({what}); "
                      f"{'it keeps the last saved state' if os.path.exists(path) else 'nothing was saved'}") from None


# -----------------------------------------------------------------------------
# The tokenizer

# GPT-2's BPE files, shipped in data/: (our name, the name tiktoken downloads, the name in a Hub folder)
GPT2_BPE_FILES = [('gpt2-vocab.bpe', 'vocab.bpe', 'merges.txt'), ('gpt2-encoder.json', 'encoder.json', 'vocab.json')]


def gpt2_encoding():
    """tiktoken's GPT-2 encoding. tiktoken downloads its two BPE files on first use; this repo ships them
    (data/gpt2-vocab.bpe, data/gpt2-encoder.json, from openai/gpt-2), so they seed tiktoken's cache and a
    fresh clone tokenizes offline. tiktoken checks their sha256 either way."""
    import tiktoken
    cache = os.environ.get('TIKTOKEN_CACHE_DIR') or os.environ.get('DATA_GYM_CACHE_DIR') or \
        os.path.join(tempfile.gettempdir(), 'data-gym-cache')
    base = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
    try:
        for ours, name, _ in GPT2_BPE_FILES:
            dst = os.path.join(cache, hashlib.sha1((base + name).encode()).hexdigest())  # tiktoken's cache key
            if not os.path.exists(dst) and os.path.exists(os.path.join(DATA, ours)):
                os.makedirs(cache, exist_ok=True)
                with open(os.path.join(DATA, ours), 'rb') as fi, open(dst + f'.{os.getpid()}.tmp', 'wb') as fo:
                    fo.write(fi.read())
                os.replace(dst + f'.{os.getpid()}.tmp', dst)
    except OSError:
        pass  # an unwritable cache: tiktoken downloads the files itself
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # tiktoken raises requests' errors, or ValueError on a hash mismatch
        raise ConnectionError(f"tiktoken could not fetch GPT-2's BPE files ({type(e).__name__}); connect once to "
                              f"the internet, or restore data/gpt2-vocab.bpe and data/gpt2-encoder.json from git"
                              ) from None


class Tokenizer:
    """Text to a model's token ids and back, for the three vocabularies a model here can have:
    - GPT-2's BPE (tiktoken): the 50,257 ids as they are;
    - GPT-2's BPE compacted to the ids of the training data (data/prepare.py --compact_vocab=True): the model's
      token i is GPT-2's token id_map[i];
    - characters (nanoGPT's shakespeare_char, data/prepare.py --tokenizer=char): token i is the string chars[i].
    Data folders hold GPT-2 ids (compacted or not) or their own character ids; table(vocab) maps those to the
    model's ids (-1 where the model lacks one)."""

    def __init__(self, id_map=None, chars=None):
        self.id_map = None if id_map is None else list(id_map)
        self.chars = None if chars is None else list(chars)
        if self.chars is not None:
            self.enc, self.n_vocab = None, len(self.chars)
            self.stoi = {c: i for i, c in enumerate(self.chars)}
            return
        self.enc = gpt2_encoding()
        self.n_vocab = self.enc.n_vocab if id_map is None else len(self.id_map)
        # GPT-2 id -> model id: one table, for encoding text and for mapping data folders' ids
        self.gpt2_to_model = torch.arange(self.enc.n_vocab) if id_map is None else \
            torch.full((self.enc.n_vocab,), -1).index_put_((torch.tensor(self.id_map, dtype=torch.long),),
                                                           torch.arange(len(self.id_map)))

    @classmethod
    def from_spec(cls, spec):
        """The tokenizer a checkpoint or data folder names: {'name': 'gpt2', 'id_map': ...} or {'name': 'char',
        'chars': [...]}."""
        name = spec.get('name', 'gpt2') if isinstance(spec, dict) else None
        chars, id_map = (spec.get('chars'), spec.get('id_map')) if isinstance(spec, dict) else (None, None)
        if name == 'char' and isinstance(chars, list) and chars and all(isinstance(c, str) and c for c in chars):
            check_chars(chars, 'the tokenizer')
            return cls(chars=chars)
        if name == 'gpt2' and (id_map is None or isinstance(id_map, list) and id_map and all(
                type(i) is int and 0 <= i < 50257 for i in id_map)):
            return cls(id_map=id_map)
        raise ValueError(f"the tokenizer {spec!r:.80} is not one this repo knows (gpt2 with an id_map of GPT-2 ids, or "
                         f"char with its list of characters)")

    def spec(self):
        return dict(name='char', chars=self.chars) if self.chars is not None else dict(name='gpt2', id_map=self.id_map)

    def describe(self):
        if self.chars is not None:
            return f"{self.n_vocab} characters"
        return f"GPT-2's BPE, {self.n_vocab} tokens" + (" (compacted)" if self.id_map is not None else "")

    def split(self, text):
        """(base ids, pieces) of text: GPT-2 ids and their strings, or the model's character ids (None for a
        character the vocabulary lacks) and the characters."""
        if self.chars is not None:
            return [self.stoi.get(c) for c in text], list(text)
        ids = self.enc.encode(text, allowed_special={'<|endoftext|>'})
        return ids, [self.piece(i) for i in ids]

    def piece(self, base_id):
        if self.chars is not None:
            return self.chars[base_id]
        return self.enc.decode_single_token_bytes(base_id).decode('utf-8', errors='replace')

    def row_ids(self):
        """The base id (GPT-2 id, or character id) of each of the model's token ids."""
        return self.id_map if self.id_map is not None else list(range(self.n_vocab))

    def to_model_ids(self, base_ids):
        """The model's ids of these base ids (see split), or None if the vocabulary lacks any of them."""
        if self.chars is not None:
            return None if any(i is None or not 0 <= i < self.n_vocab for i in base_ids) else list(base_ids)
        ids = self.gpt2_to_model[torch.as_tensor(list(base_ids), dtype=torch.long)].tolist()
        return None if -1 in ids else ids

    def encode(self, text):
        base_ids, pieces = self.split(text)
        ids = self.to_model_ids(base_ids)
        if ids is None:
            missing = next(p for i, p in zip(base_ids, pieces) if self.to_model_ids([i]) is None)
            raise ValueError(f"{missing!r} is not in this model's vocabulary ({self.describe()}"
                             f"{', compacted to the tokens of its training data' if self.id_map else ''})")
        return ids

    def decode(self, ids):
        if self.chars is not None:
            return ''.join(self.chars[i] for i in ids)
        return self.enc.decode(list(ids) if self.id_map is None else [self.id_map[i] for i in ids])

    def token_bytes(self, i):
        if self.chars is not None:
            return self.chars[i].encode('utf-8')
        return self.enc.decode_single_token_bytes(i if self.id_map is None else self.id_map[i])

    def table(self, vocab):
        """The model id of each id in a data folder whose vocabulary is vocab (see read_data_folder), -1 where
        this tokenizer lacks it: GPT-2 ids through the compacted map, characters by their string."""
        if vocab['name'] != ('char' if self.chars is not None else 'gpt2'):
            raise ValueError(f"its tokens are {'characters' if vocab['name'] == 'char' else 'GPT-2 BPE ids'} but the "
                             f"model's vocabulary is {self.describe()}")
        if self.chars is not None:
            return torch.tensor([self.stoi.get(c, -1) for c in vocab['chars']], dtype=torch.long)
        return self.gpt2_to_model


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only: it refuses every global (a class or function, which is how a
    pickle runs code), so loading a file from the internet runs nothing."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only dicts, ints and strings are accepted")

    def persistent_load(self, pid):  # (the default's message takes two lines)
        raise pickle.UnpicklingError("it refers to an object outside the file (a persistent id), and only dicts, "
                                     "ints and strings are accepted")


def read_meta_pkl(path):
    """The characters of a nanoGPT char-level meta.pkl ({'vocab_size': n, 'stoi': {ch: i}, 'itos': {i: ch}}),
    as a list by id. Read with PlainUnpickler, then checked to hold only dicts, ints and strings that agree."""
    if os.path.getsize(path) > 1 << 24:
        raise ValueError(f"{path}: refused: {os.path.getsize(path):,} bytes is no character vocabulary")
    try:
        with open(path, 'rb') as f:
            meta = PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, RecursionError, OverflowError) as e:  # (OverflowError: a length of 2**63 or more)
        raise ValueError(f"{path}: refused: {(str(e).splitlines() or [type(e).__name__])[0][:120]}") from None
    todo, seen = [meta], 0
    while todo:  # dicts, ints and strings only, looked at without recursion (a pickle can nest 10**5 deep)
        x = todo.pop()
        seen += 1
        if isinstance(x, dict) and seen < 1 << 20:
            todo += [*x.keys(), *x.values()]
        elif type(x) not in (int, str) or seen >= 1 << 20:
            raise ValueError(f"{path}: refused: it holds more than dicts, ints and strings")
    itos, stoi, n = (meta.get('itos'), meta.get('stoi'), meta.get('vocab_size')) if isinstance(meta, dict) else [None] * 3
    if not (isinstance(itos, dict) and isinstance(stoi, dict) and isinstance(n, int) and len(itos) == n
            and all(type(i) is int and 0 <= i < n and isinstance(c, str) and stoi.get(c) == i for i, c in itos.items())):
        raise ValueError(f"{path} is not a char-level vocabulary nanoGPT would write: it needs vocab_size, and itos "
                         f"(ids 0..vocab_size-1) and stoi that invert each other")
    chars = [itos[i] for i in range(n)]
    check_chars(chars, path)
    return chars


def check_chars(chars, where):
    """A character vocabulary's entries must be text a model can print: not empty (it would decode to nothing and
    encode from nothing) and valid Unicode (a lone surrogate cannot be written as UTF-8). ValueError otherwise."""
    for i, c in enumerate(chars):
        try:
            c.encode('utf-8')
        except UnicodeEncodeError:
            raise ValueError(f"{where}: character {i} of the vocabulary ({c!r}) is not valid Unicode (a lone "
                             f"surrogate); remake the vocabulary from UTF-8 text") from None
        if not c:
            raise ValueError(f"{where}: character {i} of the vocabulary is the empty string; remake the vocabulary")


# -----------------------------------------------------------------------------
# Data folders: train.bin and val.bin (uint16 token ids, as nanoGPT's) and what the ids mean

EOT = '<|endoftext|>'
BUNDLED = {  # data folders a fresh clone makes itself from the text in data/: name -> (source, data/prepare.py settings)
    'tinystories': ('tinystories_slice.txt', {}),
    'tinystories_compact': ('tinystories_slice.txt', dict(compact_vocab=True)),
    '3seqs': ('3seqs.txt', {}),
    '3seqs_compact': ('3seqs.txt', dict(compact_vocab=True)),
    'shakespeare_char': ('tinyshakespeare.txt', dict(tokenizer='char')),
}


def find_data_folder(name):
    """The data folder a setting names: a path, or nanoGPT's habit NAME for data/NAME (in the current folder,
    then in this repo). A bundled one that does not exist yet (into this repo's data/), or a text file (as the
    course's --input_files are; into our cache, data/<stem>-<tag of its path, size and time>, its vocabulary
    compacted) is prepared first, once, with one line saying so. Raises FileNotFoundError naming where it looked."""
    tried = list(dict.fromkeys([name, os.path.join('data', name), os.path.join(ROOT, name), os.path.join(ROOT, 'data', name)]))
    for path in tried:
        if os.path.isdir(path):
            return path
    bundled = os.path.basename(os.path.normpath(name))
    text = next((path for path in tried if os.path.isfile(path)), None)
    sources = {os.path.realpath(os.path.join(DATA, source)): folder for folder, (source, settings) in BUNDLED.items()
               if settings.get('compact_vocab')}
    if text and os.path.realpath(text) in sources:  # data/3seqs.txt is the source of the bundled 3seqs_compact
        bundled = sources[os.path.realpath(text)]
    elif text:
        st = os.stat(text)
        tag = hashlib.sha1(f"{os.path.abspath(text)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]
        stem = os.path.splitext(os.path.basename(text))[0]
        return prepare_once(os.path.join(cache_dir(), 'data', f"{stem}-{tag}"), text, dict(compact_vocab=True), name)
    if bundled in BUNDLED and (text or os.path.normpath(name) in (bundled, os.path.join('data', bundled))):
        source, settings = BUNDLED[bundled]
        return prepare_once(os.path.join(ROOT, 'data', bundled), os.path.join(DATA, source), settings, name)
    raise FileNotFoundError(f"data folder {name!r} not found (looked in {', '.join(tried)}); make it with "
                            f"data/prepare.py, or name a text file or one of the bundled: {', '.join(BUNDLED)}")


def prepare_once(out_dir, source, settings, name):
    """out_dir, prepared from the text file source with data/prepare.py's settings unless it exists. Under
    torchrun every process comes here: one prepares while the others wait, then find it done."""
    with file_lock(os.path.join(os.path.dirname(out_dir), f'.{os.path.basename(out_dir)}.lock')):
        if not os.path.isdir(out_dir):  # (prepare_data makes the folder only once it is complete)
            # (paths inside this repo as the command to run from its folder would name them)
            src, out = (os.path.relpath(p, ROOT) if os.path.abspath(p).startswith(ROOT + os.sep) else p
                        for p in (source, out_dir))
            args = ''.join(f" --{k}={v}" for k, v in settings.items())
            print(f"{name}: not prepared yet; preparing it from {src} (as python data/prepare.py --source={src}{args} "
                  f"--out_dir={out})", file=sys.stderr)
            prepare_data([source], out_dir, source=src, quiet=True, **settings)
    return out_dir


def read_data_folder(folder, check=True):
    """(vocab, {'train': ids, 'val': ids}) of a data folder, the ids memory-mapped. vocab says what the ids are:
    {'name': 'gpt2', 'id_map': list or None} (our meta.json; a folder without meta, as nanoGPT's openwebtext,
    holds GPT-2 ids) or {'name': 'char', 'chars': [...]} (meta.json, or nanoGPT's meta.pkl). With check, every id
    is checked against that vocabulary (reading the whole folder once), so a folder is refused with one line
    (ValueError) rather than trained on wrongly."""
    for split in ('train', 'val'):
        if not os.path.exists(os.path.join(folder, f'{split}.bin')):
            raise FileNotFoundError(f"data folder {folder!r} has no {split}.bin (make it with data/prepare.py)")
    meta, vocab = None, {'name': 'gpt2', 'id_map': None}
    if os.path.exists(os.path.join(folder, 'meta.json')):
        try:
            with open(os.path.join(folder, 'meta.json'), encoding='utf-8') as f:
                meta = json.load(f)
        except (ValueError, OSError, RecursionError) as e:  # (RecursionError: JSON nested thousands deep)
            raise ValueError(f"{folder}/meta.json cannot be read ({type(e).__name__}: {str(e)[:80]}); remake the "
                             f"folder with data/prepare.py") from None
        if not isinstance(meta, dict) or meta.get('tokenizer', 'gpt2') not in ('gpt2', 'char') or not (
                meta.get('id_map') is None or isinstance(meta['id_map'], list) and all(
                    type(i) is int and 0 <= i < 50257 for i in meta['id_map'])) or meta.get('tokenizer') == 'char' and \
                not (isinstance(meta.get('chars'), list) and all(isinstance(c, str) for c in meta['chars'])):
            raise ValueError(f"{folder}/meta.json does not describe a vocabulary this repo knows (gpt2 with an optional "
                             f"id_map of GPT-2 ids, or char with its chars); remake the folder with data/prepare.py")
        vocab = {'name': 'char', 'chars': meta['chars']} if meta.get('tokenizer') == 'char' else \
            {'name': 'gpt2', 'id_map': meta.get('id_map')}
        if vocab['name'] == 'char':
            check_chars(vocab['chars'], f"{folder}/meta.json")
    elif os.path.exists(os.path.join(folder, 'meta.pkl')):
        vocab = {'name': 'char', 'chars': read_meta_pkl(os.path.join(folder, 'meta.pkl'))}
    data = {}
    for split in ('train', 'val'):
        path = os.path.join(folder, f'{split}.bin')
        size = os.path.getsize(path)
        if size % 2:
            raise ValueError(f"{path} has {size} bytes, an odd number: it is not uint16 token ids (truncated?)")
        data[split] = TokenFile(path)
        if meta and meta.get(f'{split}_tokens') not in (None, size // 2):
            raise ValueError(f"{path} has {size // 2} tokens but meta.json says {meta[f'{split}_tokens']}: the folder "
                             f"is a mix of two preparations; remake it with data/prepare.py")
        if not check or not size:
            continue
        n_vocab = len(vocab['chars']) if vocab['name'] == 'char' else 50257
        allowed, pieces = vocab.get('id_map'), range(0, len(data[split]), 1 << 24)  # read 16M ids at a time
        if allowed is None:  # ids below the vocabulary's size: the largest tells
            top = max(int(data[split][i:i + (1 << 24)].max()) for i in pieces)
            bad = [top] if top >= n_vocab else []
        else:  # only the ids of the id map: which ids occur at all
            used = np.zeros(1 << 16, dtype=bool)
            for i in pieces:
                used[np.unique(data[split][i:i + (1 << 24)])] = True
            bad = np.setdiff1d(np.flatnonzero(used), allowed)
        if len(bad):
            what = (f"{n_vocab} characters (meta.{'json' if meta else 'pkl'})" if vocab['name'] == 'char' else
                    "GPT-2's 50,257 BPE tokens" if allowed is None else f"the {len(allowed)} ids of its meta.json id_map")
            raise ValueError(f"{path} holds token id {int(bad[0])}, outside its vocabulary of {what}; was it made "
                             f"with another tokenizer? remake it with data/prepare.py")
    return vocab, data


class TokenFile:
    """The uint16 token ids of a train.bin or val.bin, read on demand (ids[a:b] reads those ids into an array),
    where nanoGPT memory-maps the file: when a file shrinks under a running process (prepare.py run again, a
    disk filling), a memory map's read past its new end kills the process with SIGBUS ('Bus error') and loses
    the work since the last checkpoint; a read here comes back short instead, a ValueError that train.py
    answers by saving a checkpoint."""

    def __init__(self, path, n=None):
        self.path, self.f = path, open(path, 'rb')
        self.n = os.fstat(self.f.fileno()).st_size // 2 if n is None else n

    def __len__(self):
        return self.n

    def head(self, n):
        """The first n ids (all if fewer), without reading them."""
        return TokenFile(self.path, min(n, self.n))

    def __getitem__(self, s):
        start, stop, step = s.indices(self.n)
        if step != 1:
            raise IndexError("a TokenFile is read in windows: ids[a:b], no step")
        count = max(0, stop - start)
        self.f.seek(2 * start)
        raw = self.f.read(2 * count)
        if len(raw) != 2 * count:
            raise ValueError(f"{self.path} has shrunk to {os.path.getsize(self.path):,} bytes since it was opened "
                             f"({2 * self.n:,}): was it rewritten or truncated while in use?")
        return np.frombuffer(raw, dtype=np.uint16)


def merged_vocab(vocabs, full_gpt2=False):
    """The one tokenizer for several data folders: GPT-2's (the union of compacted id maps, or all 50,257 ids
    if any folder is not compacted or full_gpt2), or characters (the one list, or the union in order of first
    appearance). Folders of characters and of BPE ids cannot be mixed (ValueError)."""
    if len({v['name'] for v in vocabs}) > 1:
        raise ValueError("the data folders mix character ids and GPT-2 BPE ids; train on folders of one tokenizer")
    if vocabs[0]['name'] == 'char':
        return Tokenizer(chars=list(dict.fromkeys(c for v in vocabs for c in v['chars'])))
    maps = [v.get('id_map') for v in vocabs]
    return Tokenizer(None if full_gpt2 or any(m is None for m in maps) else sorted(set().union(*maps)))


def documents(path, layout):
    """The documents of a text file, one at a time (a 2 GB file never sits in memory whole): separated by lines
    '<|endoftext|>' ('documents', TinyStories' layout), or one per non-empty line ('lines', the course's)."""
    doc = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if layout == 'lines':
                if line.strip():
                    yield line.rstrip('\n')
            elif line.strip() == EOT:
                if doc:
                    yield ''.join(doc).strip('\n')
                doc = []
            else:
                doc.append(line)
    if doc and ''.join(doc).strip():
        yield ''.join(doc).strip('\n')


def prepare_data(files, out_dir, tokenizer='gpt2', compact_vocab=False, format='auto', val_fraction=0.1,
                 fixed_splits=None, source=None, quiet=False):
    """Tokenize text files into a data folder for train.py (nanoGPT's layout: train.bin and val.bin of uint16
    ids, plus meta.json, and nanoGPT's meta.pkl for characters), all or nothing: a new folder is written under
    a temporary name and renamed into place when complete; in an existing one, every file is written to a
    temporary name and renamed when all are complete, meta.json last. A failure leaves things as they were.
    tokenizer 'gpt2': each document is followed by a separator (<|endoftext|>, or a newline for 'lines'), and a
    val_fraction of the documents, spread evenly, is held out (or fixed_splits gives each file's split);
    compact_vocab records the GPT-2 ids used. tokenizer 'char': the vocabulary is the text's sorted characters
    and the last val_fraction of the text is held out, as nanoGPT's shakespeare_char."""
    log = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    new_folder = not os.path.exists(out_dir)
    work = f"{os.path.normpath(out_dir)}.tmp-{os.getpid()}" if new_folder else out_dir
    os.makedirs(work, exist_ok=True)
    tmp = {name: os.path.join(work, f'{name}.tmp-{os.getpid()}') for name in ('train.bin', 'val.bin', 'meta.json',
                                                                            'meta.pkl')}
    counts, n_docs, layouts = {'train': 0, 'val': 0}, {'train': 0, 'val': 0}, []
    try:
        if tokenizer == 'char':
            def pieces():  # the text in pieces of 16M characters: a large file never sits in memory whole
                for path in files:
                    with open(path, encoding='utf-8') as f:
                        while piece := f.read(1 << 24):
                            yield piece
            chars, total = set(), 0
            for piece in pieces():  # first pass: the vocabulary and the length (the split is by position)
                chars.update(piece)
                total += len(piece)
            chars = sorted(chars)
            if len(chars) > 1 << 16:
                raise ValueError(f"{len(chars)} distinct characters do not fit uint16 ids")
            stoi = {c: i for i, c in enumerate(chars)}
            n_train, done = int(total * (1 - val_fraction)), 0
            with open(tmp['train.bin'], 'wb') as train_f, open(tmp['val.bin'], 'wb') as val_f:
                for piece in pieces():  # second pass: the ids, the first n_train to train.bin, the rest to val.bin
                    ids = np.array([stoi[c] for c in piece], dtype=np.uint16)
                    cut = min(max(n_train - done, 0), len(ids))
                    train_f.write(ids[:cut].tobytes())
                    val_f.write(ids[cut:].tobytes())
                    done += len(ids)
            counts, n_docs = {'train': n_train, 'val': total - n_train}, {'train': 1, 'val': 1}
            with open(tmp['meta.pkl'], 'wb') as f:  # nanoGPT's own format, so its sample.py reads the folder too
                pickle.dump({'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': stoi}, f)
            vocab = dict(tokenizer='char', chars=chars, vocab_size=len(chars))
        else:
            enc = gpt2_encoding()
            used = np.zeros(enc.n_vocab, dtype=bool)  # which GPT-2 ids occur, for compact_vocab
            outs = {s: open(tmp[f'{s}.bin'], 'wb') for s in ('train', 'val')}
            with outs['train'], outs['val']:
                for k, path in enumerate(files):
                    with open(path, encoding='utf-8') as f:
                        head = f.read(1 << 20)
                    layout = format if format != 'auto' else 'documents' if EOT in head else 'lines'
                    layouts.append(layout)
                    sep = enc.eot_token if layout == 'documents' else enc.encode('\n')[0]
                    batch, i = [], 0

                    def flush(batch):
                        for split, text in batch:
                            ids = np.array(enc.encode_ordinary(text) + [sep], dtype=np.uint16)
                            used[ids] = True
                            outs[split].write(ids.tobytes())
                            counts[split] += len(ids)
                            n_docs[split] += 1
                    for doc in documents(path, layout):
                        # document i goes to val when floor(i * val_fraction) steps up at i: spread evenly
                        split = fixed_splits[k] if fixed_splits else \
                            'val' if int((i + 1) * val_fraction) > int(i * val_fraction) else 'train'
                        batch.append((split, doc))
                        i += 1
                        if len(batch) == 10000:
                            flush(batch)
                            batch = []
                            log(f"\r{path}: {i} documents, {counts['train'] + counts['val']} tokens", end='')
                    flush(batch)
                    log(f"\r{path}: {i} documents ({layout}), {counts['train'] + counts['val']} tokens so far")
            id_map = np.flatnonzero(used).tolist() if compact_vocab else None
            vocab = dict(tokenizer='gpt2', id_map=id_map, vocab_size=len(id_map) if compact_vocab else enc.n_vocab)
        for split in ('train', 'val'):
            if counts[split] == 0:
                raise ValueError(f"the {split} split is empty: {sum(n_docs.values())} documents are too few for "
                                 f"val_fraction={val_fraction}")
        with open(tmp['meta.json'], 'w') as f:
            json.dump(dict(**vocab, source=source or ','.join(files), layout=layouts or 'characters',
                           train_tokens=counts['train'], val_tokens=counts['val'], train_documents=n_docs['train'],
                           val_documents=n_docs['val']), f)
        for name in ('train.bin', 'val.bin', 'meta.pkl', 'meta.json'):  # all written: into place, meta.json last
            if os.path.exists(tmp[name]):
                os.replace(tmp[name], os.path.join(work, name))
            elif name == 'meta.pkl' and os.path.exists(os.path.join(work, name)):
                os.remove(os.path.join(work, name))  # a character vocabulary of an earlier preparation
        if new_folder:
            os.rename(work, out_dir)
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        if new_folder and os.path.isdir(work):
            shutil.rmtree(work)
    return vocab, counts, n_docs


# -----------------------------------------------------------------------------
# Export: a model in the Hub's layout (transformers' GPT2LMHeadModel), which transformers, the Hub and
# llama.cpp's converter open

SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def save_safetensors(tensors, path):
    """Write {name: tensor} as a .safetensors file (the format model.load_safetensors reads), to a temporary
    file renamed into place."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = dict(dtype=SAFETENSORS_NAMES[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + n])
        offset += n
    header['__metadata__'] = {'format': 'pt'}
    raw = json.dumps(header, separators=(',', ':')).encode()
    raw += b' ' * (-len(raw) % 8)  # the tensor bytes start 8-byte aligned (the format pads with spaces)
    with output_file(path) as tmp, open(tmp, 'wb') as f:
        f.write(len(raw).to_bytes(8, 'little') + raw)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def hf_gpt2(model, tokenizer):
    """(config.json dict, state dict) of a GPT in transformers' GPT2LMHeadModel layout, or ValueError naming
    what that layout cannot express. The inverse of model.gpt2_from_hf_names: Conv1D weights go back to
    (in, out), and a model without biases gets zero biases, which compute the same."""
    if not isinstance(model, GPT):
        raise ValueError(f"a {type(model).__name__} has no GPT-2 layout; only transformer models export")
    c = model.config
    differ = [f"{k}={getattr(c, k)!r}" for k, want in (('norm', 'layernorm'), ('norm_position', 'pre'),
                                                       ('pos_emb', 'learned'), ('attention', 'softmax'))
              if getattr(c, k) != want]
    if differ:
        raise ValueError(f"GPT-2's layout cannot express {', '.join(differ)} (it is layernorm, pre-norm, learned "
                         f"positions, softmax attention)")
    if tokenizer.id_map is not None:
        raise ValueError(f"the vocabulary is compacted (an id_map of {tokenizer.n_vocab} GPT-2 ids), which GPT-2's "
                         f"layout cannot express; train on a folder prepared without --compact_vocab")
    sd = {k: v for k, v in model.state_dict().items() if k != 'lm_head.weight'}  # tied to wte, as GPT-2's
    for k in list(sd):
        if k.endswith(CONV1D):
            sd[k] = sd[k].t()
        if k.endswith('.weight') and not c.bias and not k.endswith(('wte.weight', 'wpe.weight')):
            sd[k.removesuffix('weight') + 'bias'] = torch.zeros(sd[k].size(-1) if k.endswith(CONV1D) else sd[k].size(0),
                                                                dtype=sd[k].dtype)
    gpt2_vocab = tokenizer.chars is None
    config = dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=c.vocab_size,
                  n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                  n_inner=None, activation_function={v: k for k, v in HF_ACTIVATIONS.items()}[c.activation],
                  resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, layer_norm_epsilon=c.norm_eps,
                  initializer_range=0.02, scale_attn_weights=True, tie_word_embeddings=True, use_cache=True,
                  bos_token_id=50256 if gpt2_vocab else None, eos_token_id=50256 if gpt2_vocab else None,
                  torch_dtype=str(model.lm_head.weight.dtype).removeprefix('torch.'))
    return config, sd


HF_TOKENIZER_FILES = ('vocab.json', 'merges.txt', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                      'added_tokens.json')
# the files of a model in the Hub's layout, as transformers and the Hub's other libraries write them
HF_MODEL_FILES = re.compile(r'config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|'
                            r'pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?|tf_model\.h5|flax_model\.msgpack|'
                            r'model\.ckpt\..*|' + '|'.join(re.escape(f) for f in HF_TOKENIZER_FILES))


def save_hf_folder(model, tokenizer, folder, tokenizer_from=None, overwrite=False):
    """Write model as a Hub-layout folder: config.json, model.safetensors, and tokenizer files: those of the
    folder the model came from (tokenizer_from) when it has any, else GPT-2's for GPT-2's vocabulary (data/'s BPE
    files), else none. A folder that holds a model already is refused (ValueError) unless overwrite, and then
    every file of that model which this export does not write (pytorch_model.bin, generation_config.json, ...) is
    removed, so a folder never mixes two models. All is written to a temporary folder and then moved in,
    config.json last."""
    config, sd = hf_gpt2(model, tokenizer)
    old = sorted(f for f in os.listdir(folder) if HF_MODEL_FILES.fullmatch(f)) if os.path.isdir(folder) else []
    if old and not overwrite:
        raise ValueError(f"{folder} holds a model already ({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}); "
                         f"--overwrite=True replaces it (and removes its other files), or give another --folder")
    tmp = f"{os.path.normpath(folder)}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    os.makedirs(tmp)
    try:
        save_safetensors(sd, os.path.join(tmp, 'model.safetensors'))
        theirs = [f for f in HF_TOKENIZER_FILES if tokenizer_from and os.path.isfile(os.path.join(tokenizer_from, f))]
        for name in theirs:
            shutil.copy(os.path.join(tokenizer_from, name), os.path.join(tmp, name))
        files = {'config.json': config}
        if not theirs and tokenizer.chars is None:
            special = '<|endoftext|>'
            files['tokenizer_config.json'] = dict(tokenizer_class='GPT2Tokenizer', bos_token=special, eos_token=special,
                                                  unk_token=special, model_max_length=config['n_positions'],
                                                  add_prefix_space=False)
            files['special_tokens_map.json'] = dict(bos_token=special, eos_token=special, unk_token=special)
            for ours, _, name in GPT2_BPE_FILES:
                shutil.copy(os.path.join(DATA, ours), os.path.join(tmp, name))
        for name, content in files.items():
            with open(os.path.join(tmp, name), 'w') as f:
                json.dump(content, f, indent=2)
        os.makedirs(folder, exist_ok=True)
        new = sorted(os.listdir(tmp), key=lambda f: f == 'config.json')  # config.json last: the folder is a model
        for name in sorted(old, key=lambda f: f != 'config.json'):  # config.json first: until the new one is in,
            if name not in new[:-1]:  # the folder is no model rather than a mix of two
                os.remove(os.path.join(folder, name))
        for name in new:
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(f for f in os.listdir(folder) if HF_MODEL_FILES.fullmatch(f))


# -----------------------------------------------------------------------------
# The model every script starts from, and where it runs; what the scripts check before their work


def check_output(path, setting):
    """Refuse (ValueError, one line) an output file that could not be written, before the work that makes it:
    a folder, or a path whose folder is missing or read-only."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{setting}={path!r} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{setting}={path!r}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{setting}={path!r}: cannot write into {folder}")


def read_prompt(start):
    """The prompt a script was given: the text itself, or 'FILE:path' for a UTF-8 text file, or anything that
    reads as one (FILE:/dev/stdin); ValueError when it is not UTF-8 text."""
    if not start.startswith('FILE:'):
        try:  # a command line that is not UTF-8 arrives with its bytes as lone surrogates, which nothing can print
            start.encode('utf-8')
        except UnicodeEncodeError as e:
            raise ValueError(f"the prompt is not UTF-8 text (byte {start[e.start].encode('utf-8', 'surrogateescape')!r:.12} "
                             f"at character {e.start}); give it in UTF-8, or as FILE:path") from None
        return start
    path = start[5:]
    if os.path.isdir(path):
        raise ValueError(f"prompt file {path!r} is a folder")
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {path!r} is not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"prompt file {path!r}: {e.strerror or 'cannot be read'}") from None


def memory_bytes():
    """This machine's physical memory in bytes, or None where the OS does not say. Linux overcommits: an
    allocation far too large succeeds and the kernel kills the process later, so the scripts compare their
    estimates with this first."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return None


def pick_device(device):
    """The device a script runs on: 'auto' picks cuda > mps > cpu; a named one must exist here (ValueError)."""
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device={device!r} is not a device (cpu, cuda, cuda:1, mps, or auto)") from None
    if d.type == 'cuda' and not (torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"device={device!r} but this PyTorch sees {torch.cuda.device_count()} CUDA GPUs; use "
                         f"--device=cpu")
    if d.type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} but this PyTorch has no MPS (Apple GPU) support; use --device=cpu")
    if d.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"device={device!r}: the scripts run on cpu, cuda or mps")
    return device


def checkpoint_tokenizer(ckpt, n_vocab, path):
    """The tokenizer of a checkpoint: the one it names (ours), else, for nanoGPT's, the meta.pkl of the data
    folder its config names, where nanoGPT's sample.py looks (data/<dataset>/meta.pkl from the current folder;
    then in this repo, whose bundled shakespeare_char is prepared if need be), else GPT-2's BPE. Refused when
    it does not fit the model's n_vocab embedding rows (ValueError)."""
    config = ckpt.get('config') if isinstance(ckpt.get('config'), dict) else {}
    dataset = config.get('dataset') if isinstance(config.get('dataset'), str) else ''
    looked = []
    if ckpt.get('tokenizer'):
        tokenizer = Tokenizer.from_spec(ckpt['tokenizer'])
    elif dataset and n_vocab < 50257:  # nanoGPT writes no tokenizer: a small vocabulary is its meta.pkl's
        looked = list(dict.fromkeys(os.path.join(d, 'data', dataset, 'meta.pkl') for d in ('.', ROOT)))
        found = [m for m in looked if os.path.isfile(m)]
        if not found and BUNDLED.get(dataset, ('', {}))[1].get('tokenizer') == 'char':
            found = [os.path.join(find_data_folder(dataset), 'meta.pkl')]
        if not found:
            raise ValueError(f"{path}: the model's vocabulary has {n_vocab} tokens and the checkpoint names no "
                             f"tokenizer; nanoGPT's sample.py reads {looked[0]}, which is not here (looked at "
                             f"{', '.join(looked)}): copy that data folder here")
        tokenizer = Tokenizer(chars=read_meta_pkl(found[0]))
    else:
        tokenizer = Tokenizer()
    # GPT-2's ids may leave padding rows unused (nanoGPT's 50,304); a character for each row, exactly
    if n_vocab < tokenizer.n_vocab or tokenizer.chars is not None and n_vocab != tokenizer.n_vocab:
        raise ValueError(f"{path}: the model's vocabulary has {n_vocab} tokens but its tokenizer has "
                         f"{tokenizer.describe()}{f' ({looked[0]})' if looked else ''}")
    return tokenizer


def load_model(init_from, out_dir='out', active_layers=None):
    """init_from: 'resume' (out_dir/ckpt.pt), a path to a .pt checkpoint, a GPT-2 name, a Hub repo id, or a
    local folder. Returns (model, tokenizer, checkpoint or None). Errors are one-line FileNotFoundError /
    ConnectionError / ValueError messages."""
    if init_from == 'resume':
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"out_dir {out_dir!r} does not exist (init_from='resume' loads out_dir/ckpt.pt)")
        init_from = os.path.join(out_dir, 'ckpt.pt')
    if init_from.endswith('.pt') or os.path.isfile(init_from):
        model, ckpt = load_checkpoint(init_from)
        n_vocab = next(m for m in model.modules() if isinstance(m, nn.Embedding)).num_embeddings
        tokenizer = checkpoint_tokenizer(ckpt, n_vocab, init_from)
        if active_layers is not None:
            if not isinstance(model, GPT):
                raise ValueError(f"active_layers selects transformer blocks; this is a {type(model).__name__}")
            model.prune_layers(active_layers)
        return model, tokenizer, ckpt
    # a path whose parent folder exists locally is a folder the user meant, not a Hub repo id
    parent = os.path.dirname(os.path.normpath(init_from))
    if not os.path.isdir(init_from) and (init_from.startswith(('.', '/', '~')) or parent and os.path.isdir(parent)):
        raise FileNotFoundError(f"model folder {init_from!r} does not exist")
    model = GPT.from_pretrained(init_from, active_layers=active_layers)
    if model.config.vocab_size < 50257:  # a folder's tokenizer is GPT-2's here: its ids must all have rows
        raise ValueError(f"{init_from}: the model's vocabulary has {model.config.vocab_size} tokens, fewer than GPT-2's "
                         f"50257, and a model folder names no other tokenizer here; use the checkpoint it came from")
    return model, Tokenizer(), None
