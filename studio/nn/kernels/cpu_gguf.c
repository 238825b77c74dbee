/* Matrix products with GGUF block-quantized weights, for the CPU.
 *
 * y (M, N) = x (M, K) @ W.T (+ bias), W as GGUF Q4_0 / Q4_1 / Q8_0 blocks, read where they lie (the
 * mapped file); cpu_gguf.py converts Q4_K (exactly but for float16 scales) and the other types
 * (requantized per block of 32) into those three at load. Each row of x is first quantized per block
 * of 32 into two int8 planes, x ~ dx (q1 + q2 / 256) (about 15 bits; llama.cpp keeps one plane, and
 * that alone changed the bundled SmolLM2's greedy answers), so a block's product is integer
 * multiply-adds (AVX512-VNNI / AVX-VNNI vpdpbusd, else AVX2 maddubs), exact in int32. Q4 values are
 * centred (q - 8) against x and the block offset m + 8 d multiplies the exact float sum of x's block.
 * Rows of W are split over OpenMP threads: the process's libgomp (torch's), so torch.set_num_threads
 * governs it. Built at first use with -march=native by cpu_gguf.py; the scalar path is the
 * reference the vector paths must match (tests/test_cpu_kernels.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0 && man == 0) bits = sign;
    else if (exp == 0) {  /* subnormal: normalise */
        exp = 127 - 15 + 1;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    } else if (exp == 31) bits = sign | 0x7F800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

#if defined(__AVX2__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 unsigned bytes . 32 signed bytes -> 8 int32 partial sums */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* 256 (u . s1) + u . s2: the product with x's two int8 planes (x ~ dx / 256 (256 s1 + s2)) */
static inline __m256i dot2_u8s8(__m256i u, __m256i s1, __m256i s2) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_slli_epi32(dot_u8s8(u, s1), 8), u, s2);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_slli_epi32(dot_u8s8(u, s1), 8), u, s2);
#else
    return _mm256_add_epi32(_mm256_slli_epi32(dot_u8s8(u, s1), 8), dot_u8s8(u, s2));
#endif
}

/* 16 bytes of nibbles (byte j: value j low, value j + 16 high) -> 32 bytes in value order */
static inline __m256i unpack_q4(const uint8_t *qs) {
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}
#endif

/* One row of x -> two int8 planes per block of 32, x ~ dx (q1 + q2 / 256): xq holds 32 bytes of q1 then
 * 32 of q2 per block (64 a block), dx the block's step / 256, xs its exact sum and e = xs - dx (256
 * sum(q1) + sum(q2)), what quantizing lost of the sum. About 15 bits of each value survive: a
 * single int8 plane (llama.cpp's Q8 activations) changed the bundled SmolLM2's greedy answers. */
static void quantize_row(const float *x, int64_t k, int8_t *xq, float *dx, float *xs, float *e) {
    for (int64_t b = 0; b < k / 32; b++) {
        const float *v = x + b * 32;
        int8_t *q1 = xq + b * 64, *q2 = q1 + 32;
#if defined(__AVX2__)
        __m256 vs[4] = {_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8), _mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24)};
        const __m256 sign = _mm256_set1_ps(-0.f);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, vs[0]), _mm256_andnot_ps(sign, vs[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, vs[2]), _mm256_andnot_ps(sign, vs[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float sum = hsum8(_mm256_add_ps(_mm256_add_ps(vs[0], vs[1]), _mm256_add_ps(vs[2], vs[3])));
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        __m256i i1[4], i2[4];
        __m256i isum = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256 t = _mm256_mul_ps(vs[j], _mm256_set1_ps(id));
            i1[j] = _mm256_cvtps_epi32(t);
            __m256 rest = _mm256_mul_ps(_mm256_sub_ps(t, _mm256_cvtepi32_ps(i1[j])), _mm256_set1_ps(256.f));
            i2[j] = _mm256_max_epi32(_mm256_cvtps_epi32(rest), _mm256_set1_epi32(-127));  /* -128 would break vpsignb */
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(_mm256_slli_epi32(i1[j], 8), i2[j]));
        }
        /* packs work within 128-bit lanes: the permute puts the 32 bytes back in order */
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        __m256i p1 = _mm256_packs_epi16(_mm256_packs_epi32(i1[0], i1[1]), _mm256_packs_epi32(i1[2], i1[3]));
        __m256i p2 = _mm256_packs_epi16(_mm256_packs_epi32(i2[0], i2[1]), _mm256_packs_epi32(i2[2], i2[3]));
        _mm256_storeu_si256((__m256i *)q1, _mm256_permutevar8x32_epi32(p1, order));
        _mm256_storeu_si256((__m256i *)q2, _mm256_permutevar8x32_epi32(p2, order));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
        t = _mm_hadd_epi32(t, t);
        t = _mm_hadd_epi32(t, t);
        int32_t qsum = _mm_cvtsi128_si32(t);
#else
        float amax = 0.f, sum = 0.f;
        for (int i = 0; i < 32; i++) { float a = fabsf(v[i]); amax = a > amax ? a : amax; sum += v[i]; }
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int32_t qsum = 0;
        for (int i = 0; i < 32; i++) {
            float t = v[i] * id;
            long a1 = lrintf(t), a2 = lrintf((t - (float)a1) * 256.f);
            q1[i] = (int8_t)a1;
            q2[i] = (int8_t)(a2 < -127 ? -127 : a2 > 127 ? 127 : a2);  /* as the vector path saturates */
            qsum += 256 * q1[i] + q2[i];
        }
#endif
        dx[b] = d / 256.f;
        xs[b] = sum;
        e[b] = sum - dx[b] * (float)qsum;
    }
}

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  /* GGML type ids */
#ifndef PREFETCH
#define PREFETCH 4096 /* bytes ahead of the weight block being read */
#endif
#define RB 4 /* rows of x per pass over a weight row: its unpacked blocks are reused from registers */

/* The scalar block product: 256 (q . q1) + q . q2 for one weight block and x's two planes at xb. */
__attribute__((unused)) static int32_t block_dot(int q8, const uint8_t *q, const int8_t *xb) {
    int32_t s1 = 0, s2 = 0;
    if (q8) {
        for (int i = 0; i < 32; i++) { s1 += (int8_t)q[i] * xb[i]; s2 += (int8_t)q[i] * xb[32 + i]; }
    } else {
        for (int i = 0; i < 16; i++) {
            s1 += (q[i] & 0x0F) * xb[i] + (q[i] >> 4) * xb[i + 16];
            s2 += (q[i] & 0x0F) * xb[32 + i] + (q[i] >> 4) * xb[48 + i];
        }
    }
    return 256 * s1 + s2;
}

/* out[r] = sum over blocks of dj[b] dx[r][b] (q . xq[r]) for r < nr, q the block's values: Q4 0..15
 * (16 bytes at qoff, byte i: value i low nibble, value i + 16 high), Q8 -128..127 (32 bytes at qoff). */
__attribute__((unused)) static void row_dots(int q8, const uint8_t *w, int64_t bs, int64_t qoff, const float *dj, int64_t nb, int64_t k,
                     const int8_t *xq, const float *dx, int nr, float *out) {
#if defined(__AVX2__)
    __m256 acc[RB];
    for (int r = 0; r < RB; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = w + b * bs + qoff;
        __m256i wv = q8 ? _mm256_loadu_si256((const __m256i *)q) : unpack_q4(q);
        __m256i wa = q8 ? _mm256_sign_epi8(wv, wv) : wv;
        __m256 db = _mm256_broadcast_ss(dj + b);
        for (int r = 0; r < nr; r++) {
            const int8_t *xb = xq + r * 2 * k + b * 64;
            __m256i x1 = _mm256_loadu_si256((const __m256i *)xb), x2 = _mm256_loadu_si256((const __m256i *)(xb + 32));
            __m256i p = q8 ? dot2_u8s8(wa, _mm256_sign_epi8(x1, wv), _mm256_sign_epi8(x2, wv)) : dot2_u8s8(wa, x1, x2);
            __m256 sc = _mm256_mul_ps(db, _mm256_broadcast_ss(dx + r * nb + b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sc, acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r] = hsum8(acc[r]);
#else
    for (int r = 0; r < nr; r++) {
        float sum = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *q = w + b * bs + qoff;
            int32_t s = block_dot(q8, q, xq + r * 2 * k + b * 64);
            sum += dj[b] * dx[r * nb + b] * (float)s;
        }
        out[r] = sum;
    }
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512DQ__)
#define HAVE_ROWS512 1
/* row_dots for prompts with 512-bit vectors: two blocks per instruction. dxe holds each x row's block
 * scales repeated 8 times (nb * 8 floats a row), so a pair of blocks' scales is one load. */
static void row_dots512(int q8, const uint8_t *w, int64_t bs, int64_t qoff, const float *dj, int64_t nb, int64_t k,
                        const int8_t *xq, const float *dxe, int nr, float *out) {
    __m512 acc[RB];
    for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *q0 = w + b * bs + qoff, *q1 = q0 + bs;
        __m256i w0 = q8 ? _mm256_loadu_si256((const __m256i *)q0) : unpack_q4(q0);
        __m256i w1 = q8 ? _mm256_loadu_si256((const __m256i *)q1) : unpack_q4(q1);
        __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
        __m512i wa = q8 ? _mm512_abs_epi8(wv) : wv;
        __mmask64 neg = q8 ? _mm512_movepi8_mask(wv) : 0;  /* x takes w's sign, as vpsignb does */
        __m512 dd = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(dj[b])), _mm256_set1_ps(dj[b + 1]), 1);
        for (int r = 0; r < nr; r++) {
            /* blocks b and b + 1: their first planes side by side, then their second planes */
            const int8_t *xb = xq + r * 2 * k + b * 64;
            __m512i x1 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)xb)),
                                            _mm256_loadu_si256((const __m256i *)(xb + 64)), 1);
            __m512i x2 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(xb + 32))),
                                            _mm256_loadu_si256((const __m256i *)(xb + 96)), 1);
            if (q8) {
                x1 = _mm512_mask_sub_epi8(x1, neg, _mm512_setzero_si512(), x1);
                x2 = _mm512_mask_sub_epi8(x2, neg, _mm512_setzero_si512(), x2);
            }
            __m512i p = _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wa, x1), 8),
                                            wa, x2);
            __m512 sc = _mm512_mul_ps(dd, _mm512_loadu_ps(dxe + r * nb * 8 + b * 8));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
    if (b < nb) {  /* an odd last block */
        const uint8_t *q = w + b * bs + qoff;
        __m256i wv = q8 ? _mm256_loadu_si256((const __m256i *)q) : unpack_q4(q);
        __m256i wa = q8 ? _mm256_sign_epi8(wv, wv) : wv;
        for (int r = 0; r < nr; r++) {
            const int8_t *xb = xq + r * 2 * k + b * 64;
            __m256i x1 = _mm256_loadu_si256((const __m256i *)xb), x2 = _mm256_loadu_si256((const __m256i *)(xb + 32));
            __m256i p = q8 ? dot2_u8s8(wa, _mm256_sign_epi8(x1, wv), _mm256_sign_epi8(x2, wv)) : dot2_u8s8(wa, x1, x2);
            out[r] += hsum8(_mm256_cvtepi32_ps(p)) * dj[b] * dxe[r * nb * 8 + b * 8];
        }
    }
}
#endif

static float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#if defined(__AVX2__)
    __m256 v = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) v = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), v);
    s = hsum8(v);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* A weight row's block scales d and offsets m as float32 (w = d (q - 8) + (m + 8 d): Q4_0's m is -8 d). */
static void row_scales(int type, const uint8_t *wr, int64_t bs, int64_t nb, float *dj, float *mj) {
    int64_t b = 0;
#if defined(__AVX2__) && defined(__F16C__)
    /* eight blocks at a time: one gather brings each block's first four bytes, d | m << 16 */
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)bs));
    for (; b + 8 <= nb; b += 8) {
        __m256i g = _mm256_i32gather_epi32((const int *)(wr + b * bs), idx, 1);
        __m256i dm = _mm256_packus_epi32(_mm256_and_si256(g, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(g, 16));
        dm = _mm256_permute4x64_epi64(dm, 0xD8);  /* d0..d7 | m0..m7 as float16 */
        __m256 d = _mm256_cvtph_ps(_mm256_castsi256_si128(dm));
        _mm256_storeu_ps(dj + b, d);
        if (type == Q4_1) _mm256_storeu_ps(mj + b, _mm256_cvtph_ps(_mm256_extracti128_si256(dm, 1)));
        else _mm256_storeu_ps(mj + b, _mm256_mul_ps(d, _mm256_set1_ps(-8.f)));
    }
#endif
    for (; b < nb; b++) {
        dj[b] = f16_to_f32(rd16(wr + b * bs));
        mj[b] = type == Q4_1 ? f16_to_f32(rd16(wr + b * bs + 2)) : -8.f * dj[b];
    }
}

/* One weight row . one quantized x row, everything included (decode, M = 1). ds: scratch of nb + 8 floats. */
static float row_dot1(int type, const uint8_t *wr, int64_t bs, int64_t qoff, int64_t nb, const int8_t *xq,
                      const float *dx, const float *xs, const float *e, float *ds) {
    int q8 = type == Q8_0;
    int64_t b = 0;
    float tail = 0.f;
#if defined(__AVX2__) && defined(__F16C__)
    /* scales eight blocks at a time: one gather brings each block's first four bytes, d | m << 16 */
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)bs));
    __m256 tv = _mm256_setzero_ps();
    for (; b + 8 <= nb; b += 8) {
        __m256i g = _mm256_i32gather_epi32((const int *)(wr + b * bs), idx, 1);
        __m256i dm = _mm256_packus_epi32(_mm256_and_si256(g, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(g, 16));
        dm = _mm256_permute4x64_epi64(dm, 0xD8);  /* d0..d7 | m0..m7 as float16 */
        __m256 d = _mm256_cvtph_ps(_mm256_castsi256_si128(dm));
        _mm256_storeu_ps(ds + b, _mm256_mul_ps(d, _mm256_loadu_ps(dx + b)));
        if (!q8) {  /* w = d (q - 8) + (m + 8 d): 8 d against what quantizing lost of x's sum, m against the sum */
            __m256 m = type == Q4_1 ? _mm256_cvtph_ps(_mm256_extracti128_si256(dm, 1)) : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
            tv = _mm256_fmadd_ps(m, _mm256_loadu_ps(xs + b), _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(8.f)),
                                                                             _mm256_loadu_ps(e + b), tv));
        }
    }
    tail = hsum8(tv);
#endif
    for (; b < nb; b++) {
        float d = f16_to_f32(rd16(wr + b * bs));
        ds[b] = d * dx[b];
        if (!q8) tail += (type == Q4_1 ? f16_to_f32(rd16(wr + b * bs + 2)) : -8.f * d) * xs[b] + 8.f * d * e[b];
    }
#if defined(__AVX2__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    b = 0;
#define BLOCK_DOT(bb, acc) do {                                                                              \
        const uint8_t *q_ = wr + (bb) * bs + qoff;                                                             \
        __m256i x1_ = _mm256_loadu_si256((const __m256i *)(xq + (bb) * 64)), p_;                               \
        __m256i x2_ = _mm256_loadu_si256((const __m256i *)(xq + (bb) * 64 + 32));                              \
        if (q8) {                                                                                              \
            __m256i wv_ = _mm256_loadu_si256((const __m256i *)q_);                                             \
            p_ = dot2_u8s8(_mm256_sign_epi8(wv_, wv_), _mm256_sign_epi8(x1_, wv_), _mm256_sign_epi8(x2_, wv_)); \
        } else {                                                                                               \
            p_ = dot2_u8s8(unpack_q4(q_), x1_, x2_);                                                           \
        }                                                                                                      \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p_), _mm256_broadcast_ss(ds + (bb)), acc);                   \
    } while (0)
    for (; b + 2 <= nb; b += 2) {
        /* the weights stream from memory once per token: ask for them well ahead (this row's tail, the next rows) */
#if PREFETCH
        _mm_prefetch((const char *)(wr + b * bs + PREFETCH), _MM_HINT_T0);
#endif
        BLOCK_DOT(b, a0);
        BLOCK_DOT(b + 1, a1);
    }
    if (b < nb) BLOCK_DOT(b, a0);
#undef BLOCK_DOT
    return hsum8(_mm256_add_ps(a0, a1)) + tail;
#else
    float sum = 0.f;
    for (b = 0; b < nb; b++) {
        sum += ds[b] * (float)block_dot(q8, wr + b * bs + qoff, xq + b * 64);
    }
    return sum + tail;
#endif
}

/* y[r * ldy + j] = x[r] . W[j] + bias[j] for r < m, j < n; W is n rows of `row_bytes` GGUF blocks of
 * `type` (Q4_0 w = d (q - 8), Q4_1 w = d q + m, Q8_0 w = d q; d and m float16 at the block's start).
 * Returns 0, or -1 on a bad argument or no memory. */
int studio_gemm(int type, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k, const float *x, int64_t m,
                float *y, int64_t ldy, const float *bias, int threads) {
    if ((type != Q4_0 && type != Q4_1 && type != Q8_0) || k % 32 || k > 131072 || m < 1 || n < 1) return -1;
    int64_t nb = k / 32, bs = type == Q4_0 ? 18 : type == Q4_1 ? 20 : 34, qoff = type == Q4_1 ? 4 : 2;
    int q8 = type == Q8_0;
    if (row_bytes < nb * bs) return -1;
    /* x's quantized copy lives on the stack for a decode step (no allocation per call), else on the heap */
    int small = m * k <= 8192;
    int8_t xq_s[small ? 2 * m * k : 1];
    float sc_s[small ? 3 * m * nb : 1];
    int8_t *xq = small ? xq_s : malloc((size_t)(2 * m * k));
    float *dx = small ? sc_s : malloc(sizeof(float) * (size_t)(3 * m * nb));
    if (!xq || !dx) { if (!small) { free(xq); free(dx); } return -1; }
    float *xs = dx + m * nb, *e = xs + m * nb;
    for (int64_t r = 0; r < m; r++)
        quantize_row(x + r * k, k, xq + r * 2 * k, dx + r * nb, xs + r * nb, e + r * nb);
#if HAVE_ROWS512
    float *dxe = m > 1 ? malloc(sizeof(float) * (size_t)(m * nb * 8)) : NULL;
    if (m > 1 && !dxe) { if (!small) { free(xq); free(dx); } return -1; }
    for (int64_t i = 0; m > 1 && i < m * nb; i++)
        for (int l = 0; l < 8; l++) dxe[i * 8 + l] = dx[i];
#endif
    int64_t chunks = (n + 15) / 16;
    /* weight rows in chunks of 16: each thread streams its slice of W once, reusing each row (from L1) for every x row */
#pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1 && n * k * m >= 65536)
    for (int64_t ch = 0; ch < chunks; ch++) {
        int64_t lo = ch * 16, hi = lo + 16 < n ? lo + 16 : n;
        float part[RB], dj[nb + 8], mj[nb];  /* this row's scales as float32; K <= 131072 keeps them under 32 KiB */
        for (int64_t j = lo; j < hi; j++) {
            const uint8_t *wr = w + j * row_bytes;
            if (m == 1) {
                float v = row_dot1(type, wr, bs, qoff, nb, xq, dx, xs, e, dj);
                y[j] = bias ? v + bias[j] : v;
                continue;
            }
            row_scales(type, wr, bs, nb, dj, mj);
            for (int64_t r0 = 0; r0 < m; r0 += RB) {
                int nr = m - r0 < RB ? (int)(m - r0) : RB;
#if HAVE_ROWS512
                row_dots512(q8, wr, bs, qoff, dj, nb, k, xq + r0 * 2 * k, dxe + r0 * nb * 8, nr, part);
#else
                row_dots(q8, wr, bs, qoff, dj, nb, k, xq + r0 * 2 * k, dx + r0 * nb, nr, part);
#endif
                for (int r = 0; r < nr; r++) {
                    float v = part[r];
                    if (!q8)  /* -8 d against x's int8 sum, m + 8 d against its exact sum: 8 d e + m xs */
                        v += dot_f32(mj, xs + (r0 + r) * nb, nb) + 8.f * dot_f32(dj, e + (r0 + r) * nb, nb);
                    y[(r0 + r) * ldy + j] = bias ? v + bias[j] : v;
                }
            }
        }
    }
#if HAVE_ROWS512
    free(dxe);
#endif
    if (!small) { free(xq); free(dx); }
    return 0;
}

/* Which vector path this build took, for reports: 3 AVX512-VNNI, 2 AVX-VNNI, 1 AVX2, 0 scalar. */
int studio_gguf_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX2__)
    return 3;
#elif defined(__AVXVNNI__) && defined(__AVX2__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
