"""Hub downloads against a loopback server in the Hub's URL layout ($HF_ENDPOINT)."""
import hashlib
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from load import cache_dir, hub_download, load_model
from model import GPT


def cached(repo, name):
    return os.path.join(cache_dir(), 'hub', repo.replace('/', '--'), name)


def test_fresh_download_then_cached_offline_run(hub, hf_tiny, monkeypatch, capsys):
    folder, hf = hf_tiny
    hub.add_folder('someone/tiny-gpt2', folder)
    model, _, _ = load_model('someone/tiny-gpt2')
    got = [p for p, _ in hub.log]
    assert '/someone/tiny-gpt2/resolve/main/config.json' in got
    assert '/someone/tiny-gpt2/resolve/main/model.safetensors' in got
    assert 'MB/s' in capsys.readouterr().err  # the progress line
    with open(cached('someone/tiny-gpt2', 'model.safetensors'), 'rb') as f:
        assert f.read() == hub.files['someone/tiny-gpt2/model.safetensors']
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        ref = model(idx)[0]
    # second run: the files are cached, the network is gone, nothing is requested
    n = len(hub.log)
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')
    again, _, _ = load_model('someone/tiny-gpt2')
    assert len(hub.log) == n
    with torch.no_grad():
        assert torch.equal(again(idx)[0], ref)


def test_gpt2_names_map_to_openai_community(hub, hf_tiny):
    folder, _ = hf_tiny
    hub.add_folder('openai-community/gpt2', folder)
    model = GPT.from_pretrained('gpt2', active_layers='even')
    assert model.layer_ids == [0, 2]
    assert hub.log[0][0] == '/openai-community/gpt2/resolve/main/config.json'


def test_connection_dropped_mid_file_resumes_with_range(hub, hf_tiny):
    folder, _ = hf_tiny
    hub.add_folder('org/tiny', folder)
    data = hub.files['org/tiny/model.safetensors']
    hub.drop_after['org/tiny/model.safetensors'] = len(data) // 3
    GPT.from_pretrained('org/tiny')
    ranges = [r for p, r in hub.log if p == '/org/tiny/resolve/main/model.safetensors']
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(ranges[1].removeprefix('bytes=').removesuffix('-'))
    assert 0 < resumed_at <= len(data) // 3  # the second request asks only for what the disk lacks
    with open(cached('org/tiny', 'model.safetensors'), 'rb') as f:
        assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert not os.path.exists(cached('org/tiny', 'model.safetensors') + '.part')


def test_interrupted_run_resumes_from_part_file(hub, hf_tiny):
    """A .part file left by an earlier run (killed mid-download) is continued, not restarted."""
    folder, _ = hf_tiny
    hub.add_folder('org/tiny', folder)
    data = hub.files['org/tiny/model.safetensors']
    part = cached('org/tiny', 'model.safetensors') + '.part'
    os.makedirs(os.path.dirname(part), exist_ok=True)
    with open(part, 'wb') as f:
        f.write(data[:1000])
    path = hub_download('org/tiny', 'model.safetensors', os.path.dirname(part))
    assert hub.log[-1] == ('/cdn/org/tiny/model.safetensors', 'bytes=1000-')
    with open(path, 'rb') as f:
        assert f.read() == data


def test_sha256_mismatch_is_refused_and_removed(hub, hf_tiny):
    folder, _ = hf_tiny
    hub.add_folder('org/tiny', folder)
    hub.bad_sha.add('org/tiny/model.safetensors')
    with pytest.raises(ValueError, match='sha256 of the download does not match'):
        GPT.from_pretrained('org/tiny')
    target = cached('org/tiny', 'model.safetensors')
    assert not os.path.exists(target) and not os.path.exists(target + '.part')


def test_404_names_repo_and_file(hub):
    with pytest.raises(FileNotFoundError) as e:
        GPT.from_pretrained('nobody/missing')
    assert 'nobody/missing' in str(e.value) and 'config.json' in str(e.value) and 'HTTP 404' in str(e.value)


def test_falls_back_to_pytorch_model_bin(hub, hf_tiny, tmp_path):
    folder, hf = hf_tiny
    torch.save(hf.state_dict(), tmp_path / 'pytorch_model.bin')
    with open(os.path.join(folder, 'config.json'), 'rb') as f:
        (tmp_path / 'config.json').write_bytes(f.read())
    hub.add_folder('org/old', str(tmp_path))
    model = GPT.from_pretrained('org/old').eval()
    assert ('/org/old/resolve/main/model.safetensors', None) in hub.log
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_no_network_says_how_to_use_a_local_folder():
    with pytest.raises(ConnectionError) as e:
        GPT.from_pretrained('gpt2')
    msg = str(e.value)
    assert 'cannot reach http://127.0.0.1:9' in msg and '--init_from=path/to/folder' in msg and '\n' not in msg


# -- downloads under hostile servers and concurrent processes (each of these failed before the download routine
# took a lock, kept what arrived, counted attempts without progress and timed out stalls)

BLOB = bytes(range(256)) * 800  # 204,800 bytes


def serve(hub, key, data=BLOB):
    hub.files[key] = data
    return os.path.join(cache_dir(), 'hub', 'dl')


def test_two_processes_share_one_download(hub, tmp_path):
    """A plain mirror (no Range, no sha256) and two processes wanting the same file at the same time: one
    downloads while the other waits on the lock and then finds the file; the bytes are the server's."""
    folder = serve(hub, 'org/m/model.bin')
    hub.ignore_range.add('org/m/model.bin')
    hub.pace['org/m/model.bin'] = 0.05  # 64 KB every 50 ms: the downloads overlap
    code = f"import sys; sys.path.insert(0, {ROOT!r}); from load import hub_download; hub_download('org/m', 'model.bin', {folder!r})"
    procs = [subprocess.Popen([sys.executable, '-c', code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    with open(os.path.join(folder, 'model.bin'), 'rb') as f:
        assert f.read() == BLOB
    assert len([p for p, _ in hub.log if p.endswith('model.bin')]) == 1
    assert not os.path.exists(os.path.join(folder, 'model.bin.part'))


def test_no_size_and_a_dropped_connection_is_not_taken_for_the_file(hub):
    """A server that announces no size and drops the connection mid-file: the partial file is never renamed
    into place; with resumption it completes byte-exact, without it the download fails with one line."""
    folder = serve(hub, 'org/m/a.bin')
    hub.no_size.add('org/m/a.bin')
    hub.drop_after['org/m/a.bin'] = 50000
    assert open(hub_download('org/m', 'a.bin', folder), 'rb').read() == BLOB
    serve(hub, 'org/m/b.bin')
    hub.no_size.add('org/m/b.bin')
    hub.ignore_range.add('org/m/b.bin')
    hub.drop_every['org/m/b.bin'] = 50000
    with pytest.raises(ConnectionError, match='attempts in a row brought nothing new'):
        hub_download('org/m', 'b.bin', folder)
    assert not os.path.exists(os.path.join(folder, 'b.bin'))


def test_a_server_that_announces_more_than_it_sends_ends_with_one_line(hub):
    folder = serve(hub, 'org/m/c.bin')
    hub.announce['org/m/c.bin'] = len(BLOB) + 1000
    hub.ignore_range.add('org/m/c.bin')
    with pytest.raises(ConnectionError) as e:
        hub_download('org/m', 'c.bin', folder)
    assert f'at {len(BLOB)} of {len(BLOB) + 1000} bytes' in str(e.value) and 'brought nothing new' in str(e.value)
    assert len(hub.log) <= 6 and not os.path.exists(os.path.join(folder, 'c.bin'))


def test_a_trickle_is_a_stall(hub, monkeypatch):
    import load
    monkeypatch.setattr(load, 'STALL_SECONDS', 1)
    folder = serve(hub, 'org/m/d.bin', BLOB[:2000])
    hub.trickle['org/m/d.bin'] = 0.1  # 10 bytes a second, below 1 KB a second
    monkeypatch.setattr(load, 'ATTEMPTS', 2)
    t0 = time.time()
    with pytest.raises(ConnectionError, match=r'stalled \(fewer than 1024 bytes in 1 s\)'):
        hub_download('org/m', 'd.bin', folder)
    assert time.time() - t0 < 15


def test_a_connection_that_drops_every_few_kb_still_completes(hub):
    """Each drop keeps what arrived, so every attempt brings new bytes and the count of failures restarts."""
    folder = serve(hub, 'org/m/e.bin')
    hub.drop_every['org/m/e.bin'] = 30000
    assert open(hub_download('org/m', 'e.bin', folder), 'rb').read() == BLOB
    assert len(hub.log) >= 7  # 204,800 bytes, 30,000 at a time


def test_gzip_transfers_restart_instead_of_resuming(hub):
    """Content-Encoding gzip: ranges would count compressed bytes, so a broken transfer starts over."""
    folder = serve(hub, 'org/m/f.bin')
    hub.gzip.add('org/m/f.bin')
    hub.no_size.add('org/m/f.bin')
    hub.drop_after['org/m/f.bin'] = 3000
    assert open(hub_download('org/m', 'f.bin', folder), 'rb').read() == BLOB
    assert [r for _, r in hub.log] == [None, None]


def test_a_server_that_never_answers_says_so(hub, monkeypatch):
    import load
    monkeypatch.setattr(load, 'STALL_SECONDS', 1)
    folder = serve(hub, 'org/m/g.bin')
    hub.silent.add('org/m/g.bin')
    with pytest.raises(ConnectionError) as e:
        hub_download('org/m', 'g.bin', folder)
    assert 'did not answer within 1 s' in str(e.value) and 'offline' not in str(e.value)
