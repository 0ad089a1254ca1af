"""Half-precision weights and the fast CPU inference paths: same answers as float32, every loader and
active_layers still working after .to(dtype), and the compiled decoding step with its fallback."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

import fast_cpu
from conftest import greedy_reference
from fast_cpu import CPULinear
from load import load_model
from model import GPT, GPTConfig

HALF = [torch.float16, torch.bfloat16]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('dtype', [torch.float32] + HALF)
@pytest.mark.parametrize('rows', [1, 5])
def test_linear_paths_equal_f_linear(dtype, rows):
    """Every CPU inference kernel CPULinear picks (oneDNN, float16's one-row kernel, float16 upcast for many
    rows) computes what F.linear computes in float64."""
    torch.manual_seed(0)
    lin = CPULinear(96, 40).to(dtype)
    x = torch.randn(1, rows, 96).to(dtype)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    with torch.no_grad():
        out = lin(x)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


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


def test_compile_decode_generates_the_same_tokens(hf_tiny):
    folder, _ = hf_tiny
    model = fast_cpu.optimize(GPT.from_pretrained(folder).eval())
    idx = torch.randint(0, 50257, (1, 6))
    ref = model.generate(idx, 40, temperature=0)  # past block_size (32): the cache is refilled
    torch._dynamo.reset()  # (no graph of an earlier test's model to reuse: the count below starts clean)
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
    assert fast_cpu.compile_decode(model, probe=False), "torch.compile failed: is a C++ compiler installed?"
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == graphs + 1  # the step, compiled once
    graphs += 1
    assert torch.equal(model.generate(idx, 40, temperature=0), ref)
    # another prompt length and token count run the same graph: compiling again would cost seconds per sample
    model.generate(idx[:, :3], 7, temperature=0)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == graphs
    with torch.no_grad():  # the one-token step is the compiled one, and equals the eager forward
        model.setup_cache(1, 8)
        model(idx[:, :4], start_pos=0)
        compiled = model(idx[:, 4:5], start_pos=4)[0]
        model.setup_cache(1, 8)
        GPT.forward(model, idx[:, :4], start_pos=0)
        eager = GPT.forward(model, idx[:, 4:5], start_pos=4)[0]
        model.setup_cache(None, None)
    assert rel_err(compiled, eager) < 1e-4


@pytest.mark.parametrize('attention,pos_emb', [('softmax', 'rope'), ('linear', 'none'), ('gla', 'rope')])
def test_compile_decode_works_for_every_attention_kind(attention, pos_emb):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_embd=32, n_head=2, n_layer=2, block_size=24, bias=False, norm='rmsnorm',
                          activation='gelu', attention=attention, pos_emb=pos_emb)).eval()
    fast_cpu.optimize(model)
    idx = torch.randint(0, 97, (1, 5))
    ref = model.generate(idx, 30, temperature=0)
    assert fast_cpu.compile_decode(model, probe=False), "torch.compile failed: is a C++ compiler installed?"
    assert torch.equal(model.generate(idx, 30, temperature=0), ref)


def test_compile_decode_falls_back_without_a_compiler(hf_tiny, monkeypatch, capsys):
    folder, _ = hf_tiny
    model = fast_cpu.optimize(GPT.from_pretrained(folder).eval())
    idx = torch.randint(0, 50257, (1, 6))
    ref = model.generate(idx, 10, temperature=0)

    def no_compiler(fn, **kw):
        def fail(*a, **k):
            raise RuntimeError('no C++ compiler found')
        return fail
    monkeypatch.setattr(fast_cpu.torch, 'compile', no_compiler)
    assert fast_cpu.compile_decode(model) is False
    assert 'torch.compile is not available here (RuntimeError); decoding runs uncompiled' in capsys.readouterr().err
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

@pytest.mark.parametrize('rows,bfloat16_native', [(1, False), (7, False), (80, False), (80, True)])
def test_int8_linear_is_the_dequantized_matmul(rows, bfloat16_native, monkeypatch):
    """Int8Linear computes x @ (q * scale)^T + b, q the per-output-channel int8 weight (symmetric, |q| <= 127),
    through PyTorch's int8 kernel or, for 64 rows and more on a CPU with native bfloat16, a bfloat16 matmul."""
    monkeypatch.setattr(fast_cpu, 'bfloat16_matmul_is_faster', lambda: bfloat16_native)
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = fast_cpu.Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    scale = lin.weight.detach().abs().amax(1) / 127
    assert torch.equal(q.weight, (lin.weight.detach() / scale[:, None]).round().to(torch.int8))
    x = torch.randn(1, rows, 96)
    with torch.no_grad():
        out = q(x)
    ref = F.linear(x.double(), q.weight.double() * q.scale.double()[:, None], lin.bias.double())
    assert out.dtype == torch.float32 and out.shape == (1, rows, 40)
    assert rel_err(out, ref) < 1e-2  # activations meet the weights in bfloat16
    assert rel_err(out, lin(x)) < 2e-2  # and the float layer's answer, within int8's rounding
    with pytest.raises(RuntimeError, match='inference only'):
        q(x)  # gradients on: training an int8 model is refused


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
    # one int8 kernel for every row count (not bfloat16 matmuls for 64 rows and more), so that greedy
    # tokens can be compared exactly, whatever this CPU is
    monkeypatch.setattr(fast_cpu, 'bfloat16_matmul_is_faster', lambda: False)
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
    assert fast_cpu.compile_decode(model, probe=False), "torch.compile failed: is a C++ compiler installed?"
    # the compiled one-row matmul takes float32 activations, the int8 kernel bfloat16 ones
    assert rel_err(second_token_logits(), eager) < 1e-2


def test_int8_without_pytorchs_int8_kernel_dequantizes(monkeypatch):
    """On a PyTorch without _weight_int8pack_mm, Int8Linear falls back to dequantize-and-multiply."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    q = fast_cpu.Int8Linear(lin)
    x = torch.randn(3, 64)
    with torch.no_grad():
        fast = q(x)
        monkeypatch.setattr(fast_cpu, 'INT8PACK', False)
        slow = q(x)
    assert rel_err(slow, F.linear(x, q.weight.float() * q.scale.float()[:, None], lin.bias)) < 1e-3
    assert rel_err(slow, fast) < 1e-2


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
