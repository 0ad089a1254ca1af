"""The Pico-LLM models and their pieces: RMSNorm, the k-gram windows, generation with carried state."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_reference

from load import build_model
from model import GPT, KGramMLPSeqModel, LSTMSeqModel, RMSNorm, TransformerModel


def test_rmsnorm_formula_and_half_precision():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data = torch.randn(16)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ref = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert torch.allclose(norm.double()(x), ref, atol=1e-12)
    big = torch.full((2, 16), 300.0, dtype=torch.float16)  # 300^2 overflows float16; the norm must not
    assert torch.isfinite(norm.half()(big)).all()
    # a bfloat16 input to a float32 norm (GLA's head norm under autocast): the fused kernel, no mixed-dtype warning
    norm.float()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        y = norm(x[0].bfloat16())
    assert y.dtype == torch.bfloat16 and torch.allclose(y.double(), ref[0], rtol=2e-2, atol=2e-2)


def test_kgram_windows_equal_a_loop_over_positions():
    """The unfold-based forward equals the definition: position t sees tokens t-k+1 .. t, 0 before the start."""
    torch.manual_seed(0)
    k = 4
    model = KGramMLPSeqModel(50, k=k, embed_size=6, num_inner_layers=2).eval()
    idx = torch.randint(1, 50, (2, 9))
    logits, _ = model(idx)
    for t in range(9):
        window = [idx[:, j] if j >= 0 else torch.zeros(2, dtype=torch.long) for j in range(t - k + 1, t + 1)]
        x = torch.cat([model.embedding(w) for w in window], dim=-1)
        assert torch.allclose(logits[:, t], model.net(x), atol=1e-6)


def scaled(model):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


@pytest.mark.parametrize('make', [
    lambda: LSTMSeqModel(300, embed_size=16, hidden_size=24),
    lambda: KGramMLPSeqModel(300, k=3, embed_size=8, num_inner_layers=2),
    lambda: KGramMLPSeqModel(300, k=1, embed_size=8, num_inner_layers=1),
    lambda: TransformerModel(300, d_model=32, n_heads=2, n_blocks=2, block_size=16),
], ids=['lstm', 'kgram3', 'kgram1', 'transformer'])
def test_generation_with_carried_state_equals_recompute(make):
    """Every model generates through the one loop; its cache (LSTM state, k-gram window, KV cache) gives
    what recomputing the whole text at every step gives, also past the Transformer's block_size."""
    torch.manual_seed(0)
    model = scaled(make())
    idx = torch.randint(0, 300, (2, 3))
    out = model.generate(idx, 30, temperature=0)
    assert torch.equal(out, greedy_reference(model, idx, 30))
    assert len(set(out[0, 3:].tolist())) > 1  # not one token repeated: the state matters


@pytest.mark.parametrize('model', [LSTMSeqModel(50, 8, 8), KGramMLPSeqModel(50, 2, 8, 1),
                                   TransformerModel(50, 16, 2, 1, block_size=8)], ids=['lstm', 'kgram', 'transformer'])
def test_every_model_returns_logits_and_loss(model):
    idx = torch.randint(0, 50, (3, 8))
    logits, loss = model(idx)[0], model(idx, idx)[1]
    assert logits.shape == (3, 8, 50) and model(idx)[1] is None
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 50), idx.reshape(-1)))


def test_transformer_is_gpt_with_rmsnorm():
    model = TransformerModel(100, d_model=32, n_heads=4, n_blocks=2, block_size=16)
    assert isinstance(model, GPT) and model.config.norm == 'rmsnorm' and not model.config.bias
    assert model.config.activation == 'gelu'  # exact GELU: faster than the tanh approximation on CPUs
    assert isinstance(model.transformer.h[0].ln_1, RMSNorm) and isinstance(model.transformer.ln_f, RMSNorm)
    with pytest.raises(ValueError, match="model_type='rnn' is not one of: gpt, transformer, gpt2, lstm, kgram_mlp"):
        build_model('rnn', {})
