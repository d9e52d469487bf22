/* C kernels for CPU decoding, built and called by kernels.py (its docstring says what and why). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) && !defined(PORTABLE)
#include <immintrin.h>
#define AVX512 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(PORTABLE)
#define VNNI 1
#endif

int kernels_vnni(void) {
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

/* ---- w4a8 ----
   The weight is stored for the kernel in blocks of 4 rows (one memory stream) and 16 groups of
   G inputs (w4a8_layout): 4 x 8G bytes of nibbles, then the 4 rows' 16 scales and 16 zeros
   (bf16), 32G + 256 bytes. A row's nibbles are G / 8 vectors of 64 bytes, and vector v of the 4
   rows is stored side by side (bytes 256 v + 64 r), so the kernel reads the block in order: a
   stream the CPU's prefetchers follow. Int32 lane g of each vector holds 4 bytes of group g: so
   one vpdpbusd adds 8 products to each of 16 groups, and a group's integer sum is complete after
   G / 4 of them, with no shuffle; its scales then apply once. Chunk c of 4 inputs of group g
   (inputs 4c .. 4c + 3) is in the low nibbles of vector c / 2 when c is even, the high ones when
   odd. The rounded activations (w4a8_quantize) are in the same order:
   per block, chunk c of all 16 groups is 64 bytes. Inputs past the last group are padding: zero
   scales and zeros, zero activations. */

#define W4A8_BLOCK(G) (32 * (G) + 256)
/* blocks a row's sums take at a time (2048 inputs): each chunk's float sums are added up
   across their 16 lanes, then to the row's, in the same order for one token or many */
#define W4A8_CHUNK(G) (128 / (G))

/* x (tokens, n) float32, or bfloat16 if bf16 -> per block of 16 groups: qx (16 G int8, in
   chunk order), and per group d (the scale), c8 = 8 * sum qx, sx = sum x (exact). */
static void w4a8_quantize(const void *x, int bf16_input, int64_t tokens, int64_t n, int G,
                          int64_t nb, int8_t *qx, float *d, int32_t *c8, float *sx) {
    #pragma omp parallel for schedule(static) if (tokens * n > 65536)
    for (int64_t tg = 0; tg < tokens * nb * 16; tg++) {  /* one group of one token */
        int64_t t = tg / (nb * 16), g = tg % (nb * 16), i0 = g * G;
        int8_t *out = qx + (t * nb + g / 16) * 16 * G + (g % 16) * 4;
        float xb[128], amax = 0.f, sum = 0.f;
        for (int i = 0; i < G; i++) {
            int64_t at = t * n + i0 + i;
            xb[i] = i0 + i >= n ? 0.f : bf16_input ? bf16(((const uint16_t *)x)[at])
                                                   : ((const float *)x)[at];
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
            sum += xb[i];
        }
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        int s = 0;
        for (int i = 0; i < G; i++) {
            int v = (int)nearbyintf(xb[i] * inv);
            out[(i / 4) * 64 + i % 4] = (int8_t)v;
            s += v;
        }
        d[tg] = amax / 127.f; c8[tg] = 8 * s; sx[tg] = sum;
    }
}

#ifdef VNNI
static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 4 rows times one token, blocks b0..b1: added to y[0..3] */
static inline void w4a8_tile(const int8_t *qx, const float *d, const int32_t *c8, const float *sx,
                             const uint8_t *wb, int64_t b0, int64_t b1, float *y, const int G) {
    const __m512i low = _mm512_set1_epi8(15);
    __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *p = wb + b * W4A8_BLOCK(G);
        const int8_t *xb = qx + b * 16 * G;
        _mm_prefetch((const char *)(p + 2 * W4A8_BLOCK(G)), _MM_HINT_T0);
        __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
        for (int v = 0; v < G / 8; v++) {
            __m512i x0 = _mm512_load_si512(xb + v * 128), x1 = _mm512_load_si512(xb + v * 128 + 64);
            #pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                __m512i w = _mm512_loadu_si512(p + (v * 4 + r) * 64);
                a[r] = _mm512_dpbusd_epi32(a[r], _mm512_and_si512(w, low), x0);
                a[r] = _mm512_dpbusd_epi32(a[r], _mm512_and_si512(_mm512_srli_epi16(w, 4), low),
                                           x1);
            }
        }
        const uint16_t *s = (const uint16_t *)(p + 32 * G), *z = s + 64;
        __m512 dv = _mm512_loadu_ps(d + b * 16), sxv = _mm512_loadu_ps(sx + b * 16);
        __m512i cv = _mm512_loadu_si512(c8 + b * 16);
        #pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            __m512 m = _mm512_mul_ps(bf16x16(s + 16 * r), dv);
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[r], cv)), m, f[r]);
            f[r] = _mm512_fmadd_ps(bf16x16(z + 16 * r), sxv, f[r]);
        }
    }
    for (int r = 0; r < 4; r++) y[r] += _mm512_reduce_add_ps(f[r]);
}

/* one row (r of the block) times 8 tokens (prefill), blocks b0..b1, added to y: each 64 bytes
   of the row's nibbles unpacked once for all 8 tokens, not once a token; 16 accumulators */
static inline void w4a8_tile8(const int8_t *qx, const float *d, const int32_t *c8,
                              const float *sx, const uint8_t *wb, int64_t nb, int64_t b0,
                              int64_t b1, int r, float *y, int64_t out, const int G) {
    const __m512i low = _mm512_set1_epi8(15);
    const int64_t xs = nb * 16 * G, fs = nb * 16;  /* one token's strides in qx, and d c8 sx */
    __m512 f[8];
    for (int j = 0; j < 8; j++) f[j] = _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *p = wb + b * W4A8_BLOCK(G);
        const int8_t *xb = qx + b * 16 * G;
        __m512i a[8];
        #pragma GCC unroll 8
        for (int j = 0; j < 8; j++) a[j] = _mm512_setzero_si512();
        for (int v = 0; v < G / 8; v++) {
            __m512i w = _mm512_loadu_si512(p + (v * 4 + r) * 64);
            __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
            #pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                a[j] = _mm512_dpbusd_epi32(a[j], lo, _mm512_load_si512(xb + j * xs + v * 128));
                a[j] = _mm512_dpbusd_epi32(a[j], hi, _mm512_load_si512(xb + j * xs + v * 128 + 64));
            }
        }
        const uint16_t *sc = (const uint16_t *)(p + 32 * G) + 16 * r, *z = sc + 64;
        __m512 sv = bf16x16(sc), zv = bf16x16(z);
        #pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            int64_t i = j * fs + b * 16;
            __m512 m = _mm512_mul_ps(sv, _mm512_loadu_ps(d + i));
            __m512i dot = _mm512_sub_epi32(a[j], _mm512_loadu_si512(c8 + i));
            f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), m, f[j]);
            f[j] = _mm512_fmadd_ps(zv, _mm512_loadu_ps(sx + i), f[j]);
        }
    }
    for (int j = 0; j < 8; j++) y[j * out] += _mm512_reduce_add_ps(f[j]);
}

/* tile(..., G) with G a constant (32, 64 or 128), so that its loops unroll for it */
#define W4A8_WITH_G(G, tile, ...) ((G) == 32 ? tile(__VA_ARGS__, 32) : (G) == 64 ? \
                                   tile(__VA_ARGS__, 64) : tile(__VA_ARGS__, 128))
#endif

/* the 4 rows of block wb times token t: acc[0..3] */
static void w4a8_rows(const int8_t *qx, const float *d, const int32_t *c8, const float *sx,
                      int64_t t, const uint8_t *wb, int64_t nb, int G, float *acc) {
    const int8_t *xt = qx + t * nb * 16 * G;
    const float *dt = d + t * nb * 16, *sxt = sx + t * nb * 16;
    const int32_t *ct = c8 + t * nb * 16;
    for (int r = 0; r < 4; r++) acc[r] = 0.f;
#ifdef VNNI
    for (int64_t b0 = 0; b0 < nb; b0 += W4A8_CHUNK(G)) {
        int64_t b1 = b0 + W4A8_CHUNK(G) < nb ? b0 + W4A8_CHUNK(G) : nb;
        W4A8_WITH_G(G, w4a8_tile, xt, dt, ct, sxt, wb, b0, b1, acc);
    }
#else
    for (int64_t b = 0; b < nb; b++) {  /* plain C: the same sums */
        const uint8_t *p = wb + b * W4A8_BLOCK(G);
        const uint16_t *s = (const uint16_t *)(p + 32 * G), *z = s + 64;
        for (int r = 0; r < 4; r++)
            for (int g = 0; g < 16; g++) {
                int32_t dot = 0;
                for (int c = 0; c < G / 4; c++)
                    for (int k = 0; k < 4; k++) {
                        uint8_t byte = p[((c / 2) * 4 + r) * 64 + g * 4 + k];
                        int q = c % 2 ? byte >> 4 : byte & 15;
                        dot += q * xt[b * 16 * G + c * 64 + g * 4 + k];
                    }
                int64_t i = b * 16 + g;
                acc[r] += (float)(dot - ct[i]) * (bf16(s[16 * r + g]) * dt[i]) +
                          bf16(z[16 * r + g]) * sxt[i];
            }
    }
#endif
}

/* y (tokens, out) = x W^T, w from w4a8_layout: out / 4 blocks of rows */
static void w4a8_matmul(const int8_t *qx, const float *d, const int32_t *c8, const float *sx,
                        int64_t tokens, const uint8_t *w, int64_t out, int64_t nb, int G,
                        float *y) {
    /* prefill: panels of rows that stay in L2 while 8 tokens at a time pass over them */
    int64_t panel = tokens < 8 ? 4 : 4 * (262144 / (nb * W4A8_BLOCK(G)));
    panel = panel < 4 ? 4 : panel;
    #pragma omp parallel for schedule(static)
    for (int64_t p0 = 0; p0 < out; p0 += panel) {
        int64_t p1 = p0 + panel < out ? p0 + panel : out, t = 0;
#ifdef VNNI
        for (; t + 8 <= tokens; t += 8) {
            for (int64_t j = t; j < t + 8; j++)
                for (int64_t r = p0; r < p1; r++) y[j * out + r] = 0.f;
            const int64_t i = t * nb * 16;  /* the 8 tokens' first group */
            const int8_t *xt = qx + i * G;
            for (int64_t b0 = 0; b0 < nb; b0 += W4A8_CHUNK(G)) {  /* 8 tokens' chunk: in L1 */
                int64_t b1 = b0 + W4A8_CHUNK(G) < nb ? b0 + W4A8_CHUNK(G) : nb;
                for (int64_t r0 = p0; r0 < p1; r0 += 4) {
                    const uint8_t *wb = w + (r0 / 4) * nb * W4A8_BLOCK(G);
                    for (int r = 0; r < 4; r++)
                        W4A8_WITH_G(G, w4a8_tile8, xt, d + i, c8 + i, sx + i, wb, nb, b0, b1, r,
                                    y + t * out + r0 + r, out);
                }
            }
        }
#endif
        for (int64_t r0 = p0; r0 < p1; r0 += 4)
            for (int64_t u = t; u < tokens; u++) {
                float acc[4];
                w4a8_rows(qx, d, c8, sx, u, w + (r0 / 4) * nb * W4A8_BLOCK(G), nb, G, acc);
                for (int r = 0; r < 4; r++) y[u * out + r0 + r] = acc[r];
            }
    }
}

/* y (tokens, out) float32 = x W^T: x rounded per group, then the products; one call from Python */
int w4a8_linear(const void *x, int bf16_input, int64_t tokens, int64_t n, int G, const uint8_t *w,
                int64_t out, float *y) {
    int64_t nb = (n + 16 * G - 1) / (16 * G), tg = tokens * nb * 16;
    int8_t *qx = aligned_alloc(64, tg * G);  /* 64-byte loads in one cache line */
    float *f = malloc(3 * tg * sizeof(float));  /* d, c8, sx */
    if (!qx || !f) { free(qx); free(f); return 1; }
    w4a8_quantize(x, bf16_input, tokens, n, G, nb, qx, f, (int32_t *)(f + tg), f + 2 * tg);
    w4a8_matmul(qx, f, (int32_t *)(f + tg), f + 2 * tg, tokens, w, out, nb, G, y);
    free(qx);
    free(f);
    return 0;
}
/* rows r0 .. r0 + 4 * blocks of rows of the weight, dequantized: out (rows, n) float32 */
void w4a8_dequantize(const uint8_t *w, int64_t row_blocks, int64_t n, int G, float *out) {
    int64_t nb = (n + 16 * G - 1) / (16 * G);
    #pragma omp parallel for schedule(static)
    for (int64_t rb = 0; rb < row_blocks; rb++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = w + (rb * nb + b) * W4A8_BLOCK(G);
            const uint16_t *s = (const uint16_t *)(p + 32 * G), *z = s + 64;
            for (int r = 0; r < 4; r++)
                for (int g = 0; g < 16 && (b * 16 + g) * G < n; g++) {
                    float sc = bf16(s[16 * r + g]), zr = bf16(z[16 * r + g]) - 8.f * sc;
                    float *o = out + (rb * 4 + r) * n + (b * 16 + g) * G;
                    for (int c = 0; c < G / 4; c++)
                        for (int k = 0; k < 4; k++) {
                            uint8_t byte = p[((c / 2) * 4 + r) * 64 + g * 4 + k];
                            o[c * 4 + k] = (float)(c % 2 ? byte >> 4 : byte & 15) * sc + zr;
                        }
                }
        }
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

/* 4 rows times one token (decoding). No prefetch: the block's rows are one stream the CPU's
   prefetchers follow, and fetching the next block ahead read slower (a block is 4n bytes) */
static void w8a8_tile1(const int8_t *qx, const float *d, const float *sq, int64_t t0, int64_t n,
                       const uint8_t *wb, const float *sc, int64_t r0, int64_t out, float *y) {
    W8A8_ZERO(0)
    for (int64_t k = 0; k < n; k += 64) {
        __m512i xv = _mm512_loadu_si512(qx + t0 * n + k);
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
/* ---- one-query attention (decoding) ----
   softmax(q k^T / sqrt(hd)) v for each query head, over S cached positions, all in float32 (from
   bf16 or float32 K/V), the query heads of one K/V head together so its keys and values are read
   once. q (B, H, hd); k, v (B, S.., KV, hd) with batch stride bs (elements); y (B, H, hd). */

static uint16_t to_bf16(float f) {  /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* element i of a bf16 (bf) or float32 array, as float32; and back, rounded */
static inline float load1(const void *p, int64_t i, int bf) {
    return bf ? bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store1(void *p, int64_t i, float f, int bf) {
    if (bf) ((uint16_t *)p)[i] = to_bf16(f);
    else ((float *)p)[i] = f;
}

#ifdef AVX512
static inline __m512 load16(const void *p, int bf) {  /* 16 floats, from bf16 if bf */
    return bf ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((const __m256i *)p)), 16))
              : _mm512_loadu_ps(p);
}

static inline __m512 round_bf16x16(__m512 f) {  /* to_bf16 then back, 16 at a time */
    __m512i u = _mm512_castps_si512(f);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(
        _mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static inline void store16(void *p, __m512 f, int bf) {  /* f rounded to bf16 if bf */
    if (bf) _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(
                _mm512_castps_si512(round_bf16x16(f)), 16)));
    else _mm512_storeu_ps(p, f);
}

/* e^x (x < 88): x = n ln 2 + r, |r| <= ln 2 / 2, e^r by its Taylor series to r^7 (relative error
   under 2e-7), times 2^n exactly (vscalefps) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  /* ln 2 in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    static const float c[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
    for (int i = 0; i < 7; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}
#endif

int attend_one(const void *q, const void *k, const void *v, int bf, int64_t B, int64_t H,
               int64_t KV, int64_t hd, int64_t S, int64_t bs, void *y) {
    int64_t rep = H / KV, S16 = (S + 15) / 16 * 16, esize = bf ? 2 : 4;
    int fail = 0;
    #pragma omp parallel for schedule(static) reduction(|:fail)
    for (int64_t bk = 0; bk < B * KV; bk++) {
        int64_t b = bk / KV, kv = bk % KV, h0 = (b * H + kv * rep) * hd;
        /* scores then probabilities (rep, S16), the scaled queries, the outputs, one K/V row */
        float *p = aligned_alloc(64, (rep * S16 + 2 * rep * hd + hd) * sizeof(float));
        if (!p) { fail = 1; continue; }
        float *qf = p + rep * S16, *acc = qf + rep * hd, *row = acc + rep * hd;
        float scale = 1.f / sqrtf((float)hd);
        for (int64_t i = 0; i < rep * hd; i++) {
            qf[i] = load1(q, h0 + i, bf) * scale;
            acc[i] = 0.f;
        }
        const char *kb = (const char *)k + (b * bs + kv * hd) * esize;
        const char *vb = (const char *)v + (b * bs + kv * hd) * esize;
        int64_t step = KV * hd * esize;  /* bytes from one position's row to the next */
        for (int64_t s = 0; s < S; s++) {  /* scores */
#ifdef AVX512
            /* a cached row is a few lines a KV-row apart, and cold (the weights streamed since
               this layer's last step): fetched ahead, as no prefetcher follows the stride */
            for (int64_t c = 0; c < hd * esize; c += 64)
                _mm_prefetch(kb + (s + 8) * step + c, _MM_HINT_T0);
            for (int64_t c = 0; c < hd; c += 16)
                _mm512_store_ps(row + c, load16(kb + s * step + c * esize, bf));
            for (int64_t r = 0; r < rep; r++) {
                __m512 a = _mm512_setzero_ps();
                for (int64_t c = 0; c < hd; c += 16)
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + r * hd + c), _mm512_load_ps(row + c),
                                        a);
                p[r * S16 + s] = _mm512_reduce_add_ps(a);
            }
#else
            for (int64_t c = 0; c < hd; c++)
                row[c] = load1(kb, s * KV * hd + c, bf);
            for (int64_t r = 0; r < rep; r++) {
                float a = 0.f;
                for (int64_t c = 0; c < hd; c++) a += qf[r * hd + c] * row[c];
                p[r * S16 + s] = a;
            }
#endif
        }
        for (int64_t r = 0; r < rep; r++) {  /* softmax */
            float *pr = p + r * S16, m = -INFINITY, sum = 0.f;
            for (int64_t s = 0; s < S; s++) m = pr[s] > m ? pr[s] : m;
#ifdef AVX512
            for (int64_t s = S; s < S16; s++) pr[s] = -INFINITY;  /* e^-inf: 0 */
            __m512 vsum = _mm512_setzero_ps();
            for (int64_t s = 0; s < S16; s += 16) {
                __m512 e = exp16(_mm512_sub_ps(_mm512_load_ps(pr + s), _mm512_set1_ps(m)));
                _mm512_store_ps(pr + s, e);
                vsum = _mm512_add_ps(vsum, e);
            }
            sum = _mm512_reduce_add_ps(vsum);
#else
            for (int64_t s = 0; s < S; s++) { pr[s] = expf(pr[s] - m); sum += pr[s]; }
#endif
            for (int64_t s = 0; s < S; s++) pr[s] /= sum;
        }
        for (int64_t s = 0; s < S; s++) {  /* values */
#ifdef AVX512
            for (int64_t c = 0; c < hd * esize; c += 64)
                _mm_prefetch(vb + (s + 8) * step + c, _MM_HINT_T0);
            for (int64_t c = 0; c < hd; c += 16) {
                __m512 x = load16(vb + s * step + c * esize, bf);
                for (int64_t r = 0; r < rep; r++)
                    _mm512_store_ps(acc + r * hd + c, _mm512_fmadd_ps(
                        _mm512_set1_ps(p[r * S16 + s]), x, _mm512_load_ps(acc + r * hd + c)));
            }
#else
            for (int64_t c = 0; c < hd; c++)
                row[c] = load1(vb, s * KV * hd + c, bf);
            for (int64_t r = 0; r < rep; r++)
                for (int64_t c = 0; c < hd; c++) acc[r * hd + c] += p[r * S16 + s] * row[c];
#endif
        }
        for (int64_t i = 0; i < rep * hd; i++) store1(y, h0 + i, acc[i], bf);
        free(p);
    }
    return fail;
}

/* ---- the rest of a decoding step's attention, around attend_one ----
   qkv (B, (H + 2 KV) hd): one token's q, k and v from the stacked product. RoPE rotates each pair
   (x0, x1) of q and k by (cos, sin) of this position, in float32 as llama.apply_rope does, and
   rounds to the model's dtype; k and v go into the cache at position pos, and q attends to the
   cache's first pos + 1 positions. cs (hd / 2, 2) float32; kc, vc (B, .., KV, hd), batch
   stride bs; q_out (B, H, hd) receives the rotated queries; y (B, H, hd). */

int rope_attend_one(const void *qkv, int bf, int64_t B, int64_t H, int64_t KV, int64_t hd,
                    const float *cs, void *kc, void *vc, int64_t bs, int64_t pos, void *q_out,
                    void *y) {
    int64_t width = (H + 2 * KV) * hd, esize = bf ? 2 : 4;
    for (int64_t b = 0; b < B; b++) {
        const char *row = (const char *)qkv;
        int64_t base = b * width;
        for (int64_t h = 0; h < H + KV; h++) {  /* q heads, then k heads */
            void *dst = h < H ? q_out : kc;
            int64_t out = h < H ? (b * H + h) * hd : b * bs + pos * KV * hd + (h - H) * hd;
            int64_t j = 0;
#ifdef AVX512
            for (; j + 8 <= hd / 2; j += 8) {  /* 8 pairs at a time: x (c, c) + (x1, x0) (-s, s) */
                __m512 x = load16(row + (base + h * hd + 2 * j) * esize, bf);
                __m512 t = _mm512_loadu_ps(cs + 2 * j);  /* c, s of each pair */
                __m512 c = _mm512_permute_ps(t, 0xA0), s = _mm512_permute_ps(t, 0xF5);
                s = _mm512_mask_sub_ps(s, 0x5555, _mm512_setzero_ps(), s);  /* -s, s */
                store16((char *)dst + (out + 2 * j) * esize, _mm512_add_ps(_mm512_mul_ps(x, c),
                        _mm512_mul_ps(_mm512_permute_ps(x, 0xB1), s)), bf);
            }
#endif
            for (; j < hd / 2; j++) {
                float x0 = load1(row, base + h * hd + 2 * j, bf);
                float x1 = load1(row, base + h * hd + 2 * j + 1, bf);
                float c = cs[2 * j], s = cs[2 * j + 1];
                store1(dst, out + 2 * j, x0 * c - x1 * s, bf);
                store1(dst, out + 2 * j + 1, x0 * s + x1 * c, bf);
            }
        }
        memcpy((char *)vc + (b * bs + pos * KV * hd) * esize,  /* v as it is */
               row + (base + (H + KV) * hd) * esize, KV * hd * esize);
    }
    return attend_one(q_out, kc, vc, bf, B, H, KV, hd, pos + 1, bs, y);
}

/* ---- RMSNorm and SwiGLU of inference, one pass each (llama.RMSNorm, llama.FeedForward) ----
   rms_norm: each row of x (rows, n) in float32, times rsqrt(mean of squares + eps), rounded to
   the dtype, then times the weight (n,) and rounded again, as torch's two ops round.
   swiglu: h (rows, 2 m) = [a | b] -> silu(a) rounded, times b, rounded: (rows, m). */


void rms_norm(const void *x, const void *w, int bf, int64_t rows, int64_t n, float eps,
              void *y) {
    int64_t es = bf ? 2 : 4;
    #pragma omp parallel for schedule(static) if (rows * n > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * n * es;
        char *yr = (char *)y + r * n * es;
        float ss = 0.f;
        int64_t i = 0;
#ifdef AVX512
        __m512 a = _mm512_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            __m512 v = load16(xr + i * es, bf);
            a = _mm512_fmadd_ps(v, v, a);
        }
        ss = _mm512_reduce_add_ps(a);
#endif
        for (; i < n; i++) {
            float v = load1(xr, i, bf);
            ss += v * v;
        }
        float scale = 1.f / sqrtf(ss / n + eps);
        i = 0;
#ifdef AVX512
        for (; i + 16 <= n; i += 16) {  /* the same roundings, 16 at a time */
            __m512 v = _mm512_mul_ps(load16(xr + i * es, bf), _mm512_set1_ps(scale));
            if (bf) v = round_bf16x16(v);
            store16(yr + i * es, _mm512_mul_ps(v, load16((const char *)w + i * es, bf)), bf);
        }
#endif
        for (; i < n; i++) {
            float v = load1(xr, i, bf) * scale;
            if (bf) v = bf16(to_bf16(v));
            store1(yr, i, v * load1(w, i, bf), bf);
        }
    }
}

/* in pieces of 2048 outputs, so that decoding's one row is shared among the threads */
#define SWIGLU_PIECE 2048

void swiglu(const void *h, int bf, int64_t rows, int64_t m, void *y) {
    int64_t es = bf ? 2 : 4, pieces = (m + SWIGLU_PIECE - 1) / SWIGLU_PIECE;
    #pragma omp parallel for schedule(static) if (rows * m > 4096)
    for (int64_t rp = 0; rp < rows * pieces; rp++) {
        int64_t r = rp / pieces, i = rp % pieces * SWIGLU_PIECE;
        int64_t end = i + SWIGLU_PIECE < m ? i + SWIGLU_PIECE : m;
        const char *ha = (const char *)h + r * 2 * m * es, *hb = ha + m * es;
        char *yr = (char *)y + r * m * es;
#ifdef AVX512
        for (; i + 16 <= end; i += 16) {  /* the same arithmetic, 16 at a time */
            __m512 a = load16(ha + i * es, bf), b = load16(hb + i * es, bf);
            __m512 s = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.f),
                                                      exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
            store16(yr + i * es, _mm512_mul_ps(bf ? round_bf16x16(s) : s, b), bf);
        }
#endif
        for (; i < end; i++) {
            float a = load1(ha, i, bf), b = load1(hb, i, bf);
            float s = a / (1.f + expf(-a));
            if (bf) s = bf16(to_bf16(s));
            store1(yr, i, s * b, bf);
        }
    }
}

/* ---- bf16: bf16 weights times bf16 activations, float32 sums (--fast CPU decoding) ----
   Blocks of 32 rows (bf16_layout): for each pair of inputs, the 32 rows' two values side by side
   (128 bytes), one memory stream a block. AVX-512 BF16's vdpbf16ps multiplies 16 rows' pairs by
   one pair of a token broadcast, into 16 float32 sums: the sums are rows, so no horizontal add.
   Without it, the plain C loop. */
#if defined(__AVX512BF16__) && !defined(PORTABLE)
#define BF16DOT 1
#endif

int kernels_bf16dot(void) {
#ifdef BF16DOT
    return 1;
#else
    return 0;
#endif
}

/* One tile: a block of 32 rows times nt <= 12 tokens, 24 float32 accumulators: each weight load
   serves nt tokens, so prefill's long products run at the dot products' speed, not the loads';
   decoding (nt = 1) streams the block once. Every token's sums in the same order for any nt. */
static inline __attribute__((always_inline)) void bf16_tile(
        const int32_t *xp, int64_t n, const uint16_t *wb, const int nt, int64_t out, float *y,
        uint16_t *yb) {
#ifdef BF16DOT
    __m512 a[12][2];
    for (int t = 0; t < nt; t++) a[t][0] = a[t][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < n / 2; p++) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + 64 * p),
                 w1 = (__m512bh)_mm512_loadu_si512(wb + 64 * p + 32);
        for (int t = 0; t < nt; t++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[nt * p + t]);
            a[t][0] = _mm512_dpbf16_ps(a[t][0], w0, xv);
            a[t][1] = _mm512_dpbf16_ps(a[t][1], w1, xv);
        }
    }
    for (int t = 0; t < nt; t++)
        for (int h = 0; h < 2; h++) {
            if (yb) _mm256_storeu_si256((__m256i *)(yb + t * out + 16 * h),
                                        (__m256i)_mm512_cvtneps_pbh(a[t][h]));
            else _mm512_storeu_ps(y + t * out + 16 * h, a[t][h]);
        }
#else
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < 32; r++) {
            float s = 0.f;
            for (int64_t c = 0; c < n; c++)
                s += bf16(wb[64 * (c / 2) + 2 * r + c % 2]) *
                     bf16(((const uint16_t *)(xp + nt * (c / 2) + t))[c % 2]);
            if (yb) yb[t * out + r] = to_bf16(s); else y[t * out + r] = s;
        }
#endif
}

/* y (tokens, out): float32, or bfloat16 if bf16_out. x is first copied pair-major a tile of tokens
   (pairs of tile t at xp + t * 12 * n / 2: its tokens' pair p side by side), so that a tile reads
   its broadcasts from one stream; one token (decoding) is already in that order, and is read in
   place. The blocks of rows are split over the threads; each stays in its core's cache while
   every token passes through it. Returns 0 without memory for the copy. */
int bf16_linear(const uint16_t *x, int64_t tokens, int64_t n, const uint16_t *w, int64_t out,
                void *y, int bf16_out) {
    int64_t half = n / 2;
    int32_t *copy = NULL;
    if (tokens > 1) {
        copy = malloc(sizeof(int32_t) * half * tokens);
        if (!copy) return 0;
        #pragma omp parallel for schedule(static)
        for (int64_t t0 = 0; t0 < tokens; t0 += 12) {
            int nt = tokens - t0 < 12 ? tokens - t0 : 12;
            for (int t = 0; t < nt; t++)
                for (int64_t p = 0; p < half; p++)
                    memcpy(copy + t0 * half + nt * p + t, x + (t0 + t) * n + 2 * p, 4);
        }
    }
    const int32_t *xp = copy ? copy : (const int32_t *)x;
    #pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < out; r0 += 32)
        for (int64_t t = 0; t < tokens; t += 12) {
            const int32_t *xt = xp + t * half;
            const uint16_t *wb = w + r0 * n;
            float *yt = bf16_out ? NULL : (float *)y + t * out + r0;
            uint16_t *ybt = bf16_out ? (uint16_t *)y + t * out + r0 : NULL;
            switch (tokens - t < 12 ? tokens - t : 12) {  /* nt a constant: kept in registers */
#define TILE(k) case k: bf16_tile(xt, n, wb, k, out, yt, ybt); break;
                TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
                TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)
#undef TILE
            }
        }
    free(copy);
    return 1;
}

/* ---- one decoding block in one call (speed.KernelBlock) ----
   llama.TransformerBlock's step for B tokens of bf16, through the kernels above in the order and
   with the roundings of the modules' own path: each product's float32 sums rounded to bf16, as
   .to(x.dtype) does, each residual added in float32 and rounded, as torch's bf16 add does. One call
   instead of about forty Python calls a layer, each of which, after the weights have streamed
   through the caches, costs more than its arithmetic. */

struct product { int64_t kind, G, n, out; const void *w, *scales; };  /* kind: 0 bf16, 1 w8a8, 2 w4a8 */
struct block {
    const uint16_t *attention_norm, *ffn_norm;
    float eps;
    int64_t dim, H, KV, hd, hidden;
    struct product qkv, wo, w13, w2;
};

/* y (tokens, p->out) bf16 = x p's weight^T; f: float32 scratch of the same size. 0 when done */
static int product_bf16(const struct product *p, const uint16_t *x, int64_t tokens, float *f,
                        uint16_t *y) {
    if (p->kind == 0) return !bf16_linear(x, tokens, p->n, p->w, p->out, y, 1);
    int fail = p->kind == 1 ? w8a8_linear(x, 1, tokens, p->n, p->w, p->scales, p->out, f)
                            : w4a8_linear(x, 1, tokens, p->n, (int)p->G, p->w, p->out, f);
    int64_t i = 0, m = tokens * p->out;
#ifdef AVX512
    for (; i + 16 <= m; i += 16) store16(y + i, _mm512_loadu_ps(f + i), 1);
#endif
    for (; i < m; i++) y[i] = to_bf16(f[i]);
    return fail;
}

static void add_bf16(const uint16_t *a, const uint16_t *b, int64_t m, uint16_t *y) {
    int64_t i = 0;
#ifdef AVX512
    for (; i + 16 <= m; i += 16)
        store16(y + i, _mm512_add_ps(load16(a + i, 1), load16(b + i, 1)), 1);
#endif
    for (; i < m; i++) y[i] = to_bf16(bf16(a[i]) + bf16(b[i]));
}

/* x (B, dim) -> y (B, dim); k and v written into the caches (batch stride bs) at pos */
int decode_block(const struct block *L, const uint16_t *x, int64_t B, const float *cs,
                 void *kc, void *vc, int64_t bs, int64_t pos, uint16_t *y) {
    int64_t dim = L->dim, qd = L->H * L->hd, width = L->qkv.out, wide = 2 * L->hidden;
    int64_t most = width > wide ? width : wide;
    float *f = malloc(B * most * sizeof(float));
    uint16_t *a = malloc(B * (2 * dim + most + 2 * qd + L->hidden) * 2);
    if (!f || !a) { free(f); free(a); return 1; }
    uint16_t *h = a + B * dim, *wide_out = h + B * dim, *q = wide_out + B * most, *o = q + B * qd;
    uint16_t *s = o + B * qd;
    rms_norm(x, L->attention_norm, 1, B, dim, L->eps, a);
    int fail = product_bf16(&L->qkv, a, B, f, wide_out);  /* q|k|v */
    fail |= rope_attend_one(wide_out, 1, B, L->H, L->KV, L->hd, cs, kc, vc, bs, pos, q, o);
    fail |= product_bf16(&L->wo, o, B, f, a);
    add_bf16(x, a, B * dim, h);  /* h = x + attention */
    rms_norm(h, L->ffn_norm, 1, B, dim, L->eps, a);
    fail |= product_bf16(&L->w13, a, B, f, wide_out);  /* w1 x | w3 x */
    swiglu(wide_out, 1, B, L->hidden, s);
    fail |= product_bf16(&L->w2, s, B, f, a);
    add_bf16(h, a, B * dim, y);  /* h + feed-forward */
    free(f);
    free(a);
    return fail;
}
