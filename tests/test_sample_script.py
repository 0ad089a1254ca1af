"""sample.py and configurator.py end to end, as a user runs them; checkpoint loading."""
import os
import pickle

import pytest
import tiktoken
import torch
from conftest import assert_one_line_error, run_script

import load
from load import gpt2_encoding, load_model
from model import GPT, GPTConfig

SEP = '---------------'


def samples(stdout):
    return [s.strip('\n') for s in stdout.split(SEP + '\n') if s.strip()]


def hf_greedy_text(hf, prompt, n):
    enc = gpt2_encoding()
    idx = torch.tensor([enc.encode(prompt)])
    with torch.no_grad():
        out = hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return enc.decode(out[0].tolist())


def test_sample_greedy_equals_transformers(hf_tiny):
    folder, hf = hf_tiny
    proc = run_script('sample.py', f'--init_from={folder}', '--start=Once upon a time', '--num_samples=2',
                      '--max_new_tokens=20', '--temperature=0', '--device=cpu')
    assert proc.returncode == 0, proc.stderr
    expected = hf_greedy_text(hf, 'Once upon a time', 20)
    assert samples(proc.stdout) == [expected, expected]


def test_one_sample_streams_the_same_text(hf_tiny):
    folder, hf = hf_tiny
    proc = run_script('sample.py', f'--init_from={folder}', '--start=Once upon a time', '--num_samples=1',
                      '--max_new_tokens=20', '--temperature=0')
    assert proc.returncode == 0, proc.stderr
    assert samples(proc.stdout) == [hf_greedy_text(hf, 'Once upon a time', 20)]


def test_config_file_and_overrides(hf_tiny, tmp_path):
    folder, hf = hf_tiny
    (tmp_path / 'prompt.txt').write_text('The dog')
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(f"init_from = {folder!r}\nnum_samples = 1\nmax_new_tokens = 2 * 6\ntemperature = 0.0\n")
    proc = run_script('sample.py', str(cfg), f'--start=FILE:{tmp_path / "prompt.txt"}', '--top_k=None')
    assert proc.returncode == 0, proc.stderr
    assert samples(proc.stdout) == [hf_greedy_text(hf, 'The dog', 12)]


def test_active_layers_from_the_command_line(hf_tiny):
    """--active_layers=0,2 reaches the script as a tuple through literal_eval; it means blocks 0 and 2."""
    folder, hf = hf_tiny
    outs = []
    for spec in ('--active_layers=0,2', '--active_layers=even', "--active_layers=[0, 2]"):
        proc = run_script('sample.py', f'--init_from={folder}', '--start=Hi', '--num_samples=1',
                          '--max_new_tokens=8', '--temperature=0', spec)
        assert proc.returncode == 0, proc.stderr
        assert 'running blocks [0, 2]' in proc.stderr
        outs.append(proc.stdout)
    assert outs[0] == outs[1] == outs[2]
    for spec, blocks in (('first_half', '[0, 1]'), ('0-1', '[0, 1]'), ('all', '[0, 1, 2]')):  # a prefix is named too
        proc = run_script('sample.py', f'--init_from={folder}', '--start=Hi', '--num_samples=1',
                          '--max_new_tokens=2', f'--active_layers={spec}')
        assert f'running blocks {blocks}' in proc.stderr, proc.stderr


def test_help_lists_every_setting_with_default_and_comment():
    for script, setting in (('prune.py', '--eval_text'), ('data/prepare.py', '--tokenizer')):
        proc = run_script(script, '--help')  # their ALL_CAPS constants (HERE) are not settings
        assert proc.returncode == 0 and '--HERE' not in proc.stdout and setting in proc.stdout, proc.stdout
    proc = run_script('sample.py', '--help')
    assert proc.returncode == 0
    for line in ("--top_p          = None", "--temperature    = 0.8", "--active_layers", "nucleus sampling",
                 "'resume' (out_dir/ckpt.pt)", "--compile        = False"):
        assert line in proc.stdout, proc.stdout


@pytest.mark.parametrize('args,phrases', [
    (['--temprature=0.5'], ["unknown setting 'temprature'", 'did you mean temperature?']),
    (['--temperature=hot'], ['temperature expects float', "'hot'"]),
    (['--num_samples=2.5'], ['num_samples expects int', "'2.5'"]),
    (['--compile=yes'], ['compile expects bool (True/False)', "'yes'"]),
    (['--top_p=high'], ['top_p expects float or None', "'high'"]),
    (['nope/config.py'], ["config file 'nope/config.py' not found"]),
    (['--temperature'], ['--temperature needs a value: --temperature=VALUE or --temperature VALUE']),
    (['temperature=3'], ["expected --key=value, --key value or a config file, got 'temperature=3'"]),
])
def test_configurator_errors(args, phrases):
    assert_one_line_error(run_script('sample.py', *args), *phrases)


def test_config_file_with_unknown_setting(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("max_new_token = 10\n")
    assert_one_line_error(run_script('sample.py', str(cfg)), "unknown setting 'max_new_token'",
                          'did you mean max_new_tokens?')
    cfg.write_text("max_new_tokens = (\n")
    assert_one_line_error(run_script('sample.py', str(cfg)), 'failed at line', 'SyntaxError')


@pytest.mark.parametrize('args,phrases', [
    (['--temperature=-1'], ['temperature=-1.0 must be >= 0']),
    (['--top_k=0'], ['top_k=0 must be >= 1']),
    (['--top_p=0'], ['top_p=0.0 must be in (0, 1]']),
    (['--top_p=1.01'], ['top_p=1.01 must be in (0, 1]']),
    (['--max_new_tokens=-5'], ['max_new_tokens=-5 must be in [0, 1,000,000]']),
    (['--num_samples=0'], ['num_samples=0 must be >= 1']),
    (['--dtype=float8'], ["dtype='float8' is not one of float32, bfloat16, float16"]),
    (['--start=FILE:/no/such/prompt.txt'], ["prompt file '/no/such/prompt.txt': No such file or directory"]),
    (['--init_from=resume', '--out_dir=/no/such/dir'], ["out_dir '/no/such/dir' does not exist"]),
    (['--init_from=/no/such/folder'], ["model folder '/no/such/folder' does not exist"]),
    (['--init_from=gpt2'], ['cannot reach http://127.0.0.1:9', '--init_from=path/to/folder']),
])
def test_setting_validation_errors(args, phrases):
    assert_one_line_error(run_script('sample.py', *args), *phrases)


def test_model_errors(hf_tiny, tmp_path):
    folder, _ = hf_tiny
    assert_one_line_error(run_script('sample.py', f'--init_from={tmp_path}'), 'has no config.json')
    assert_one_line_error(run_script('sample.py', f'--init_from={folder}', '--active_layers=0-3'),
                          'block 3 is out of range, this model has 3 blocks (0-2)', "allowed: None, 'all'")
    trunc = tmp_path / 'trunc'
    trunc.mkdir()
    for name in ('config.json', 'model.safetensors'):
        data = open(os.path.join(folder, name), 'rb').read()
        (trunc / name).write_bytes(data if name == 'config.json' else data[:len(data) // 2])
    assert_one_line_error(run_script('sample.py', f'--init_from={trunc}'), 'model.safetensors',
                          'truncated or corrupt')


def nanogpt_checkpoint(model, compiled=True):
    """A checkpoint as nanoGPT's train.py writes it (keys model/model_args/config; _orig_mod. when compiled)."""
    c = model.config
    prefix = '_orig_mod.' if compiled else ''
    return {'model': {prefix + k: v for k, v in model.state_dict().items()},
            'optimizer': torch.optim.AdamW(model.parameters()).state_dict(),
            'model_args': dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                               bias=c.bias, vocab_size=c.vocab_size, dropout=c.dropout),
            'iter_num': 100, 'best_val_loss': torch.tensor(3.2), 'config': {'dataset': 'openwebtext', 'lr': 6e-4}}


def test_resume_loads_nanogpt_checkpoints(tmp_path):
    torch.manual_seed(0)
    # nanoGPT's own models: no biases, exact GELU, vocabulary padded to 50304
    ref = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, bias=False,
                        activation='gelu')).eval()
    torch.save(nanogpt_checkpoint(ref), tmp_path / 'ckpt.pt')
    model, _, ckpt = load_model('resume', out_dir=str(tmp_path))
    assert model.config.activation == 'gelu' and ckpt['iter_num'] == 100
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], ref(idx)[0])
    proc = run_script('sample.py', '--init_from=resume', f'--out_dir={tmp_path}', '--num_samples=2',
                      '--max_new_tokens=5', '--start=Hi', '--active_layers=1')
    assert proc.returncode == 0, proc.stderr
    assert len(samples(proc.stdout)) == 2 and 'running blocks [1]' in proc.stderr
    # a .pt path works as init_from too
    proc = run_script('sample.py', f'--init_from={tmp_path / "ckpt.pt"}', '--num_samples=1', '--max_new_tokens=3')
    assert proc.returncode == 0, proc.stderr


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls open(marker, 'w'): a checkpoint that runs code
        return (open, (self.marker, 'w'))


def test_checkpoint_that_would_run_code_runs_nothing(tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'model': RunsCode(str(marker)), 'model_args': {}}, tmp_path / 'ckpt.pt')
    line = assert_one_line_error(run_script('sample.py', '--init_from=resume', f'--out_dir={tmp_path}'),
                                 'refused to load', 'would run code')
    assert 'ckpt.pt' in line
    assert not marker.exists()
    # the same through a plain pickle (the legacy format torch.load also reads)
    with open(tmp_path / 'legacy.pt', 'wb') as f:
        pickle.dump({'model': RunsCode(str(marker))}, f)
    assert_one_line_error(run_script('sample.py', f'--init_from={tmp_path / "legacy.pt"}'), 'refused to load')
    assert not marker.exists()


def test_corrupt_and_foreign_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=1, n_embd=8))
    torch.save(nanogpt_checkpoint(model), tmp_path / 'ok.pt')
    data = (tmp_path / 'ok.pt').read_bytes()
    (tmp_path / 'trunc.pt').write_bytes(data[:len(data) // 2])
    assert_one_line_error(run_script('sample.py', f'--init_from={tmp_path / "trunc.pt"}'), 'trunc.pt',
                          'truncated or corrupt')
    torch.save({'weights': 1}, tmp_path / 'other.pt')
    assert_one_line_error(run_script('sample.py', f'--init_from={tmp_path / "other.pt"}'),
                          'is not a training checkpoint')
    assert_one_line_error(run_script('sample.py', f'--init_from={tmp_path / "missing.pt"}'),
                          'missing.pt not found')


def test_tokenizer_offline_fallback_and_error(tmp_path, monkeypatch):
    # an empty cache is seeded from the BPE files in data/: no network needed
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'empty'))
    monkeypatch.setattr(tiktoken.registry, 'ENCODINGS', {})
    assert gpt2_encoding().encode(' dog') == [3290]
    # without those files and without network: one line that says how to fix it
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'empty2'))
    monkeypatch.setattr(tiktoken.registry, 'ENCODINGS', {})
    monkeypatch.setattr(load, 'GPT2_BPE_FILES', [('missing.bpe', 'vocab.bpe', 'merges.txt'),
                                                 ('missing.json', 'encoder.json', 'vocab.json')])

    def offline(*a, **k):
        raise __import__('requests').ConnectionError('no network')
    monkeypatch.setattr(tiktoken.load, 'read_file', offline)
    with pytest.raises(ConnectionError) as e:
        gpt2_encoding()
    assert "tiktoken could not fetch GPT-2's BPE files" in str(e.value) and 'data/gpt2-vocab.bpe' in str(e.value)
