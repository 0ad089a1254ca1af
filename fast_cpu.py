"""
Fast CPU inference for a loaded model, in one call: fast_cpu.optimize(model). model.py stays plain PyTorch;
this file swaps in the kernels that measured fastest on CPUs (bench.py, README "Speed") and leaves training,
torch.compile and GPUs on the ordinary path (training only asks bfloat16_matmul_is_faster() and
attention_in_float32()).
    model = load_model(...)[0].eval().to(dtype)
    fast_cpu.optimize(model)                 # kernel choice by dtype and shape; attention in float32
    fast_cpu.optimize(model, compile=True)   # also compile the one-token decoding step (needs a C++ compiler)
Which kernel runs is measured on the machine it runs on, not read off its ISA (kernel_choice): kernels that win
on one CPU lose on another (README "Speed"). Its own C++ kernels (KERNELS_CPP: int8 activations times int8
weights, and float matrix-vector products) are compiled once per machine where a C++ compiler exists.
"""
import functools
import hashlib
import json
import mmap
import os
import platform
import subprocess
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from load import output_file


def _onednn_linear_works(dtype):
    """True if PyTorch's oneDNN matmul is present and agrees with F.linear in this dtype (checked at import)."""
    try:
        x, w, b = torch.linspace(-1, 1, 24).view(3, 8), torch.linspace(-2, 1, 40).view(5, 8), torch.ones(5)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', [], '')
        return torch.allclose(y.float(), F.linear(x, w, b).float(), atol=0.05)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


ONEDNN_DTYPES = {dt for dt in (torch.float32, torch.bfloat16) if _onednn_linear_works(dt)}


def _int8pack_works():
    """True if PyTorch has its CPU int8-weight matmul (_weight_int8pack_mm, torch >= 2.3 on x86 and ARM)."""
    try:
        torch.ops.aten._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16), torch.ones(8, 32, dtype=torch.int8),
                                           torch.ones(8, dtype=torch.bfloat16))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


INT8PACK = _int8pack_works()


@functools.cache  # measured once per process: train.py asks it (int8 prompts ask kernel_choice)
def bfloat16_matmul_is_faster():
    """True if this CPU multiplies bfloat16 matrices at least 1.5x faster than float32, measured on the shape of
    a training loss's output layer (256 rows x 128 -> 8,192). CPUs with AVX512-BF16 or AMX do (oneDNN, ~2.5x on
    a 2-core AMD EPYC); AVX2 ones emulate bfloat16 and are slower. About 0.1 s, once."""
    g = torch.Generator().manual_seed(0)  # (not the global generator: a probe must not change a seeded run)

    def best(dtype):
        x, w = torch.randn(256, 128, generator=g).to(dtype), torch.randn(8192, 128, generator=g).to(dtype)
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            x @ w.t()
            times.append(time.perf_counter() - t0)
        return min(times[1:])
    return best(torch.float32) > 1.5 * best(torch.bfloat16)


# -- fast_cpu's own C++ kernels, compiled once per machine -----------------------------------------------------

KERNELS_CPP = r'''
// fast_cpu's C++ kernels (torch.ops.gptlab), compiled once per machine by fast_cpu.kernels().
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#endif

// Activations are quantized per block of 32 values as llama.cpp's Q8_0 does (symmetric: q = round(x / s),
// s = max|x| / 127), so that one large activation costs precision in its own block only.
constexpr int64_t BLOCK = 32;
// int8 weights are packed in groups of 4 output rows: block b of the group's 4 rows lie one after another
// (4 x 32 bytes), so each thread reads the weights as one sequential stream (1.2-1.6x faster than 4 rows
// read side by side). Rows past the last whole group stay in row order.
constexpr int64_t GROUP = 4;
constexpr int64_t PREFETCH = 2048;  // bytes ahead of the weights being read (int8 on an EPYC: 2-8 KB alike;
                                    // float16 on a Xeon: 1-2 KB alike, 4 KB 1.1x slower)

// The vector loops this CPU can run: 0 plain C++, 1 AVX2 (with FMA and F16C), 2 AVX-512 with VNNI (Ice Lake,
// Zen 4 and later; an AVX-512 CPU without VNNI, such as Skylake-X, gets 1). A kernel's isa argument caps it.
static int64_t cpu_isa() {
#if defined(__x86_64__)
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) return 0;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") ? 2 : 1;
#else
  return 0;
#endif
}

static void quantize_plain(const float* x, int64_t blocks, int8_t* q, float* s) {
  for (int64_t i = 0; i < blocks; ++i, x += BLOCK, q += BLOCK) {
    float amax = 0.f;
    for (int j = 0; j < BLOCK; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    s[i] = amax / 127.f;
    for (int j = 0; j < BLOCK; ++j) q[j] = (int8_t)std::nearbyint(x[j] * inv);  // (ties to even, as torch.round)
  }
}

#if defined(__x86_64__)
AVX2 static void quantize_avx2(const float* x, int64_t blocks, int8_t* q, float* s) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t i = 0; i < blocks; ++i, x += BLOCK, q += BLOCK) {
    __m256 v[4], m = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) m = _mm256_max_ps(m, _mm256_and_ps(v[j] = _mm256_loadu_ps(x + 8 * j), abs_mask));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    s[i] = amax / 127.f;
    __m256i r[4];  // round to nearest even (the default rounding mode), then narrow 32 -> 16 -> 8 bits
    for (int j = 0; j < 4; ++j) r[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    // (the packs work within 128-bit lanes: put the 8 groups of 4 values back in order)
    _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

AVX2 static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// x . w over one block of 32, times the block's activation scale s, added to acc. |x| (unsigned) times w with
// x's sign (signed) makes maddubs' products x * w; it sums them in pairs to int16 (|sum| <= 2 * 127 * 128: no
// saturation), madd sums pairs of those to int32 (llama.cpp's AVX2 trick for Q8_0).
AVX2 static inline __m256 block_fma(__m256i ax, __m256i xv, const int8_t* w, __m256 s, __m256 acc) {
  const __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)w), xv));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1))), s, acc);
}
#endif

struct Int8Args {
  const int8_t *xq, *w; const float *xs, *ws, *bias; float* y; int64_t M, K, N;
  float out(int64_t n, float dot) const { return dot * ws[n] + (bias ? bias[n] : 0.f); }
};

static float row_dot_plain(const Int8Args& a, int64_t m, const int8_t* w, int64_t step) {
  // w: one output row, its block b at w + b * step (step 32 in row order, 4 * 32 packed)
  const int64_t nb = a.K / BLOCK;
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t d = 0;
    for (int j = 0; j < BLOCK; ++j) d += int32_t(a.xq[m * a.K + b * BLOCK + j]) * int32_t(w[b * step + j]);
    acc += a.xs[m * nb + b] * float(d);
  }
  return acc;
}

static void rows_plain(const Int8Args& a, int64_t n0, int64_t n1) {
  const int64_t whole = a.N / GROUP * GROUP;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = n < whole ? a.w + (n / GROUP) * GROUP * a.K + (n % GROUP) * BLOCK : a.w + n * a.K;
    for (int64_t m = 0; m < a.M; ++m) a.y[m * a.N + n] = a.out(n, row_dot_plain(a, m, w, n < whole ? GROUP * BLOCK : BLOCK));
  }
}

#if defined(__x86_64__)
AVX2 static void rows_avx2(const Int8Args& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, nb = K / BLOCK, whole = a.N / GROUP * GROUP;
  int64_t n = n0;
  for (; n + GROUP <= std::min(n1, whole); n += GROUP) {  // n0 is a multiple of GROUP (see int8_linear)
    const int8_t* w = a.w + n * K;
    for (int64_t m = 0; m < a.M; ++m) {  // (the group's 3 KB stay in L1 for every row of x)
      const int8_t* xr = a.xq + m * K;
      const float* xs = a.xs + m * nb;
      __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xr + b * BLOCK));
        const __m256i ax = _mm256_sign_epi8(xv, xv);
        const __m256 s = _mm256_broadcast_ss(xs + b);
        const int8_t* wb = w + b * GROUP * BLOCK;
        _mm_prefetch((const char*)(wb + PREFETCH), _MM_HINT_T0);  // (the hardware prefetcher alone falls
        _mm_prefetch((const char*)(wb + PREFETCH + 64), _MM_HINT_T0);  // behind: 10-20% slower)
        c0 = block_fma(ax, xv, wb, s, c0);
        c1 = block_fma(ax, xv, wb + BLOCK, s, c1);
        c2 = block_fma(ax, xv, wb + 2 * BLOCK, s, c2);
        c3 = block_fma(ax, xv, wb + 3 * BLOCK, s, c3);
      }
      float* y = a.y + m * a.N + n;
      y[0] = a.out(n, hsum(c0)); y[1] = a.out(n + 1, hsum(c1)); y[2] = a.out(n + 2, hsum(c2)); y[3] = a.out(n + 3, hsum(c3));
    }
  }
  for (; n < n1; ++n)  // the rows past the last whole group
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* xr = a.xq + m * K;
      __m256 c = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xr + b * BLOCK));
        c = block_fma(_mm256_sign_epi8(xv, xv), xv, a.w + n * K + b * BLOCK, _mm256_broadcast_ss(a.xs + m * nb + b), c);
      }
      a.y[m * a.N + n] = a.out(n, hsum(c));
    }
}

// The same with 512-bit vectors: one load holds block b of two rows of a group (the activation block sits in
// both halves), and VNNI's dpbusd sums |x| times w with x's sign in groups of 4 straight to int32 (AVX-512
// has no sign_epi8: w is negated where x < 0 under a mask). Half the instructions of the AVX2 loop per byte.
AVX512 static void rows_avx512(const Int8Args& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, nb = K / BLOCK, whole = a.N / GROUP * GROUP;
  const __m512i zero = _mm512_setzero_si512();
  int64_t n = n0;
  for (; n + GROUP <= std::min(n1, whole); n += GROUP) {
    const int8_t* w = a.w + n * K;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* xr = a.xq + m * K;
      const float* xs = a.xs + m * nb;
      __m512 c01 = _mm512_setzero_ps(), c23 = c01;
      for (int64_t b = 0; b < nb; ++b) {
        const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(xr + b * BLOCK)));
        const __m512i ax = _mm512_abs_epi8(xv);
        const __mmask64 neg = _mm512_movepi8_mask(xv);
        const __m512 s = _mm512_set1_ps(xs[b]);
        const int8_t* wb = w + b * GROUP * BLOCK;
        _mm_prefetch((const char*)(wb + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char*)(wb + PREFETCH + 64), _MM_HINT_T0);
        __m512i w01 = _mm512_loadu_si512(wb), w23 = _mm512_loadu_si512(wb + 2 * BLOCK);
        w01 = _mm512_mask_sub_epi8(w01, neg, zero, w01);
        w23 = _mm512_mask_sub_epi8(w23, neg, zero, w23);
        c01 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax, w01)), s, c01);
        c23 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax, w23)), s, c23);
      }
      float* y = a.y + m * a.N + n;
      y[0] = a.out(n, hsum(_mm512_castps512_ps256(c01)));
      y[1] = a.out(n + 1, hsum(_mm512_extractf32x8_ps(c01, 1)));
      y[2] = a.out(n + 2, hsum(_mm512_castps512_ps256(c23)));
      y[3] = a.out(n + 3, hsum(_mm512_extractf32x8_ps(c23, 1)));
    }
  }
  rows_avx2(a, n, n1);  // (the rows past the last whole group)
}
#endif

// y = x @ (w * scale)^T + bias, x float32 (..., K) quantized per block of 32 here, w int8 (N, K) packed.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, int64_t isa) {
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(-1) == K && K % BLOCK == 0,
              "int8_linear: x must be contiguous float32 (..., K), K a multiple of 32");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.is_contiguous(), "int8_linear: weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N, "int8_linear: scale");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "int8_linear: bias");
  const int64_t M = x.numel() / K;
  isa = std::min(isa, cpu_isa());
  const bool avx2 = isa >= 1;
  at::Tensor xq = at::empty({M * K}, x.options().dtype(at::kChar)), xs = at::empty({M * K / BLOCK}, x.options());
#if defined(__x86_64__)
  if (avx2) quantize_avx2(x.data_ptr<float>(), M * K / BLOCK, xq.data_ptr<int8_t>(), xs.data_ptr<float>()); else
#endif
  quantize_plain(x.data_ptr<float>(), M * K / BLOCK, xq.data_ptr<int8_t>(), xs.data_ptr<float>());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const Int8Args a{xq.data_ptr<int8_t>(), weight.data_ptr<int8_t>(), xs.data_ptr<float>(), scale.data_ptr<float>(),
                   bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), M, K, N};
  at::parallel_for(0, (N + GROUP - 1) / GROUP, 16, [&](int64_t g0, int64_t g1) {
#if defined(__x86_64__)
    if (isa == 2) return rows_avx512(a, g0 * GROUP, std::min(N, g1 * GROUP));
    if (avx2) return rows_avx2(a, g0 * GROUP, std::min(N, g1 * GROUP));
#endif
    rows_plain(a, g0 * GROUP, std::min(N, g1 * GROUP));
  });
  return y;
}

// float32 or float16 weights (N, K) in row order times a few float32 rows (float16 x is converted first).
// One row of x (decoding) reads each weight row start to end with 4 sums in flight: one sequential stream a
// thread (AVX-512 EPYC: float16 ~30 GB/s against ~12 for 4 weight rows read side by side, float32 ~30 against
// ~24), prefetched PREFETCH bytes ahead (a 2-core AMX Xeon, GPT-2's weights from memory: float16 1.2x faster,
// 17.8 -> 21.1 GB/s with AVX2 and 19.9 -> 24.2 with AVX-512; float32 AVX2 1.1x, AVX-512 alike). More rows of
// x take 4 weight rows at a time, 8 columns a step, each weight read once for all rows of x.
template <typename W> static void float_rows_plain(const float* x, const W* w, const float* bias, float* y,
                                                    int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[m * K + k] * float(w[n * K + k]);
      y[m * N + n] = acc + (bias ? bias[n] : 0.f);
    }
}

#if defined(__x86_64__)
AVX2 static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
AVX2 static inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

template <typename W> AVX2 static void float_rows_avx2(const float* x, const W* w, const float* bias, float* y,
                                                      int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (M == 1) {  // one row of x: each weight row start to end, 4 sums in flight
    for (; n < n1; ++n) {
      const W* wr = w + n * K;
      __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        for (int b = 0; b < 32 * (int)sizeof(W); b += 64) _mm_prefetch((const char*)(wr + k) + PREFETCH + b, _MM_HINT_T0);
        c0 = _mm256_fmadd_ps(load8(wr + k), _mm256_loadu_ps(x + k), c0);
        c1 = _mm256_fmadd_ps(load8(wr + k + 8), _mm256_loadu_ps(x + k + 8), c1);
        c2 = _mm256_fmadd_ps(load8(wr + k + 16), _mm256_loadu_ps(x + k + 16), c2);
        c3 = _mm256_fmadd_ps(load8(wr + k + 24), _mm256_loadu_ps(x + k + 24), c3);
      }
      for (; k < K; k += 8) c0 = _mm256_fmadd_ps(load8(wr + k), _mm256_loadu_ps(x + k), c0);
      y[n] = hsum(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3))) + (bias ? bias[n] : 0.f);
    }
    return;
  }
  for (; n + 4 <= n1; n += 4) {
    const W* w0 = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t k = 0; k < K; k += 8) {
        const __m256 xv = _mm256_loadu_ps(xr + k);
        c0 = _mm256_fmadd_ps(load8(w0 + k), xv, c0);
        c1 = _mm256_fmadd_ps(load8(w0 + K + k), xv, c1);
        c2 = _mm256_fmadd_ps(load8(w0 + 2 * K + k), xv, c2);
        c3 = _mm256_fmadd_ps(load8(w0 + 3 * K + k), xv, c3);
      }
      float* yr = y + m * N + n;
      for (int r = 0; r < 4; ++r) yr[r] = hsum(r == 0 ? c0 : r == 1 ? c1 : r == 2 ? c2 : c3) + (bias ? bias[n + r] : 0.f);
    }
  }
  float_rows_plain(x, w, bias, y, M, K, N, n, n1);
}

AVX512 static inline __m512 load16(__mmask16 k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }
AVX512 static inline __m512 load16(__mmask16 k, const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

// The same with 16 columns a step (the last step masked when K is not a multiple of 16).
template <typename W> AVX512 static void float_rows_avx512(const float* x, const W* w, const float* bias, float* y,
                                                        int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (M == 1) {
    for (; n < n1; ++n) {
      const W* wr = w + n * K;
      __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      int64_t k = 0;
      for (; k + 64 <= K; k += 64) {
        for (int b = 0; b < 64 * (int)sizeof(W); b += 64) _mm_prefetch((const char*)(wr + k) + PREFETCH + b, _MM_HINT_T0);
        c0 = _mm512_fmadd_ps(load16(0xffff, wr + k), _mm512_loadu_ps(x + k), c0);
        c1 = _mm512_fmadd_ps(load16(0xffff, wr + k + 16), _mm512_loadu_ps(x + k + 16), c1);
        c2 = _mm512_fmadd_ps(load16(0xffff, wr + k + 32), _mm512_loadu_ps(x + k + 32), c2);
        c3 = _mm512_fmadd_ps(load16(0xffff, wr + k + 48), _mm512_loadu_ps(x + k + 48), c3);
      }
      for (; k < K; k += 16) {
        const __mmask16 all = K - k >= 16 ? 0xffff : (1u << (K - k)) - 1;
        c0 = _mm512_fmadd_ps(load16(all, wr + k), load16(all, x + k), c0);
      }
      y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3))) + (bias ? bias[n] : 0.f);
    }
    return;
  }
  for (; n + 4 <= n1; n += 4) {
    const W* w0 = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 all = K - k >= 16 ? 0xffff : (1u << (K - k)) - 1;
        const __m512 xv = load16(all, xr + k);
        c0 = _mm512_fmadd_ps(load16(all, w0 + k), xv, c0);
        c1 = _mm512_fmadd_ps(load16(all, w0 + K + k), xv, c1);
        c2 = _mm512_fmadd_ps(load16(all, w0 + 2 * K + k), xv, c2);
        c3 = _mm512_fmadd_ps(load16(all, w0 + 3 * K + k), xv, c3);
      }
      float* yr = y + m * N + n;
      yr[0] = _mm512_reduce_add_ps(c0) + (bias ? bias[n] : 0.f);
      yr[1] = _mm512_reduce_add_ps(c1) + (bias ? bias[n + 1] : 0.f);
      yr[2] = _mm512_reduce_add_ps(c2) + (bias ? bias[n + 2] : 0.f);
      yr[3] = _mm512_reduce_add_ps(c3) + (bias ? bias[n + 3] : 0.f);
    }
  }
  float_rows_plain(x, w, bias, y, M, K, N, n, n1);
}
#endif

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        int64_t isa) {
  const int64_t N = weight.size(0), K = weight.size(1);
  const bool half = weight.scalar_type() == at::kHalf;
  TORCH_CHECK((half || weight.scalar_type() == at::kFloat) && weight.dim() == 2 && weight.is_contiguous() && K % 8 == 0,
              "float_linear: weight must be contiguous float32 or float16 (N, K), K a multiple of 8");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.is_contiguous() && x.size(-1) == K, "float_linear: x");
  TORCH_CHECK(!bias || (bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N),
              "float_linear: bias");
  const int64_t M = x.numel() / K;
  const at::Tensor xf = half ? x.to(at::kFloat) : x, bf = bias ? bias->to(at::kFloat) : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options().dtype(at::kFloat));
  const float *xp = xf.data_ptr<float>(), *bp = bias ? bf.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  isa = std::min(isa, cpu_isa());
  auto rows = [&](const auto* w, int64_t n0, int64_t n1) {  // (w: float or c10::Half)
#if defined(__x86_64__)
    if (isa == 2) return float_rows_avx512(xp, w, bp, yp, M, K, N, n0, n1);
    if (isa == 1) return float_rows_avx2(xp, w, bp, yp, M, K, N, n0, n1);
#endif
    float_rows_plain(xp, w, bp, yp, M, K, N, n0, n1);
  };
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t g0, int64_t g1) {
    const int64_t n0 = g0 * 4, n1 = std::min(N, g1 * 4);
    if (half) rows(weight.data_ptr<c10::Half>(), n0, n1); else rows(weight.data_ptr<float>(), n0, n1);
  });
  return half ? y.to(at::kHalf) : y;
}

// Attention of one query against the cache, for decoding: softmax(q k^T / sqrt(D)) v per (batch, head), in
// float32 whatever the cache's dtype (float32, or float16 read as it is: half the bytes). Three passes over the
// positions: scores, their exponentials, the weighted sum of values. q (B, H, 1, D) contiguous; k, v (B, H, L, D)
// with rows of D contiguous (slices of the cache). Returns (B, H, 1, D) float32.
template <typename T> static inline float to_float(T v) { return (float)v; }

template <typename T> static void attend_plain(const float* q, const T* k, const T* v, float* y, float* s,
                                               int64_t L, int64_t D, int64_t ks, int64_t vs, float scale) {
  float best = -INFINITY;
  for (int64_t l = 0; l < L; ++l) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * to_float(k[l * ks + d]);
    s[l] = dot * scale;
    best = std::max(best, s[l]);
  }
  float total = 0.f;
  for (int64_t l = 0; l < L; ++l) total += (s[l] = std::exp(s[l] - best));
  for (int64_t d = 0; d < D; ++d) y[d] = 0.f;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t d = 0; d < D; ++d) y[d] += s[l] * to_float(v[l * vs + d]);
  for (int64_t d = 0; d < D; ++d) y[d] /= total;
}

#if defined(__x86_64__)
template <typename T> AVX2 static void attend_avx2(const float* q, const T* k, const T* v, float* y, float* s,
                                                   int64_t L, int64_t D, int64_t ks, int64_t vs, float scale) {
  // (D a multiple of 8, at most 256: the query and the output stay in registers or L1)
  float best = -INFINITY;
  for (int64_t l = 0; l < L; ++l) {
    __m256 c = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) c = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + l * ks + d), c);
    s[l] = hsum(c) * scale;
    best = std::max(best, s[l]);
  }
  float total = 0.f;
  for (int64_t l = 0; l < L; ++l) total += (s[l] = std::exp(s[l] - best));
  __m256 acc[32];
  for (int64_t d = 0; d < D; d += 8) acc[d / 8] = _mm256_setzero_ps();
  for (int64_t l = 0; l < L; ++l) {
    const __m256 p = _mm256_set1_ps(s[l]);
    for (int64_t d = 0; d < D; d += 8) acc[d / 8] = _mm256_fmadd_ps(p, load8(v + l * vs + d), acc[d / 8]);
  }
  const __m256 inv = _mm256_set1_ps(1.f / total);
  for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(y + d, _mm256_mul_ps(acc[d / 8], inv));
}
#endif

at::Tensor one_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t isa) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "one_query_attention: q must be contiguous float32 (B, H, 1, D)");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type() && k.size(0) == q.size(0) &&
              k.size(1) == q.size(1) && k.size(3) == q.size(3) && k.size(2) >= 1 && k.stride(3) == 1 && v.stride(3) == 1 &&
              (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf),
              "one_query_attention: k and v must be float32 or float16 (B, H, L, D), rows contiguous");
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3);
  at::Tensor y = at::empty_like(q);
  const float scale = 1.f / std::sqrt((float)D);
  isa = std::min(isa, cpu_isa());
  const bool vector = isa >= 1 && D % 8 == 0 && D <= 256;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      auto run = [&](auto* kp, auto* vp) {
        kp += b * k.stride(0) + h * k.stride(1);
        vp += b * v.stride(0) + h * v.stride(1);
        const float* qp = q.data_ptr<float>() + i * D;
        float* yp = y.data_ptr<float>() + i * D;
#if defined(__x86_64__)
        if (vector) return attend_avx2(qp, kp, vp, yp, s.data(), L, D, k.stride(2), v.stride(2), scale);
#endif
        attend_plain(qp, kp, vp, yp, s.data(), L, D, k.stride(2), v.stride(2), scale);
      };
      if (k.scalar_type() == at::kHalf) run(k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>());
      else run(k.data_ptr<float>(), v.data_ptr<float>());
    }
  });
  return y;
}

TORCH_LIBRARY(gptlab, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias, int isa=1) -> Tensor");
  m.def("float_linear(Tensor x, Tensor weight, Tensor? bias, int isa=1) -> Tensor");
  m.def("one_query_attention(Tensor q, Tensor k, Tensor v, int isa=1) -> Tensor");
  m.def("isa() -> int");
}
TORCH_LIBRARY_IMPL(gptlab, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("float_linear", &float_linear);
  m.impl("one_query_attention", &one_query_attention);
}
TORCH_LIBRARY_IMPL(gptlab, CompositeExplicitAutograd, m) { m.impl("isa", []() { return cpu_isa(); }); }
'''


def cache_dir():
    """Where the compiled kernels and the kernel choices of this machine are kept: TORCH_EXTENSIONS_DIR's (or
    torch's default, ~/.cache/torch_extensions) gpt-lab folder."""
    root = os.environ.get('TORCH_EXTENSIONS_DIR') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'torch_extensions')
    return os.path.join(root, 'gpt-lab')


@functools.cache  # (once a process: a library is loaded once)
def kernels():
    """torch.ops.gptlab with KERNELS_CPP's kernels (int8_linear, float_linear, isa), compiled the first time on
    this machine (~15 s, one line) and kept in cache_dir(); None, with one line, where no C++ compiler builds
    them (then the int8 and float paths use PyTorch's own kernels). The library runs anywhere torch does: each
    kernel takes the vector ISA to use (isa: 0 plain C++ loops, 1 AVX2, 2 AVX-512 with VNNI), capped at what
    the CPU has (torch.ops.gptlab.isa()); kernel_choice times the levels against each other."""
    cxx = os.environ.get('CXX', 'c++')
    torch_dir = os.path.dirname(torch.__file__)
    flags = ['-O3', '-std=c++20', '-shared', '-fPIC', '-fopenmp', f'-I{torch_dir}/include', f'-L{torch_dir}/lib',
             '-lc10', '-ltorch_cpu', f'-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}']
    key = hashlib.sha256('\n'.join([KERNELS_CPP, torch.__version__, platform.machine(), cxx, *flags]).encode())
    path = os.path.join(cache_dir(), f'kernels-{key.hexdigest()[:16]}.so')
    if not os.path.exists(path):
        print(f"fast_cpu: compiling its C++ kernels for this machine (once, ~15 s) into {os.path.dirname(path)}",
              file=sys.stderr)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with output_file(path) as tmp:  # (whole or not at all, should two processes race; the source on stdin)
                out = subprocess.run([cxx, '-x', 'c++', '-', '-o', tmp, *flags], input=KERNELS_CPP,
                                     capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    raise RuntimeError(f"{cxx} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"fast_cpu: no C++ kernels ({str(e)[:200]}); PyTorch's own kernels are used", file=sys.stderr)
            return None
    torch.ops.load_library(path)
    # the output's shape and dtype without running the kernel, for torch.compile (compile_decode's step)
    torch.library.register_fake('gptlab::int8_linear')(
        lambda x, weight, scale, bias=None, isa=1: x.new_empty((*x.shape[:-1], weight.size(0))))
    torch.library.register_fake('gptlab::float_linear')(
        lambda x, weight, bias=None, isa=1: x.new_empty((*x.shape[:-1], weight.size(0))))
    torch.library.register_fake('gptlab::one_query_attention')(lambda q, k, v, isa=1: torch.empty_like(q))
    return torch.ops.gptlab


def pack_rows(q):
    """int8 weights (out, in) in row order -> the layout of KERNELS_CPP's int8_linear: in each group of 4 rows,
    block b (32 columns) of the 4 rows one after another; rows past the last whole group stay as they are."""
    n, k = q.shape
    whole = n // 4 * 4
    groups = q[:whole].view(n // 4, 4, k // 32, 32).transpose(1, 2).reshape(whole, k)
    return torch.cat([groups, q[whole:]])


def unpack_rows(p):
    """pack_rows undone: int8 weights (out, in) in row order."""
    n, k = p.shape
    whole = n // 4 * 4
    return torch.cat([p[:whole].view(n // 4, k // 32, 4, 32).transpose(1, 2).reshape(whole, k), p[whole:]])


# -- which kernel: measured on the machine it runs on -----------------------------------------------------------

def one_row_matmul(x, weight, scale=None, bias=None):
    """x (in,) times weight (out, in) transposed, written as a multiply-and-sum: torch.compile turns it into
    one pass over the weight (see compile_decode). scale (out,), int8 weights' per-channel scales, and bias
    (out,) are applied in the same pass (two small kernels fewer per call)."""
    y = (weight * x).sum(-1)
    if scale is not None:
        y = y * scale
    return y if bias is None else y + bias


def machine():
    """What kernel speeds depend on: the CPU, the ISA PyTorch uses on it (ATEN_CPU_CAPABILITY lowers it, and
    ONEDNN_MAX_CPU_ISA oneDNN's), torch's version and the threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    except OSError:
        pass
    return (f"{cpu} | {torch.backends.cpu.get_cpu_capability()} | ONEDNN_MAX_CPU_ISA="
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '(all)')} | torch {torch.__version__} | {torch.get_num_threads()} threads")


def _probe_layers(dtype, candidate, megabytes):
    """Layers of GPT-2's MLP shape (768 -> 3072) holding megabytes of weights in dtype (int8: Int8Linear,
    packed for ours), each with its own memory, so that one row streams them from memory as decoding does."""
    with torch.no_grad():
        lin = nn.Linear(768, 3072, device='meta').to_empty(device='cpu')
        lin.weight.copy_(torch.linspace(-0.05, 0.05, lin.weight.numel()).view_as(lin.weight))
        lin.bias.zero_()
        if dtype == 'int8':
            first = Int8Linear(lin, packed=candidate.startswith('ours'))
        else:
            lin.__class__ = CPULinear
            first = lin.to(getattr(torch, dtype))
        per_layer = sum(t.numel() * t.element_size() for t in first.state_dict().values())
        layers = [first] + [copy_module(first) for _ in range(max(1, int(megabytes * 2**20 // per_layer)) - 1)]
    for layer in layers:
        layer.kernel = candidate
    return layers


def copy_module(m):
    """A copy of m with memory of its own (not torch's deepcopy: one shallow copy, then each tensor cloned)."""
    c = m.__class__.__new__(m.__class__)
    c.__dict__ = {**m.__dict__, '_parameters': {k: None if v is None else nn.Parameter(v.detach().clone(), False)
                                                 for k, v in m._parameters.items()},
                  '_buffers': {k: None if v is None else v.clone() for k, v in m._buffers.items()}}
    return c


def probe_rows(n):
    """The row count kernel_choice measures for a matmul of n rows: 1 (a decoding step), 16 (2-16 rows: a short
    prompt, a batch of steps) or 128 (a prompt). Each is its own ranking: float16's F.linear wins at one row
    and is 2x slower than ours at 16 (a 16-token prompt of GPT-2 124M: 112 against 54 ms here)."""
    return 1 if n == 1 else 16 if n <= 16 else 128


@functools.cache  # once a process; and kept on disk per machine (cache_dir()/kernel-choices.json)
def kernel_choice(dtype, rows):
    """The kernels for a matmul with dtype weights ('float32', 'bfloat16', 'float16', 'int8') and rows rows of x
    (probe_rows: 1, 16 or 128), fastest first, as measured on this machine:
    each candidate (CPULinear.KERNELS, Int8Linear.KERNELS) runs on layers of GPT-2's MLP shape, alternately,
    the best of three (1 and 16 rows: 48 MB of weights, more than most CPUs cache; a candidate twice as slow as
    the best after its first run is not run again). Under a second, once per machine, torch version, thread count
    and version of KERNELS_CPP, with one line; the result is kept in cache_dir()."""
    if rows not in (1, 16, 128):
        raise ValueError(f"kernel_choice: rows is {rows!r}; it is one of 1, 16, 128 (probe_rows)")
    many = rows > 16
    key = choice_key(dtype, 'many rows' if many else 'one row' if rows == 1 else '16 rows')
    known = _known_choice(key)
    if isinstance(known, list):  # (filtered: a kernel that existed then may not now)
        return tuple(name for name in known if _can_run(name, dtype, many))
    kernels_of = Int8Linear.KERNELS if dtype == 'int8' else CPULinear.KERNELS
    candidates = [name for name in kernels_of if _can_run(name, dtype, many)]
    layers = {name: _probe_layers(dtype, name, 0 if many else 48) for name in candidates}
    x = torch.linspace(-1, 1, rows * 768).view(-1, 768).to(torch.float32 if dtype == 'int8' else
                                                                          getattr(torch, dtype))
    times = {name: [] for name in candidates}
    with torch.no_grad():
        for name in candidates:  # warm up (first calls set kernels up)
            layers[name][0](x)
        for _ in range(3):
            for name in candidates:
                if times[name] and min(times[name]) > 2 * min(min(t) for t in times.values() if t):
                    continue
                t0 = time.perf_counter()
                for layer in layers[name]:
                    layer(x)
                times[name].append(time.perf_counter() - t0)
    ranking = sorted(candidates, key=lambda name: min(times[name]))
    print(f"fast_cpu: timed the {dtype} matmul kernels for {'one row' if rows == 1 else f'{rows} rows'} on this CPU "
          f"({torch.backends.cpu.get_cpu_capability()}): " +
          ", ".join(f"{n} {min(times[n]) * 1e3:.2f} ms" for n in ranking) + f"; using {ranking[0]}", file=sys.stderr)
    _keep_choice(key, ranking)
    return tuple(ranking)


def one_query_attention(q, k, v):
    """softmax(q k^T / sqrt(head size)) v for one query per head, q (B, H, 1, D) float32, k and v the cache's
    first L positions (B, H, L, D), float32 or float16, read in their own dtype (KERNELS_CPP: a decoding step's
    attention, 1.4-2.3x faster than SDPA on a float32 copy of a float16 cache at 100-1,000 positions) where it
    measured faster than SDPA on this machine (attention_choice, at the first call); other dtypes, gradients,
    and machines where it is slower take SDPA."""
    if (torch.is_grad_enabled() or q.dtype != torch.float32 or k.dtype not in (torch.float32, torch.float16)
            or attention_choice()[0] != 'ours'):
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
    return torch.ops.gptlab.one_query_attention(q.contiguous(), k, v, 1)


@functools.cache  # once a process; and kept on disk per machine with kernel_choice's rankings
def attention_choice():
    """'ours' (one_query_attention) and 'SDPA', fastest first on this machine, for one query against 256 cached
    positions of GPT-2's 12 heads x 64, float32, 12 layers' caches (as a step reads them), alternately, best of 5;
    ('SDPA',) where KERNELS_CPP could not be compiled. A few ms, once per machine and version of the kernels."""
    if kernels() is None:
        return ('SDPA',)
    key = choice_key('attention, one query')
    known = _known_choice(key)
    if known in (['ours', 'SDPA'], ['SDPA', 'ours']):
        return tuple(known)
    caches = torch.linspace(-1, 1, 24 * 12 * 256 * 64).view(24, 1, 12, 256, 64).unbind()
    q = torch.linspace(-1, 1, 12 * 64).view(1, 12, 1, 64)
    candidates = {'ours': lambda k, v: torch.ops.gptlab.one_query_attention(q, k, v, 1),
                  'SDPA': lambda k, v: F.scaled_dot_product_attention(q, k, v)}
    times = {name: [] for name in candidates}
    with torch.no_grad():
        for _ in range(5):
            for name, attend in candidates.items():
                t0 = time.perf_counter()
                for k, v in zip(caches[0::2], caches[1::2]):
                    attend(k, v)
                times[name].append(time.perf_counter() - t0)
    ranking = sorted(candidates, key=lambda name: min(times[name]))
    print(f"fast_cpu: timed one-query attention on this CPU ({torch.backends.cpu.get_cpu_capability()}): " +
          ", ".join(f"{n} {min(times[n]) * 1e3:.2f} ms" for n in ranking) + f"; using {ranking[0]}", file=sys.stderr)
    _keep_choice(key, ranking)
    return tuple(ranking)


def choice_key(*parts):
    """A ranking's key in cache_dir()/kernel-choices.json: the machine (machine()), the version of KERNELS_CPP
    (a ranking of an earlier version of our kernels says nothing of these) and what was ranked."""
    return ' | '.join([machine(), f"kernels {hashlib.sha256(KERNELS_CPP.encode()).hexdigest()[:8]}", *parts])


def _all_choices():
    """The rankings kept in cache_dir()/kernel-choices.json ({key: [names, fastest first]}), or {} where there is
    no readable file."""
    try:
        with open(os.path.join(cache_dir(), 'kernel-choices.json')) as f:
            known = json.load(f)
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def _known_choice(key):
    """The ranking kept under key, or None."""
    return _all_choices().get(key)


def _keep_choice(key, ranking):
    """Add one ranking to cache_dir()/kernel-choices.json, whole or not at all (output_file)."""
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        with output_file(os.path.join(cache_dir(), 'kernel-choices.json')) as tmp, open(tmp, 'w') as f:
            json.dump({**_all_choices(), key: ranking}, f, indent=1)
    except (OSError, ValueError):  # (unwritable, or a link: measured again next time)
        pass


def _can_run(name, dtype, many):
    """Whether kernel name exists here for dtype weights (the candidates kernel_choice times)."""
    if name not in (Int8Linear.KERNELS if dtype == 'int8' else CPULinear.KERNELS):
        return False  # (a name kept on disk by another version of this file)
    if name.startswith('ours'):
        if kernels() is None or dtype not in ('float32', 'float16', 'int8'):
            return False
        # AVX-512 where the CPU has it and ATen uses it (ATEN_CPU_CAPABILITY=avx2 imitates an AVX2 CPU)
        return name == 'ours' or (torch.ops.gptlab.isa() == 2 and torch.backends.cpu.get_cpu_capability() == 'AVX512')
    if name == 'oneDNN':
        return getattr(torch, dtype) in ONEDNN_DTYPES
    if name == 'oneDNN in float32':
        return dtype == 'float16' and many and torch.float32 in ONEDNN_DTYPES
    if name == '_weight_int8pack_mm':
        return INT8PACK
    if name == 'dequantized bfloat16':
        return many
    return True


def _onednn(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')


class CPULinear(nn.Linear):
    """nn.Linear with the fastest CPU inference kernel for its dtype and row count on this machine
    (kernel_choice); optimize() turns a model's nn.Linears into these (same parameters, same state dict).
    The candidates: F.linear (MKL, and a hand-written float16 one-row kernel); oneDNN's matmul (on a 2-core AMD
    EPYC with AVX-512: ~30 GB/s against MKL's ~17, and 2x faster on many rows); for float16 with many rows,
    oneDNN in float32 (PyTorch's float16 many-row kernel is 8x slower on CPUs without AVX512-FP16); and
    KERNELS_CPP's float_linear (float32 and float16). One row inside compile_decode()'s step is a compiled
    one_row_matmul, or float_linear (a custom op inside the graph) where that step measured faster (step_kernel).
    Training (gradients on), other torch.compile uses and GPUs take plain F.linear."""
    KERNELS = {
        'F.linear': F.linear,
        'oneDNN': _onednn,
        'oneDNN in float32': lambda x, w, b: _onednn(x.float(), w.float(), None if b is None else b.float()).half(),
        'ours': lambda x, w, b: torch.ops.gptlab.float_linear(x.contiguous(), w, b, 1),
        'ours AVX-512': lambda x, w, b: torch.ops.gptlab.float_linear(x.contiguous(), w, b, 2),
    }
    kernel = None  # a kernel's name, to force one (kernel_choice's probe); None: kernel_choice's fastest
    step_kernel = None  # one of ours for compile_decode's step (step_kernels); None: a compiled one_row_matmul

    def forward(self, x):
        if x.device.type != 'cpu' or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():
            if x.numel() == x.size(-1):  # compile_decode's step
                if self.step_kernel:
                    return self.KERNELS[self.step_kernel](x, self.weight, self.bias)
                return one_row_matmul(x.reshape(-1), self.weight, None, self.bias).view(*x.shape[:-1], -1)
            return F.linear(x, self.weight, self.bias)
        name = self.kernel
        if name is None:
            rows = probe_rows(x.numel() // x.size(-1))
            name = next(n for n in kernel_choice(str(x.dtype).removeprefix('torch.'), rows) + ('F.linear',)
                        if not n.startswith('ours') or self.in_features % 8 == 0)
        return self.KERNELS[name](x, self.weight, self.bias)


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8, one float32 scale per output channel (symmetric: w ~= q * scale,
    q in [-127, 127]): a quarter of float32's bytes, and decoding reads every weight once per token. Activations
    are float32 outside; inside, the kernel kernel_choice measured fastest on this machine:
    - 'ours' (KERNELS_CPP's int8_linear): activations quantized to int8 per block of 32 at run time, as llama.cpp's
      Q8_0 does, and integer dot products with the int8 weights (AVX2 maddubs; 'ours AVX-512': VNNI's dpbusd),
      the weights packed for it (pack_rows; weight then holds that layout, row_order_weight() gives row order);
    - PyTorch's int8-weight kernel on bfloat16 activations (_weight_int8pack_mm: its float32 path is ~20x slower);
    - for many rows (a prompt, prune.py's scoring), the weight dequantized to bfloat16 (oneDNN multiplies
      bfloat16 natively on CPUs with AVX512-BF16 or AMX: 2.2-2.4x faster than _weight_int8pack_mm at 512 rows)
      or to float32.
    Inside compile_decode's step one row takes the fastest of ours if the weights are packed, else a compiled one-row
    multiply-and-sum. Inference only: quantize_int8 makes these from a loaded model."""
    KERNELS = {
        'ours': lambda self, rows: torch.ops.gptlab.int8_linear(rows.float().contiguous(), self.weight, self.scale,
                                                                self.bias, 1),
        'ours AVX-512': lambda self, rows: torch.ops.gptlab.int8_linear(rows.float().contiguous(), self.weight,
                                                                        self.scale, self.bias, 2),
        '_weight_int8pack_mm': lambda self, rows: torch.ops.aten._weight_int8pack_mm(
            rows.to(torch.bfloat16), self.weight, self.scale_bf16).float() + (0 if self.bias is None else self.bias),
        'dequantized bfloat16': lambda self, rows: F.linear(
            rows.to(torch.bfloat16), self.row_order_weight().to(torch.bfloat16) * self.scale_bf16[:, None]).float()
            + (0 if self.bias is None else self.bias),
        'dequantized float32': lambda self, rows: F.linear(
            rows.float(), self.row_order_weight().float() * self.scale[:, None], self.bias),
    }
    kernel = None  # a kernel's name, to force one; None: kernel_choice's fastest that this layer can run

    def __init__(self, linear, packed=None):
        """packed: whether to pack the weight for ours (the 'ours' kernels); None: if one of them is this
        machine's fastest for one row."""
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer('weight', (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer('scale', scale)
        self.register_buffer('scale_bf16', scale.to(torch.bfloat16), persistent=False)  # (_weight_int8pack_mm's)
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.ours = 'ours'  # which of the 'ours' kernels the compiled step runs on packed weights
        if packed is None:
            ranking = kernel_choice('int8', 1)
            packed = self.in_features % 32 == 0 and ranking[0].startswith('ours')
            self.ours = ranking[0] if packed else 'ours'
        self.packed = packed
        if packed:
            self.weight = pack_rows(self.weight)

    def row_order_weight(self):
        """The int8 weight (out, in) in row order, whatever the layout it is stored in."""
        return unpack_rows(self.weight) if self.packed else self.weight

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("an int8 model is for inference only; train the float model it was quantized from")
        rows = x.reshape(-1, x.size(-1))
        if torch.compiler.is_compiling():  # compile_decode's step: one row
            if self.packed:
                return self.KERNELS[self.ours](self, rows).to(x.dtype).view(*x.shape[:-1], -1)
            y = one_row_matmul(rows[0].float(), self.weight, self.scale, self.bias)
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        name = self.kernel or next(n for n in kernel_choice('int8', probe_rows(rows.size(0))) + ('dequantized float32',)
                                   if n.startswith('ours') == self.packed or n.startswith('dequantized'))
        return self.KERNELS[name](self, rows).to(x.dtype).view(*x.shape[:-1], -1)


def quantize_int8(model):
    """Quantize a loaded model's Linears to int8 weights (Int8Linear), in place, for CPU inference; returns it.
    GPT's output layer shares its weight with the token embedding: it gets an int8 copy, and the embedding
    stays as it was (a lookup reads one row per token). Call it before optimize()."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Linear, CPULinear):  # (not the Embedding: a tied lm_head gets its own int8 copy)
                setattr(parent, name, Int8Linear(child))
    return attention_in_float32(model)  # attention and its cache in float32, not the weights' int8


DTYPES = ('float32', 'bfloat16', 'float16', 'int8')  # what sample.py, prune.py and interpret.py take as dtype


def check_dtype(dtype, device):
    """Raise ValueError (one line) for a dtype not in DTYPES, or int8 off the CPU. Scripts call it before loading
    anything, so that a typo costs no download."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == 'int8' and device != 'cpu':
        raise ValueError(f"dtype='int8' is a CPU path (fast_cpu.quantize_int8); on {device} use bfloat16 or float16")


def cast(model, dtype, device):
    """The model's weights in dtype, one of DTYPES ('int8': quantize_int8, a CPU path), on device; then, on a
    CPU, optimize(). Raises ValueError as check_dtype does. Returns the model."""
    check_dtype(dtype, device)
    model.to(device=device, dtype=getattr(torch, 'float32' if dtype == 'int8' else dtype))
    if dtype == 'int8':
        quantize_int8(model)
    return optimize(model) if device == 'cpu' else model


def optimize(model, compile=False):
    """Make a loaded model fast for inference on the CPU, in place; returns it. Every nn.Linear becomes a
    CPULinear, and softmax attention computes (and caches keys and values) in float32 under half-precision
    weights: PyTorch's CPU attention is 8-13x slower in float16 / bfloat16 than in float32 (bench.py), and
    less accurate; one query (a decoding step) attends through one_query_attention. The weights move to huge pages (huge_pages). compile=True also compiles the one-token
    decoding step (compile_decode). A model on another device is returned as it is. Call it after moving the model to its device and dtype."""
    p = next(model.parameters())
    if p.device.type != 'cpu':
        return model
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = CPULinear
    if p.dtype in (torch.float16, torch.bfloat16):
        attention_in_float32(model)
    for m in model.modules():
        if hasattr(m, 'one_query_attention'):
            m.one_query_attention = one_query_attention
    huge_pages(model)
    if compile:
        compile_decode(model)
    return model


HUGE_PAGE = 2 << 20  # x86-64's and most ARM64 Linux kernels' large page


def huge_pages(model):
    """Move the model's weights of 2 MB or more into memory that Linux backs with 2 MB pages (transparent huge
    pages, asked for with madvise), in place; returns the model. Decoding streams every weight once a token, and
    with 4 KB pages the CPU's prefetcher stops at every page boundary and its TLB misses every few rows: on a
    2-core Zen 4, one-token steps took 4% (float16, int8) to 7% (float32) less time (README "Speed"). Where
    the kernel has them off (or on a system without madvise), nothing is moved. Tensors shared by two modules
    (GPT's tied embedding and output layer) stay shared."""
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            if '[never]' in f.read():
                return model
    except OSError:
        return model  # (not Linux)
    if not hasattr(mmap, 'MADV_HUGEPAGE'):
        return model
    moved = {}  # id of a tensor -> (it, what replaces it); (it kept: an id is unique only while its object lives)
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is None or t.device.type != 'cpu' or t.numel() * t.element_size() < HUGE_PAGE:
                    continue
                if id(t) not in moved:
                    if isinstance(t, nn.Parameter):  # the same Parameter, its data moved: whoever shares it sees it
                        t.data = huge_page_copy(t.detach())
                        moved[id(t)] = (t, t)
                    else:
                        moved[id(t)] = (t, huge_page_copy(t))
                store[name] = moved[id(t)][1]
    return model


def huge_page_copy(t):
    """A copy of tensor t in private memory that starts at a 2 MB boundary, marked for huge pages (MADV_HUGEPAGE:
    filled with 2 MB pages as it is written). The memory is freed with the last tensor that uses it."""
    n = t.numel() * t.element_size()
    memory = mmap.mmap(-1, n + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # (shared memory has no THP)
    memory.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(memory, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + n].view(t.dtype).view(t.shape).copy_(t)


def attention_in_float32(model):
    """Make softmax attention compute (and cache keys and values) in float32, whatever the weights' dtype and
    even under autocast; in place, returns the model. On CPUs PyTorch's half-precision attention is slow:
    8-13x in decoding (optimize() calls this), and in training under bfloat16 autocast its flash-attention
    backward is 1.9-2.5x float32's time for small heads and short contexts (4 heads x 32 over 64-128
    positions: nanoGPT's CPU example, pico_tiny; 2-core AMD EPYC, torch 2.13), so train.py calls this there.
    (At GPT-2's 12 heads x 64 over 1024 positions bfloat16 is 0.8x float32's time: a few % of that step.)"""
    for m in model.modules():
        if hasattr(m, 'compute_dtype'):
            m.compute_dtype = torch.float32
    return model


def decode_seconds(model, tokens=6):
    """Seconds a greedy generation of tokens takes after a one-token prompt (the best of two), the measure by
    which compile_decode keeps or drops the compiled step on the machine it runs on."""
    best = float('inf')
    for _ in range(2):
        t0 = time.perf_counter()
        model.generate(torch.zeros(1, 1, dtype=torch.long), tokens, temperature=0)
        best = min(best, time.perf_counter() - t0)
    return best


# Inductor inlines cheap elementwise work into its consumers; inside a one-row matmul that would recompute a
# LayerNorm or GELU for every weight row (measured: blocks 1.8x slower), so small results are stored.
STEP_OPTIONS = {'realize_opcount_threshold': 0, 'realize_acc_reads_threshold': 0}


def aot_step(model, eager, blocks):
    """The one-token step of a GPT whose blocks keep key/value caches, compiled ahead of time by AOTInductor
    (torch.export, then inductor's C++): step(idx, start_pos) -> (logits, None), C++ from input to output.
    Per token it saves what a torch.compile'd step spends in Python (dynamo's guards, inductor's wrapper that
    calls each kernel): int8 1.15-1.3x, float16 1.08-1.11x faster on a 2-core Zen 4 (README "Speed"). The
    compiled library holds no weights: it reads the model's own tensors in place (so compile a model after it
    has its final dtype and weights, as optimize(model, compile=True) does). It is kept in cache_dir(), keyed
    by the exported graph and the weights' shapes: a model of the same shape and dtype compiles once (~25 s),
    later only exports (~5 s)."""
    class Step(nn.Module):
        # the caches are inputs, written in place; start_pos is the length of an empty tensor, the form in
        # which export keeps an integer symbolic: one library for every position and cache length
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, idx, position, caches):
            for block, k, v in zip(blocks, caches[0::2], caches[1::2]):
                block.attn.cache = (k, v)
            return eager(idx, start_pos=position.size(0))[0]
    module, longest = Step(), model.block_size or 4096
    model.setup_cache(1, 3)  # (examples: position 2 and caches of length 4; 0 and 1 would be taken as constants)
    caches = [t for block in blocks for t in block.attn.cache]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # (that Step assigns the caches: it is meant to)
            program = torch.export.export(
                module, (torch.zeros(1, 1, dtype=torch.long), torch.empty(2, 0), caches), strict=False,
                dynamic_shapes=({}, {0: torch.export.Dim('position', min=1, max=longest - 1)},
                                [{2: torch.export.Dim('length', min=3, max=longest + 1)}] * len(caches)))
    finally:
        model.setup_cache(None, None)
    weights = {**program.constants, **dict(module.named_parameters(remove_duplicate=False)),
               **dict(module.named_buffers(remove_duplicate=False))}
    key = hashlib.sha256('\n'.join([str(program.graph), machine(), repr(STEP_OPTIONS), *sorted(
        f'{k}={v}' for k, v in os.environ.items() if k.startswith('TORCHINDUCTOR')), *(
        f'{name} {tuple(t.shape)} {t.stride()} {t.dtype}' for name, t in weights.items())]).encode())
    path = os.path.join(cache_dir(), f'step-{key.hexdigest()[:16]}.pt2')
    if not os.path.exists(path):
        print(f"compile_decode: compiling the one-token step with AOTInductor (once per model shape and dtype, "
              f"~25 s) into {cache_dir()}", file=sys.stderr)
        os.makedirs(cache_dir(), exist_ok=True)
        with output_file(path) as tmp:
            torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs={
                **STEP_OPTIONS, 'aot_inductor.package_constants_in_so': False})
    runner = torch._inductor.aoti_load_package(path)
    runner.load_constants({name: weights[name].detach() for name in runner.get_constant_fqns()},
                          check_full_update=True, user_managed=True)

    first = next(module.parameters())  # a .to() or .half() after this gives every weight new memory
    address = first.data_ptr()

    def step(idx, start_pos):
        if first.data_ptr() != address:  # (the library would read freed memory)
            raise RuntimeError("compile_decode: the model's weights were moved or cast after compiling; give a model "
                               "its final dtype and device before fast_cpu.compile_decode")
        # (the runner's own call rebuilds its input and output trees each time; this is its flat form: the
        # inputs in order, the one output in a list)
        return runner.loader.boxed_run([idx, torch.empty(start_pos, 0), *(t for block in blocks
                                                                          for t in block.attn.cache)])[0], None
    return step


def dynamo_step(eager):
    """The one-token step through torch.compile, which compiles it on the first call: for models whose state is
    replaced each step (the linear-attention family) rather than written into a cache."""
    # each model compiled in a process adds graphs of GPT.forward: raise dynamo's limit of 8 per function, past
    # which it would decode uncompiled without a word (recompile_limit since torch 2.6, cache_size_limit before)
    dynamo_config = torch._dynamo.config
    limit = 'recompile_limit' if hasattr(dynamo_config, 'recompile_limit') else 'cache_size_limit'
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
    # dynamic=True: one graph for every position and state (the weights' shapes stay fixed)
    step = torch.compile(eager, dynamic=True, options=STEP_OPTIONS)
    return lambda idx, start_pos: step(idx, start_pos=start_pos)


def step_key(linears, ahead_of_time):
    """The ranking's key (choice_key) for the one-row matmuls of a compiled step over these CPULinears: inductor's
    settings, the weights' dtype, how the step is compiled (AOTInductor or torch.compile) and the matmuls'
    shapes (a small model's timing says little of GPT-2's)."""
    shapes = sorted({f'{m.out_features}x{m.in_features}' for m in linears})
    inductor = [f'{k}={v}' for k, v in sorted(os.environ.items()) if k.startswith('TORCHINDUCTOR')]
    return choice_key(*inductor, str(linears[0].weight.dtype).removeprefix('torch.'),
                      f"compiled step ({'AOTInductor' if ahead_of_time else 'torch.compile'}), {len(linears)} "
                      f"matmuls {' '.join(shapes)}")


def step_kernels(linears, ahead_of_time):
    """The one-row matmuls compile_decode's step may run for float weights (CPULinear.step_kernel), to be
    compiled and timed: None (one_row_matmul, inductor's multiply-and-sum) and, where one of ours leads
    kernel_choice's one-row ranking, that one too (float_linear, a custom op inside the graph). What wins alone
    need not win inside a step: on a 2-core Zen 4 'ours AVX-512' ranked first alone for float32, and its step
    decoded at 0.94x one_row_matmul's; on a Xeon imitating AVX2, ours' float16 step decoded at 2.1x
    one_row_matmul's (README "Speed"). A ranking timed before (kept in cache_dir() per machine and shapes)
    gives its first alone."""
    dtype = str(linears[0].weight.dtype).removeprefix('torch.') if linears else None
    if dtype not in ('float32', 'float16'):
        return [None]
    known = _known_choice(step_key(linears, ahead_of_time))
    if isinstance(known, list) and known and (known[0] is None or _can_run(known[0], dtype, False)):
        return known[:1]
    fastest = kernel_choice(dtype, 1)[0]
    return [None, fastest] if fastest.startswith('ours') else [None]


def compile_decode(model, probe=True):
    """Compile token-by-token decoding on CPU (it needs a C++ compiler): each one-token step of a GPT (batch 1)
    runs as one compiled call, so the ~200 small eager kernels and dozens of dispatches a token become a handful
    of C++ loops, and every matmul of one row becomes a multiply-and-sum (one_row_matmul) that streams the
    weights once, int8 scales and biases in the same pass, or a call of KERNELS_CPP's kernel, a custom op inside
    the graph: int8_linear on packed int8 weights; float_linear on float32 and float16 ones where it ranks first
    for one row (kernel_choice) and its step decodes faster than the multiply-and-sum's (both are compiled and
    timed once per machine and model shape, ~2-4 s: step_kernels). A model whose blocks all keep a key/value
    cache (softmax attention: GPT-2) is compiled ahead of time (aot_step): the step is then a C++ function,
    with no Python, guards or wrapper per call; the linear-attention family, whose state is replaced each step,
    goes through torch.compile. Prefill, batches and gradients keep the model's own forward (one graph serves every
    position: no recompiling per prompt). It compiles before returning (GPT-2 124M on a 2-core CPU: ~30 s the
    first time, twice that where a float step is compiled both ways; 4-9 s once the compiled step is cached).
    Returns False, with a one-line note on stderr, if compiling is not possible here, or (probe) if the
    compiled step decodes slower than the eager one on this CPU, timed alternately for a moment
    (decode_seconds): kernels that win on one ISA lose on another (README "Speed"), so the choice is measured
    where it runs, and compile=True is never slower than compile=False."""
    if 'forward' in vars(model):  # compiled already
        return True
    eager = model.forward
    blocks = getattr(getattr(model, 'transformer', None), 'h', [])

    def forward(idx, targets=None, start_pos=None):
        if start_pos and idx.shape == (1, 1) and targets is None and not torch.is_grad_enabled():
            return step(idx, start_pos)
        return eager(idx, targets, start_pos)
    attention_choice()  # (measured before tracing, which would trace the timing's own ops)
    linears = [m for m in model.modules() if isinstance(m, CPULinear) and m.in_features % 8 == 0]
    steps, step = {}, None  # one-row matmul kernel -> its compiled step; the step forward calls

    def use(kernel):  # (step_kernel is traced into a step, and dynamo's guards check it on every call)
        nonlocal step
        for m in linears:
            m.step_kernel = kernel
        step = steps.get(kernel)
    ahead_of_time = blocks and all(hasattr(block.attn, 'cache') for block in blocks)
    tried = step_kernels(linears, ahead_of_time)
    try:  # compile now (torch.compile would on the first call), so that a missing compiler shows here
        for kernel in tried:
            use(kernel)
            try:
                step = steps[kernel] = aot_step(model, eager, blocks) if ahead_of_time else dynamo_step(eager)
                model.forward = forward
                model.generate(torch.zeros(1, 1, dtype=torch.long), 3, temperature=0)  # (greedy: no random numbers)
            except Exception as e:  # (our kernel failing inside a step where inductor's loop compiled: keep that)
                steps.pop(kernel, None)
                if not steps or isinstance(e, ValueError):
                    raise
    except ValueError:  # (the model's own one-line error: its logits are NaN)
        vars(model).pop('forward', None)
        raise
    except Exception as e:  # no C++ compiler, or no inductor for this platform
        vars(model).pop('forward', None)
        print(f"compile_decode: compiling is not available here ({type(e).__name__}); decoding runs uncompiled",
              file=sys.stderr)
        return False
    ranking = list(steps)
    if len(steps) > 1:  # time them alternately (a change of load falls on each), keep the fastest
        times = {kernel: [] for kernel in steps}
        for _ in range(3):  # (16 tokens: one-token prompts and new caches dilute fewer; ~2-4 s, once per machine)
            for kernel in steps:
                use(kernel)
                times[kernel].append(decode_seconds(model, 16))
        ranking = sorted(steps, key=lambda kernel: min(times[kernel]))
        print(f"compile_decode: timed the compiled step's one-row matmuls on this CPU "
              f"({torch.backends.cpu.get_cpu_capability()}): " + ", ".join(
                  f"{kernel or 'one_row_matmul'} {min(times[kernel]) * 1e3:.0f} ms" for kernel in ranking) +
              f" for 16 tokens; using {ranking[0] or 'one_row_matmul'}", file=sys.stderr)
    use(ranking[0])
    if len(tried) > 1:  # (kept, failed kernels last: later models of this shape compile only the first)
        _keep_choice(step_key(linears, ahead_of_time), ranking + [kernel for kernel in tried if kernel not in steps])
    return probe_compiled(model) if probe else True


def probe_compiled(model):
    """compile_decode's probe: keep the compiled step only if it decodes faster than the eager one on this CPU,
    timed alternately for a moment (decode_seconds); else drop it with one line. Returns whether it is kept."""
    forward = vars(model)['forward']
    times = {'compiled': [], 'eager': []}
    for _ in range(2):  # alternately, so that a change of load falls on both
        times['compiled'].append(decode_seconds(model))
        del model.forward  # (the class's own forward: eager)
        times['eager'].append(decode_seconds(model))
        model.forward = forward
    compiled, plain = min(times['compiled']), min(times['eager'])
    if compiled >= plain:
        del model.forward
        print(f"compile_decode: the compiled step is slower on this CPU ({torch.backends.cpu.get_cpu_capability()}"
              f": {compiled * 1e3:.0f} vs {plain * 1e3:.0f} ms for a few tokens); decoding runs uncompiled",
              file=sys.stderr)
        return False
    return True
