/* Matmuls straight from bfloat16 weights (a BF16 GGUF's tensors as stored) with float32
 * activations and results, the arithmetic of llama.cpp's BF16 path: each activation row is
 * rounded to bfloat16 once, then every product of two bfloat16 values is summed in float32.
 *
 * With AVX512-BF16 one instruction (vdpbf16ps) multiplies 32 pairs and adds them into 16
 * float lanes (with AVX-512 alone, 16 values widened to float32 and one fma); a tile of four
 * weight rows against up to four activation rows keeps sixteen such sums going, and each
 * row's lanes are summed once at the end. Without AVX-512, the same sums in plain C (the
 * compiler vectorizes them). Rows of the output are split over OpenMP
 * threads. Built by servelm/ops/c_build.py; called through ctypes (ops/qgemm.py) or
 * included by decoder.c.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define BGEMM_AVX512 1
#if defined(__AVX512BF16__) /* one vdpbf16ps: 32 products of bfloat16 pairs into 16 lanes */
#define BGEMM_STEP 32
typedef __m512bh bgemm_vec;
static inline bgemm_vec bgemm_load(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512(p); }
static inline __m512 bgemm_dot(__m512 acc, bgemm_vec a, bgemm_vec b) { return _mm512_dpbf16_ps(acc, a, b); }
#else /* AVX-512 without BF16: widen 16 values to float32 (a shift) and fma them, exact as above */
#define BGEMM_STEP 16
typedef __m512 bgemm_vec;
static inline bgemm_vec bgemm_load(const uint16_t *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline __m512 bgemm_dot(__m512 acc, bgemm_vec a, bgemm_vec b) { return _mm512_fmadd_ps(a, b, acc); }
#endif
#endif

static inline uint16_t bgemm_round_bf16(float f) { /* to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float bgemm_widen(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define BGEMM_ROWS 4 /* weight rows and activation rows per tile */

/* out[m0 + i, n0 + r] for RN weight rows and RM activation rows (both <= 4). */
static inline __attribute__((always_inline)) void bgemm_tile(const uint16_t *x, const uint16_t *w, int64_t K,
                                                             int64_t n0, const int RN, int64_t m0, const int RM,
                                                             float *out, int64_t ldo, int accumulate) {
    float res[BGEMM_ROWS][BGEMM_ROWS];
    int64_t k = 0;
#ifdef BGEMM_AVX512
    __m512 acc[BGEMM_ROWS][BGEMM_ROWS];
    for (int r = 0; r < RN; r++)
        for (int i = 0; i < RM; i++) acc[r][i] = _mm512_setzero_ps();
    for (; k + BGEMM_STEP <= K; k += BGEMM_STEP) {
        if (RM == 1 && k % 32 == 0) /* decode reads weights from DRAM: ask for the tile after next */
            for (int r = 0; r < RN; r++) _mm_prefetch((const char *)(w + (n0 + 2 * RN + r) * K + k), _MM_HINT_T0);
        bgemm_vec xv[BGEMM_ROWS];
        for (int i = 0; i < RM; i++) xv[i] = bgemm_load(x + (m0 + i) * K + k);
        for (int r = 0; r < RN; r++) {
            const bgemm_vec wv = bgemm_load(w + (n0 + r) * K + k);
            for (int i = 0; i < RM; i++) acc[r][i] = bgemm_dot(acc[r][i], wv, xv[i]);
        }
    }
    for (int r = 0; r < RN; r++)
        for (int i = 0; i < RM; i++) res[r][i] = _mm512_reduce_add_ps(acc[r][i]);
#else
    for (int r = 0; r < RN; r++)
        for (int i = 0; i < RM; i++) res[r][i] = 0.0f;
#endif
    for (int r = 0; r < RN; r++)
        for (int i = 0; i < RM; i++) {
            const uint16_t *wr = w + (n0 + r) * K, *xr = x + (m0 + i) * K;
            float s = 0.0f;
            #pragma omp simd reduction(+:s)
            for (int64_t j = k; j < K; j++) s += bgemm_widen(wr[j]) * bgemm_widen(xr[j]);
            float *o = out + (m0 + i) * ldo + n0 + r;
            *o = accumulate ? *o + res[r][i] + s : res[r][i] + s;
        }
}

static void bgemm_run_tile(const uint16_t *x, const uint16_t *w, int64_t K, int64_t n0, int RN, int64_t m0,
                           int RM, float *out, int64_t ldo, int accumulate) {
#define BT(a, b) bgemm_tile(x, w, K, n0, a, m0, b, out, ldo, accumulate)
    switch (RN * 8 + RM) {
    case 4 * 8 + 4: BT(4, 4); break;
    case 4 * 8 + 3: BT(4, 3); break;
    case 4 * 8 + 2: BT(4, 2); break;
    case 4 * 8 + 1: BT(4, 1); break;
    default: /* the last N % 4 rows */
        for (int r = 0; r < RN; r++)
            for (int i = 0; i < RM; i++) bgemm_tile(x, w, K, n0 + r, 1, m0 + i, 1, out, ldo, accumulate);
    }
#undef BT
}

/* out[m, n] (+)= sum_k x[m, k] w[n, k]: x [M, K] float32, w [N, K] bfloat16 rows, out rows
 * `ldo` apart. Returns 0, or -2 out of memory. */
int bgemm_bf16(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *out, int64_t ldo,
               int accumulate) {
    uint16_t *xb = malloc(sizeof(uint16_t) * (size_t)(M * K));
    if (!xb) return -2;
    for (int64_t i = 0; i < M * K; i++) xb[i] = bgemm_round_bf16(x[i]);
    #pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += BGEMM_ROWS) {
        const int RN = N - n0 < BGEMM_ROWS ? (int)(N - n0) : BGEMM_ROWS;
        for (int64_t m0 = 0; m0 < M; m0 += BGEMM_ROWS)
            bgemm_run_tile(xb, w, K, n0, RN, m0, M - m0 < BGEMM_ROWS ? (int)(M - m0) : BGEMM_ROWS, out, ldo,
                           accumulate);
    }
    free(xb);
    return 0;
}
