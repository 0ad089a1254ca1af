"""export.py writes Hub-layout folders that transformers opens with our logits and our from_pretrained reads
back, from every kind of init_from; variants GPT-2's layout cannot express are refused. And the Hugging Face
cache: a complete snapshot there is used, read-only, instead of a download."""
import json
import os
import shutil

import pytest
import torch
from conftest import assert_one_line_error, run_script
from test_nanogpt import nanogpt_checkpoint

from load import gpt2_encoding, load_model
from model import GPT, GPTConfig, KGramMLPSeqModel, LSTMSeqModel


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def export(tmp_path, *args):
    folder = tmp_path / 'export'
    proc = run_script('export.py', *args, f'--folder={folder}')
    assert proc.returncode == 0, proc.stderr
    assert 'read back with from_pretrained: same logits' in proc.stdout
    return str(folder)


def transformers_logits(folder, idx):
    from transformers import GPT2LMHeadModel
    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(folder).eval()(idx).logits


def checkpoint(tmp_path, model, model_type, args, tokenizer=None):
    torch.save({'model': model.state_dict(), 'model_args': args, 'model_type': model_type,
                **({'tokenizer': tokenizer} if tokenizer else {})}, tmp_path / 'ckpt.pt')
    return str(tmp_path / 'ckpt.pt')


def test_export_of_a_hub_folder_with_active_layers(hf_tiny, tmp_path):
    from test_model import hf_pruned
    folder, hf = hf_tiny
    out = export(tmp_path, f'--init_from={folder}', '--active_layers=0,2')
    assert sorted(os.listdir(out)) == ['config.json', 'merges.txt', 'model.safetensors', 'special_tokens_map.json',
                                       'tokenizer_config.json', 'vocab.json']
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        ref = hf_pruned(hf, [0, 2])(idx, use_cache=False).logits
    assert rel_err(transformers_logits(out, idx), ref) < 1e-5
    assert json.load(open(os.path.join(out, 'config.json')))['n_layer'] == 2
    # GPT-2's tokenizer files: transformers' tokenizer from the folder encodes as tiktoken does
    from transformers import AutoTokenizer
    text = "Hello world! It's 2026, <|endoftext|> and the caf\u00e9 is open."
    assert AutoTokenizer.from_pretrained(out)(text)['input_ids'] == gpt2_encoding().encode(
        text, allowed_special={'<|endoftext|>'})


@pytest.mark.parametrize('bias,activation,dtype', [(True, 'gelu_tanh', 'float32'), (False, 'gelu', 'float32'),
                                                   (True, 'gelu', 'float16')])
def test_export_of_our_checkpoints(tmp_path, bias, activation, dtype):
    """A model train.py writes with GPT-2's shape (--norm=layernorm; with or without biases, either GELU)."""
    torch.manual_seed(0)
    args = dict(block_size=24, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, bias=bias, activation=activation,
                norm='layernorm')
    model = GPT(GPTConfig(**args)).eval()
    ckpt = checkpoint(tmp_path, model, 'transformer', args, dict(name='gpt2', id_map=None))
    out = export(tmp_path, f'--init_from={ckpt}', f'--dtype={dtype}')
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        ours = model.to(getattr(torch, dtype))(idx)[0]
    assert rel_err(transformers_logits(out, idx), ours) < (1e-5 if dtype == 'float32' else 1e-2)
    assert rel_err(GPT.from_pretrained(out).eval().to(getattr(torch, dtype))(idx)[0], ours) < 1e-6


def test_export_of_nanogpt_checkpoints(tmp_path):
    """nanoGPT's own: no biases, exact GELU, vocabulary padded to 50,304; and a character-level one (no
    tokenizer files: GPT-2's do not describe its ids)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, bias=False,
                          activation='gelu')).eval()
    torch.save(nanogpt_checkpoint(model, 'openwebtext'), tmp_path / 'ckpt.pt')
    out = export(tmp_path, '--init_from=resume', f'--out_dir={tmp_path}')
    idx = torch.randint(0, 50257, (1, 32))
    with torch.no_grad():
        assert rel_err(transformers_logits(out, idx), model(idx)[0]) < 1e-5
    char_dir = tmp_path / 'char'
    (char_dir / 'data' / 'shakespeare_char').mkdir(parents=True)
    from test_nanogpt import nanogpt_char_folder
    chars = nanogpt_char_folder(char_dir / 'data' / 'shakespeare_char', 'To be, or not to be: that is the question.')
    model = GPT(GPTConfig(block_size=16, vocab_size=len(chars), n_layer=1, n_head=2, n_embd=16, bias=False,
                          activation='gelu')).eval()
    torch.save(nanogpt_checkpoint(model, 'shakespeare_char'), char_dir / 'ckpt.pt')
    proc = run_script('export.py', '--init_from=ckpt.pt', '--folder=hf', cwd=char_dir)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(char_dir / 'hf')) == ['config.json', 'model.safetensors']
    idx = torch.randint(0, len(chars), (1, 16))
    with torch.no_grad():
        assert rel_err(transformers_logits(str(char_dir / 'hf'), idx), model(idx)[0]) < 1e-5


@pytest.mark.parametrize('model_type,args,phrase', [
    ('transformer', dict(pos_emb='rope'), "pos_emb='rope'"),
    ('transformer', dict(norm='rmsnorm'), "norm='rmsnorm'"),
    ('transformer', dict(norm_position='post'), "norm_position='post'"),
    ('transformer', dict(attention='linear'), "attention='linear'"),
    ('transformer', dict(attention='gla'), "attention='gla'"),
    ('transformer', dict(attention='gated_deltanet'), "attention='gated_deltanet'"),
    ('lstm', dict(vocab_size=300, embed_size=8, hidden_size=8), 'a LSTMSeqModel has no GPT-2 layout'),
    ('kgram_mlp', dict(vocab_size=300, k=2, embed_size=8, num_inner_layers=1), 'a KGramMLPSeqModel has no GPT-2'),
    ('compact', dict(), 'the vocabulary is compacted (an id_map of 300 GPT-2 ids)'),
])
def test_export_refuses_what_gpt2s_layout_cannot_express(tmp_path, model_type, args, phrase):
    torch.manual_seed(0)
    if model_type in ('lstm', 'kgram_mlp'):
        model = (LSTMSeqModel if model_type == 'lstm' else KGramMLPSeqModel)(**args)
        ckpt = checkpoint(tmp_path, model, model_type, args, dict(name='gpt2', id_map=list(range(300))))
    else:
        args = dict(block_size=16, vocab_size=300 if model_type == 'compact' else 50257, n_layer=1, n_head=2,
                    n_embd=16, **args)
        spec = dict(name='gpt2', id_map=list(range(300)) if model_type == 'compact' else None)
        ckpt = checkpoint(tmp_path, GPT(GPTConfig(**args)), 'transformer', args, spec)
    assert_one_line_error(run_script('export.py', f'--init_from={ckpt}', f'--folder={tmp_path}/x'), phrase)
    assert not (tmp_path / 'x' / 'model.safetensors').exists()


def hf_cache_layout(hub_dir, repo, folder, files=('config.json', 'model.safetensors')):
    """A repo laid out as huggingface_hub caches it: blobs named by hash, a snapshot folder of links to them,
    refs/main naming the commit."""
    base = hub_dir / f"models--{repo.replace('/', '--')}"
    commit = 'a' * 40
    (base / 'blobs').mkdir(parents=True)
    (base / 'snapshots' / commit).mkdir(parents=True)
    (base / 'refs').mkdir()
    (base / 'refs' / 'main').write_text(commit)
    for i, name in enumerate(files):
        shutil.copy(os.path.join(folder, name), base / 'blobs' / f'blob{i}')
        os.symlink(f'../../blobs/blob{i}', base / 'snapshots' / commit / name)
    return base


def test_a_complete_snapshot_in_the_hf_cache_is_used_without_a_download(hf_tiny, tmp_path, monkeypatch, hub):
    folder, hf = hf_tiny
    hf_cache_layout(tmp_path / 'hf-home' / 'hub', 'openai-community/gpt2', folder)  # $HF_HOME/hub (conftest)
    model, _, _ = load_model('gpt2')
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert rel_err(model.eval()(idx)[0], hf(idx).logits) < 1e-5
    assert hub.log == [] and not os.path.exists(tmp_path / 'cache' / 'gpt-lab')  # no request, nothing copied
    # transformers' own from_pretrained('gpt2') caches under the old id: models--gpt2
    shutil.rmtree(tmp_path / 'hf-home')
    hf_cache_layout(tmp_path / 'hf-home' / 'hub', 'gpt2', folder)
    load_model('gpt2')
    assert hub.log == []
    # $HF_HUB_CACHE comes first
    hf_cache_layout(tmp_path / 'elsewhere', 'org/tiny', folder)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'elsewhere'))
    load_model('org/tiny')
    assert hub.log == []


def test_an_incomplete_snapshot_in_the_hf_cache_is_downloaded_afresh(hf_tiny, tmp_path, hub):
    folder, _ = hf_tiny
    hf_cache_layout(tmp_path / 'hf-home' / 'hub', 'org/tiny', folder, files=('config.json',))  # weights still missing
    hub.add_folder('org/tiny', folder)
    load_model('org/tiny')
    assert [p for p, _ in hub.log if 'resolve' in p] == ['/org/tiny/resolve/main/config.json',
                                                         '/org/tiny/resolve/main/model.safetensors']


def test_export_into_a_used_folder_and_back(tmp_path):
    """Exporting into a folder that holds a model is refused without --overwrite=True; with it, a character model
    exported where a GPT-2-vocabulary one was (beside another library's pytorch_model.bin and
    generation_config.json) leaves none of the earlier model's files behind; and a folder of a character model is
    refused by the scripts (its ids are not GPT-2's), in one line."""
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, norm='layernorm')
    first = checkpoint(tmp_path, GPT(GPTConfig(**args)), 'transformer', args)
    assert run_script('export.py', f'--init_from={first}', f'--folder={tmp_path}/hf').returncode == 0
    assert 'vocab.json' in os.listdir(tmp_path / 'hf')
    chars = list('abcde')
    (tmp_path / 'c').mkdir()
    second = checkpoint(tmp_path / 'c', GPT(GPTConfig(**{**args, 'vocab_size': 5})), 'transformer',
                        {**args, 'vocab_size': 5}, dict(name='char', chars=chars))
    (tmp_path / 'hf' / 'pytorch_model.bin').write_bytes(b'an earlier model')
    (tmp_path / 'hf' / 'generation_config.json').write_text('{}')
    (tmp_path / 'hf' / 'notes.txt').write_text('mine')
    before = {f: (tmp_path / 'hf' / f).read_bytes() for f in os.listdir(tmp_path / 'hf')}
    assert_one_line_error(run_script('export.py', f'--init_from={second}', f'--folder={tmp_path}/hf'),
                          'holds a model already', '--overwrite=True')
    assert {f: (tmp_path / 'hf' / f).read_bytes() for f in os.listdir(tmp_path / 'hf')} == before
    proc = run_script('export.py', f'--init_from={second}', f'--folder={tmp_path}/hf', '--overwrite=True')
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / 'hf')) == ['config.json', 'model.safetensors', 'notes.txt']
    assert_one_line_error(run_script('sample.py', f'--init_from={tmp_path}/hf'), "vocabulary has 5 tokens",
                          "fewer than GPT-2's 50257", 'use the checkpoint it came from')
    assert_one_line_error(run_script('export.py', f'--init_from={tmp_path}/hf', f'--folder={tmp_path}/hf2'),
                          'vocabulary has 5 tokens')


def test_a_checkpoint_naming_an_impossible_tokenizer(tmp_path):
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    ckpt = checkpoint(tmp_path, GPT(GPTConfig(**args)), 'transformer', args, dict(name='gpt2', id_map=[60000]))
    assert_one_line_error(run_script('sample.py', f'--init_from={ckpt}'), 'is not one this repo knows')
