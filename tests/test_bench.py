"""bench.py runs (its figures are measurements, not tested; what it prints and compares is)."""
import re

from conftest import run_script


def test_train_bench_reports_every_model_against_nanogpt_over_processes():
    proc = run_script('bench.py', '--bench=train', '--train_sizes=char', '--train_steps=1', '--repeats=1',
                      '--train_rounds=2')
    assert proc.returncode == 0, proc.stderr
    assert 'median of 2 processes' in proc.stdout
    for name in ('nanoGPT math', 'ours (GPT)', 'ours (GPT, loss as before)', 'ours (TransformerModel, RMSNorm)'):
        assert re.search(re.escape(name) + r'\s+[\d,]+ tokens/s\s+\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)', proc.stdout), \
            proc.stdout
    assert re.search(r'nanoGPT math\s+[\d,]+ tokens/s\s+1\.00x \(1\.00-1\.00\)', proc.stdout)
