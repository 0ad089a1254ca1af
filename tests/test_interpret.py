"""interpret.py: attention maps for every attention kind, and the sparse autoencoder with its report."""
import json

import pytest
import torch
from conftest import assert_one_line_error, block_matplotlib, run_script
from conftest import story_text

from model import GPT, GPTConfig, KGramMLPSeqModel, LSTMSeqModel


def checkpoint(tmp_path, model, model_type, model_args):
    torch.save({'model': model.state_dict(), 'model_args': model_args, 'model_type': model_type}, tmp_path / 'ckpt.pt')
    return str(tmp_path)


@pytest.mark.parametrize('attention', ['softmax', 'linear', 'gla', 'gated_deltanet'])
def test_attention_maps(tmp_path, attention):
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, attention=attention, pos_emb='rope')
    out = checkpoint(tmp_path, GPT(GPTConfig(**args)), 'transformer', args)
    png = tmp_path / 'attn.png'
    proc = run_script('interpret.py', f'--out_dir={out}', f'--attention_png={png}', '--prompt=The cat sat on the mat.')
    assert proc.returncode == 0, proc.stderr
    assert 'wrote' in proc.stderr and '2 layers x 2 heads, 7 tokens' in proc.stderr
    assert png.read_bytes()[:4] == b'\x89PNG'


@pytest.fixture(scope='module')
def stories(tmp_path_factory):
    path = tmp_path_factory.mktemp('sae') / 'stories.txt'
    path.write_text(story_text(400, seed=3))
    return str(path)


def test_sae_on_the_residual_stream(hf_tiny, stories, tmp_path):
    folder, _ = hf_tiny
    report, page = tmp_path / 'sae.json', tmp_path / 'features.html'
    proc = run_script('interpret.py', f'--init_from={folder}', '--attention_png=None', '--sae=True', '--sae_layer=1',
                      f'--sae_data={stories}', '--sae_tokens=4000', '--sae_eval_tokens=1000', '--sae_features=128',
                      '--sae_epochs=20', '--sae_batch=256', '--sae_l1=1e-3', '--top_features=5',
                      f'--out_json={report}', f'--sae_html={page}')
    assert proc.returncode == 0, proc.stderr
    m = json.loads(report.read_text())
    assert m['where'] == 'the residual stream after block 1'
    assert 0.5 < m['variance_explained'] <= 1.0  # it reconstructs ...
    assert 0 < m['mean_l0'] < 64  # ... from a minority of its 128 features
    assert 0 <= m['dead_feature_share'] < 0.5
    # splicing the reconstruction in costs far less than replacing the activations by their mean
    assert m['loss_increase'] < 0.5 * (m['loss_mean_ablation'] - m['loss']), m
    assert 'sae step' in proc.stderr and 'variance explained' in proc.stdout
    text = page.read_text()
    assert text.startswith('<!DOCTYPE html>') and text.count('<h2>feature') == 5 and '<style>' in text


def test_sae_on_an_lstm_hidden_state(stories, tmp_path):
    torch.manual_seed(0)
    args = dict(vocab_size=50257, embed_size=16, hidden_size=24)
    out = checkpoint(tmp_path, LSTMSeqModel(**args), 'lstm', args)
    proc = run_script('interpret.py', f'--out_dir={out}', '--sae=True', f'--sae_data={stories}', '--sae_tokens=2000',
                      '--sae_eval_tokens=600', '--sae_features=48', '--sae_epochs=5', f'--sae_html={tmp_path}/f.html',
                      f'--attention_png={tmp_path}/a.png', f'--out_json={tmp_path}/m.json')
    assert proc.returncode == 0, proc.stderr
    assert 'no attention maps: a LSTMSeqModel has no attention' in proc.stderr
    assert json.loads((tmp_path / 'm.json').read_text())['where'] == "the LSTM's hidden state"


def test_interpret_errors(hf_tiny, stories, tmp_path):
    folder, _ = hf_tiny
    assert_one_line_error(run_script('interpret.py', f'--init_from={folder}', '--attention_png=None', '--sae=True',
                                     f'--sae_data={stories}', '--sae_layer=3'),
                          'sae_layer=3 is out of range: this model has 3 blocks (0-2, or -1)')
    assert_one_line_error(run_script('interpret.py', f'--init_from={folder}', '--sae=True', '--sae_data=/no/data'),
                          'sae_data:', "data folder '/no/data' not found", 'or give a text file')
    short = tmp_path / 'short.txt'
    short.write_text('Once upon a time there was a cat.')  # fewer tokens than two windows of 32
    assert_one_line_error(run_script('interpret.py', f'--init_from={folder}', '--attention_png=None', '--sae=True',
                                     f'--sae_data={short}', '--sae_tokens=10', '--sae_eval_tokens=4'),
                          'the SAE needs at least two windows of 32 tokens')
    args = dict(vocab_size=50257, k=2, embed_size=8, num_inner_layers=1)
    out = checkpoint(tmp_path, KGramMLPSeqModel(**args), 'kgram_mlp', args)
    assert_one_line_error(run_script('interpret.py', f'--out_dir={out}', '--attention_png=None', '--sae=True',
                                     f'--sae_data={stories}'), "not a KGramMLPSeqModel")
    assert_one_line_error(run_script('interpret.py', f'--init_from={folder}', f'--attention_png={tmp_path}/a.png',
                                     env=block_matplotlib(tmp_path)), 'attention maps need matplotlib')


def test_attention_maps_and_sae_with_int8_weights(hf_tiny, stories, tmp_path):
    folder, _ = hf_tiny
    report = tmp_path / 'sae.json'
    proc = run_script('interpret.py', f'--init_from={folder}', '--dtype=int8', '--device=cpu', '--sae=True',
                      f'--attention_png={tmp_path / "a.png"}', f'--sae_data={stories}', '--sae_tokens=2000',
                      '--sae_eval_tokens=500', '--sae_features=64', '--sae_epochs=2', f'--out_json={report}',
                      f'--sae_html={tmp_path / "f.html"}')
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / 'a.png').read_bytes()[:4] == b'\x89PNG'
    assert json.loads(report.read_text())['loss'] > 0
