"""study.py (top-p sweep, overfitting, hyperparameter sweep, attention kinds) on tiny runs, its measures against
plain computations, data/make_mqar.py, train.py's train_tokens, and the course starter's command line
(configurator.py)."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, greedy_reference, run_script

from load import load_model
from study import copied_share, distinct_n, mqar_answers, ngram_keys, recall_accuracy, sample_stats

TINY = ['n_layer=1', 'n_head=2', 'n_embd=32', 'block_size=16', 'batch_size=4', 'eval_iters=4', 'log_interval=5',
        'warmup_iters=5', 'sample_tokens=4', 'dtype=float32']  # (float32: the same numbers on every CPU)


@pytest.fixture(scope='module')
def trained(datasets, tmp_path_factory):
    """A tiny Transformer trained on the compacted stories until its samples look like them."""
    out = tmp_path_factory.mktemp('run') / 'run'
    proc = run_script('train.py', f'--out_dir={out}', f'--dataset={datasets["compact"]}', '--max_iters=60',
                      '--eval_interval=30', '--learning_rate=1e-2', '--device=cpu', *(f'--{s}' for s in TINY))
    assert proc.returncode == 0, proc.stderr
    return str(out)


def test_top_p_study_writes_measures_samples_and_figure(trained):
    proc = run_script('study.py', '--study=top_p', f'--out_dir={trained}', '--top_ps=1e-6,0.5,1.0',
                      '--temperatures=1.0,1.5', '--num_samples=3', '--max_new_tokens=12', '--start=Once upon a time')
    assert proc.returncode == 0, proc.stderr
    result = json.load(open(os.path.join(trained, 'top_p.json')))
    assert open(os.path.join(trained, 'top_p.png'), 'rb').read(4) == b'\x89PNG'
    rows = result['rows']
    assert [(r['temperature'], r['top_p']) for r in rows] == [(t, p) for t in (1.0, 1.5) for p in (1e-6, 0.5, 1.0)]
    for r in rows:
        assert len(r['samples']) == 3 and all(s.startswith('Once upon a time') for s in r['samples'])
        assert 0 < r['distinct_1'] <= 1 and 0 <= r['repeat_4gram'] <= 1 and r['self_perplexity'] >= 1
    # p -> 0 keeps only the likeliest token: every sample is the greedy continuation, at any temperature
    model, tokenizer, _ = load_model('resume', trained)
    prompt = torch.tensor([tokenizer.encode('Once upon a time')])
    greedy = tokenizer.decode(greedy_reference(model.eval(), prompt, 12)[0].tolist())
    assert rows[0]['samples'] == [greedy] * 3 and rows[3]['samples'] == [greedy] * 3
    assert len(set(rows[2]['samples'])) > 1  # p = 1: sampled, so they differ
    assert 'self-ppl' in proc.stdout and greedy[len('Once upon a time'):].replace('\n', ' ')[:40] in proc.stdout


def test_sample_stats_equal_plain_computations(trained):
    model, tokenizer, _ = load_model('resume', trained)
    model.eval()
    ids = tokenizer.encode('Once upon a time')
    stats, seqs = sample_stats(model, ids, 4, 20, 1.0, 1.0, 7)  # 4 + 20 tokens: past block_size 16
    gen = [s[len(ids):] for s in seqs]
    assert stats['distinct_2'] == pytest.approx(np.mean([len(set(zip(g, g[1:]))) / (len(g) - 1) for g in gen]))
    # self-perplexity: each sampled token's probability given the block_size tokens before it, one at a time
    nll = []
    for s in seqs:
        for i in range(len(ids), len(s)):
            context = torch.tensor([s[max(0, i - model.block_size):i]])
            nll.append(-F.log_softmax(model(context)[0][0, -1], -1)[s[i]].item())
    assert stats['self_perplexity'] == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    again, seqs2 = sample_stats(model, ids, 4, 20, 1.0, 1.0, 7)
    assert seqs2 == seqs and again == stats  # the same seed gives the same samples


def test_ngram_measures():
    train = list(range(100)) + [5, 6, 7, 8, 9, 10, 11, 12]
    keys = np.unique(ngram_keys(train, 8))
    assert len(keys) == 100  # 101 8-grams, of which (5..12) twice: no two others collided
    assert copied_share(train[20:40], keys) == 1.0  # recited from the training set
    assert copied_share([99, 98, 97, 96, 95, 94, 93, 92, 91], keys) == 0.0  # new text
    assert copied_share(list(range(10, 18)) + [0], keys) == 0.5  # 2 8-grams: one copied, one not
    assert distinct_n([1, 1, 2, 2], 1) == 0.5


def test_overfitting_study_gap_grows_as_the_training_set_shrinks(datasets, tmp_path):
    study_dir = tmp_path / 'overfit'
    overrides = ' '.join(TINY + [f'dataset={datasets["compact"]}', 'max_iters=60', 'eval_interval=60',
                                 'learning_rate=1e-2'])
    proc = run_script('study.py', '--study=overfitting', '--base=', f'--overrides={overrides}',
                      '--train_tokens=40,20000', f'--study_dir={study_dir}', '--num_samples=4', '--max_new_tokens=24',
                      '--temperature=0.7')
    assert proc.returncode == 0, proc.stderr
    rows = json.load(open(study_dir / 'overfitting.json'))['rows']
    assert (study_dir / 'overfitting.png').read_bytes()[:4] == b'\x89PNG'
    small, large = rows
    assert (small['train_tokens'], large['train_tokens']) == (40, 20000)
    for r in rows:
        _, _, ckpt = load_model('resume', str(study_dir / f"tokens-{r['train_tokens']}"))
        assert ckpt['config']['train_tokens'] == r['train_tokens'] and ckpt['iter_num'] == 60
    # 40 tokens seen 6,000 times: recited from memory, far from the val text
    assert small['train_loss'] < 0.5 and small['gap'] > 1.5 and small['gap'] > large['gap'] + 1
    assert small['copied_8gram'] > large['copied_8gram'] + 0.2  # its samples recite more of what it saw
    assert 'copied-8' in proc.stdout


def test_sweep_study_trains_each_setting_and_overlays_them(datasets, tmp_path):
    study_dir = tmp_path / 'sweep'
    overrides = ' '.join(TINY + [f'dataset={datasets["compact"]}', 'max_iters=10', 'eval_interval=5'])
    proc = run_script('study.py', '--study=sweep', '--base=', f'--overrides={overrides}', f'--study_dir={study_dir}',
                      '--runs=learning_rate=1e-3;learning_rate=1e-2 n_embd=16', '--num_samples=2',
                      '--max_new_tokens=8')
    assert proc.returncode == 0, proc.stderr
    rows = json.load(open(study_dir / 'sweep.json'))['rows']
    assert [r['settings'] for r in rows] == ['learning_rate=1e-3', 'learning_rate=1e-2 n_embd=16']
    assert (study_dir / 'sweep.png').read_bytes()[:4] == b'\x89PNG'
    _, _, a = load_model('resume', rows[0]['run'])
    _, _, b = load_model('resume', rows[1]['run'])
    assert a['config']['learning_rate'] == 1e-3 and a['model_args']['n_embd'] == 32
    assert b['config']['learning_rate'] == 1e-2 and b['model_args']['n_embd'] == 16
    assert rows[0]['val_loss'] != rows[1]['val_loss']


def test_recall_accuracy_counts_answer_tokens_only(tiktoken_cache):
    from load import Tokenizer
    tokenizer = Tokenizer.from_spec(dict(name='gpt2', id_map=None))
    ids, answers = mqar_answers(tokenizer, 'pairs: 3 41 7 52 queries: 7 52 3 41')
    assert [tokenizer.decode([ids[p]]) for p in answers] == [' 52', ' 41']
    assert tokenizer.decode(ids[:answers[0]]) == 'pairs: 3 41 7 52 queries: 7'

    class Lookup(torch.nn.Module):
        """A hand-made model that knows one pair: after ' 7' it says ' 52'; everywhere else ' 41'."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx):
            logits = torch.zeros(*idx.shape, 50257)
            logits[..., tokenizer.encode(' 41')[0]] = 1
            logits[idx == tokenizer.encode(' 7')[0], tokenizer.encode(' 52')[0]] = 2
            return logits, None
    assert recall_accuracy(Lookup(), [(ids, answers)]) == 1.0  # ' 52' after 7, ' 41' after 3
    other = mqar_answers(tokenizer, 'pairs: 3 60 7 52 queries: 3 60 7 52')
    assert recall_accuracy(Lookup(), [other]) == 0.5  # after 3 it says 41, the answer is 60
    # lines of other lengths batch apart; only answers count (the guesses after 'pairs:' are wrong, and ignored)
    short = mqar_answers(tokenizer, 'pairs: 9 60 queries: 9 60')
    assert recall_accuracy(Lookup(), [(ids, answers), short]) == 2 / 3


def test_make_mqar_lines(tmp_path):
    proc = run_script('data/make_mqar.py', '--n_pairs=5', '--n_keys=20', '--n_lines=30', f'--out={tmp_path / "m.txt"}')
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / 'm.txt').read_text().splitlines()
    assert len(lines) == 30
    for line in lines:
        words = line.split()
        assert words[0] == 'pairs:' and words[11] == 'queries:' and len(words) == 22
        pairs = dict(zip(map(int, words[1:11:2]), map(int, words[2:11:2])))
        asked = list(zip(map(int, words[12::2]), map(int, words[13::2])))
        assert len(pairs) == 5 and all(0 <= k < 20 <= v < 40 for k, v in pairs.items())
        assert sorted(asked) == sorted(pairs.items())  # every key asked once, answered with its value
    assert_one_line_error(run_script('data/make_mqar.py', '--n_pairs=30', '--n_keys=20'), 'n_pairs=30 must be between 1')


def test_attention_study_trains_every_kind_and_times_decoding(datasets, tmp_path):
    study_dir = tmp_path / 'att'
    overrides = ' '.join(TINY + [f'dataset={datasets["compact"]}', 'max_iters=4', 'eval_interval=4', 'n_head=2'])
    proc = run_script('study.py', '--study=attention', '--base=', f'--overrides={overrides}', f'--study_dir={study_dir}',
                      '--attention_kinds=softmax,gated_deltanet', '--stories_overrides=', '--recall_pairs=3',
                      '--recall_keys=6', '--recall_lines=300', '--recall_overrides=max_iters=4 block_size=32',
                      '--positions=4,12',
                      '--decode_overrides=--decode_tokens=2 --repeats=1 --attention_n_layer=1 --attention_n_embd=64')
    assert proc.returncode == 0, proc.stderr
    result = json.load(open(study_dir / 'attention.json'))
    assert (study_dir / 'attention.png').read_bytes()[:4] == b'\x89PNG'
    assert result['kinds'] == ['softmax', 'gated_deltanet']
    for kind in result['kinds']:
        _, _, ckpt = load_model('resume', str(study_dir / f'stories-{kind}'))
        assert ckpt['model_args']['attention'] == kind and ckpt['iter_num'] == 4
        assert ckpt['model_args']['short_conv'] == (0 if kind == 'softmax' else 4)  # the linear family's
        assert result['stories'][kind]['val_loss'] > 0 and result['stories'][kind]['tokens_per_s'] > 0
        for n in ('3',):
            _, tokenizer, ckpt = load_model('resume', str(study_dir / f'recall-{n}-{kind}'))
            assert ckpt['model_args']['attention'] == kind and ckpt['config']['tinystories_weight'] == 0.0
            assert 0 <= result['recall'][kind][n]['accuracy'] <= 1
        assert set(result['decode']['ms_per_token'][kind]) == {'4', '12'}
    assert 'recall@3' in proc.stdout and 'gated_deltanet' in proc.stdout


@pytest.mark.parametrize('args, phrases', [
    (['--study=topp'], ["study='topp' is not one of: top_p, overfitting, sweep, attention"]),
    (['--study=attention', '--attention_kinds=mamba'], ["attention_kinds='mamba': give some of softmax"]),
    (['--study=attention', '--recall_pairs=0'], ['recall_pairs=(0,) must be whole numbers from 1']),
    (['--study=attention', '--recall_jobs=0'], ['recall_jobs=0 must be a whole number >= 1']),
    (['--top_ps=0,0.5'], ['top_p']),
    (['--study=sweep', '--runs=--learning_rate=1'], ["is not key=value"]),
    (['--study=sweep', '--runs=;'], ['runs is empty']),
    (['--study=overfitting', '--base=nope.py'], ["base config file 'nope.py' not found"]),
    (['--study=overfitting', '--train_tokens=0'], ['train_tokens=(0,) must be whole numbers >= 1']),
    (['--out_dir=/nonexistent/run'], ['/nonexistent/run']),
])
def test_study_bad_input(args, phrases):
    assert_one_line_error(run_script('study.py', *args), *phrases)


def test_a_failed_run_is_reported_in_one_line(datasets, tmp_path):
    proc = run_script('study.py', '--study=sweep', '--base=', f'--study_dir={tmp_path}',
                      f'--overrides=dataset={datasets["compact"]}', '--runs=block_size=100000')
    assert_one_line_error(proc, 'the run block_size=100000 failed', 'block_size=100000 is longer than the train split')


def test_a_failed_recall_run_ends_the_study_in_one_line(datasets, tmp_path):
    overrides = ' '.join(TINY + [f'dataset={datasets["compact"]}', 'max_iters=2', 'eval_interval=2', 'n_head=2'])
    proc = run_script('study.py', '--study=attention', '--base=', f'--overrides={overrides}', f'--study_dir={tmp_path}',
                      '--attention_kinds=softmax,linear', '--stories_overrides=', '--recall_pairs=3', '--recall_keys=6',
                      '--recall_lines=50', '--recall_overrides=block_size=100000', '--recall_jobs=1')
    assert_one_line_error(proc, 'block_size=100000 attention=softmax', 'failed', 'is longer than the train split')
    assert (tmp_path / 'stories-linear').is_dir() and not (tmp_path / 'recall-3-linear').exists()  # never started


def test_train_tokens_too_few_is_refused(datasets, tmp_path):
    proc = run_script('train.py', f'--out_dir={tmp_path / "r"}', f'--dataset={datasets["compact"]}', '--train_tokens=10',
                      *(f'--{s}' for s in TINY))
    assert_one_line_error(proc, 'block_size=16 is longer than the train split', '(10 tokens)')
    proc = run_script('train.py', f'--out_dir={tmp_path / "r"}', f'--dataset={datasets["compact"]}', '--train_tokens=-5')
    assert_one_line_error(proc, 'train_tokens=-5 must be >= 1')


# -- the course starter's command line ---------------------------------------------------------------------------

def test_the_starters_command_runs(tmp_path):
    """pico-llm.py's own example, with argparse's spellings: --key value, a list of input files, its flag names."""
    (tmp_path / 'seqs.txt').write_text(''.join(' '.join(str(a + i) for i in range(12)) + '\n' for a in range(300)))
    proc = run_script('train.py', '--block_size', '32', '--tinystories_weight', '0.0', '--input_files', 'seqs.txt',
                      '--prompt', '0 1 2 3 4', '--max_steps_per_epoch', '4', '--device_id', 'cpu', '--n_layer', '1',
                      '--n_embd', '32', '--batch_size', '4', '--eval_iters', '2', '--out_dir', 'run', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "note: the starter's --max_steps_per_epoch is --max_iters here" in proc.stderr
    assert "note: the starter's --device_id is --device here" in proc.stderr
    _, tokenizer, ckpt = load_model('resume', str(tmp_path / 'run'))
    cfg = ckpt['config']
    assert (cfg['block_size'], cfg['max_iters'], cfg['device'], cfg['prompt']) == (32, 12, 'cpu', '0 1 2 3 4')
    assert cfg['tinystories_weight'] == 0.0 and cfg['input_files'] == 'seqs.txt' and ckpt['iter_num'] == 12
    assert tokenizer.encode(' 7') and "'0 1 2 3 4" in proc.stdout  # its samples start with the prompt


def test_key_value_spellings_lists_flags_and_config_files(datasets, tmp_path):
    cfg = tmp_path / 'my.py'
    cfg.write_text(f"dataset = {datasets['compact']!r}\nmax_iters = 3\nn_layer = 1\nn_embd = 32\nblock_size = 16\n")
    # a config file, then --key value, a bare bool flag, and several values for a list after one --key
    proc = run_script('train.py', str(cfg), '--batch_size', '2', '--eval_interval', '3', '--eval_iters=2', '--bias',
                      '--input_files', datasets['numbers'], datasets['compact'], '--out_dir', str(tmp_path / 'r'),
                      '--device=cpu')
    assert proc.returncode == 0, proc.stderr
    _, _, ckpt = load_model('resume', str(tmp_path / 'r'))
    c = ckpt['config']
    assert (c['max_iters'], c['n_layer'], c['batch_size'], c['bias']) == (3, 1, 2, True)
    assert c['input_files'] == f"{datasets['numbers']},{datasets['compact']}"
    # the same list with a comma, in another script: plot.py overlays both spellings alike
    a = run_script('plot.py', '--runs', str(tmp_path / 'r'), str(tmp_path / 'r'), f'--out={tmp_path / "a.png"}')
    b = run_script('plot.py', f'--runs={tmp_path / "r"},{tmp_path / "r"}', f'--out={tmp_path / "b.png"}')
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and len(a.stdout.splitlines()) == 1 + 2


@pytest.mark.parametrize('flag, phrases', [
    (['--kgram_chunk_size', '4'], ["--kgram_chunk_size is a flag of the course's starter script",
                                   "From the starter's flags"]),
    (['--monosemantic_enabled'], ['interpret.py --sae=True']),
    (['--block_size'], ['--block_size needs a value']),
    (['--learning_rate', 'fast'], ["learning_rate expects float, got 'fast'"]),
])
def test_starter_flags_without_a_meaning_here_are_refused(flag, phrases):
    assert_one_line_error(run_script('train.py', *flag), *phrases)
