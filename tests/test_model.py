"""GPT-2 in model.py against transformers' GPT2LMHeadModel, layer pruning, the KV cache, and weight files."""
import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_reference

from model import ChunkedCrossEntropy, GPT, GPTConfig, load_safetensors, parse_active_layers


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def hf_pruned(hf, keep):
    """transformers' model with only the blocks in keep, in that order: the reference for active_layers."""
    ref = copy.deepcopy(hf)
    ref.transformer.h = torch.nn.ModuleList([ref.transformer.h[i] for i in keep])
    ref.config.n_layer = len(keep)
    return ref


@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])
def test_logits_equal_transformers(hf_tiny, grad):
    folder, hf = hf_tiny
    model = GPT.from_pretrained(folder).eval()
    idx = torch.randint(0, 50257, (2, 32))
    with torch.set_grad_enabled(grad):  # no_grad runs the oneDNN inference path, grad the F.linear one
        ours, _ = model(idx)
    with torch.no_grad():
        ref = hf(idx).logits
    assert ours.shape == ref.shape
    assert rel_err(ours.detach(), ref) < 1e-5


@pytest.mark.parametrize('spec,keep', [('even', [0, 2]), ('odd', [1]), ('first_half', [0, 1]),
                                       ('last_half', [1, 2]), ('0,2', [0, 2]), ((2, 0), [2, 0]), ('1-2', [1, 2])])
def test_active_layers_equal_transformers_pruned(hf_tiny, spec, keep):
    folder, hf = hf_tiny
    model = GPT.from_pretrained(folder, active_layers=spec).eval()
    assert model.layer_ids == keep
    assert len(model.transformer.h) == len(keep) and model.config.n_layer == len(keep)
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        ours, _ = model(idx)
        ref = hf_pruned(hf, keep)(idx, use_cache=False).logits
    assert rel_err(ours, ref) < 1e-5


def test_prune_layers_on_any_gpt_frees_the_blocks():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=6, n_head=2, n_embd=16)).eval()
    full = copy.deepcopy(model)
    n_before = sum(p.numel() for p in model.parameters())
    model.prune_layers('odd')
    assert model.layer_ids == [1, 3, 5]
    per_block = sum(p.numel() for p in full.transformer.h[0].parameters())
    assert sum(p.numel() for p in model.parameters()) == n_before - 3 * per_block
    # the pruned model computes what the full model's blocks 1, 3, 5 compute
    full.transformer.h = torch.nn.ModuleList([full.transformer.h[i] for i in (1, 3, 5)])
    idx = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], full(idx)[0])
    # pruning again selects among the remaining blocks and keeps the original ids
    model.prune_layers([0, 2])
    assert model.layer_ids == [1, 5]


@pytest.mark.parametrize('spec,n,expected', [
    (None, 4, [0, 1, 2, 3]), ('all', 4, [0, 1, 2, 3]), ('even', 12, [0, 2, 4, 6, 8, 10]),
    ('odd', 5, [1, 3]), ('first_half', 12, [0, 1, 2, 3, 4, 5]), ('last_half', 12, [6, 7, 8, 9, 10, 11]),
    ('first_half', 5, [0, 1, 2]), ('last_half', 5, [2, 3, 4]), ('0,2,4', 6, [0, 2, 4]), ('0-5', 12, [0, 1, 2, 3, 4, 5]),
    ('0-1, 4', 6, [0, 1, 4]), ((0, 2, 4), 6, [0, 2, 4]), ([3], 6, [3]), (2, 6, [2]),
])
def test_parse_active_layers(spec, n, expected):
    assert parse_active_layers(spec, n) == expected


@pytest.mark.parametrize('spec,phrase', [
    ('12', 'block 12 is out of range, this model has 12 blocks (0-11)'), ((0, 12), 'out of range'),
    ('0,0', 'block 0 is listed twice'), ([], 'selects no block'), ('', 'cannot read'),
    ('evn', "cannot read 'evn'"), ('5-2', 'runs backwards'), ((0.5,), 'not a layer selection'),
    (-1, 'out of range'), ('odd', None),
])
def test_parse_active_layers_errors(spec, phrase):
    if phrase is None:  # 'odd' of a 1-block model selects nothing
        with pytest.raises(ValueError, match='selects no block'):
            parse_active_layers(spec, 1)
        return
    with pytest.raises(ValueError) as e:
        parse_active_layers(spec, 12)
    msg = str(e.value)
    assert phrase in msg and "allowed: None, 'all', 'even', 'odd', 'first_half', 'last_half'" in msg
    assert '\n' not in msg


def test_kv_cache_greedy_equals_recompute_past_block_size(hf_tiny):
    """Greedy decoding with the cache equals nanoGPT's loop that recomputes the last block_size tokens."""
    folder, _ = hf_tiny
    model = GPT.from_pretrained(folder).eval()
    block_size = model.config.block_size  # 32
    idx = torch.randint(0, 50257, (2, 7))
    out = model.generate(idx, 70, temperature=0)  # 77 tokens: more than twice block_size
    assert out.size(1) > 2 * block_size
    assert torch.equal(out, greedy_reference(model, idx, 70))
    assert len(set(out[0, 7:].tolist())) > 10  # the test means something only if decoding varies


def test_generate_batch_rows_are_independent(hf_tiny):
    folder, _ = hf_tiny
    model = GPT.from_pretrained(folder).eval()
    idx = torch.randint(0, 50257, (3, 5))
    together = model.generate(idx, 20, temperature=0)
    for i in range(3):
        assert torch.equal(together[i:i + 1], model.generate(idx[i:i + 1], 20, temperature=0))


def test_greedy_generate_equals_transformers(hf_tiny):
    folder, hf = hf_tiny
    model = GPT.from_pretrained(folder).eval()
    idx = torch.randint(0, 50257, (2, 6))
    with torch.no_grad():
        ref = hf.generate(idx, max_new_tokens=25, min_new_tokens=25, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(idx, 25, temperature=0), ref)


def test_hub_layout_without_prefix_and_pytorch_bin(hf_tiny, tmp_path):
    """The Hub's gpt2 files have no 'transformer.' prefix; save_pretrained writes one; older repos ship only
    pytorch_model.bin. All three load to the same model."""
    from safetensors.torch import save_file  # (test-only: comes with transformers, requirements-test.txt)
    folder, hf = hf_tiny
    sd = {k.removeprefix('transformer.'): v.contiguous() for k, v in hf.state_dict().items() if k != 'lm_head.weight'}
    hub = tmp_path / 'hub-layout'
    hub.mkdir()
    shutil.copy(os.path.join(folder, 'config.json'), hub)
    save_file(sd, str(hub / 'model.safetensors'))
    binf = tmp_path / 'bin-layout'
    binf.mkdir()
    shutil.copy(os.path.join(folder, 'config.json'), binf)
    torch.save(hf.state_dict(), binf / 'pytorch_model.bin')
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        ref = hf(idx).logits
        for f in (hub, binf):
            assert rel_err(GPT.from_pretrained(str(f)).eval()(idx)[0], ref) < 1e-5


def test_safetensors_reader_matches_the_library(hf_tiny):
    from safetensors.torch import load_file  # the library itself, as the reference (comes with transformers)
    folder, _ = hf_tiny
    path = os.path.join(folder, 'model.safetensors')
    ours, ref = load_safetensors(path), load_file(path)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k])


def test_truncated_and_corrupt_safetensors(hf_tiny, tmp_path):
    folder, _ = hf_tiny
    with open(os.path.join(folder, 'model.safetensors'), 'rb') as f:
        data = f.read()
    bad = tmp_path / 'bad'
    bad.mkdir()
    shutil.copy(os.path.join(folder, 'config.json'), bad)
    for content in (data[:len(data) // 2], data[:4], b'\xff' * 100, data[:8] + b'{not json' + data[17:]):
        (bad / 'model.safetensors').write_bytes(content)
        with pytest.raises(ValueError) as e:
            GPT.from_pretrained(str(bad))
        assert 'model.safetensors' in str(e.value) and 'truncated or corrupt' in str(e.value)
        assert '\n' not in str(e.value)


def test_folder_errors(hf_tiny, tmp_path):
    folder, _ = hf_tiny
    with pytest.raises(FileNotFoundError, match='has no config.json'):
        GPT.from_pretrained(str(tmp_path))
    only_config = tmp_path / 'only-config'
    only_config.mkdir()
    shutil.copy(os.path.join(folder, 'config.json'), only_config)
    with pytest.raises(FileNotFoundError, match='no model.safetensors or pytorch_model.bin'):
        GPT.from_pretrained(str(only_config))
    (only_config / 'config.json').write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match='only GPT-2 architecture'):
        GPT.from_pretrained(str(only_config))


def test_model_py_alone_builds_every_architecture_and_loads_a_local_folder(hf_tiny, tmp_path):
    """model.py copied into an empty folder, as a student forks it: it imports no other file of this repo and
    still loads GPT-2 from a local folder, with transformers' logits."""
    import subprocess
    import sys
    folder, hf = hf_tiny
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'model.py'), tmp_path)
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        torch.save(hf(idx).logits, tmp_path / 'ref.pt')
    code = f"""
import sys, torch
from model import GPT, TransformerModel, LSTMSeqModel, KGramMLPSeqModel, GPTConfig
for kind in ('softmax', 'linear', 'gla'):
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=8, attention=kind))
TransformerModel(50, 16, 2, 1, 8), LSTMSeqModel(50, 8, 8), KGramMLPSeqModel(50, 2, 8, 1)
model = GPT.from_pretrained({folder!r}).eval()
with torch.no_grad():
    out = model(torch.tensor({idx.tolist()}))[0]
ref = torch.load('ref.pt', weights_only=True)
assert ((out - ref).norm() / ref.norm()).item() < 1e-5
others = [m for m in ('load', 'fast_cpu', 'requests', 'tiktoken') if m in sys.modules]
assert not others, others
print('ok')
"""
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
    assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr


@pytest.mark.parametrize('vocab', [50257, 97])
def test_chunked_loss_equals_cross_entropy_on_full_logits(vocab, monkeypatch):
    """GPT's loss (ChunkedCrossEntropy: several chunks of rows for GPT-2's vocabulary, one for 97) equals
    F.cross_entropy on the whole logits, in value and in every parameter's gradient, ignored targets included."""
    monkeypatch.setattr(ChunkedCrossEntropy, 'rows', 40 * 50257)  # 96 rows: 3 chunks of GPT-2's vocabulary
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    idx, targets = torch.randint(0, vocab, (3, 32)), torch.randint(0, vocab, (3, 32))
    targets[0, :5] = -1
    logits, _ = model(idx)
    plain = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    none, loss = model(idx, targets)
    loss.backward()
    assert none is None and (96 > ChunkedCrossEntropy.rows // vocab or vocab == 97)  # several chunks, or one
    assert torch.allclose(loss, plain, rtol=1e-5, atol=0)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-5, atol=1e-5 * want[n].abs().max().item()), n
    with torch.no_grad():  # evaluation: the same value, and no gradient work kept
        assert torch.allclose(model(idx, targets)[1], plain, rtol=1e-5, atol=0)
    with torch.autocast('cpu', torch.bfloat16):  # train.py's mixed precision: close, not equal
        assert torch.allclose(model(idx, targets)[1], plain, rtol=1e-2, atol=0)


def test_chunked_loss_stays_finite_where_the_targets_probability_underflows():
    """A target 200 nats below the best logit: exp underflows to 0 in float32, yet the loss is its exact
    200-ish nats (as F.cross_entropy says), not inf, and the gradient is softmax - onehot."""
    x, weight = torch.eye(4, requires_grad=True), (torch.eye(4) * torch.tensor([200.0, 0, 0, 0])).requires_grad_()
    targets = torch.tensor([1, 1, 2, 3])  # row 0's best logit is 200, its target's 0
    loss = ChunkedCrossEntropy.apply(x, weight, targets, True)
    logits = x @ weight.t()
    plain = F.cross_entropy(logits, targets)
    assert torch.isfinite(loss) and torch.allclose(loss, plain, rtol=1e-6)
    assert torch.allclose(torch.autograd.grad(loss, weight)[0], torch.autograd.grad(plain, weight)[0], atol=1e-7)
