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


def test_decode_bench_reports_a_failing_llama_bench_and_goes_on(tmp_path):
    # a llama.cpp build can die on this CPU (SIGILL in the prompt test on a Xeon VM): its figure is n/a, the table
    # still prints and bench.py exits 0
    import json
    import signal
    import stat

    from transformers import GPT2Config, GPT2LMHeadModel
    weights = tmp_path / 'weights'
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=64)).save_pretrained(weights)
    (weights / 'gpt2-q8_0.gguf').write_bytes(b'')  # already converted: the fake binary never reads it
    binary = tmp_path / 'llama' / 'build' / 'bin' / 'llama-bench'
    binary.parent.mkdir(parents=True)
    rows = json.dumps([{'n_gen': 100, 'avg_ts': 123.4}])
    # generation (-p 0) works; prompt processing (-n 0) is killed by SIGILL as the native build was there
    binary.write_text(f"#!/bin/sh\ncase \"$*\" in *'-n 0'*) echo 'illegal instruction' >&2; kill -ILL $$;; esac\n"
                      f"echo '{rows}'\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    proc = run_script('bench.py', '--bench=decode', '--engines_list=llama.cpp-Q8_0', '--repeats=1',
                      '--accuracy_prompts=0', '--new_tokens=100', f'--weights={weights}',
                      f'--llama_cpp={binary.parent.parent.parent}', env={})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"llama.cpp-Q8_0: llama-bench -p 512 -n 0 failed (signal {int(signal.SIGILL)})" \
        in proc.stdout, proc.stdout
    lines = proc.stdout.splitlines()
    b1 = lines.index(next(line for line in lines if line.startswith('batch 1')))
    assert re.match(r'\s+llama.cpp-Q8_0\s+123\.4\s', lines[b1 + 1]), proc.stdout
    ttft = lines.index(next(line for line in lines if line.startswith('time to first token')))
    assert re.match(r'\s+llama.cpp-Q8_0\s+n/a\s', lines[ttft + 1]), proc.stdout
