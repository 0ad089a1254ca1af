"""nanoGPT's data folders and checkpoints, both ways: a character-level folder (train.bin, val.bin, meta.pkl)
trains a model of that vocabulary, and a checkpoint written by nanoGPT's train.py samples, prunes, probes and
interprets with its characters; meta.pkl is read without running anything; data folders whose ids do not fit
their vocabulary are refused; the bundled folders prepare themselves."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, greedy_reference, run_script

import load
from model import GPT, GPTConfig

TEXT = open(os.path.join(ROOT, 'data', 'tinyshakespeare.txt'), encoding='utf-8').read()[:20000]


def nanogpt_char_folder(folder, text=TEXT):
    """What nanoGPT's data/shakespeare_char/prepare.py writes: sorted characters, 90% / 10% split, uint16 ids,
    and meta.pkl with vocab_size, itos and stoi."""
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, {i: c for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    os.makedirs(folder, exist_ok=True)
    ids[:int(len(ids) * 0.9)].tofile(os.path.join(folder, 'train.bin'))
    ids[int(len(ids) * 0.9):].tofile(os.path.join(folder, 'val.bin'))
    with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': len(chars), 'itos': itos, 'stoi': stoi}, f)
    return chars


def nanogpt_checkpoint(model, dataset):
    """A checkpoint as nanoGPT's train.py writes it: compiled keys, model_args without our fields, its config."""
    c = model.config
    return {'model': {'_orig_mod.' + k: v for k, v in model.state_dict().items()},
            'optimizer': torch.optim.AdamW(model.parameters()).state_dict(),
            'model_args': dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                               bias=c.bias, vocab_size=c.vocab_size, dropout=c.dropout),
            'iter_num': 5000, 'best_val_loss': torch.tensor(1.47),
            'config': {'dataset': dataset, 'batch_size': 64, 'learning_rate': 1e-3, 'device': 'cpu'}}


@pytest.fixture(scope='module')
def nanogpt_run(tmp_path_factory):
    """A folder laid out as nanoGPT's repository after its character-level quickstart: data/shakespeare_char
    and out-shakespeare-char/ckpt.pt, with weights scaled so that greedy decoding varies from step to step."""
    root = tmp_path_factory.mktemp('nanogpt')
    chars = nanogpt_char_folder(root / 'data' / 'shakespeare_char')
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=32, bias=False,
                          activation='gelu')).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and '.h.' in name:
                p.mul_(20.0)
    (root / 'out-shakespeare-char').mkdir()
    torch.save(nanogpt_checkpoint(model, 'shakespeare_char'), root / 'out-shakespeare-char' / 'ckpt.pt')
    return root, model, chars


def test_sample_from_a_nanogpt_char_checkpoint_equals_nanogpts_sampler(nanogpt_run):
    """nanoGPT's sample.py --top_k=1 is argmax decoding of the last block_size characters, decoded through
    meta.pkl: ours prints the same characters, past block_size too."""
    root, model, chars = nanogpt_run
    prompt = 'ROMEO:'
    idx = torch.tensor([[chars.index(c) for c in prompt]])
    expected = ''.join(chars[i] for i in greedy_reference(model, idx, 40)[0].tolist())
    assert len(set(expected[len(prompt):])) > 5  # the test means something only if decoding varies
    for n in ('1', '2'):
        proc = run_script('sample.py', '--init_from=resume', '--out_dir=out-shakespeare-char', f'--start={prompt}',
                          '--top_k=1', '--max_new_tokens=40', f'--num_samples={n}', cwd=root)
        assert proc.returncode == 0, proc.stderr
        assert [s.strip('\n') for s in proc.stdout.split('---------------\n') if s.strip()] == [expected] * int(n)


def test_prune_probe_interpret_export_a_nanogpt_char_checkpoint(nanogpt_run, tmp_path):
    root, model, chars = nanogpt_run
    common = ['--init_from=resume', '--out_dir=out-shakespeare-char']
    text = tmp_path / 'eval.txt'
    text.write_text(TEXT[:3000])
    proc = run_script('prune.py', *common, f'--eval_text={text}', '--configs=all;even', '--max_new_tokens=10',
                      '--start=ROMEO:', '--num_samples=1', f'--out_json={tmp_path}/prune.json', cwd=root)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / 'prune.json').read_text())
    assert [r['layers'] for r in res['configs']] == [[0, 1], [0]] and res['configs'][0]['samples'][0].startswith('ROMEO:')
    assert all(set(s) <= set(chars) for r in res['configs'] for s in r['samples'])  # decoded through meta.pkl
    proc = run_script('probe_embeddings.py', *common, f'--out_json={tmp_path}/probe.json', '--words_rare=qzx,Xyz',
                      cwd=root)
    assert proc.returncode == 0, proc.stderr
    probe = json.loads((tmp_path / 'probe.json').read_text())
    dog = next(r for r in probe['words'] if r['word'] == 'dog' and r['form'] == 'start')
    assert dog['ids'] == [chars.index(c) for c in 'dog'] and dog['pieces'] == ['d', 'o', 'g']
    assert probe['subtoken'] == 'mean'
    proc = run_script('interpret.py', *common, '--prompt=ROMEO: good', f'--attention_png={tmp_path}/a.png',
                      '--sae=True', '--sae_data=shakespeare_char', '--sae_tokens=3000', '--sae_eval_tokens=600',
                      '--sae_features=32', '--sae_epochs=2', f'--sae_html={tmp_path}/f.html', cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert '2 layers x 2 heads, 11 tokens' in proc.stderr and 'variance explained' in proc.stdout


def test_train_on_a_nanogpt_char_folder(nanogpt_run, tmp_path):
    """--dataset=shakespeare_char (nanoGPT's spelling) finds data/shakespeare_char, trains a model of its 65-or-so
    characters (not GPT-2's 50,257 tokens), and the checkpoint carries the characters."""
    root, _, chars = nanogpt_run
    out = tmp_path / 'run'
    proc = run_script('train.py', '--dataset=shakespeare_char', f'--out_dir={out}', '--n_layer=1', '--n_head=2',
                      '--n_embd=32', '--block_size=32', '--batch_size=16', '--max_iters=200', '--eval_interval=100',
                      '--eval_iters=4', '--learning_rate=1e-2', '--warmup_iters=5', '--prompt=ROMEO:', '--sample_tokens=8',
                      cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert f'vocabulary: {len(chars)} characters' in proc.stdout
    model, tokenizer, ckpt = load.load_model('resume', str(out))
    assert model.config.vocab_size == len(chars) and ckpt['tokenizer'] == {'name': 'char', 'chars': chars}
    assert tokenizer.decode(tokenizer.encode('ROMEO: hi')) == 'ROMEO: hi'
    with open(out / 'log.csv') as f:
        vals = [float(r.split(',')[4]) for r in f.read().splitlines()[1:] if r.split(',')[4]]
    assert vals[-1] < 0.8 * vals[0]
    proc = run_script('sample.py', '--init_from=resume', f'--out_dir={out}', '--start=ROMEO:', '--max_new_tokens=20',
                      '--num_samples=1')
    assert proc.returncode == 0 and proc.stdout.startswith('ROMEO:') and set(proc.stdout) <= set(chars) | {'-'}
    bad = run_script('sample.py', '--init_from=resume', f'--out_dir={out}', '--start=\u00e9t\u00e9')
    assert_one_line_error(bad, "'\u00e9' is not in this model's vocabulary", f'{len(chars)} characters')


def test_nanogpt_char_checkpoint_without_its_meta_pkl(nanogpt_run, tmp_path):
    root, model, _ = nanogpt_run
    torch.save(nanogpt_checkpoint(model, 'my_chars'), tmp_path / 'ckpt.pt')
    assert_one_line_error(run_script('sample.py', f'--init_from={tmp_path}/ckpt.pt', cwd=tmp_path),
                          "the model's vocabulary has", "nanoGPT's sample.py reads", 'data/my_chars/meta.pkl',
                          'copy that data folder here')


def test_nanogpt_shakespeare_char_checkpoint_in_a_fresh_clone(tmp_path, monkeypatch):
    """A checkpoint of nanoGPT's shakespeare_char quickstart, and no data folder: the bundled tiny Shakespeare is
    prepared as nanoGPT's prepare.py would (the same 65 characters), and the model decodes through it."""
    monkeypatch.setattr(load, 'ROOT', str(tmp_path))  # prepare into tmp_path/data, not into this checkout
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16, bias=False, activation='gelu'))
    torch.save(nanogpt_checkpoint(model, 'shakespeare_char'), tmp_path / 'ckpt.pt')
    _, tokenizer, _ = load.load_model(str(tmp_path / 'ckpt.pt'))
    chars = sorted(set(open(os.path.join(ROOT, 'data', 'tinyshakespeare.txt'), encoding='utf-8').read()))
    assert tokenizer.chars == chars and (tmp_path / 'data' / 'shakespeare_char' / 'meta.pkl').exists()
    torch.save(nanogpt_checkpoint(GPT(GPTConfig(block_size=16, vocab_size=60, n_layer=1, n_head=2, n_embd=16)),
                                  'shakespeare_char'), tmp_path / 'other.pt')
    with pytest.raises(ValueError, match="vocabulary has 60 tokens but its tokenizer has 65 characters"):
        load.load_model(str(tmp_path / 'other.pt'))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls open(marker, 'w'): a meta.pkl that runs code
        return (open, (self.marker, 'w'))


@pytest.mark.parametrize('meta,phrase', [
    ('code', "only dicts, ints and strings are accepted"),
    ({'vocab_size': 2, 'itos': {0: 'a', 1: 'b'}, 'stoi': {'a': 0, 'b': 1}, 'extra': [1, 2]}, 'more than dicts'),
    ({'vocab_size': 2, 'itos': {0: 'a', 1: 'b'}, 'stoi': {'a': 0, 'b': 1.0}}, 'more than dicts'),
    ({'vocab_size': 2, 'itos': {0: 'a', 1: 'b'}, 'stoi': {'a': 1, 'b': 0}}, 'invert each other'),
    ({'vocab_size': 3, 'itos': {0: 'a', 1: 'b'}, 'stoi': {'a': 0, 'b': 1}}, 'invert each other'),
    ({'vocab_size': 1, 'itos': {0: 'a', 'x': 'b'}, 'stoi': {'a': 0}}, 'invert each other'),
    ({'vocab_size': 10 ** 12, 'itos': {}, 'stoi': {}}, 'invert each other'),
    ('nested', 'invert each other'),  # (10**5 dicts deep: checked without recursion)
    (b'not a pickle', 'refused'),
])
def test_meta_pkl_is_read_without_running_code(tmp_path, meta, phrase):
    marker = tmp_path / 'pwned'
    folder = tmp_path / 'data'
    nanogpt_char_folder(folder, 'abab' * 100)
    with open(folder / 'meta.pkl', 'wb') as f:
        if meta == 'code':
            pickle.dump({'vocab_size': 2, 'itos': {0: 'a', 1: 'b'}, 'stoi': RunsCode(str(marker))}, f)
        elif meta == 'nested':  # 100,000 dicts inside each other, as raw opcodes: EMPTY_DICT, then SETITEM pairs
            f.write(b'\x80\x02' + b'}K\x00' * 100000 + b'}' + b's' * 100000 + b'.')
        elif isinstance(meta, bytes):
            f.write(meta)
        else:
            pickle.dump(meta, f)
    with pytest.raises(ValueError, match=phrase):
        load.read_meta_pkl(str(folder / 'meta.pkl'))
    proc = run_script('train.py', f'--dataset={folder}', f'--out_dir={tmp_path}/out', '--block_size=8')
    assert_one_line_error(proc, 'meta.pkl', phrase)
    assert not marker.exists()


def test_data_folders_whose_ids_do_not_fit_their_vocabulary_are_refused(tmp_path):
    chars_dir, gpt2_dir, odd, compact = (tmp_path / n for n in ('chars', 'gpt2', 'odd', 'compact'))
    nanogpt_char_folder(chars_dir, 'abcdefghij' * 50)
    np.arange(500, dtype=np.uint16).__mod__(40).astype(np.uint16).tofile(chars_dir / 'train.bin')  # ids up to 39
    gpt2_dir.mkdir()
    for split in ('train', 'val'):
        np.full(300, 60000, dtype=np.uint16).tofile(gpt2_dir / f'{split}.bin')  # a nanoGPT folder: GPT-2 ids
    odd.mkdir()
    (odd / 'train.bin').write_bytes(b'\x01\x00' * 100 + b'\x01')
    (odd / 'val.bin').write_bytes(b'\x01\x00' * 100)
    compact.mkdir()
    for split in ('train', 'val'):
        np.array([10, 11, 12] * 100, dtype=np.uint16).tofile(compact / f'{split}.bin')
    (compact / 'meta.json').write_text(json.dumps({'tokenizer': 'gpt2', 'id_map': [10, 11]}))
    for folder, phrases in ((chars_dir, ['holds token id 39', 'outside its vocabulary of 10 characters (meta.pkl)']),
                            (gpt2_dir, ['holds token id 60000', "GPT-2's 50,257 BPE tokens"]),
                            (odd, ['an odd number']),
                            (compact, ['holds token id 12', 'the 2 ids of its meta.json id_map'])):
        proc = run_script('train.py', f'--dataset={folder}', f'--out_dir={tmp_path}/out', '--block_size=8')
        assert_one_line_error(proc, *phrases)
    good_chars = tmp_path / 'good'
    nanogpt_char_folder(good_chars, 'abcdefghij' * 50)
    ok_gpt2 = tmp_path / 'ok_gpt2'
    ok_gpt2.mkdir()
    for split in ('train', 'val'):
        np.arange(300, dtype=np.uint16).tofile(ok_gpt2 / f'{split}.bin')
    assert_one_line_error(run_script('train.py', f'--dataset={good_chars}', f'--input_files={ok_gpt2}',
                                     f'--out_dir={tmp_path}/out', '--block_size=8'),
                          'mix character ids and GPT-2 BPE ids')
    assert_one_line_error(run_script('train.py', '--dataset=nosuch', f'--out_dir={tmp_path}/out', cwd=tmp_path),
                          "data folder 'nosuch' not found", 'data/nosuch', 'shakespeare_char')
    assert not (tmp_path / 'out' / 'ckpt.pt').exists()


def test_an_interrupted_first_preparation_leaves_nothing_behind(tmp_path, monkeypatch):
    """Ctrl-C during a bundled folder's first preparation: no half-made folder stays to be taken for a data
    folder; the next run prepares it. And two processes naming it at once: one prepares, the other waits."""
    monkeypatch.setattr(load, 'ROOT', str(tmp_path))
    monkeypatch.chdir(tmp_path)

    def interrupted(path, layout):
        yield '1 2 3'
        raise KeyboardInterrupt
    monkeypatch.setattr(load, 'documents', interrupted)
    with pytest.raises(KeyboardInterrupt):
        load.find_data_folder('3seqs')
    assert os.listdir(tmp_path / 'data') == ['.3seqs.lock']
    monkeypatch.undo()
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import load; load.ROOT = {str(tmp_path)!r}; "
            f"load.read_data_folder(load.find_data_folder('3seqs'))")
    procs = [subprocess.Popen([sys.executable, '-c', code], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum('not prepared yet' in e for e in errs) == 1  # one prepared it, the other found it done


def test_bundled_folders_prepare_themselves(tmp_path, monkeypatch, capsys):
    """A fresh clone has no data/3seqs_compact: naming it prepares it from data/3seqs.txt, with one line saying
    so, byte for byte as data/prepare.py does; the second time it is simply found."""
    monkeypatch.setattr(load, 'ROOT', str(tmp_path))  # prepare into tmp_path/data, not into this checkout
    monkeypatch.chdir(tmp_path)
    folder = load.find_data_folder('3seqs_compact')
    assert folder == str(tmp_path / 'data' / '3seqs_compact')
    line = capsys.readouterr().err.strip()
    assert line.startswith('3seqs_compact: not prepared yet; preparing it from') and '3seqs.txt' in line
    ref = tmp_path / 'ref'
    proc = run_script('data/prepare.py', '--source=data/3seqs.txt', '--compact_vocab=True', f'--out_dir={ref}')
    assert proc.returncode == 0, proc.stderr
    for name in ('train.bin', 'val.bin'):
        assert (ref / name).read_bytes() == (tmp_path / 'data' / '3seqs_compact' / name).read_bytes()
    assert load.find_data_folder('data/3seqs_compact') == os.path.join('data', '3seqs_compact')
    assert capsys.readouterr().err == ''
    vocab, splits = load.read_data_folder(folder)
    assert vocab['name'] == 'gpt2' and len(vocab['id_map']) < 1000 and len(splits['train']) > 5 * len(splits['val'])


def test_prepare_char_writes_nanogpts_layout(tmp_path):
    src = tmp_path / 'text.txt'
    src.write_text(TEXT)
    proc = run_script('data/prepare.py', f'--source={src}', '--tokenizer=char', f'--out_dir={tmp_path}/c')
    assert proc.returncode == 0, proc.stderr
    ref = tmp_path / 'ref'
    chars = nanogpt_char_folder(ref)  # nanoGPT's own prepare, as the test writes it
    for name in ('train.bin', 'val.bin'):
        assert (tmp_path / 'c' / name).read_bytes() == (ref / name).read_bytes()
    assert load.read_meta_pkl(str(tmp_path / 'c' / 'meta.pkl')) == chars
    assert_one_line_error(run_script('data/prepare.py', f'--source={src}', '--tokenizer=chars'),
                          "tokenizer='chars' must be 'gpt2'")
