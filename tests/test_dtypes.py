"""Half-precision weights and the fast CPU inference paths: same answers as float32, every loader and
active_layers still working after .to(dtype), and the compiled decoding step with its fallback."""
import copy
import inspect
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import fast_cpu
from conftest import ROOT, greedy_reference
from fast_cpu import CPULinear
from load import load_model
from model import GPT, GPTConfig

HALF = [torch.float16, torch.bfloat16]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('dtype', [torch.float32] + HALF)
@pytest.mark.parametrize('rows', [1, 5, 40])
@pytest.mark.parametrize('kernel', list(CPULinear.KERNELS))
def test_linear_paths_equal_f_linear(dtype, rows, kernel):
    """Every CPU inference kernel CPULinear can pick (F.linear, oneDNN, float16 upcast for many rows, our
    float_linear) computes what F.linear computes in float64, and the one kernel_choice picks is one of them."""
    name = str(dtype).removeprefix('torch.')
    if not fast_cpu._can_run(kernel, name, rows > 16):
        pytest.skip(f"{kernel} is not a candidate for {name} here")
    torch.manual_seed(0)
    lin = CPULinear(96, 40).to(dtype)
    x = torch.randn(1, rows, 96).to(dtype)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    with torch.no_grad():
        picked = lin(x)
        lin.kernel = kernel
        out = lin(x)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert kernel_choice_ran_one_of(picked, CPULinear.KERNELS, x, lin)


def kernel_choice_ran_one_of(picked, kernels, x, lin):
    return any(torch.equal(picked, k(x, lin.weight, lin.bias)) for n, k in kernels.items()
               if fast_cpu._can_run(n, str(x.dtype).removeprefix('torch.'), x.numel() > 16 * x.size(-1)))


@pytest.mark.parametrize('dtype', HALF)
def test_half_precision_logits_close_to_float32(hf_plain, dtype):
    folder, _ = hf_plain
    full = fast_cpu.optimize(GPT.from_pretrained(folder).eval())
    half = fast_cpu.optimize(copy.deepcopy(full).to(dtype))
    idx = torch.randint(0, 50257, (3, 24))
    with torch.no_grad():
        ref, out = full(idx)[0][:, -1], half(idx)[0][:, -1]
    assert out.dtype == dtype
    assert rel_err(out, ref) < 0.02


@pytest.mark.parametrize('dtype', [torch.float32] + HALF)
def test_kv_cache_greedy_equals_recompute_in_every_dtype(hf_tiny, dtype):
    folder, _ = hf_tiny
    model = fast_cpu.optimize(GPT.from_pretrained(folder).eval().to(dtype))
    idx = torch.randint(0, 50257, (2, 5))
    out = model.generate(idx, 40, temperature=0)  # past block_size (32) too
    assert torch.equal(out, greedy_reference(model, idx, 40))
    assert model.transformer.h[0].attn.cache is None  # freed after generation


@pytest.mark.parametrize('dtype', HALF)
def test_active_layers_and_loaders_after_to_dtype(hf_plain, tmp_path, dtype):
    folder, hf = hf_plain
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        ref_even = GPT.from_pretrained(folder, active_layers='even').eval()(idx)[0]
        pruned = fast_cpu.optimize(GPT.from_pretrained(folder, active_layers='even').eval().to(dtype))
        assert rel_err(pruned(idx)[0], ref_even) < 0.02
        later = fast_cpu.optimize(GPT.from_pretrained(folder).eval().to(dtype)).prune_layers('even')  # prune after
        assert later.layer_ids == [0, 2] and rel_err(later(idx)[0], ref_even) < 0.02
    # a checkpoint, loaded and cast, generates like its float32 self
    model = GPT.from_pretrained(folder)
    torch.save({'model': model.state_dict(), 'model_args': vars(model.config), 'model_type': 'gpt'}, tmp_path / 'ckpt.pt')
    loaded, _, _ = load_model('resume', str(tmp_path), active_layers='0-1')
    loaded = fast_cpu.optimize(loaded.eval().to(dtype))
    assert loaded.lm_head.weight.dtype == dtype and loaded.transformer.wte.weight is loaded.lm_head.weight
    out = loaded.generate(idx, 10, temperature=0)
    assert out.shape == (1, 22)


def test_compile_decode_generates_the_same_tokens(hf_tiny, monkeypatch):
    folder, _ = hf_tiny
    model = fast_cpu.optimize(GPT.from_pretrained(folder).eval())
    idx = torch.randint(0, 50257, (1, 6))
    ref = model.generate(idx, 40, temperature=0)  # past block_size (32): the cache is refilled
    assert fast_cpu.compile_decode(model, probe=False), "compiling failed: is a C++ compiler installed?"
    compiles, graphs = [], torch._dynamo.utils.counters['stats']['unique_graphs']
    aoti = torch._inductor.aoti_compile_and_package
    monkeypatch.setattr(torch._inductor, 'aoti_compile_and_package', lambda *a, **k: compiles.append(a) or aoti(*a, **k))
    assert torch.equal(model.generate(idx, 40, temperature=0), ref)
    # another prompt length and token count run the same step: compiling again would cost seconds per sample
    model.generate(idx[:, :3], 7, temperature=0)
    # and another model of the same shape loads the step compiled for the first (cache_dir())
    again = fast_cpu.optimize(GPT.from_pretrained(folder).eval())
    assert fast_cpu.compile_decode(again, probe=False)
    assert torch.equal(again.generate(idx, 40, temperature=0), ref)
    assert compiles == [] and torch._dynamo.utils.counters['stats']['unique_graphs'] == graphs
    # the compiled step reads the weights in place: after a cast it refuses in one line, it reads no freed memory
    again.double()
    with pytest.raises(RuntimeError, match="weights were moved or cast after compiling"):
        again.generate(idx, 3, temperature=0)
    with torch.no_grad():  # the one-token step is the compiled one, and equals the eager forward
        model.setup_cache(1, 8)
        model(idx[:, :4], start_pos=0)
        compiled = model(idx[:, 4:5], start_pos=4)[0]
        model.setup_cache(1, 8)
        GPT.forward(model, idx[:, :4], start_pos=0)
        eager = GPT.forward(model, idx[:, 4:5], start_pos=4)[0]
        model.setup_cache(None, None)
    assert rel_err(compiled, eager) < 1e-4


@pytest.mark.parametrize('attention,fastest_alone,fastest_in_step', [
    ('softmax', 'ours', 'ours'), ('softmax', 'ours', None), ('softmax', 'F.linear', None), ('softmax', 'ours', 'fails'),
    ('linear', 'ours', 'ours'), ('linear', 'ours', None)])
def test_compile_decode_times_its_one_row_matmuls_inside_the_step(monkeypatch, capsys, tmp_path, attention,
                                                                  fastest_alone, fastest_in_step):
    """Where float_linear is this machine's fastest kernel for one float16 row alone (kernel_choice), compile_decode
    compiles the step twice, with it (a custom op inside the graph) and with inductor's multiply-and-sum
    (one_row_matmul), times both (here: an injected timing) and decodes with the faster, saying so in one line:
    what wins alone can lose inside a step (README "Speed"). The ranking is kept, so the next model of that shape
    compiles only the winner. Where F.linear wins alone, only the multiply-and-sum is compiled; where ours fails
    to compile inside the step, the multiply-and-sum's step is kept. Steps equal eager's logits."""
    if fast_cpu.kernels() is None:
        pytest.skip("no C++ compiler for KERNELS_CPP here")
    winner = None if fastest_in_step == 'fails' else fastest_in_step
    choice = fast_cpu.kernel_choice
    monkeypatch.setattr(fast_cpu, 'kernel_choice', lambda dtype, rows: (fastest_alone, 'F.linear') if (
        dtype, rows) == ('float16', 1) else choice(dtype, rows))
    monkeypatch.setattr(fast_cpu, 'cache_dir', lambda: str(tmp_path))  # (no ranking kept from another test)
    kernels_in_step = lambda m: {x.step_kernel for x in m.modules() if isinstance(x, CPULinear)}
    monkeypatch.setattr(fast_cpu, 'decode_seconds', lambda m, tokens=6: 0.01 if kernels_in_step(m) == {winner} else 0.03)
    traced = set()  # what the compiled steps' graphs hold: float_linear (ours), or one_row_matmul's multiply-and-sum
    ours, one_row_matmul = CPULinear.KERNELS['ours'], fast_cpu.one_row_matmul

    def traced_ours(*a):
        if torch.compiler.is_compiling():
            traced.add('ours')
            if fastest_in_step == 'fails':
                raise RuntimeError('no such op in this graph')
        return ours(*a)
    monkeypatch.setattr(CPULinear, 'KERNELS', {**CPULinear.KERNELS, 'ours': traced_ours})
    monkeypatch.setattr(fast_cpu, 'one_row_matmul', lambda *a: traced.add(None) or one_row_matmul(*a))
    ran = []  # the kernel each compiled step that ran was compiled with (each maker tags the step it returns)
    compiling = {}

    def tagged(make):
        def made(*a):
            kernel, step = kernels_in_step(compiling['model']), make(*a)
            return lambda *b: ran.append(kernel) or step(*b)
        return made
    monkeypatch.setattr(fast_cpu, 'aot_step', tagged(fast_cpu.aot_step))
    monkeypatch.setattr(fast_cpu, 'dynamo_step', tagged(fast_cpu.dynamo_step))
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, n_embd=32, n_head=2, n_layer=2, block_size=24, attention=attention)
    idx = torch.randint(0, 97, (1, 5))

    def step_logits(model):  # (the logits of the sixth token's step, after a five-token prompt)
        with torch.no_grad():
            model.setup_cache(1, 8)
            model(idx, start_pos=0)
            logits = model(idx[:, -1:], start_pos=5)[0]
            model.setup_cache(None, None)
        return logits

    def compiled_model():
        torch.manual_seed(0)
        compiling['model'] = model = fast_cpu.cast(GPT(config).eval(), 'float16', 'cpu')
        ref = step_logits(model)
        assert fast_cpu.compile_decode(model, probe=False), "compiling failed: is a C++ compiler installed?"
        ran.clear()
        assert kernels_in_step(model) == {winner} and rel_err(step_logits(model), ref) < 1e-2
        assert ran == [{winner}]  # (the winner's step decodes, not merely its flag set)
        return capsys.readouterr().err
    err = compiled_model()
    if fastest_alone == 'ours':
        assert traced == {'ours', None}
        assert ('using ' + str(winner or 'one_row_matmul') in err) == (fastest_in_step != 'fails')
    else:
        assert traced == {None} and 'timed the compiled step' not in err
    traced.clear()
    assert 'timed the compiled step' not in compiled_model()
    assert traced == {winner}


@pytest.mark.parametrize('attention,pos_emb', [('softmax', 'rope'), ('linear', 'none'), ('gla', 'rope')])
def test_compile_decode_works_for_every_attention_kind(attention, pos_emb):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_embd=32, n_head=2, n_layer=2, block_size=24, bias=False, norm='rmsnorm',
                          activation='gelu', attention=attention, pos_emb=pos_emb)).eval()
    fast_cpu.optimize(model)
    idx = torch.randint(0, 97, (1, 5))
    ref = model.generate(idx, 30, temperature=0)
    assert fast_cpu.compile_decode(model, probe=False), "compiling failed: is a C++ compiler installed?"
    assert torch.equal(model.generate(idx, 30, temperature=0), ref)


def test_compile_decode_falls_back_without_a_compiler(hf_tiny, monkeypatch, capsys, tmp_path):
    folder, _ = hf_tiny
    model = fast_cpu.optimize(GPT.from_pretrained(folder).eval())
    idx = torch.randint(0, 50257, (1, 6))
    ref = model.generate(idx, 10, temperature=0)

    def no_compiler(fn, **kw):
        def fail(*a, **k):
            raise RuntimeError('no C++ compiler found')
        return fail
    monkeypatch.setattr(fast_cpu.torch, 'compile', no_compiler)
    monkeypatch.setattr(fast_cpu.torch._inductor, 'aoti_compile_and_package', no_compiler(None))
    monkeypatch.setattr(fast_cpu, 'cache_dir', lambda: str(tmp_path))  # (nothing compiled: the step is not there)
    assert fast_cpu.compile_decode(model) is False
    assert 'compiling is not available here (RuntimeError); decoding runs uncompiled' in capsys.readouterr().err
    assert torch.equal(model.generate(idx, 10, temperature=0), ref)


@pytest.mark.parametrize('compiled_ms,eager_ms,kept', [(30, 10, False), (10, 30, True)])
def test_compile_decode_keeps_the_compiled_step_only_where_it_is_faster(hf_tiny, monkeypatch, capsys, compiled_ms,
                                                                        eager_ms, kept):
    """The probe times the compiled and the eager step on this machine; told (here, by an injected timing) that
    the compiled one is slower, it keeps eager decoding and says so in one line."""
    folder, _ = hf_tiny
    model = fast_cpu.optimize(GPT.from_pretrained(folder).eval())
    idx = torch.randint(0, 50257, (1, 6))
    ref = model.generate(idx, 10, temperature=0)
    # (the eager step is the model's own method; the compiled one is compile_decode's function)
    monkeypatch.setattr(fast_cpu, 'decode_seconds', lambda m: (eager_ms if inspect.ismethod(m.forward) else
                                                               compiled_ms) / 1e3)
    assert fast_cpu.compile_decode(model) is kept
    err = capsys.readouterr().err
    assert ('the compiled step is slower on this CPU' in err and 'decoding runs uncompiled' in err) is not kept, err
    assert ('forward' in vars(model)) is kept
    assert torch.equal(model.generate(idx, 10, temperature=0), ref)


# -- int8 weights (fast_cpu.quantize_int8) ------------------------------------------------------------------------

@pytest.mark.parametrize('rows', [1, 7, 80])
@pytest.mark.parametrize('kernel', list(fast_cpu.Int8Linear.KERNELS))
def test_int8_linear_is_the_dequantized_matmul(rows, kernel):
    """Int8Linear computes x @ (q * scale)^T + b, q the per-output-channel int8 weight (symmetric, |q| <= 127),
    through every kernel it can pick: int8 activations (ours, AVX2 or AVX-512, weights packed), PyTorch's int8
    kernel on bfloat16 activations, or the weight dequantized to bfloat16 or float32."""
    if not fast_cpu._can_run(kernel, 'int8', rows > 16):
        pytest.skip(f"{kernel} is not a candidate here")
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 42)  # (42: two rows past the last group of 4 that pack_rows packs)
    q = fast_cpu.Int8Linear(lin, packed=kernel.startswith('ours'))
    q.kernel = kernel
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    scale = lin.weight.detach().abs().amax(1) / 127
    assert torch.equal(q.row_order_weight(), (lin.weight.detach() / scale[:, None]).round().to(torch.int8))
    x = torch.randn(1, rows, 96)
    with torch.no_grad():
        out = q(x)
    ref = F.linear(x.double(), q.row_order_weight().double() * q.scale.double()[:, None], lin.bias.double())
    assert out.dtype == torch.float32 and out.shape == (1, rows, 42)
    # int8 activations (per block of 32) or bfloat16 ones; float32 is exact
    assert rel_err(out, ref) < (1e-6 if kernel == 'dequantized float32' else 1e-2)
    assert rel_err(out, lin(x)) < 2e-2  # and the float layer's answer, within int8's rounding
    with pytest.raises(RuntimeError, match='inference only'):
        q(x)  # gradients on: training an int8 model is refused


ISAS = {0: 'plain C++', 1: 'AVX2', 2: 'AVX-512 with VNNI'}  # KERNELS_CPP's isa argument


def kernels_with(isa):
    ops = fast_cpu.kernels()
    assert ops is not None, "fast_cpu's C++ kernels did not compile: is a C++ compiler installed?"
    if ops.isa() < isa:
        pytest.skip(f"this CPU has no {ISAS[isa]}")
    return ops


@pytest.mark.parametrize('isa', list(ISAS))
def test_int8_activation_kernel_equals_its_integer_reference_exactly(isa):
    """KERNELS_CPP's int8_linear (its AVX-512, AVX2 and plain C++ loops) is an integer matmul: with activations
    that are whole numbers and 127 in every block of 32, the block scales are 1 and the result must be exact;
    and its quantizer is round(x * 127 / max|x|) per block (identity weights give the dequantized input back)."""
    ops, simd = kernels_with(isa), isa
    torch.manual_seed(0)
    for n, k in [(50, 64), (3, 96), (257, 768)]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        x = torch.randint(-127, 128, (3, k)).float()
        x[:, ::32] = 127
        y = ops.int8_linear(x, fast_cpu.pack_rows(w), torch.ones(n), None, simd)
        assert torch.equal(y, (x.long() @ w.long().t()).float())
        bias = torch.randn(n)
        assert torch.equal(ops.int8_linear(x, fast_cpu.pack_rows(w), torch.ones(n), bias, simd), y + bias)
        assert torch.equal(fast_cpu.unpack_rows(fast_cpu.pack_rows(w)), w)
    x = torch.randn(4, 64) * 3
    amax = x.view(-1, 32).abs().amax(1, keepdim=True)
    q = (x.view(-1, 32) * (127 / amax)).round()
    y = ops.int8_linear(x, fast_cpu.pack_rows(torch.eye(64, dtype=torch.int8)), torch.ones(64), None, simd)
    assert torch.equal(y.view(-1, 32), q * (amax / 127))
    if isa == 2:  # the AVX-512 loop adds the same int32 sums in the same order as the AVX2 one: equal bits
        w, x = torch.randint(-127, 128, (42, 96), dtype=torch.int8), torch.randn(5, 96)
        scale, bias = torch.rand(42), torch.randn(42)
        assert torch.equal(ops.int8_linear(x, fast_cpu.pack_rows(w), scale, bias, 2),
                           ops.int8_linear(x, fast_cpu.pack_rows(w), scale, bias, 1))


@pytest.mark.parametrize('isa', list(ISAS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_float_kernel_equals_f_linear_at_every_isa(isa, dtype):
    """KERNELS_CPP's float_linear at each vector ISA computes F.linear in float64's values, also where the
    input width is not a multiple of the vector's 16 columns (the AVX-512 loop's masked last step) and the
    rows are not a multiple of the 4 it reads at a time."""
    ops = kernels_with(isa)
    torch.manual_seed(0)
    for n, k, rows in [(42, 40, 1), (7, 24, 3), (3072, 768, 1)]:
        w, b, x = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype), torch.randn(rows, k).to(dtype)
        y = ops.float_linear(x, w, b, isa)
        assert y.dtype == dtype and rel_err(y, F.linear(x.double(), w.double(), b.double())) < (
            1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize('isa', [0, 1])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_one_query_attention_equals_sdpa(isa, dtype):
    """KERNELS_CPP's one_query_attention (AVX2 and plain C++ loops) is SDPA's softmax(q k^T / sqrt(D)) v in
    float64's values, reading a float16 cache as it is, on slices of a longer cache as a decoding step passes
    them, for one position and many; and the decoding-step wrapper gives SDPA's answer where it cannot run it."""
    ops = kernels_with(isa)
    torch.manual_seed(0)
    for B, H, L, D in [(2, 3, 1, 64), (1, 12, 7, 64), (2, 2, 300, 24), (1, 2, 5, 12)]:  # (D 12: the plain loop)
        k_cache, v_cache = torch.randn(2, B, H, L + 9, D).to(dtype)
        q = torch.randn(B, H, 1, D)
        k, v = k_cache[:, :, :L], v_cache[:, :, :L]
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert rel_err(ops.one_query_attention(q, k, v, isa), ref) < 1e-6
        assert rel_err(fast_cpu.one_query_attention(q, k, v), ref) < 1e-6
        assert rel_err(fast_cpu.one_query_attention(q.double(), k.double(), v.double()), ref) < 1e-12  # (SDPA)


def test_attention_choice_is_measured_and_decides_the_decoding_attention(monkeypatch, tmp_path, capsys):
    """attention_choice times our one-query attention against SDPA here (made slow, SDPA comes last), says so in
    one line and keeps the ranking on disk; a decoding step's attention runs our kernel only where it ranks
    first."""
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    kernels_with(1)
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: (time.sleep(0.002), sdpa(*a, **k))[1])
    assert fast_cpu.attention_choice.__wrapped__() == ('ours', 'SDPA')
    line = capsys.readouterr().err
    assert line.count('\n') == 1 and 'timed one-query attention' in line and 'using ours' in line
    monkeypatch.setattr(F, 'scaled_dot_product_attention', None)  # (measuring again would fail)
    assert fast_cpu.attention_choice.__wrapped__() == ('ours', 'SDPA') and capsys.readouterr().err == ''
    model = fast_cpu.optimize(GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)).eval())
    assert model.transformer.h[0].attn.one_query_attention is fast_cpu.one_query_attention
    calls = []
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: (calls.append(1), sdpa(*a, **k))[1])
    for ranking, sdpa_calls in [(('ours', 'SDPA'), 0), (('SDPA', 'ours'), 1)]:
        monkeypatch.setattr(fast_cpu, 'attention_choice', lambda: ranking)
        calls.clear()
        model.generate(torch.zeros(1, 4, dtype=torch.long), 2, temperature=0)  # (a prefill, then one step)
        assert len(calls) == 1 + sdpa_calls


def test_kernel_choice_is_measured_and_kept_per_machine(monkeypatch, tmp_path, capsys):
    """kernel_choice ranks the kernels by their measured time here (a kernel made slow comes last), says so
    in one line, and keeps the ranking on disk: a later process reads it and measures nothing."""
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    slow = dict(CPULinear.KERNELS)
    slow['F.linear'] = lambda x, w, b: (time.sleep(0.002), F.linear(x, w, b))[1]
    monkeypatch.setattr(CPULinear, 'KERNELS', slow)
    ranking = fast_cpu.kernel_choice.__wrapped__('float32', 1)
    assert ranking[-1] == 'F.linear' and set(ranking) == {n for n in slow if fast_cpu._can_run(n, 'float32', False)}
    line = capsys.readouterr().err
    assert line.count('\n') == 1 and 'timed the float32 matmul kernels for one row' in line and ranking[0] in line
    monkeypatch.setattr(fast_cpu, '_probe_layers', None)  # (measuring again would fail)
    assert fast_cpu.kernel_choice.__wrapped__('float32', 1) == ranking and capsys.readouterr().err == ''


def test_without_a_cpp_compiler_int8_and_float_run_on_pytorchs_kernels(tmp_path):
    """Where no C++ compiler works (CXX names none here), fast_cpu says so in one line and quantize_int8,
    optimize and generate work on PyTorch's own kernels."""
    code = ("import torch, fast_cpu; from model import GPT, GPTConfig; torch.manual_seed(0);"
            "m = GPT(GPTConfig(vocab_size=64, n_embd=32, n_head=2, n_layer=1, block_size=16));"
            "q = fast_cpu.optimize(fast_cpu.quantize_int8(GPT(m.config).eval()));"
            "assert not q.lm_head.packed and fast_cpu.kernels() is None;"
            "print(q.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0).shape)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, 'CXX': str(tmp_path / 'no-compiler'), 'TORCH_EXTENSIONS_DIR': str(tmp_path)})
    assert out.returncode == 0 and out.stdout.strip() == 'torch.Size([1, 6])', out.stderr
    lines = [line for line in out.stderr.splitlines() if 'no C++ kernels' in line]
    assert len(lines) == 1 and "PyTorch's own kernels are used" in lines[0], out.stderr


def test_int8_logits_close_to_float32_and_every_loader_works(hf_plain, tmp_path):
    folder, _ = hf_plain
    full = fast_cpu.optimize(GPT.from_pretrained(folder).eval())
    int8 = fast_cpu.optimize(fast_cpu.quantize_int8(GPT.from_pretrained(folder).eval()))
    assert int8.lm_head.weight.dtype == torch.int8 and int8.transformer.wte.weight.dtype == torch.float32
    idx = torch.randint(0, 50257, (3, 24))
    with torch.no_grad():
        assert rel_err(int8(idx)[0][:, -1], full(idx)[0][:, -1]) < 0.03
        pruned = fast_cpu.quantize_int8(GPT.from_pretrained(folder, active_layers='even').eval())
        ref_even = GPT.from_pretrained(folder, active_layers='even').eval()(idx)[0]
        assert pruned.layer_ids == [0, 2] and rel_err(pruned(idx)[0], ref_even) < 0.03
    model = GPT.from_pretrained(folder)
    torch.save({'model': model.state_dict(), 'model_args': vars(model.config), 'model_type': 'gpt'}, tmp_path / 'ckpt.pt')
    loaded, _, _ = load_model('resume', str(tmp_path))
    loaded = fast_cpu.optimize(fast_cpu.quantize_int8(loaded.eval()))
    with torch.no_grad():
        assert rel_err(loaded(idx)[0][:, -1], full(idx)[0][:, -1]) < 0.03


def test_int8_kv_cache_greedy_equals_recompute_and_compiled(hf_tiny, monkeypatch):
    # one int8 kernel for every row count (the one-row choice, not a bfloat16 or float32 matmul for many rows),
    # so that greedy tokens can be compared exactly, whatever this CPU is
    choice = fast_cpu.kernel_choice
    monkeypatch.setattr(fast_cpu, 'kernel_choice', lambda dtype, rows: choice(dtype, 1))
    folder, _ = hf_tiny
    model = fast_cpu.optimize(fast_cpu.quantize_int8(GPT.from_pretrained(folder).eval()))
    idx = torch.randint(0, 50257, (2, 5))
    out = model.generate(idx, 40, temperature=0)  # past block_size (32) too
    with torch.no_grad():
        assert torch.equal(out, greedy_reference(model, idx, 40))
    def second_token_logits():
        with torch.no_grad():
            model.setup_cache(1, 4)
            model(idx[:1, :1], start_pos=0)
            logits = model(idx[:1, 1:2], start_pos=1)[0]
            model.setup_cache(None, None)
        return logits
    eager = second_token_logits()
    assert fast_cpu.compile_decode(model, probe=False), "compiling failed: is a C++ compiler installed?"
    if model.lm_head.packed:  # the compiled step calls the same int8-activation kernel (the norms and GELU
        # around it are inductor's C++ loops, which round differently from ATen's: measured 2.7e-7)
        assert rel_err(second_token_logits(), eager) < 1e-5
    else:  # the compiled one-row matmul takes float32 activations, PyTorch's int8 kernel bfloat16 ones
        assert rel_err(second_token_logits(), eager) < 1e-2


def test_attention_in_float32_holds_under_bfloat16_autocast(monkeypatch):
    """train.py's CPU bfloat16 training: attention_in_float32 makes every attention product float32 although
    autocast would cast it to bfloat16, and the loss and gradients stay those of the bfloat16 run, closely."""
    from model import GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, bias=False))
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    sdpa, seen = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: seen.append(sdpa(*a, **k)) or seen[-1])

    def loss_and_grads():
        seen.clear()
        with torch.autocast('cpu', torch.bfloat16):
            loss = model(x, y)[1]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss, grads, [t.dtype for t in seen]
    loss, grads, dtypes = loss_and_grads()
    assert dtypes == [torch.bfloat16] * 2
    fast_cpu.attention_in_float32(model)
    loss32, grads32, dtypes = loss_and_grads()
    assert dtypes == [torch.float32] * 2
    assert torch.allclose(loss32, loss, rtol=1e-2)
    for g, g32 in zip(grads, grads32):
        assert ((g32 - g).norm() / g.norm()).item() < 0.05


def vma_of(address):
    """The fields of /proc/self/smaps for the mapping that holds address."""
    fields, inside = {}, False
    with open('/proc/self/smaps') as f:
        for line in f:
            head = line.split()[0]
            if '-' in head and not head.endswith(':'):
                start, end = (int(a, 16) for a in head.split('-'))
                inside = start <= address < end
            elif inside:
                fields[head.rstrip(':')] = line.split()[1]
    return fields


@pytest.mark.parametrize('dtype', ['float32', 'int8'])
def test_huge_pages_move_the_weights_and_change_no_output(dtype, monkeypatch):
    """optimize() puts every weight of 2 MB or more in memory marked for 2 MB pages (THPeligible in the
    kernel's own account), keeps GPT's tied embedding and output layer one tensor, and changes no logit."""
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            if '[never]' in f.read():
                pytest.skip("transparent huge pages are off in this kernel")
    except OSError:
        pytest.skip("no transparent huge pages here (not Linux)")
    torch.manual_seed(0)

    def model():
        m = GPT(GPTConfig(block_size=16, vocab_size=16384, n_layer=1, n_head=2, n_embd=128)).eval()  # wte: 8 MB
        return fast_cpu.quantize_int8(m) if dtype == 'int8' else m  # (int8: its own output layer of 2 MB)
    moved, plain = fast_cpu.optimize(model()), model()
    with monkeypatch.context() as m:
        m.setattr(fast_cpu, 'huge_pages', lambda model: model)
        fast_cpu.optimize(plain)
    idx = torch.randint(0, 16384, (1, 8))
    with torch.no_grad():
        before = plain(idx)[0]
        state = {k: v.clone() for k, v in plain.state_dict().items()}
        fast_cpu.huge_pages(plain)
        after = plain(idx)[0]
    for model in (moved, plain):
        for t in (model.transformer.wte.weight, model.lm_head.weight):
            assert t.data_ptr() % fast_cpu.HUGE_PAGE == 0 and vma_of(t.data_ptr()).get('THPeligible') == '1'
        small = model.transformer.h[0].mlp.c_fc.weight  # 128 KB (int8: 64 KB): where it was
        assert small.data_ptr() % fast_cpu.HUGE_PAGE or vma_of(small.data_ptr()).get('THPeligible') != '1'
        if dtype == 'float32':
            assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    assert torch.equal(after, before)


def test_a_short_prompt_has_a_ranking_of_its_own(monkeypatch):
    """One row, 2-16 rows and more are three rankings (float16's F.linear wins at one row, loses 2x at 16):
    CPULinear and Int8Linear ask kernel_choice for the probe's row count, and any other count is refused."""
    asked, choice = [], fast_cpu.kernel_choice
    monkeypatch.setattr(fast_cpu, 'kernel_choice', lambda dtype, rows: (asked.append(rows), ('F.linear',))[1])
    lin = CPULinear(32, 8)
    with torch.no_grad():
        for n in (1, 2, 16, 17, 40):
            lin(torch.randn(n, 32))
    assert asked == [1, 16, 16, 128, 128]
    with pytest.raises(ValueError, match='one of 1, 16, 128'):
        choice.__wrapped__('float32', 5)
