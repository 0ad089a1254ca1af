"""Absurd inputs, each answered with one line and a non-zero exit, never a traceback and never after the work:
settings out of range, files that are folders, binaries or corrupt, sizes that would exhaust memory, outputs
that could not be written. (Each of these gave a traceback, ran for minutes, or was killed, before.)"""
import json
import os
import random
import struct

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_script

from model import GPT, GPTConfig, KGramMLPSeqModel


@pytest.fixture(scope='module')
def files(tmp_path_factory, hf_tiny):
    """A folder of hostile files, and a small model folder and data folder to point them at."""
    root = tmp_path_factory.mktemp('bad')
    folder, _ = hf_tiny
    (root / 'binary.txt').write_bytes(bytes(range(256)) * 10)
    (root / 'adir').mkdir()
    (root / 'dir.pt').mkdir()
    (root / 'empty.pt').write_bytes(b'')
    (root / 'random.pt').write_bytes(random.Random(0).randbytes(3000))  # (fixed: a few random files read as a
    # pickle that breaks off mid-string, which says 'truncated or corrupt' instead; both are right, one is tested)
    (root / 'stack.pt').write_bytes(b'\x80\x02\x87.')  # a pickle whose first op pops an empty stack
    (root / 'notes.txt').write_text("open('ran', 'w')\n")
    data = root / 'data'
    data.mkdir()
    np.arange(2000, dtype=np.uint16).tofile(data / 'train.bin')
    np.arange(500, dtype=np.uint16).tofile(data / 'val.bin')
    empty = root / 'empty_data'
    empty.mkdir()
    (empty / 'train.bin').write_bytes(b'')
    np.arange(500, dtype=np.uint16).tofile(empty / 'val.bin')
    # checkpoints and config.json whose sizes their weights do not have
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=300, n_layer=1, n_head=2, n_embd=16)
    sd = GPT(GPTConfig(**args)).state_dict()
    torch.save({'model': sd, 'model_args': {**args, 'n_layer': 10 ** 9}, 'tokenizer': {'name': 'gpt2', 'id_map':
                list(range(300))}}, root / 'deep.pt')
    kg = dict(vocab_size=300, k=2, embed_size=8, num_inner_layers=1)
    torch.save({'model': KGramMLPSeqModel(**kg).state_dict(), 'model_type': 'kgram_mlp',
                'model_args': {**kg, 'num_inner_layers': 10 ** 9}}, root / 'kgram.pt')
    for name, change in (('layers', {'n_layer': 10 ** 5}), ('vocab', {'vocab_size': 10 ** 12})):
        (root / name).mkdir()
        config = json.load(open(os.path.join(folder, 'config.json')))
        json.dump({**config, **change}, open(root / name / 'config.json', 'w'))
        os.symlink(os.path.join(folder, 'model.safetensors'), root / name / 'model.safetensors')
    # safetensors whose header points before the data (into the header) or has a shape of floats
    for name, entry in (('negative', {'dtype': 'F32', 'shape': [2], 'data_offsets': [-8, 0]}),
                        ('floats', {'dtype': 'F32', 'shape': [0.5, 4], 'data_offsets': [0, 8]})):
        (root / name).mkdir()
        header = json.dumps({'transformer.wte.weight': entry}).encode()
        (root / name / 'model.safetensors').write_bytes(struct.pack('<Q', len(header)) + header + b'\0' * 8)
        os.symlink(os.path.join(folder, 'config.json'), root / name / 'config.json')
    return root, folder


CASES = [
    # script, arguments ({root}: the hostile files, {model}: a small GPT-2 folder), phrases of the one line
    ('sample.py', ['--init_from={model}', '--start=FILE:{root}/binary.txt'], ['is not UTF-8 text']),
    ('sample.py', ['--init_from={model}', '--start=FILE:{root}/adir'], ['is a folder']),
    ('sample.py', ['--max_new_tokens=1e10'], ['max_new_tokens=10000000000 must be in [0, 1,000,000]']),
    ('sample.py', ['--init_from={model}', '--active_layers=0-99999999999'], ['block 3 is out of range']),
    ('sample.py', ['--device=tpu'], ["device='tpu'"]),
    ('sample.py', ['--device=cuda:3'], ["device='cuda:3' but this PyTorch sees"]),
    ('sample.py', ['--init_from={model}', '--num_samples=100000', '--max_new_tokens=100000'], ['need about']),
    ('sample.py', ['--seed=-1'], ['seed=-1 must be in']),
    ('sample.py', ['--temperature=nan'], ["temperature expects float, got 'nan'"]),
    ('sample.py', ['--init_from={root}/empty.pt'], ['empty.pt is truncated or corrupt']),
    ('sample.py', ['--init_from={root}/random.pt'], ['refused to load', 'not tensors and plain data']),
    ('sample.py', ['--init_from={root}/stack.pt'], ['refused to load', 'not tensors and plain data']),
    ('sample.py', ['--init_from={root}/dir.pt'], ['dir.pt is a directory']),
    ('sample.py', ['--init_from={root}/deep.pt'], ['the config says n_layer=1000000000 but the weights hold 1']),
    ('sample.py', ['--init_from={root}/kgram.pt'], ['num_inner_layers=1000000000 but the weights hold 1']),
    ('sample.py', ['--init_from={root}/layers'], ['n_layer=100000 but the weights hold 3 blocks']),
    ('sample.py', ['--init_from={root}/vocab'], ['transformer.wte.weight is of shape (50257, 32)',
                                                 'the config makes it (1000000000000, 32)']),
    ('sample.py', ['--init_from={root}/negative'], ['model.safetensors is truncated or corrupt', 'does not fit']),
    ('sample.py', ['--init_from={root}/floats'], ['model.safetensors is truncated or corrupt', 'does not fit']),
    ('sample.py', ['{root}/notes.txt'], ['is not a config file (a .py file)']),
    ('train.py', ['--dataset={root}/data', '--n_head=0'], ['n_head=0 is out of range']),
    ('train.py', ['--dataset={root}/data', '--learning_rate=-1'], ['learning_rate=-1.0 must be > 0']),
    ('train.py', ['--dataset={root}/data', '--dropout=1.5'], ['dropout=1.5 is out of range']),
    ('train.py', ['--dataset={root}/data', '--beta2=1'], ['beta2=1.0 must be in [0, 1)']),
    ('train.py', ['--dataset={root}/data', '--warmup_iters=-1'], ['warmup_iters=-1 must be >= 0']),
    ('train.py', ['--dataset={root}/data', '--device=cpu', '--dtype=float16'], ["dtype='float16' trains on a GPU only"]),
    ('train.py', ['--dataset={root}/data', '--n_layer=1000000000'], ['need about', 'make it smaller']),
    ('train.py', ['--dataset={root}/empty_data', '--block_size=8'], ['is longer than the train split']),
    ('train.py', ['--dataset={root}/data', '--device=tpu'], ["device='tpu'"]),
    ('prune.py', ['--init_from={model}', '--out_json={root}/missing/p.json'], ['the folder', 'does not exist']),
    ('prune.py', ['--init_from={model}', '--plot={root}/adir'], ['is a folder']),
    ('prune.py', ['--init_from={model}', '--eval_text={root}/adir'], ['eval_text', 'is a folder']),
    ('prune.py', ['--init_from={model}', '--eval_text={root}/binary.txt'], ['is not UTF-8 text']),
    ('prune.py', ['--init_from={model}', '--eval_tokens=-5'], ['eval_tokens=-5 must be >= 2']),
    ('probe_embeddings.py', ['--init_from={model}', '--out_json={root}/missing/p.json'], ['does not exist']),
    ('interpret.py', ['--init_from={model}', '--attention_png={root}/missing/a.png'], ['does not exist']),
    ('interpret.py', ['--init_from={model}', '--sae=True', '--sae_html={root}/missing/f.html'], ['does not exist']),
    ('interpret.py', ['--init_from={model}', '--sae_features=0'], ['sae_features=0 must be >= 1']),
    ('plot.py', ['--runs={root}', '--out={root}/missing/x.png'], ['cannot be written']),
    ('export.py', ['--init_from={model}', '--dtype=int4'], ["dtype='int4' is not one of"]),
    ('data/prepare.py', ['--source={root}/adir'], ['is a folder']),
    ('data/prepare.py', ['--source={root}/binary.txt', '--out_dir={root}/never'], ['can\'t decode byte']),
]


@pytest.mark.parametrize('script,args,phrases', CASES, ids=[f"{c[0]}:{' '.join(c[1])[-40:]}" for c in CASES])
def test_one_line_and_no_work(files, script, args, phrases):
    root, model = files
    proc = run_script(script, *(a.format(root=root, model=model) for a in args), cwd=root, timeout=60)
    assert_one_line_error(proc, *phrases)
    assert not (root / 'ran').exists() and not (root / 'never').exists()
