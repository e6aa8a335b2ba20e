/* Matmuls straight from block-quantized weights, the way llama.cpp runs a GGUF on a CPU.
 *
 * Weights stay in their blocks of 32 input columns; a scale (and for 4-bit, a min) covers
 * `group` columns, a multiple of 32, stored as fp16 like GGUF's Q8_0 / Q4_1:
 *   q8: w = q * d,      q int8 in [-127, 127], one byte per weight;
 *   q4: w = q * d + m,  q in [0, 15], two per byte: low nibbles are columns 0-15 of the
 *       block, high nibbles 16-31 (GGUF's order, so its bytes are used as they are).
 * The activations are quantized too, to int8 with a float scale per 32 columns, so a block's
 * dot product is 32 integer multiply-adds (AVX2: maddubs + madd) and one float multiply:
 *   sum_j w_j x_j ~= d_w d_x sum_j q_j p_j  (+ m_w sum_j x_j for q4).
 * That reads a weight once per step in its stored size, which is what decode is bound by.
 *
 * Rows of the output are split over OpenMP threads. With AVX2 and the weights copied into
 * a layout that interleaves eight rows (qi, with the d8/m8/s8 scales regrouped to match), a
 * thread runs eight weight rows against up to four activation rows at a time (gemm8; with
 * AVX-512 VNNI and several activation rows, two groups of eight per instruction, gemm16);
 * otherwise, and for the last N % 8 rows, a tile of up to four rows by four activation rows
 * of the row-major blocks. Built on first use by servelm/ops/c_build.py and called through
 * ctypes (ops/qgemm.py), or included by decoder.c.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QGEMM_AVX2 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
#define QGEMM_VNNI 1 /* one instruction for 32 byte products summed in fours (dpbusd) */
#endif
#endif

#define BLOCK 32

static inline float half_to_float(uint16_t h) {
#ifdef QGEMM_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        float f = ldexpf((float)man, -24);
        return (h & 0x8000u) ? -f : f;
    }
    bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112u) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* x [M, K] -> q int8 [M, K], d [M, K/32] (scale), s [M, K/32] = d * sum(q), the block's sum
 * as quantized: with it the min term m * s makes the result exactly the dequantized weights
 * times the quantized activations, so the error of the large all-positive q4 values does not
 * stand uncancelled against an exact float sum. */
static void quantize_activations(const float *x, int64_t M, int64_t K, int8_t *q, float *d, float *s) {
    const int64_t nb = K / BLOCK;
    #pragma omp parallel for schedule(static) if (M >= 8)
    for (int64_t r = 0; r < M * nb; r++) {
        const float *xb = x + r * BLOCK;
        float amax = 0.0f;
        for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < BLOCK; j++) {
            const int8_t v = (int8_t)lrintf(xb[j] * inv);
            q[r * BLOCK + j] = v;
            sum += v;
        }
        d[r] = scale;
        s[r] = scale * (float)sum;
    }
}

#define MAX_BLOCKS 1024 /* K up to 32768 */

typedef struct {
    int64_t K, nb, per_scale, ns; /* columns; blocks of 32, blocks per scale, scales per row */
    int q4;                       /* 4-bit (packed, with mins) or 8-bit */
    const uint8_t *q;             /* rows of K (8-bit) or K / 2 (4-bit) bytes */
    const uint16_t *d, *m;        /* [N, ns] fp16 */
    const uint16_t *d8, *m8;      /* the same for the first N - N % 8 rows as [N / 8, ns, 8], or NULL */
    const float *s8;              /* 8-bit: sum of each block's q for those rows, [N / 8, nb, 8], or NULL */
    const uint8_t *qi;            /* those rows' q interleaved eight at a time (gemm8), or NULL */
} weights_t;

typedef struct {
    const int8_t *q; /* [M, K] */
    const float *d;  /* [M, nb] scale per block */
    const float *s;  /* [M, nb] d * sum(q) per block */
    const uint8_t *u; /* [M, K] q + 128 (for gemm8's 8-bit weights with VNNI), or NULL */
} acts_t;

#ifdef QGEMM_AVX2
static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* acc + 32 products of unsigned bytes u and signed bytes s, summed four at a time into
 * 8 int32 lanes (without VNNI, maddubs' 16-bit pair sums must not overflow). */
static inline __m256i dot_u8s8_add(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static inline __m256i dot_u8s8(__m256i u, __m256i s) { return dot_u8s8_add(_mm256_setzero_si256(), u, s); }

/* Block b of a weight row as 32 bytes: signed values (8-bit) or 0..15 (4-bit, unpacked). */
static inline __m256i load_block(int q4, const uint8_t *row, int64_t b) {
    if (!q4) return _mm256_loadu_si256((const __m256i *)(row + b * BLOCK));
    const __m128i raw = _mm_loadu_si128((const __m128i *)(row + b * BLOCK / 2));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

/* sum_j w_j x_j over one block, as 8 float lanes. 4-bit values are unsigned already;
 * signed 8-bit ones multiply as |w| times x with w's sign. */
static inline __m256 block_dot(int q4, __m256i wv, __m256i xv) {
    const __m256i d = q4 ? dot_u8s8(wv, xv) : dot_u8s8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    return _mm256_cvtepi32_ps(d);
}
#endif

/* fp16 row values as floats, one per block of 32 (a scale covering several blocks repeats). */
static inline void per_block(const uint16_t *h, int64_t nb, int64_t per_scale, float *out) {
    int64_t b = 0;
#ifdef QGEMM_AVX2
    if (per_scale == 1)
        for (; b + 8 <= nb; b += 8)
            _mm256_storeu_ps(out + b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + b))));
#endif
    for (int64_t s = b / per_scale; b < nb; s++)
        for (int64_t j = 0; j < per_scale && b < nb; j++, b++) out[b] = half_to_float(h[s]);
}

/* Row n's per-block scales times activation row m0 + i's, into sc[i][b]; and for 4-bit,
 * sum_b m_b s_b (the mins' share) into mins[i]. */
static inline void row_scales(const weights_t *w, int64_t n, const acts_t *x, int64_t m0, int RM,
                              float (*sc)[MAX_BLOCKS], float *mins) {
    float d[MAX_BLOCKS], m[MAX_BLOCKS];
    const int64_t nb = w->nb;
    per_block(w->d + n * w->ns, nb, w->per_scale, d);
    if (w->q4) per_block(w->m + n * w->ns, nb, w->per_scale, m);
    for (int i = 0; i < RM; i++) {
        const float *xd = x->d + (m0 + i) * nb, *xs = x->s + (m0 + i) * nb;
        float msum = 0.0f;
        #pragma omp simd
        for (int64_t b = 0; b < nb; b++) sc[i][b] = d[b] * xd[b];
        if (w->q4) /* in order, not a vectorized reduction: the same bits in every tile shape */
            for (int64_t b = 0; b < nb; b++) msum += m[b] * xs[b];
        mins[i] = msum;
    }
}

/* out[m0 + i, n0 + r] for RN weight rows and RM activation rows (RN * RM <= 4 accumulators,
 * each its own dependency chain). q4, RN and RM are constants after inlining, so every
 * shape and format gets its own branch-free loop. */
static inline __attribute__((always_inline)) void tile(const weights_t *w, const int q4, int64_t n0,
                                                       const int RN, const acts_t *x, int64_t m0,
                                                       const int RM, float *out, int64_t ldo,
                                                       int accumulate) {
    float sc[4][MAX_BLOCKS], mins[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* [r * RM + i] */
    const int64_t K = w->K, nb = w->nb, row_bytes = q4 ? K / 2 : K;
    for (int r = 0; r < RN; r++) row_scales(w, n0 + r, x, m0, RM, sc + r * RM, mins + r * RM);
#ifdef QGEMM_AVX2
    __m256 acc[4][4];
    for (int r = 0; r < RN; r++)
        for (int i = 0; i < RM; i++) acc[r][i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i xv[4];
        for (int i = 0; i < RM; i++) xv[i] = _mm256_loadu_si256((const __m256i *)(x->q + (m0 + i) * K + b * BLOCK));
        for (int r = 0; r < RN; r++) {
            const __m256i wv = load_block(q4, w->q + (n0 + r) * row_bytes, b);
            for (int i = 0; i < RM; i++)
                acc[r][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(&sc[r * RM + i][b]), block_dot(q4, wv, xv[i]),
                                            acc[r][i]);
        }
    }
#define TILE_RESULT(r, i) hsum(acc[r][i])
#else
    float acc[4][4] = {{0}};
    for (int64_t b = 0; b < nb; b++) {
        for (int r = 0; r < RN; r++) {
            const uint8_t *wb = w->q + (n0 + r) * row_bytes + b * (q4 ? BLOCK / 2 : BLOCK);
            for (int i = 0; i < RM; i++) {
                const int8_t *xb = x->q + (m0 + i) * K + b * BLOCK;
                int32_t dot = 0;
                if (q4) {
                    for (int j = 0; j < BLOCK / 2; j++)
                        dot += (int32_t)(wb[j] & 15) * xb[j] + (int32_t)(wb[j] >> 4) * xb[j + BLOCK / 2];
                } else {
                    for (int j = 0; j < BLOCK; j++) dot += (int32_t)(int8_t)wb[j] * xb[j];
                }
                acc[r][i] += sc[r * RM + i][b] * (float)dot;
            }
        }
    }
#define TILE_RESULT(r, i) acc[r][i]
#endif
    for (int r = 0; r < RN; r++)
        for (int i = 0; i < RM; i++) {
            float *o = out + (m0 + i) * ldo + n0 + r;
            const float v = TILE_RESULT(r, i) + mins[r * RM + i];
            *o = accumulate ? *o + v : v;
        }
#undef TILE_RESULT
}

/* The tile shapes and formats used, each compiled with its sizes as constants. */
static void run_tile(const weights_t *w, int64_t n0, int RN, const acts_t *x, int64_t m0, int RM,
                     float *out, int64_t ldo, int accumulate) {
#define T(q4, a, b) tile(w, q4, n0, a, x, m0, b, out, ldo, accumulate)
#define SHAPES(q4)               \
    switch (RN * 8 + RM) {       \
    case 4 * 8 + 1: T(q4, 4, 1); break; \
    case 3 * 8 + 1: T(q4, 3, 1); break; \
    case 2 * 8 + 1: T(q4, 2, 1); break; \
    case 1 * 8 + 4: T(q4, 1, 4); break; \
    case 1 * 8 + 3: T(q4, 1, 3); break; \
    case 1 * 8 + 2: T(q4, 1, 2); break; \
    default: T(q4, 1, 1); break; \
    }
    if (w->q4) {
        SHAPES(1)
    } else {
        SHAPES(0)
    }
#undef SHAPES
#undef T
}

#ifdef QGEMM_AVX2
#include "qgemm_rows8.c"
#endif

/* out[m, n] (+)= sum_k x[m, k] w[n, k]: quantize x, then split the weight rows over threads.
 * Rows outside gemm8 tile as: one activation row (decode) against four weight rows; more,
 * one weight row against up to four activation rows, reusing each loaded weight block. */
static int qgemm(const float *x, int64_t M, const weights_t *w, int64_t N, float *out, int64_t ldo,
                 int accumulate) {
    const int64_t K = w->K, nb = w->nb;
    if (nb > MAX_BLOCKS) return -1;
    int8_t *xq = malloc((size_t)(M * K));
    float *xd = malloc(sizeof(float) * (size_t)(M * nb)), *xs = malloc(sizeof(float) * (size_t)(M * nb));
    if (!xq || !xd || !xs) {
        free(xq), free(xd), free(xs);
        return -2;
    }
    quantize_activations(x, M, K, xq, xd, xs);
    acts_t acts = {xq, xd, xs, NULL};
    int64_t first = 0; /* rows before this one ran eight at a time */
#ifdef QGEMM_AVX2
    if (w->qi != NULL && w->d8 != NULL && (w->q4 || w->s8 != NULL)) {
        uint8_t *xu = NULL;
#ifdef QGEMM_VNNI
        if (!w->q4) {
            if (!(xu = malloc((size_t)(M * K)))) {
                free(xq), free(xd), free(xs);
                return -2;
            }
            for (int64_t i = 0; i < M * K; i++) xu[i] = (uint8_t)(xq[i] ^ 0x80);
            acts.u = xu;
        }
#endif
        first = N - N % 8;
        gemm8_all(w, &acts, M, first / 8, out, ldo, accumulate);
        free(xu);
    }
#endif
    const int64_t rows_per_tile = M == 1 ? 4 : 1;
    #pragma omp parallel for schedule(static)
    for (int64_t n0 = first; n0 < N; n0 += rows_per_tile) {
        const int RN = N - n0 < rows_per_tile ? (int)(N - n0) : (int)rows_per_tile;
        for (int64_t m0 = 0; m0 < M; m0 += 4)
            run_tile(w, n0, RN, &acts, m0, M == 1 ? 1 : (M - m0 < 4 ? (int)(M - m0) : 4), out, ldo, accumulate);
    }
    free(xq), free(xd), free(xs);
    return 0;
}

static int make_weights(weights_t *w, int64_t K, int64_t group, int q4, const void *q,
                        const uint16_t *d, const uint16_t *m, const uint16_t *d8, const uint16_t *m8,
                        const float *s8, const uint8_t *qi) {
    if (K % BLOCK != 0 || group % BLOCK != 0 || K % group != 0) return -1;
    *w = (weights_t){K, K / BLOCK, group / BLOCK, K / group, q4, q, d, m, d8, m8, s8, qi};
    return 0;
}

/* out[m, n] (+)= sum_k x[m, k] w[n, k]. x: [M, K] float32 contiguous; out: rows `ldo` apart.
 * d8 / m8: the scales (and mins) of the first N - N % 8 rows as [N / 8, ns, 8], or NULL;
 * s8: for 8-bit, those rows' per-block sums of q as [N / 8, nb, 8] floats, or NULL;
 * qi: those rows' values interleaved (qgemm_rows8.c), or NULL. */
int qgemm_q8(const float *x, int64_t M, int64_t K, const int8_t *wq, const uint16_t *wd,
             const uint16_t *wd8, const float *ws8, const uint8_t *wqi, int64_t N, int64_t group,
             float *out, int64_t ldo, int accumulate) {
    weights_t w;
    if (make_weights(&w, K, group, 0, wq, wd, NULL, wd8, NULL, ws8, wqi)) return -1;
    return qgemm(x, M, &w, N, out, ldo, accumulate);
}

int qgemm_q4(const float *x, int64_t M, int64_t K, const uint8_t *wq, const uint16_t *wd,
             const uint16_t *wm, const uint16_t *wd8, const uint16_t *wm8, const uint8_t *wqi, int64_t N,
             int64_t group, float *out, int64_t ldo, int accumulate) {
    weights_t w;
    if (make_weights(&w, K, group, 1, wq, wd, wm, wd8, wm8, NULL, wqi)) return -1;
    return qgemm(x, M, &w, N, out, ldo, accumulate);
}
