"""Round two of hostile input (issue 27): files and settings made to run code, lose a user's files, take all
memory, or end in a traceback. Each case failed on the code before it; each now gets its one line (or works)."""
import csv
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, run_script
from test_train import TINY, start_training, train

from load import claim_folder, save_safetensors
from model import GPT, GPTConfig

ARGS = dict(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)


def save_ckpt(path, sd=None, **extra):
    torch.manual_seed(0)
    sd = GPT(GPTConfig(**ARGS)).state_dict() if sd is None else sd
    torch.save({'model': sd, 'model_args': dict(ARGS), **extra}, path)
    return str(path)


def hf_folder(root, name, hf_tiny, config=None, header=None):
    """A model folder: hf_tiny's config.json changed by config (a dict merged in, or raw text), and its weights
    (or a safetensors file of the given raw header)."""
    folder, _ = hf_tiny
    d = root / name
    d.mkdir()
    if isinstance(config, (str, bytes)):
        (d / 'config.json').write_bytes(config.encode() if isinstance(config, str) else config)
    else:
        (d / 'config.json').write_text(json.dumps({**json.load(open(os.path.join(folder, 'config.json'))),
                                                   **(config or {})}))
    if header is None:
        os.symlink(os.path.join(folder, 'model.safetensors'), d / 'model.safetensors')
    else:
        (d / 'model.safetensors').write_bytes(struct.pack('<Q', len(header)) + header + b'\0' * 8)
    return str(d)


@pytest.fixture(scope='module')
def bad(tmp_path_factory, hf_tiny):
    root = tmp_path_factory.mktemp('hostile')
    torch.manual_seed(0)
    sd = GPT(GPTConfig(**ARGS)).state_dict()
    # weights that view one float each (stride 0): a 1 KB file that would become a full-size model
    save_ckpt(root / 'stride0.pt', {k: torch.ones(1).expand(*v.shape) for k, v in sd.items()})
    # a checkpoint rewritten with deflated zip entries
    save_ckpt(root / 'plain.pt')
    with zipfile.ZipFile(root / 'plain.pt') as src, zipfile.ZipFile(root / 'deflated.pt', 'w') as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    save_ckpt(root / 'junk.pt', junk=torch.zeros(1000))
    save_ckpt(root / 'nan.pt', {k: v.clone().fill_(float('nan')) if k.endswith('c_fc.weight') else v for k, v in sd.items()})
    save_ckpt(root / 'layer_ids.pt', layer_ids=5)
    save_ckpt(root / 'model_type.pt', model_type=['gpt'])
    torch.save({'model': sd, 'model_args': {**ARGS, 'pos_emb': 'rope', 'rope_base': 0.0}}, root / 'rope0.pt')
    torch.save({'model': sd, 'model_args': {**ARGS, 'n_layer': 1.0}}, root / 'float_layers.pt')
    rope = {**ARGS, 'pos_emb': 'rope'}
    torch.save({'model': GPT(GPTConfig(**rope)).state_dict(), 'model_args': {**rope, 'block_size': 10 ** 12}},
               root / 'rope_long.pt')  # (RoPE's tables for 10**12 positions: weights that fit, buffers that cannot)
    deep = '[' * 100000 + ']' * 100000
    for name, config in (('deep', deep), ('list', '[]'), ('null', 'null'), ('float_layers', {'n_layer': 3.0}),
                         ('float_embd', {'n_embd': 32.0}), ('str_layers', {'n_layer': '3'}),
                         ('eps', {'layer_norm_epsilon': 'x'})):
        hf_folder(root, name, hf_tiny, config)
    hf_folder(root, 'deep_header', hf_tiny, header=deep.encode())
    hf_folder(root, 'huge_shape', hf_tiny, header=json.dumps(
        {'transformer.wte.weight': {'dtype': 'F32', 'shape': [0, 10 ** 30], 'data_offsets': [0, 0]}}).encode())
    # a model folder whose weights are NaN: what it computes cannot be sampled
    folder, _ = hf_tiny
    from model import load_safetensors
    d = root / 'nan_folder'
    d.mkdir()
    os.symlink(os.path.join(folder, 'config.json'), d / 'config.json')
    save_safetensors({k: torch.full_like(v, float('nan')) for k, v in load_safetensors(
        os.path.join(folder, 'model.safetensors')).items()}, str(d / 'model.safetensors'))
    # data folders: a meta.json nested deep, meta.pkl files with impossible lengths, a persistent id, bad characters
    for name, files in (('deep_meta', {'meta.json': deep}),
                        ('len8', {'meta.pkl': b'\x80\x04\x8d' + b'\xff' * 8}),
                        ('bytes8', {'meta.pkl': b'\x80\x04\x8e' + b'\xff' * 8}),
                        ('frame', {'meta.pkl': b'\x80\x04\x95' + b'\xff' * 8}),
                        ('persid', {'meta.pkl': b'\x80\x02Pabc\n.'}),
                        ('surrogate', {'meta.pkl': pickle.dumps(dict(vocab_size=2, stoi={'a': 0, '\udce9': 1},
                                                                     itos={0: 'a', 1: '\udce9'}))}),
                        ('empty_char', {'meta.pkl': pickle.dumps(dict(vocab_size=2, stoi={'a': 0, '': 1},
                                                                      itos={0: 'a', 1: ''}))})):
        (root / name).mkdir()
        np.zeros(200, dtype=np.uint16).tofile(root / name / 'train.bin')
        np.zeros(200, dtype=np.uint16).tofile(root / name / 'val.bin')
        for f, content in files.items():
            (root / name / f).write_bytes(content.encode() if isinstance(content, str) else content)
    (root / 'latin1.py').write_bytes(b"# caf\xe9\nmax_iters = 1\n")
    (root / 'folder.py').mkdir()
    return root


CASES = [
    # script, arguments ({root}: the hostile files, {model}: a small GPT-2 folder), phrases of the one line
    ('sample.py', ['--init_from={root}/stride0.pt'], ['refused to load', 'views only', 'bytes of storage']),
    ('sample.py', ['--init_from={root}/deflated.pt'], ['refused to load', 'is compressed']),
    ('sample.py', ['--init_from={root}/junk.pt'], ["refused: it holds tensors under 'junk'"]),
    ('sample.py', ['--init_from={root}/nan.pt'], ['weight tensors are NaN or infinite', 'use an earlier checkpoint']),
    ('sample.py', ['--init_from={root}/rope0.pt'], ['rope_base=0.0 is out of range']),
    ('sample.py', ['--init_from={root}/float_layers.pt'], ['n_layer=1.0 must be a whole number']),
    ('sample.py', ['--init_from={root}/rope_long.pt'], ['this GPT needs', 'GB for its weights and buffers alone']),
    ('sample.py', ['--init_from={root}/layer_ids.pt'], ['layer_ids=5 is not a list']),
    ('sample.py', ['--init_from={root}/model_type.pt'], ["model_type=['gpt'] is not one of"]),
    ('sample.py', ['--init_from={root}/deep'], ['config.json is not valid JSON', 'RecursionError']),
    ('sample.py', ['--init_from={root}/list'], ['config.json is not a model config']),
    ('sample.py', ['--init_from={root}/null'], ['config.json is not a model config']),
    ('sample.py', ['--init_from={root}/float_layers'], ['n_layer=3.0 must be a whole number']),
    ('sample.py', ['--init_from={root}/float_embd'], ['n_embd=32.0 must be a whole number']),
    ('sample.py', ['--init_from={root}/str_layers'], ["n_layer='3' must be a whole number"]),
    ('sample.py', ['--init_from={root}/eps'], ["layer_norm_epsilon='x' must be a number"]),
    ('sample.py', ['--init_from={root}/deep_header'], ['model.safetensors is truncated or corrupt']),
    ('sample.py', ['--init_from={root}/huge_shape'], ['model.safetensors is truncated or corrupt']),
    ('sample.py', ['--init_from={root}/nan_folder', '--max_new_tokens=3'], ["the model's logits are NaN or infinite"]),
    ('sample.py', ['--init_from={root}/nan_folder', '--max_new_tokens=3', '--temperature=0'],
     ["the model's logits are NaN or infinite"]),
    ('train.py', ['--dataset={root}/deep_meta'], ['meta.json cannot be read', 'RecursionError']),
    ('train.py', ['--dataset={root}/len8'], ['meta.pkl: refused']),
    ('train.py', ['--dataset={root}/bytes8'], ['meta.pkl: refused']),
    ('train.py', ['--dataset={root}/frame'], ['meta.pkl: refused']),
    ('train.py', ['--dataset={root}/persid'], ['meta.pkl: refused', 'persistent id']),
    ('train.py', ['--dataset={root}/surrogate'], ['is not valid Unicode']),
    ('train.py', ['--dataset={root}/empty_char'], ['is the empty string']),
    ('train.py', ['{root}/latin1.py'], ["latin1.py' is not UTF-8 text", 'offset 5']),
    ('train.py', ['{root}/folder.py'], ["folder.py' is a folder"]),
]


@pytest.mark.parametrize('script,args,phrases', CASES, ids=[f"{c[0]}:{' '.join(c[1])[-40:]}" for c in CASES])
def test_one_line(bad, hf_tiny, script, args, phrases):
    proc = run_script(script, *(a.format(root=bad, model=hf_tiny[0]) for a in args), f'--out_dir={bad}/never',
                      '--device=cpu', cwd=bad, timeout=60)
    assert_one_line_error(proc, *phrases)
    assert not (bad / 'never' / 'ckpt.pt').exists()


def test_settings_at_the_edge_of_float32_still_sample(hf_tiny):
    """A temperature so small that logits / temperature overflows, a top_p that is 0 in float32: both sample
    (as greedy would, nearly), no NaN."""
    for opt in ('--temperature=1e-40', '--top_p=1e-300', '--top_p=1e-300 --top_k=None'):
        proc = run_script('sample.py', f'--init_from={hf_tiny[0]}', *opt.split(), '--max_new_tokens=4',
                          '--num_samples=2', '--device=cpu')
        assert proc.returncode == 0, proc.stderr
    greedy = run_script('sample.py', f'--init_from={hf_tiny[0]}', '--temperature=0', '--max_new_tokens=6',
                        '--num_samples=1', '--device=cpu')
    tiny = run_script('sample.py', f'--init_from={hf_tiny[0]}', '--temperature=1e-40', '--max_new_tokens=6',
                      '--num_samples=1', '--device=cpu')
    assert tiny.stdout == greedy.stdout


def test_a_prompt_that_is_not_utf8_on_a_strict_terminal(hf_tiny):
    """bash's $'caf\\xe9' reaches Python as a lone surrogate; printing it to a strict UTF-8 stdout raised."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--init_from={hf_tiny[0]}',
                           b'--start=caf\xe9', '--num_samples=1', '--max_new_tokens=2', '--device=cpu'],
                          capture_output=True, text=True, env={**os.environ, 'PYTHONIOENCODING': 'utf-8:strict'},
                          timeout=120)
    assert_one_line_error(proc, 'the prompt is not UTF-8 text', "b'\\xe9'")


def test_prompt_from_a_pipe(hf_tiny):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--init_from={hf_tiny[0]}',
                           '--start=FILE:/dev/stdin', '--num_samples=1', '--max_new_tokens=2', '--device=cpu'],
                          input='Once upon a time', capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('Once upon a time')


def test_study_never_runs_a_config_from_the_current_folder(tmp_path):
    """base='config/x.py' is this repo's config/x.py: a file of that name in the current folder is not run."""
    (tmp_path / 'config').mkdir()
    (tmp_path / 'config' / 'only_here.py').write_text(f"open({str(tmp_path / 'RAN')!r}, 'w')\n")
    proc = run_script('study.py', '--study=sweep', '--base=config/only_here.py', '--runs=max_iters=1',
                      f'--study_dir={tmp_path}/st', cwd=tmp_path)
    assert_one_line_error(proc, "base config file 'config/only_here.py' not found in this repo",
                          './config/only_here.py')
    assert not (tmp_path / 'RAN').exists()


# -- the run folder: never written through a link, never by two runs ---------------------------------------


def test_train_never_writes_through_a_link(datasets, tmp_path):
    out, keep = tmp_path / 'run', tmp_path / 'keep.txt'
    keep.write_text('notes')
    d = f'--dataset={datasets["compact"]}'
    assert train(out, d, '--max_iters=5', '--eval_interval=5').returncode == 0
    (out / 'loss.png').unlink()
    os.symlink(keep, out / 'loss.png')
    assert_one_line_error(train(out, d, '--max_iters=10', '--eval_interval=5', '--init_from=resume'),
                          'loss.png is a symbolic link', 'never through a link')
    (out / 'loss.png').unlink()
    (out / 'log.csv').unlink()
    os.symlink(keep, out / 'log.csv')
    assert_one_line_error(train(out, d, '--max_iters=5', '--overwrite=True'), 'log.csv is a symbolic link')
    assert keep.read_text() == 'notes'
    # a dangling link: a scratch run sees a run there (exists() says False for it), and creates nothing
    fresh, target = tmp_path / 'fresh', tmp_path / 'elsewhere.csv'
    fresh.mkdir()
    os.symlink(target, fresh / 'log.csv')
    assert_one_line_error(train(fresh, d, '--max_iters=5'), 'holds a run already (log.csv)')
    assert_one_line_error(train(fresh, d, '--max_iters=5', '--overwrite=True'), 'log.csv is a symbolic link')
    assert not target.exists()


def test_a_folder_claimed_by_another_process_is_refused(datasets, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', f"import sys, time; sys.path.insert(0, {ROOT!r}); import load; "
                               f"load.claim_folder({str(out)!r}, 'train.py'); print('held', flush=True); "
                               f"time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        proc = train(out, f'--dataset={datasets["compact"]}', '--max_iters=5')
        assert_one_line_error(proc, f'{out} is in use by another train.py (pid {holder.pid})')
        assert sorted(os.listdir(out)) == ['.lock']
    finally:
        holder.kill()
        holder.wait()
    assert train(out, f'--dataset={datasets["compact"]}', '--max_iters=5').returncode == 0  # (released at its end)


def test_two_runs_started_together_never_share_a_folder(datasets, tmp_path):
    out = tmp_path / 'run'
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--out_dir={out}', *TINY,
           f'--dataset={datasets["compact"]}', '--max_iters=20', '--eval_interval=10']
    procs = [subprocess.Popen(cmd + [f'--seed={s}'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    refused = next(err for code, err in results if code)
    assert 'is in use by another train.py' in refused or 'holds a run already' in refused
    iters = [int(r['iter']) for r in csv.DictReader(open(out / 'log.csv'))]
    assert iters == sorted(iters) and iters.count(0) == 1  # one run's rows, in order (two would restart at 0)


# -- resuming: what a checkpoint lacks or holds wrongly --------------------------------------------------


def test_resume_refuses_what_it_cannot_continue(datasets, tmp_path):
    d = f'--dataset={datasets["compact"]}'
    out = tmp_path / 'run'
    assert train(out, d, '--max_iters=5', '--eval_interval=5').returncode == 0
    good = torch.load(out / 'ckpt.pt', weights_only=True)

    def resume_with(**change):
        torch.save({**{k: v for k, v in good.items() if k not in change or change[k] is not None},
                    **{k: v for k, v in change.items() if v is not None}}, out / 'ckpt.pt')
        return train(out, d, '--max_iters=10', '--eval_interval=5', '--init_from=resume')
    assert_one_line_error(resume_with(optimizer=None), 'cannot be resumed: it has no optimizer')
    assert_one_line_error(resume_with(iter_num=None), 'cannot be resumed: it has no iter_num')
    opt = dict(good['optimizer'], param_groups=good['optimizer']['param_groups'][:1])
    assert_one_line_error(resume_with(optimizer=opt), 'its optimizer state or counters do not fit this run')
    assert_one_line_error(resume_with(log_state=5), 'its optimizer state or counters do not fit this run')
    torch.save(good, out / 'ckpt.pt')
    log = (out / 'log.csv').read_text()
    (out / 'log.csv').write_text(log + 'x,1,2,3,4,5,6,7\n')
    assert_one_line_error(train(out, d, '--max_iters=10', '--eval_interval=5', '--init_from=resume'),
                          "has iter='x', not an iteration number")
    assert (out / 'log.csv').read_text() == log + 'x,1,2,3,4,5,6,7\n'  # left as it was


def test_gpt2_resumed_with_a_longer_block_size(datasets, hf_tiny, tmp_path):
    out = tmp_path / 'ft'
    common = [f'--dataset={datasets["full"]}', '--model_type=gpt2', f'--pretrained={hf_tiny[0]}', '--eval_interval=5']
    assert train(out, *common, '--max_iters=5').returncode == 0
    assert_one_line_error(train(out, *common, '--max_iters=10', '--init_from=resume', '--block_size=32'),
                          'block_size=16 (settings: 32)')


def test_data_truncated_under_a_running_train_saves_and_stops(datasets, tmp_path):
    """A memory-mapped train.bin that shrinks kills the process with SIGBUS, losing the iterations since the
    last checkpoint; read with reads, it is one line, after saving them."""
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(datasets['compact'], data)
    out = tmp_path / 'run'
    p = start_training(out, f'--dataset={data}', '--max_iters=100000', '--eval_interval=100000')
    try:
        deadline = time.time() + 120  # (until a training row is logged: there is something to save)
        while time.time() < deadline and len(open(out / 'log.csv').readlines()) < 3:
            time.sleep(0.1)
        os.truncate(data / 'train.bin', 100)
        code = p.wait(timeout=120)
        err = p.stderr.read()
    finally:
        p.kill()
    assert code == 1 and 'Traceback' not in err, err
    assert 'train.bin has shrunk to 100 bytes' in err and f'saved {out}/ckpt.pt at iteration' in err
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] > 0


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='finds the worker processes in /proc')
def test_torchrun_with_a_rank_killed_saves_and_says_so(datasets, tmp_path):
    """kill -9 of one torchrun process: rank 0 saved nothing and died in a gloo traceback; now it saves the
    run as of its last whole step and says, in one line, what happened."""
    import signal
    out = tmp_path / 'run'
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          os.path.join(ROOT, 'train.py'), f'--out_dir={out}', *TINY, f'--dataset={datasets["compact"]}',
                          '--max_iters=100000', '--eval_interval=100000', '--log_interval=1'],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / 'log.csv').exists() and len(open(out / 'log.csv').readlines()) > 5):
            time.sleep(0.2)
        ranks = {}
        for pid in os.listdir('/proc'):
            try:
                env = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
            except OSError:
                continue
            if f'TORCHELASTIC_RUN_ID'.encode() in b' '.join(env) and f'--out_dir={out}'.encode() in \
                    open(f'/proc/{pid}/cmdline', 'rb').read():
                rank = next((e[5:] for e in env if e.startswith(b'RANK=')), None)
                if rank is not None:
                    ranks[int(rank)] = int(pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    ours = [ln for ln in err.splitlines() if ln.startswith('train.py: error:')]
    assert len(ours) == 1 and 'another process of this torchrun run is gone' in ours[0], err[-3000:]
    assert f'saved {out}/ckpt.pt at iteration' in ours[0]
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] > 0
