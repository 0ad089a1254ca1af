"""probe_embeddings.py and prune.py on tiny random models, against tiktoken, numpy and transformers."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, block_matplotlib, run_script, script_functions

from load import gpt2_encoding

TEXT = ("The cat sat on the mat. A dog ran after the ball in the park, and the children laughed. "
        "Science is the study of the natural world; a city is a large town. She loved the old book. ") * 12


def wte_rows(hf):
    return hf.transformer.wte.weight.detach().double().numpy()


def test_probe_ids_pieces_norms_cosines(hf_tiny, tmp_path):
    folder, hf = hf_tiny
    out = tmp_path / 'probe.json'
    proc = run_script('probe_embeddings.py', f'--init_from={folder}', f'--out_json={out}', '--neighbours=3')
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert set(res) >= {'words', 'cosine', 'vocab'}
    enc = gpt2_encoding()
    W = wte_rows(hf)
    norms = np.linalg.norm(W, axis=1)
    assert len(res['words']) == 20  # 10 words x 2 forms
    for r in res['words']:
        assert set(r) >= {'word', 'group', 'form', 'ids', 'pieces', 'norm', 'norm_percentile', 'neighbours'}
        text = ' ' + r['word'] if r['form'] == 'space' else r['word']
        assert r['ids'] == enc.encode(text)
        assert r['pieces'] == [enc.decode([i]) for i in r['ids']]
        assert r['norm'] == pytest.approx(norms[r['ids'][0]], rel=1e-5)  # subtoken='first'
        assert r['norm_percentile'] == pytest.approx(100 * np.mean(norms <= r['norm'] * (1 + 1e-7)), abs=0.01)
        v = W[r['ids'][0]]
        cos = W @ v / (norms * np.linalg.norm(v))
        cos[r['ids']] = -2
        assert [n['id'] for n in r['neighbours']] == list(np.argsort(-cos)[:3])
    dog = next(r for r in res['words'] if r['word'] == 'dog' and r['form'] == 'space')
    assert dog['ids'] == [3290] and dog['pieces'] == [' dog']
    assert next(r for r in res['words'] if r['word'] == 'uvuvwevwe')['n_pieces'] > 1
    # cosine matrices of the ' word' form, in word order
    for group, words in (('common', ['dog', 'city', 'book', 'love', 'science']),
                         ('rare', ['xqzt', 'blorpt', 'thraldor', 'uvuvwevwe', 'zzzzz'])):
        V = np.stack([W[enc.encode(' ' + w)[0]] for w in words])
        V = V / np.linalg.norm(V, axis=1, keepdims=True)
        assert np.allclose(res['cosine'][group], V @ V.T, atol=1e-5)
        off = (V @ V.T)[~np.eye(5, dtype=bool)].mean()
        assert res['cosine'][f'mean_offdiag_{group}'] == pytest.approx(off, abs=1e-5)
    assert res['vocab']['norm_mean'] == pytest.approx(norms.mean(), rel=1e-5)
    assert res['vocab']['norm_std'] == pytest.approx(norms.std(ddof=1), rel=1e-4)
    ranks = np.argsort(np.argsort(norms))
    rho = np.corrcoef(np.arange(len(norms)), ranks)[0, 1]
    assert res['vocab']['spearman_id_norm'] == pytest.approx(rho, abs=1e-6)
    header = proc.stdout.split('cosine similarity, rare words')[1].splitlines()[1]
    assert header.split() == ['xqzt', 'blorpt', 'thraldor', 'uvuvwevwe', 'zzzzz']  # whole words, however long
    assert 'mean off-diagonal cosine' in proc.stdout


def test_probe_mean_of_pieces_and_plot(hf_tiny, tmp_path):
    folder, hf = hf_tiny
    out, png = tmp_path / 'probe.json', tmp_path / 'probe.png'
    proc = run_script('probe_embeddings.py', f'--init_from={folder}', '--subtoken=mean', '--words_common=dog',
                      '--words_rare=blorpt,xqzt', f'--out_json={out}', f'--plot={png}')
    assert proc.returncode == 0, proc.stderr
    W = wte_rows(hf)
    for r in json.loads(out.read_text())['words']:
        assert r['norm'] == pytest.approx(np.linalg.norm(W[r['ids']].mean(axis=0)), rel=1e-5)
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_probe_errors(hf_tiny, tmp_path):
    folder, _ = hf_tiny
    assert_one_line_error(run_script('probe_embeddings.py', f'--init_from={folder}', '--words_rare= , '),
                          'words_rare is empty')
    assert_one_line_error(run_script('probe_embeddings.py', f'--init_from={folder}', '--subtoken=last'),
                          "subtoken='last' must be 'first' or 'mean'")
    assert_one_line_error(run_script('probe_embeddings.py', f'--init_from={folder}', f'--plot={tmp_path}/p.png',
                                     env=block_matplotlib(tmp_path)), 'plot needs matplotlib', 'pip install matplotlib')


def hf_reference_loss(hf, tokens, block_size, stride):
    """transformers' perplexity recipe (its guide, 'Perplexity of fixed-length models'): windows of
    block_size tokens every stride tokens; labels -100 except the new tokens of each window."""
    nll, count, prev_end = 0.0, 0, 0
    ids = torch.tensor([tokens])
    for begin in range(0, len(tokens), stride):
        end = min(begin + block_size, len(tokens))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=labels, use_cache=False).loss
        n_valid = (labels[:, 1:] != -100).sum().item()
        nll += loss.item() * n_valid
        count += n_valid
        prev_end = end
        if end == len(tokens):
            break
    assert count == len(tokens) - 1  # every token after the first, once
    return nll / count


def test_prune_losses_equal_transformers(hf_tiny, tmp_path):
    folder, hf = hf_tiny
    text = tmp_path / 'eval.txt'
    text.write_text(TEXT)
    out = tmp_path / 'prune.json'
    proc = run_script('prune.py', f'--init_from={folder}', '--configs=all; even', f'--eval_text={text}',
                      '--eval_stride=12', '--max_new_tokens=10', '--num_samples=2', f'--out_json={out}',
                      '--start=The cat')
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    tokens = gpt2_encoding().encode(TEXT)
    even = copy.deepcopy(hf)
    even.transformer.h = torch.nn.ModuleList([even.transformer.h[i] for i in (0, 2)])
    even.config.n_layer = 2
    for r, ref in zip(res['configs'], (hf, even)):
        assert set(r) >= {'spec', 'layers', 'params', 'loss', 'perplexity', 'tokens_per_s', 'samples', 'distinct_1',
                          'distinct_2', 'distinct_3', 'repeat_4gram'}
        assert r['loss'] == pytest.approx(hf_reference_loss(ref, tokens, 32, 12), rel=1e-5)
        assert r['perplexity'] == pytest.approx(math.exp(r['loss']))
        assert r['params'] == sum(p.numel() for p in ref.parameters())
        assert len(r['samples']) == 2 and all(s.startswith('The cat') for s in r['samples'])
    assert [r['layers'] for r in res['configs']] == [[0, 1, 2], [0, 2]]
    assert 'all' in proc.stdout and '=== sample 1' in proc.stdout


def test_prune_sweep_and_logit_lens_agree_with_configs(hf_tiny, tmp_path):
    """Dropping block 1 is the 'even' selection of a 3-block model; the lens after the last block is the
    model's own loss, and after block 1 it is the first_half selection's loss."""
    folder, _ = hf_tiny
    text = tmp_path / 'eval.txt'
    text.write_text(TEXT)
    out, png = tmp_path / 'prune.json', tmp_path / 'prune.png'
    proc = run_script('prune.py', f'--init_from={folder}', '--configs=all;even;first_half', f'--eval_text={text}',
                      '--max_new_tokens=5', '--num_samples=1', '--sweep=True', '--logit_lens=True',
                      f'--out_json={out}', f'--plot={png}')
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert '1 sample x 5 tokens' in proc.stderr
    loss = {r['spec']: r['loss'] for r in res['configs']}
    assert [s['dropped'] for s in res['sweep']] == [0, 1, 2]
    assert res['sweep'][1]['loss'] == pytest.approx(loss['even'], rel=1e-6)
    assert res['sweep'][1]['increase'] == pytest.approx(loss['even'] - loss['all'], abs=1e-6)
    assert [r['after_block'] for r in res['logit_lens']] == [-1, 0, 1, 2]
    assert res['logit_lens'][-1]['loss'] == pytest.approx(loss['all'], rel=1e-6)
    assert res['logit_lens'][2]['loss'] == pytest.approx(loss['first_half'], rel=1e-6)
    assert png.read_bytes()[:4] == b'\x89PNG'


def test_repetition_measures_on_hand_made_tokens():
    from study import distinct_n, repeat_4gram
    assert distinct_n([1, 2, 3, 4], 1) == 1.0
    assert distinct_n([1, 1, 1, 1], 1) == 0.25
    assert distinct_n([1, 2, 1, 2, 1], 2) == 2 / 4  # (1,2) (2,1) (1,2) (2,1)
    assert distinct_n([1, 2, 3, 1, 2, 3], 3) == 3 / 4
    assert distinct_n([1, 2], 3) == 0.0
    assert repeat_4gram([1, 2, 3, 4, 5, 6, 7, 8]) == 0.0
    assert repeat_4gram([1, 2, 3, 4, 9, 1, 2, 3, 4]) == 8 / 9  # two copies of (1,2,3,4); the 9 is outside
    assert repeat_4gram([7, 7, 7, 7, 7]) == 1.0  # (7,7,7,7) twice, overlapping
    assert repeat_4gram([5, 1, 2, 3, 4, 1, 2, 3, 4, 6]) == 8 / 10


def test_windows_score_every_token_once():
    (windows,) = script_functions('prune.py', 'windows')
    for n, bs, stride in [(100, 32, 16), (100, 32, 31), (33, 32, 1), (10, 32, 16), (2, 4, 2)]:
        scored = []
        for begin, end, k in windows(n, bs, stride):
            assert end - begin <= bs and k >= 1
            scored += range(end - k, end)
        assert scored == list(range(1, n))


def test_prune_errors(hf_tiny, tmp_path):
    folder, _ = hf_tiny
    assert_one_line_error(run_script('prune.py', f'--init_from={folder}', '--configs=all;0-7'),
                          'configs:', 'block 3 is out of range', "allowed: None, 'all'")
    assert_one_line_error(run_script('prune.py', f'--init_from={folder}', '--configs=all;bogus'),
                          "cannot read 'bogus'")
    assert_one_line_error(run_script('prune.py', f'--init_from={folder}', f'--eval_text={tmp_path}/none.txt'),
                          f"eval_text '{tmp_path}/none.txt' not found")
    assert_one_line_error(run_script('prune.py', f'--init_from={folder}', '--configs= ; '), 'configs is empty')
    assert_one_line_error(run_script('prune.py', f'--init_from={folder}', '--eval_stride=32'),
                          'eval_stride=32 must be in [1, block_size) = [1, 32)')
    assert_one_line_error(run_script('prune.py', f'--init_from={folder}', f'--plot={tmp_path}/p.png',
                                     env=block_matplotlib(tmp_path)), 'plot needs matplotlib')


def test_prune_and_sample_with_int8_weights(hf_tiny, tmp_path):
    """--dtype=int8 (fast_cpu.quantize_int8) in prune.py and sample.py: the same parameter count, a loss within
    int8's rounding of float32's, and samples."""
    folder, _ = hf_tiny
    text = tmp_path / 'eval.txt'
    text.write_text(TEXT)
    res = {}
    for dtype in ('float32', 'int8'):
        out = tmp_path / f'{dtype}.json'
        proc = run_script('prune.py', f'--init_from={folder}', '--configs=all;even', f'--eval_text={text}',
                          '--max_new_tokens=8', '--num_samples=2', f'--out_json={out}', f'--dtype={dtype}', '--device=cpu')
        assert proc.returncode == 0, proc.stderr
        res[dtype] = json.loads(out.read_text())['configs']
    for f, q in zip(res['float32'], res['int8']):
        assert q['params'] == f['params'] and q['layers'] == f['layers']
        assert q['loss'] == pytest.approx(f['loss'], rel=0.02)
    proc = run_script('sample.py', f'--init_from={folder}', '--dtype=int8', '--start=The cat', '--num_samples=2',
                      '--max_new_tokens=5', '--device=cpu')
    assert proc.returncode == 0 and proc.stdout.startswith('The cat'), proc.stderr
    assert_one_line_error(run_script('prune.py', f'--init_from={folder}', '--dtype=int4'), "dtype='int4' is not one of")
