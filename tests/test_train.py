"""data/prepare.py and train.py end to end, on data generated here: loss goes down for every model type,
checkpoints resume exactly, Ctrl-C saves, NaN stops, DDP equals one process, and bad input is refused."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, run_script, story_text

from load import gpt2_encoding, load_model

TINY = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4', '--embed_size=16',
        '--hidden_size=16', '--eval_iters=4', '--log_interval=5', '--learning_rate=3e-3', '--warmup_iters=5',
        '--sample_tokens=4', '--device=cpu']


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.csv')) as f:
        return list(csv.DictReader(f))


def train(out_dir, *args, **kw):
    return run_script('train.py', f'--out_dir={out_dir}', *TINY, *args, **kw)


def test_prepare_downloads_tinystories_from_the_hub(hub, tmp_path):
    """source=tinystories_hub fetches the dataset's train and valid files (resumable, verified, as model
    downloads are) and keeps the dataset's own split."""
    train_text, valid_text = story_text(20, seed=1), story_text(4, seed=2)
    hub.files['datasets/roneneldan/TinyStories/TinyStories-train.txt'] = train_text.encode()
    hub.files['datasets/roneneldan/TinyStories/TinyStories-valid.txt'] = valid_text.encode()
    hub.lfs.add('datasets/roneneldan/TinyStories/TinyStories-train.txt')
    proc = run_script('data/prepare.py', '--source=tinystories_hub', f'--out_dir={tmp_path / "ts"}')
    assert proc.returncode == 0, proc.stderr
    assert [p for p, _ in hub.log if 'resolve' in p] == [
        '/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt',
        '/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt']
    enc = gpt2_encoding()
    meta = json.load(open(tmp_path / 'ts' / 'meta.json'))
    assert (meta['train_documents'], meta['val_documents']) == (20, 4)
    val = np.fromfile(tmp_path / 'ts' / 'val.bin', dtype=np.uint16)
    assert enc.decode(val.tolist()) == valid_text.replace('\n<|endoftext|>\n', '<|endoftext|>')


def test_prepare_documents_lines_and_compact_vocab(datasets):
    enc = gpt2_encoding()
    meta = json.load(open(os.path.join(datasets['compact'], 'meta.json')))
    train_ids = np.fromfile(os.path.join(datasets['compact'], 'train.bin'), dtype=np.uint16)
    val_ids = np.fromfile(os.path.join(datasets['compact'], 'val.bin'), dtype=np.uint16)
    assert meta['id_map'] == sorted(set(train_ids.tolist()) | set(val_ids.tolist()))
    assert meta['val_documents'] == 16 and meta['train_documents'] == 144  # 10% of 160, spread evenly
    assert train_ids[-1] == enc.eot_token and enc.decode(train_ids[:5].tolist()).startswith('Once upon a time')
    assert meta['train_tokens'] == len(train_ids)
    # the text survives the round trip: documents, each followed by <|endoftext|>
    docs = story_text().split('\n<|endoftext|>\n')[:-1]
    train_docs = [d for i, d in enumerate(docs) if int((i + 1) * 0.1) == int(i * 0.1)]
    assert enc.decode(train_ids.tolist()) == ''.join(d + '<|endoftext|>' for d in train_docs)
    full = json.load(open(os.path.join(datasets['full'], 'meta.json')))
    assert full['id_map'] is None and full['vocab_size'] == 50257
    numbers = np.fromfile(os.path.join(datasets['numbers'], 'train.bin'), dtype=np.uint16)
    assert enc.decode(numbers[:13].tolist()) == '0 1 2 3 4 5 6 7 8 9 10 11\n'  # lines: newline-separated


@pytest.mark.parametrize('model_type', ['transformer', 'lstm', 'kgram_mlp'])
def test_training_lowers_the_loss_and_samples_from_the_checkpoint(datasets, tmp_path, model_type):
    out = tmp_path / 'run'
    proc = train(out, f'--dataset={datasets["compact"]}', f'--model_type={model_type}', '--max_iters=60',
                 '--eval_interval=30', '--learning_rate=1e-2')
    assert proc.returncode == 0, proc.stderr
    rows = read_log(out)
    assert list(rows[0]) == ['iter', 'tokens', 'time_s', 'train_loss', 'val_loss', 'lr', 'ms_per_iter', 'tokens_per_s']
    evals = [r for r in rows if r['val_loss']]
    assert [int(r['iter']) for r in evals] == [0, 30, 60]
    assert float(evals[-1]['val_loss']) < 0.6 * float(evals[0]['val_loss'])  # from ~ln(vocab) to far below
    assert all(r['train_loss'] for r in rows)
    steps = [r for r in rows if not r['val_loss']]
    assert [int(r['iter']) for r in steps] == list(range(5, 61, 5)) and int(steps[-1]['tokens']) == 60 * 64
    assert 'greedy:' in proc.stdout and 'top-p 0.95:' in proc.stdout and 'top-p 1.0:' in proc.stdout
    assert (out / 'loss.png').read_bytes()[:4] == b'\x89PNG'
    model, tokenizer, ckpt = load_model('resume', str(out))
    assert ckpt['model_type'] == model_type and ckpt['iter_num'] == 60 and tokenizer.id_map == ckpt['tokenizer']['id_map']
    # sample.py maps the compacted ids back to text
    s = run_script('sample.py', '--init_from=resume', f'--out_dir={out}', '--start=Once upon a time', '--num_samples=2',
                   '--max_new_tokens=12', '--temperature=0')
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith('Once upon a time')
    bad = run_script('sample.py', '--init_from=resume', f'--out_dir={out}', '--start=xylophone quantum')
    assert_one_line_error(bad, 'is not in this model', 'vocabulary')


def test_resume_continues_exactly(datasets, tmp_path):
    """Losses of a run stopped at iteration 20 and resumed equal those of a run that never stopped."""
    common = [f'--dataset={datasets["compact"]}', '--eval_interval=10', '--lr_decay_iters=40', '--dropout=0.1',
              '--log_interval=3']
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert train(full, *common, '--max_iters=40').returncode == 0
    assert train(part, *common, '--max_iters=20').returncode == 0
    proc = train(part, *common, '--max_iters=40', '--init_from=resume')
    assert proc.returncode == 0, proc.stderr
    assert f"resumed {part}/ckpt.pt at iteration 20 (1,280 tokens seen)" in proc.stdout

    def losses(d):
        return [(r['iter'], r['tokens'], r['train_loss'], r['val_loss'], r['lr']) for r in read_log(d)]
    assert losses(part) == losses(full)
    assert len(losses(full)) == 5 + 13  # evaluations at 0, 10, .., 40; log lines at 3, 6, .., 39
    # plot.py overlays the two runs and prints their final numbers
    png = tmp_path / 'compare.png'
    proc = run_script('plot.py', f'--runs={full},{part}', '--labels=never stopped,resumed', f'--out={png}')
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:4] == b'\x89PNG'
    final_val = read_log(full)[-1]['val_loss']
    assert [ln.split()[-3] for ln in proc.stdout.splitlines()[1:]] == [f"{float(final_val):.3f}"] * 2
    assert_one_line_error(run_script('plot.py', f'--runs={full},{tmp_path}/nothing'), 'nothing/log.csv not found')
    assert_one_line_error(run_script('plot.py', f'--runs={full}', '--labels=a,b'), '2 labels for 1 runs')


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(datasets, tmp_path):
    common = [f'--dataset={datasets["compact"]}', '--eval_interval=1000', '--lr_decay_iters=400', '--log_interval=1']
    out = tmp_path / 'run'
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), f'--out_dir={out}', *TINY, *common,
                          '--max_iters=400'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(out / 'log.csv') and len(read_log(out)) > 5):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert 'saved' in err and os.path.exists(out / 'ckpt.pt')
    stopped = torch.load(out / 'ckpt.pt', weights_only=True)['iter_num']
    assert 0 < stopped < 400
    proc = train(out, *common, f'--max_iters={stopped + 5}', '--init_from=resume')
    assert proc.returncode == 0, proc.stderr
    ref = tmp_path / 'ref'
    assert train(ref, *common, f'--max_iters={stopped + 5}').returncode == 0
    assert [r['train_loss'] for r in read_log(out)] == [r['train_loss'] for r in read_log(ref)]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(datasets, tmp_path):
    out = tmp_path / 'run'
    assert train(out, f'--dataset={datasets["compact"]}', '--max_iters=10', '--eval_interval=10').returncode == 0
    before = (out / 'ckpt.pt').read_bytes()
    proc = train(out, f'--dataset={datasets["compact"]}', '--max_iters=40', '--eval_interval=10', '--init_from=resume',
                 '--learning_rate=1e12', '--grad_clip=0', '--warmup_iters=0')
    assert_one_line_error(proc, 'the loss became', 'keeps the last good state', 'lower learning_rate')
    assert (out / 'ckpt.pt').read_bytes() == before


def test_ddp_with_two_processes_equals_one_process(datasets, tmp_path):
    """torchrun with 2 CPU processes (gloo), one micro-batch each, takes the same steps as one process with
    two micro-batches: the same batches, gradients averaged the same way."""
    common = [f'--dataset={datasets["compact"]}', '--max_iters=10', '--eval_interval=10', '--log_interval=2',
              '--gradient_accumulation_steps=2']
    one = tmp_path / 'one'
    assert train(one, *common).returncode == 0
    two = tmp_path / 'two'
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(ROOT, 'train.py'), f'--out_dir={two}', *TINY, *common],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'on 2 processes' in proc.stdout
    a, b = read_log(one), read_log(two)
    assert [r['iter'] for r in a] == [r['iter'] for r in b]
    for ra, rb in zip(a, b):
        for key in ('train_loss', 'val_loss'):
            if ra[key]:
                assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-4), (ra, rb)


def test_mixing_sources_logs_each_validation_split(datasets, tmp_path):
    out = tmp_path / 'mix'
    proc = train(out, f'--dataset={datasets["compact"]}', f'--input_files={datasets["numbers"]}',
                 '--tinystories_weight=0.5', '--max_iters=20', '--eval_interval=20')
    assert proc.returncode == 0, proc.stderr
    rows = read_log(out)
    assert 'val_loss_compact' in rows[0] and 'val_loss_numbers' in rows[0]
    last = rows[-1]
    mixed = 0.5 * float(last['val_loss_compact']) + 0.5 * float(last['val_loss_numbers'])
    assert float(last['val_loss']) == pytest.approx(mixed, rel=1e-5)
    _, tokenizer, _ = load_model('resume', str(out))
    assert tokenizer.encode('7 8 9') and tokenizer.encode('Once upon a time, Lily saw the cat.')  # one vocabulary


def test_finetune_gpt2_weights(datasets, hf_tiny, tmp_path):
    folder, _ = hf_tiny
    out = tmp_path / 'ft'
    proc = train(out, f'--dataset={datasets["full"]}', '--model_type=gpt2', f'--pretrained={folder}', '--max_iters=20',
                 '--eval_interval=20', '--learning_rate=1e-3')
    assert proc.returncode == 0, proc.stderr
    evals = [r for r in read_log(out) if r['val_loss']]
    assert float(evals[-1]['val_loss']) < float(evals[0]['val_loss'])
    model, tokenizer, _ = load_model('resume', str(out))
    assert model.config.block_size == 16 and tokenizer.id_map is None
    assert train(out, f'--dataset={datasets["full"]}', '--model_type=gpt2', '--max_iters=25', '--eval_interval=20',
                 '--init_from=resume').returncode == 0


def test_bad_input(datasets, tmp_path):
    d = datasets['compact']
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    assert_one_line_error(run_script('data/prepare.py', f'--source={tmp_path}/none.txt'),
                          f"source file '{tmp_path}/none.txt' not found")
    assert_one_line_error(run_script('data/prepare.py', f'--source={empty}'), 'is empty')
    assert_one_line_error(train(tmp_path / 'o', f'--dataset={d}', '--block_size=100000'),
                          'block_size=100000 is longer than the', 'lower block_size')
    assert_one_line_error(train(tmp_path / 'o', f'--dataset={d}', '--model_type=rnn'),
                          "model_type='rnn' is not one of: transformer, lstm, kgram_mlp, gpt2")
    assert_one_line_error(train(tmp_path / 'o', f'--dataset={tmp_path}'), 'has no train.bin')
    assert_one_line_error(train(tmp_path / 'o', f'--dataset={tmp_path}/nothing'), 'not found')
    txt = train(tmp_path / 'txt', f'--dataset={datasets["stories.txt"]}', '--max_iters=2', '--eval_interval=2')
    assert txt.returncode == 0 and 'stories.txt: not prepared yet; preparing it from' in txt.stderr, txt.stderr
    assert_one_line_error(train(tmp_path / 'none', f'--dataset={d}', '--init_from=resume'), 'does not exist')
    # a checkpoint, then a resume with another architecture, another vocabulary, and a corrupt file
    out = tmp_path / 'run'
    assert train(out, f'--dataset={d}', '--max_iters=5', '--eval_interval=5').returncode == 0
    before = (out / 'ckpt.pt').read_bytes()
    assert_one_line_error(train(out, f'--dataset={d}', '--init_from=resume', '--n_layer=2', '--n_embd=64'),
                          'another architecture or vocabulary', 'n_layer=1 (settings: 2)', 'n_embd=32 (settings: 64)')
    assert_one_line_error(train(out, f'--dataset={datasets["full"]}', '--init_from=resume'),
                          'vocab_size=', "vocabulary (GPT-2's BPE, ", "(compacted); the data's: GPT-2's BPE, 50257 tokens)")
    assert (out / 'ckpt.pt').read_bytes() == before  # nothing written over
    (out / 'ckpt.pt').write_bytes(before[:len(before) // 3])
    assert_one_line_error(train(out, f'--dataset={d}', '--init_from=resume'), 'truncated or corrupt')


def test_architecture_options_are_stored_and_checked_on_resume(datasets, tmp_path):
    """The research variants' options (model.py's GPTConfig) go into the checkpoint: sample.py and resume
    rebuild the same model, and resuming with other options is refused, naming each differing field."""
    d, out = datasets['compact'], tmp_path / 'variant'
    opts = ['--pos_emb=rope', '--attention=gla', '--norm_position=post', '--chunk_size=4']
    assert train(out, f'--dataset={d}', *opts, '--max_iters=5', '--eval_interval=5').returncode == 0
    config = load_model('resume', str(out))[0].config
    assert (config.pos_emb, config.attention, config.norm_position, config.chunk_size) == ('rope', 'gla', 'post', 4)
    proc = run_script('sample.py', '--init_from=resume', f'--out_dir={out}', '--start=Once upon a time',
                      '--max_new_tokens=5', '--num_samples=1')
    assert proc.returncode == 0, proc.stderr
    proc = train(out, f'--dataset={d}', *opts, '--max_iters=8', '--eval_interval=4', '--init_from=resume')
    assert proc.returncode == 0, proc.stderr
    assert_one_line_error(train(out, f'--dataset={d}', '--pos_emb=learned', '--attention=linear',
                                '--norm_position=post', '--chunk_size=4', '--init_from=resume'),
                          "attention='gla' (settings: 'linear')", "pos_emb='rope' (settings: 'learned')")


def start_training(out_dir, *args, **popen):
    """train.py as a background process, returned once it has printed its first line (the loop is starting)."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), f'--out_dir={out_dir}', *TINY, *args],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        while 'tokens per iteration' not in (line := p.stdout.readline()):  # (after "resumed ..." when resuming)
            assert line, p.stderr.read()
    except BaseException:
        p.kill()  # never leave a training running behind a failed test
        raise
    return p


def test_ctrl_c_after_the_loss_became_nan_keeps_the_last_good_checkpoint(datasets, tmp_path):
    """The loss turns NaN between two loss checks and then the user presses Ctrl-C: the NaN weights are not
    saved over the good checkpoint, and the run says so."""
    out = tmp_path / 'run'
    assert train(out, f'--dataset={datasets["compact"]}', '--max_iters=20', '--eval_interval=20').returncode == 0
    before = (out / 'ckpt.pt').read_bytes()
    p = start_training(out, f'--dataset={datasets["compact"]}', '--init_from=resume', '--learning_rate=1e9',
                       '--warmup_iters=0', '--grad_clip=0', '--log_interval=100000', '--eval_interval=100000',
                       '--max_iters=1000000')
    time.sleep(3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(('overriding', 'SIGINT'))]
    assert len(lines) == 1 and 'not saved' in lines[0] and 'NaN' in lines[0] and 'keeps the last good state' in lines[0]
    assert (out / 'ckpt.pt').read_bytes() == before


def test_sigterm_saves_like_ctrl_c(datasets, tmp_path):
    out = tmp_path / 'run'
    p = start_training(out, f'--dataset={datasets["compact"]}', '--eval_interval=1000', '--max_iters=100000')
    time.sleep(2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert 'SIGTERM: saving a checkpoint' in err and 'saved' in err
    assert 0 < torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] < 100000


def test_ctrl_c_under_torchrun_saves(datasets, tmp_path):
    """Ctrl-C in a terminal reaches torchrun and its workers together, and torchrun then sends its workers
    SIGTERM: the workers agree on the iteration to stop at, and rank 0 saves. README's command, with its
    gradient_accumulation_steps=1, runs on 2 processes (rounded up to one micro-batch each)."""
    out = tmp_path / 'ddp'
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          os.path.join(ROOT, 'train.py'), f'--out_dir={out}', *TINY, f'--dataset={datasets["compact"]}',
                          '--eval_interval=1000', '--max_iters=100000', '--log_interval=1'],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(out / 'log.csv') and len(read_log(out)) > 3):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = p.communicate(timeout=120)
    assert 'rounded up to 2' in err
    assert 'saved' in err, err[-2000:]
    assert 3 < torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] < 100000


def test_a_scratch_run_does_not_overwrite_a_run(datasets, tmp_path):
    out = tmp_path / 'run'
    assert train(out, f'--dataset={datasets["compact"]}', '--max_iters=5', '--eval_interval=5').returncode == 0
    before = (out / 'ckpt.pt').read_bytes()
    assert_one_line_error(train(out, f'--dataset={datasets["compact"]}', '--max_iters=5'),
                          f"out_dir '{out}' holds a run already (ckpt.pt)", '--init_from=resume continues it',
                          '--overwrite=True')
    assert (out / 'ckpt.pt').read_bytes() == before
    proc = train(out, f'--dataset={datasets["compact"]}', '--max_iters=6', '--eval_interval=6', '--overwrite=True')
    assert proc.returncode == 0, proc.stderr
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 6
    (tmp_path / 'afile').write_text('notes')
    assert_one_line_error(train(tmp_path / 'afile', f'--dataset={datasets["compact"]}'), 'is a file')
    assert (tmp_path / 'afile').read_text() == 'notes'


def test_disk_full_while_saving_keeps_the_old_checkpoint(datasets, tmp_path):
    """Files may grow to a limit smaller than the checkpoint (as a full disk would stop them): the save fails
    with one line, the old checkpoint is intact and no temporary file is left behind."""
    import resource
    out = tmp_path / 'run'
    assert train(out, f'--dataset={datasets["compact"]}', '--max_iters=5', '--eval_interval=5').returncode == 0
    before = (out / 'ckpt.pt').read_bytes()
    limit = len(before) // 2

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), f'--out_dir={out}', *TINY,
                           f'--dataset={datasets["compact"]}', '--init_from=resume', '--max_iters=10',
                           '--eval_interval=5'], cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files,
                          timeout=120)
    line = assert_one_line_error(proc, f'could not write {out}/ckpt.pt', 'it keeps the last saved state')
    assert (out / 'ckpt.pt').read_bytes() == before
    assert sorted(os.listdir(out)) == ['.lock', 'ckpt.pt', 'log.csv', 'loss.png'], line
