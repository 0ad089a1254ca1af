"""Hub downloads against a loopback server in the Hub's URL layout ($HF_ENDPOINT)."""
import hashlib
import os

import pytest
import torch

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
