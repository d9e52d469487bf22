"""Integer dot-product kernels for x86 CPUs, int8 activations times int4 or int8 weights: a small C
file, compiled at first use.

torch's int4 CPU product converts each weight to float and multiplies in float, and oneDNN's int8
one (which w8a8 used) reads its weights at two thirds of the memory's speed in decoding.
llama.cpp's Q4_0 and Q8_0 are faster because they multiply 4- or 8-bit weights by 8-bit
activations with the CPU's integer dot products (AVX-512 VNNI's vpdpbusd: 64 u8 x s8 products
summed into 16 int32 per instruction), converting nothing but one sum per block. This file does
the same for quantize.py's weights: --quantize w4a8 reads the int4 file, w8a8 the int8 one.

w4a8: each token's x is rounded per block of 32 inputs (the weight's groups) to int8 on its own
scale d. With w = (q - 8) s + z in a group, and x ~ d qx there:
    sum w x = s d (sum q qx - 8 sum qx) + z sum x
where q qx is the integer dot product, and sum x is the block's exact float sum.
w8a8: each token's x is rounded to int8 on one scale, the weight is int8 per row (below).

The C has each loop twice: with AVX-512 VNNI intrinsics, and as plain C (any CPU; the tests run
both against the arithmetic written out in float64). It is built with the system's C compiler
(cc, -O3 -march=native -fopenmp: OpenMP is torch's own runtime, already loaded, so it shares
torch's threads) into ~/.cache/nano-llama3, keyed by the source and the CPU, and called through
ctypes. Without a compiler, quantize.check_device says so in one line, before anything is loaded.
"""
import ctypes
import hashlib
import os
import platform
import subprocess
from functools import cache
from pathlib import Path

import torch

import llama

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(PORTABLE)
#include <immintrin.h>
#define VNNI 1
#endif

int int8dot_vnni(void) {
#ifdef VNNI
    return 1;
#else
    return 0;
#endif
}

static float bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- w4a8 ---- */

/* x (tokens, n) float32, or bfloat16 if bf16 -> per block of 32: qx int8, d (the scale),
   sq = d * sum qx * -8, sx = sum x (exact). */
static void w4a8_quantize(const void *x, int bf16_input, int64_t tokens, int64_t n, int8_t *qx,
                          float *d, float *sq, float *sx) {
    int64_t blocks = n / 32;
    #pragma omp parallel for schedule(static) if (tokens * n > 65536)
    for (int64_t b = 0; b < tokens * blocks; b++) {
        float xb[32];
        for (int i = 0; i < 32; i++)
            xb[i] = bf16_input ? bf16(((const uint16_t *)x)[b * 32 + i])
                               : ((const float *)x)[b * 32 + i];
        float amax = 0.f, sum = 0.f;
        for (int i = 0; i < 32; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
            sum += xb[i];
        }
        float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int s = 0;
        for (int i = 0; i < 32; i++) {
            int v = (int)nearbyintf(xb[i] * inv);
            qx[b * 32 + i] = (int8_t)v;
            s += v;
        }
        d[b] = scale; sq[b] = -8.f * scale * (float)s; sx[b] = sum;
    }
}

/* y (tokens, out) = x W^T. w (out, n / 2) uint8: for the blocks 2p and 2p + 1 of a row, 32 bytes,
   byte j = q[2p][j] | q[2p + 1][j] << 4. s, z (out, n / 32) bf16. */
static void w4a8_matmul(const int8_t *qx, const float *d, const float *sq, const float *sx,
                        int64_t tokens, const uint8_t *w, const uint16_t *s,
                        const uint16_t *z, int64_t out, int64_t n, float *y) {
    int64_t blocks = n / 32;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < out; r++) {
        const uint8_t *wr = w + r * (n / 2);
        const uint16_t *sr = s + r * blocks, *zr = z + r * blocks;
        for (int64_t t = 0; t < tokens; t++) {
            const int8_t *xt = qx + t * n;
            const float *dt = d + t * blocks, *sqt = sq + t * blocks, *sxt = sx + t * blocks;
            float acc = 0.f;
            int64_t b = 0;
#ifdef VNNI
            /* 16 groups (512 weights) a step: their 16 scales times the token's 16 d in one
               vector, each pair's half taken out by a permute; the -8 sum qx and zero terms
               for all 16 at once */
            __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
            __m512 accz = _mm512_setzero_ps();
            const __m256i low = _mm256_set1_epi8(15);
            const __m512i half = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
            for (; b + 16 <= blocks; b += 16) {
                __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((const __m256i *)(sr + b))), 16));
                __m512 zv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((const __m256i *)(zr + b))), 16));
                accz = _mm512_fmadd_ps(sv, _mm512_loadu_ps(sqt + b), accz);
                accz = _mm512_fmadd_ps(zv, _mm512_loadu_ps(sxt + b), accz);
                __m512 m = _mm512_mul_ps(sv, _mm512_loadu_ps(dt + b));
                for (int k = 0; k < 8; k++) {
                    __m256i p = _mm256_loadu_si256((const __m256i *)(wr + (b + 2 * k) * 16));
                    if (t == 0 && (k & 1) == 0)  /* the row after next: more reads in flight */
                        _mm_prefetch((const char *)(wr + n + (b + 2 * k) * 16), _MM_HINT_T0);
                    __m512i q = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_and_si256(p, low)),
                        _mm256_and_si256(_mm256_srli_epi16(p, 4), low), 1);
                    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q,
                                                      _mm512_loadu_si512(xt + (b + 2 * k) * 32));
                    /* lanes 0-7 take group 2k's factor, lanes 8-15 group 2k + 1's */
                    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(2 * k), half);
                    __m512 mk = _mm512_permutexvar_ps(idx, m);
                    if (k & 1) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), mk, acc1);
                    else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), mk, acc0);
                }
            }
            acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), accz));
            int64_t done = b;
#else
            int64_t done = 0;
#endif
            for (; b < blocks; b += 2) {  /* plain C: the same sums, a pair of blocks at a time */
                const uint8_t *p = wr + b * 16;
                int32_t d0 = 0, d1 = 0;
                for (int j = 0; j < 32; j++) {
                    d0 += (int32_t)(p[j] & 15) * xt[b * 32 + j];
                    d1 += (int32_t)(p[j] >> 4) * xt[(b + 1) * 32 + j];
                }
                acc += bf16(sr[b]) * dt[b] * (float)d0 + bf16(sr[b + 1]) * dt[b + 1] * (float)d1;
            }
            /* the blocks' -8 sum qx and zero terms: s (d * -8 sum qx) + z sum x */
            for (int64_t c = done; c < blocks; c++)
                acc += bf16(sr[c]) * sqt[c] + bf16(zr[c]) * sxt[c];
            y[t * out + r] = acc;
        }
    }
}

/* y (tokens, out) float32 = x W^T: x rounded per block, then the products; one call from Python */
int w4a8_linear(const void *x, int bf16_input, int64_t tokens, int64_t n, const uint8_t *w,
                const uint16_t *s, const uint16_t *z, int64_t out, float *y) {
    int64_t tb = tokens * (n / 32);
    int8_t *qx = aligned_alloc(64, (tokens * n + 63) / 64 * 64);  /* 64-byte loads in one line */
    float *f = malloc(3 * tb * sizeof(float));  /* d, sq, sx */
    if (!qx || !f) { free(qx); free(f); return 1; }
    w4a8_quantize(x, bf16_input, tokens, n, qx, f, f + tb, f + 2 * tb);
    w4a8_matmul(qx, f, f + tb, f + 2 * tb, tokens, w, s, z, out, n, y);
    free(qx);
    free(f);
    return 0;
}
/* ---- w8a8: int8 weights (per output row) times int8 activations (per token) ----
   Each token's x is rounded to qx in [-127, 127] on its own scale d (its largest |x| becomes
   127). The weight q in [-127, 127] is stored as u = q + 128 (vpdpbusd takes u8 x s8), so
       sum q qx = sum u qx - 128 sum qx
   exactly in int32; y = (that) * scale * d. Rows are interleaved by 4 (w8a8_layout): for each
   64 inputs, the 4 rows' bytes side by side, one stream a block of rows. */

static void w8a8_quantize(const void *x, int bf16_input, int64_t tokens, int64_t n, int8_t *qx,
                          float *d, float *sq) {  /* -> qx, d, sq = -128 sum qx */
    #pragma omp parallel for schedule(static) if (tokens * n > 65536)
    for (int64_t t = 0; t < tokens; t++) {
        float amax = 0.f;
        for (int64_t i = 0; i < n; i++) {
            float v = bf16_input ? bf16(((const uint16_t *)x)[t * n + i])
                                 : ((const float *)x)[t * n + i];
            amax = fabsf(v) > amax ? fabsf(v) : amax;
        }
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t s = 0;
        for (int64_t i = 0; i < n; i++) {
            float v = bf16_input ? bf16(((const uint16_t *)x)[t * n + i])
                                 : ((const float *)x)[t * n + i];
            int q = (int)nearbyintf(v * inv);
            qx[t * n + i] = (int8_t)q;
            s += q;
        }
        d[t] = amax / 127.f;
        sq[t] = -128.f * (float)s;
    }
}

#define W8A8_OUT(t, i, acc) y[(t) * out + r0 + (i)] = ((float)(acc) + sq[t]) * sc[r0 + (i)] * d[t]
#ifdef VNNI
/* 4 rows (one interleaved block) times 6 tokens: 24 accumulators in registers, each block of
   weights loaded once for the 6 tokens (prefill); named, not an array, so none spills */
#define W8A8_TOKEN(j) xv = _mm512_loadu_si512(qx + (t0 + j) * n + k); \
    a0##j = _mm512_dpbusd_epi32(a0##j, w0, xv); a1##j = _mm512_dpbusd_epi32(a1##j, w1, xv); \
    a2##j = _mm512_dpbusd_epi32(a2##j, w2, xv); a3##j = _mm512_dpbusd_epi32(a3##j, w3, xv);
#define W8A8_ZERO(j) __m512i a0##j = _mm512_setzero_si512(), a1##j = a0##j, a2##j = a0##j, \
    a3##j = a0##j;
#define W8A8_STORE(j) W8A8_OUT(t0 + j, 0, _mm512_reduce_add_epi32(a0##j)); \
    W8A8_OUT(t0 + j, 1, _mm512_reduce_add_epi32(a1##j)); \
    W8A8_OUT(t0 + j, 2, _mm512_reduce_add_epi32(a2##j)); \
    W8A8_OUT(t0 + j, 3, _mm512_reduce_add_epi32(a3##j));
static void w8a8_tile6(const int8_t *qx, const float *d, const float *sq, int64_t t0, int64_t n,
                       const uint8_t *wb, const float *sc, int64_t r0, int64_t out, float *y) {
    W8A8_ZERO(0) W8A8_ZERO(1) W8A8_ZERO(2) W8A8_ZERO(3) W8A8_ZERO(4) W8A8_ZERO(5)
    for (int64_t k = 0; k < n; k += 64) {
        __m512i w0 = _mm512_loadu_si512(wb + k * 4), w1 = _mm512_loadu_si512(wb + k * 4 + 64);
        __m512i w2 = _mm512_loadu_si512(wb + k * 4 + 128);
        __m512i w3 = _mm512_loadu_si512(wb + k * 4 + 192), xv;
        W8A8_TOKEN(0) W8A8_TOKEN(1) W8A8_TOKEN(2) W8A8_TOKEN(3) W8A8_TOKEN(4) W8A8_TOKEN(5)
    }
    W8A8_STORE(0) W8A8_STORE(1) W8A8_STORE(2) W8A8_STORE(3) W8A8_STORE(4) W8A8_STORE(5)
}

/* 4 rows times one token (decoding): the next block's bytes prefetched */
static void w8a8_tile1(const int8_t *qx, const float *d, const float *sq, int64_t t0, int64_t n,
                       const uint8_t *wb, const float *sc, int64_t r0, int64_t out, float *y) {
    W8A8_ZERO(0)
    for (int64_t k = 0; k < n; k += 64) {
        __m512i xv = _mm512_loadu_si512(qx + t0 * n + k);
        _mm_prefetch((const char *)(wb + 4 * n + k * 4), _MM_HINT_T0);
        a00 = _mm512_dpbusd_epi32(a00, _mm512_loadu_si512(wb + k * 4), xv);
        a10 = _mm512_dpbusd_epi32(a10, _mm512_loadu_si512(wb + k * 4 + 64), xv);
        a20 = _mm512_dpbusd_epi32(a20, _mm512_loadu_si512(wb + k * 4 + 128), xv);
        a30 = _mm512_dpbusd_epi32(a30, _mm512_loadu_si512(wb + k * 4 + 192), xv);
    }
    W8A8_STORE(0)
}
#endif

static void w8a8_matmul(const int8_t *qx, const float *d, const float *sq, int64_t tokens,
                        int64_t n, const uint8_t *w, const float *sc, int64_t out, float *y) {
#ifdef VNNI
    /* panels of rows that stay in L2 while each 6 tokens' qx (in L1) pass over them */
    int64_t panel = (262144 / n) / 4 * 4;
    panel = tokens < 6 || panel < 4 ? 4 : panel > 64 ? 64 : panel;
    #pragma omp parallel for schedule(static)
    for (int64_t p0 = 0; p0 < out; p0 += panel) {
        int64_t p1 = p0 + panel < out ? p0 + panel : out, t = 0;
        for (; t + 6 <= tokens; t += 6)
            for (int64_t r0 = p0; r0 < p1; r0 += 4)
                w8a8_tile6(qx, d, sq, t, n, w + r0 * n, sc, r0, out, y);
        for (int64_t r0 = p0; r0 < p1; r0 += 4)
            for (int64_t u = t; u < tokens; u++)
                w8a8_tile1(qx, d, sq, u, n, w + r0 * n, sc, r0, out, y);
    }
#else
    #pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < out; r0 += 4) {  /* plain C: the same sums */
        const uint8_t *wb = w + r0 * n;
        for (int64_t t = 0; t < tokens; t++) {
            int32_t acc[4] = {0, 0, 0, 0};
            for (int64_t k = 0; k < n; k += 64)
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 64; j++)
                        acc[i] += (int32_t)wb[k * 4 + i * 64 + j] * qx[t * n + k + j];
            for (int i = 0; i < 4; i++) W8A8_OUT(t, i, acc[i]);
        }
    }
#endif
}

int w8a8_linear(const void *x, int bf16_input, int64_t tokens, int64_t n, const uint8_t *w,
                const float *sc, int64_t out, float *y) {
    int8_t *qx = aligned_alloc(64, (tokens * n + 63) / 64 * 64);  /* 64-byte loads in one line */
    float *f = malloc(2 * tokens * sizeof(float));  /* d, sq */
    if (!qx || !f) { free(qx); free(f); return 1; }
    w8a8_quantize(x, bf16_input, tokens, n, qx, f, f + tokens);
    w8a8_matmul(qx, f, f + tokens, tokens, n, w, sc, out, y);
    free(qx);
    free(f);
    return 0;
}
"""


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nano-llama3"


@cache
def library(portable=False):
    """The compiled kernel (portable=True: the plain C loop only, for tests on any CPU)."""
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"] + (
        ["-DPORTABLE"] if portable else [])
    key = hashlib.sha256((SOURCE + " ".join(flags) + platform.processor() +
                          cpu_flags()).encode()).hexdigest()[:16]
    path = cache_dir() / f"int8dot-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # per process: another may be building it at the same time
        src, tmp = (path.with_suffix(f".{os.getpid()}{ext}") for ext in (".c", ".tmp"))
        src.write_text(SOURCE)
        try:
            r = subprocess.run([os.environ.get("CC", "cc"), *flags, str(src), "-o", str(tmp)],
                               capture_output=True, text=True)
        except FileNotFoundError:
            raise llama.InputError("w4a8 and w8a8 compile a C kernel at first use and found no "
                                   "C compiler: install gcc, or use --quantize int4 or int8"
                                   ) from None
        finally:
            src.unlink()
        if r.returncode:
            last = r.stderr.strip().splitlines()[-1:] or ["?"]
            raise llama.InputError(f"int8dot.py's C kernel did not compile ({last[0]}); use "
                                   "--quantize int4 or int8")
        os.replace(tmp, path)  # whole or absent (not llama.atomic_file: its temporary name is
        # shared, and two processes may be building at once)
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.w4a8_linear.argtypes = [p, ctypes.c_int, i64, i64, p, p, p, i64, p]
    lib.w8a8_linear.argtypes = [p, ctypes.c_int, i64, i64, p, p, i64, p]
    return lib


def cpu_flags():
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def has_vnni():
    return bool(library().int8dot_vnni())


def w4a8_layout(q):
    """q (out, in) uint8 in [0, 15] -> (out, in / 2): for each pair of groups of 32, 32 bytes,
    the first group's q in the low nibbles and the second's in the high."""
    out, n = q.shape
    pairs = q.view(out, n // 64, 2, 32)
    return (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(out, n // 2).contiguous()


def w4a8_matmul(x, w, scales, zeros, portable=False):
    """x (tokens, in) float32 or bfloat16 -> float32 (tokens, out), with w from w4a8_layout and
    scales, zeros (out, in / 32) bf16."""
    tokens, n = x.shape
    # the C reads raw memory: the layouts it assumes, checked
    if not (w.dtype == torch.uint8 and w.shape[1] * 2 == n and n % 64 == 0 and
            scales.dtype == zeros.dtype == torch.bfloat16 and
            scales.shape == zeros.shape == (len(w), n // 32) and
            all(t.is_contiguous() and t.device.type == "cpu" for t in (w, scales, zeros))):
        raise ValueError("w4a8_matmul takes w4a8_layout's uint8 (out, in / 2) and contiguous "
                         "bfloat16 (out, in / 32) scales and zeros on the CPU, in a multiple of 64")
    x = (x if x.dtype == torch.bfloat16 else x.float()).contiguous()
    y = torch.empty(tokens, len(w))
    if library(portable).w4a8_linear(x.data_ptr(), x.dtype == torch.bfloat16, tokens, n,
                                     w.data_ptr(), scales.data_ptr(), zeros.data_ptr(), len(w),
                                     y.data_ptr()):
        raise MemoryError("w4a8: no memory for the rounded activations")
    return y


def w8a8_layout(q):
    """q (out, in) int8 in [-127, 127] -> (out / 4, in * 4) uint8 q + 128: for each block of 4 rows
    and each 64 inputs, the 4 rows' 64 bytes side by side."""
    out, n = q.shape
    u = (q.view(out // 4, 4, n // 64, 64).transpose(1, 2).to(torch.int16) + 128).to(torch.uint8)
    return u.reshape(out // 4, n * 4).contiguous()


def w8a8_unlayout(w):
    """w8a8_layout undone: (out / 4, in * 4) uint8 -> q (out, in) int8."""
    blocks, n = len(w), w.shape[1] // 4
    q = (w.view(blocks, n // 64, 4, 64).to(torch.int16) - 128).to(torch.int8)
    return q.transpose(1, 2).reshape(blocks * 4, n)


def w8a8_matmul(x, w, scales, portable=False):
    """x (tokens, in) float32 or bfloat16 -> float32 (tokens, out): each token rounded to int8 on
    its own scale, times w from w8a8_layout and its rows' scales (out,) float32."""
    tokens, n = x.shape
    if not (w.dtype == torch.uint8 and w.shape[1] == 4 * n and n % 64 == 0 and
            scales.dtype == torch.float32 and scales.shape == (4 * len(w),) and
            all(t.is_contiguous() and t.device.type == "cpu" for t in (w, scales))):
        raise ValueError("w8a8_matmul takes w8a8_layout's uint8 (out / 4, in * 4) and contiguous "
                         "float32 (out,) scales on the CPU, in a multiple of 64")
    x = (x if x.dtype == torch.bfloat16 else x.float()).contiguous()
    y = torch.empty(tokens, len(scales))
    if library(portable).w8a8_linear(x.data_ptr(), x.dtype == torch.bfloat16, tokens, n,
                                     w.data_ptr(), scales.data_ptr(), len(scales), y.data_ptr()):
        raise MemoryError("w8a8: no memory for the rounded activations")
    return y
