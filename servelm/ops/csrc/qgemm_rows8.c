/* gemm8 (and gemm16): block matmuls eight (sixteen) weight rows at a time from an
 * interleaved copy of the values.
 * Included by qgemm.c inside its AVX2 section (weights_t, acts_t, dot_u8s8_add come from
 * there); not built on its own. */

/* The interleaved copy (`qi`) of the first N - N % 8 rows: for each group of eight rows and
 * each block, the rows' bytes in 4-byte pieces, piece-major, each piece all eight rows:
 *   8-bit: 8 pieces x 8 rows x 4 bytes; piece c holds columns 4c .. 4c+3 of the block;
 *   4-bit: 4 pieces x 8 rows x 4 bytes; piece j's low nibbles are columns 4j .. 4j+3, its
 *          high nibbles 16+4j .. 16+4j+3 (GGUF's nibble order, regrouped).
 * One 32-byte load is then four columns of eight rows, and one multiply-add against those
 * four activation bytes (broadcast) adds into lane r the part of row r's block dot: the eight
 * dots come out in one vector without horizontal sums, and each load serves every
 * activation row of a tile. */
#define QI_BYTES(q4) ((q4) ? 128 : 256)

/* acc + the four-byte dot products of pieces: 4-bit weights (unsigned) times activations;
 * 8-bit weights times activations + 128 (VNNI; the 128 sum_j w_j is taken off later) or,
 * without VNNI, |w| times x with w's sign (no overflow of maddubs' 16-bit sums). */
static inline __m256i piece_dot(__m256i acc, const int q4, __m256i wv, __m256i xb) {
    if (q4) return dot_u8s8_add(acc, wv, xb);
#ifdef QGEMM_VNNI
    return dot_u8s8_add(acc, xb, wv);
#else
    return dot_u8s8_add(acc, _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xb, wv));
#endif
}

/* Eight weight rows (group g) against RM activation rows m0 .. m0+RM-1. */
static inline __attribute__((always_inline)) void gemm8(const weights_t *w, const int q4, int64_t g,
                                                        const acts_t *x, int64_t m0, const int RM,
                                                        float *out, int64_t ldo, int accumulate,
                                                        const uint8_t *ahead) {
    const int64_t K = w->K, nb = w->nb;
    const uint8_t *blocks = w->qi + g * nb * QI_BYTES(q4);
    const uint16_t *d8 = w->d8 + g * w->ns * 8, *m8 = q4 ? w->m8 + g * w->ns * 8 : NULL;
#ifdef QGEMM_VNNI
    const float *s8 = q4 ? NULL : w->s8 + g * nb * 8;
    const uint8_t *xs8 = q4 ? (const uint8_t *)x->q : x->u; /* the bytes multiplied */
#else
    const uint8_t *xs8 = (const uint8_t *)x->q;
#endif
    __m256 acc[RM], macc[RM];
    for (int i = 0; i < RM; i++) acc[i] = macc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = blocks + b * QI_BYTES(q4);
        if (ahead) /* decode: the group a later iteration reads, fetched from DRAM meanwhile */
            for (int i = 0; i < QI_BYTES(q4); i += 64) _mm_prefetch((const char *)ahead + b * QI_BYTES(q4) + i, _MM_HINT_T0);
        __m256i wv[8];
        if (q4) {
            for (int j = 0; j < 4; j++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk + 32 * j));
                wv[j] = _mm256_and_si256(raw, _mm256_set1_epi8(0x0f));
                wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0f));
            }
        } else {
            for (int c = 0; c < 8; c++) wv[c] = _mm256_loadu_si256((const __m256i *)(blk + 32 * c));
        }
        const int64_t si = (b / w->per_scale) * 8;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d8 + si)));
        const __m256 mins = q4 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m8 + si))) : d;
        for (int i = 0; i < RM; i++) {
            const uint8_t *xb = xs8 + (m0 + i) * K + b * BLOCK;
            __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256(); /* two chains */
            for (int c = 0; c < 8; c += 2) {
                int32_t p0, p1;
                memcpy(&p0, xb + 4 * c, 4);
                memcpy(&p1, xb + 4 * c + 4, 4);
                s0 = piece_dot(s0, q4, wv[c], _mm256_set1_epi32(p0));
                s1 = piece_dot(s1, q4, wv[c + 1], _mm256_set1_epi32(p1));
            }
            __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
#ifdef QGEMM_VNNI
            if (!q4) dot = _mm256_fnmadd_ps(_mm256_set1_ps(128.0f), _mm256_loadu_ps(s8 + b * 8), dot);
#endif
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x->d[(m0 + i) * nb + b])), dot, acc[i]);
            if (q4) macc[i] = _mm256_fmadd_ps(mins, _mm256_set1_ps(x->s[(m0 + i) * nb + b]), macc[i]);
        }
    }
    for (int i = 0; i < RM; i++) {
        float *o = out + (m0 + i) * ldo + 8 * g;
        const __m256 res = _mm256_add_ps(acc[i], macc[i]);
        _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), res) : res);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define GEMM16 1
/* Two groups (g, g + 1) at once in 512-bit registers: lanes 0-7 are group g's rows, 8-15
 * group g + 1's, so each activation broadcast and each instruction serves sixteen rows, twice
 * gemm8's work per instruction where several activation rows make the step compute-bound.
 * Every lane does gemm8's operations in gemm8's order, so a row's result has the same bits
 * either way (a row alone and the same row in a batch must agree: speculative verification). */
static inline __m512i pair_load(const uint8_t *a, const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

static inline __m512 pair_halves(const uint16_t *a, const uint16_t *b) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)), _mm_loadu_si128((const __m128i *)b), 1));
}

static inline __attribute__((always_inline)) void gemm16(const weights_t *w, const int q4, int64_t g,
                                                         const acts_t *x, int64_t m0, const int RM,
                                                         float *out, int64_t ldo, int accumulate,
                                                         const uint8_t *ahead) {
    const int64_t K = w->K, nb = w->nb, gb = nb * QI_BYTES(q4);
    const uint8_t *blocks = w->qi + g * gb;
    const uint16_t *d8 = w->d8 + g * w->ns * 8, *m8 = q4 ? w->m8 + g * w->ns * 8 : NULL;
    const float *s8 = q4 ? NULL : w->s8 + g * nb * 8;
    const uint8_t *xs8 = q4 ? (const uint8_t *)x->q : x->u;
    __m512 acc[RM], macc[RM];
    for (int i = 0; i < RM; i++) acc[i] = macc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = blocks + b * QI_BYTES(q4);
        if (ahead) /* the next pair's blocks, from DRAM meanwhile (few rows: bound by the bytes) */
            for (int i = 0; i < QI_BYTES(q4); i += 64) {
                _mm_prefetch((const char *)ahead + b * QI_BYTES(q4) + i, _MM_HINT_T0);
                _mm_prefetch((const char *)ahead + gb + b * QI_BYTES(q4) + i, _MM_HINT_T0);
            }
        __m512i wv[8];
        if (q4) {
            for (int j = 0; j < 4; j++) {
                const __m512i raw = pair_load(blk + 32 * j, blk + gb + 32 * j);
                wv[j] = _mm512_and_si512(raw, _mm512_set1_epi8(0x0f));
                wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), _mm512_set1_epi8(0x0f));
            }
        } else {
            for (int c = 0; c < 8; c++) wv[c] = pair_load(blk + 32 * c, blk + gb + 32 * c);
        }
        const int64_t si = (b / w->per_scale) * 8;
        const __m512 d = pair_halves(d8 + si, d8 + w->ns * 8 + si);
        const __m512 mins = q4 ? pair_halves(m8 + si, m8 + w->ns * 8 + si) : d;
        for (int i = 0; i < RM; i++) {
            const uint8_t *xb = xs8 + (m0 + i) * K + b * BLOCK;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int c = 0; c < 8; c += 2) {
                int32_t p0, p1;
                memcpy(&p0, xb + 4 * c, 4);
                memcpy(&p1, xb + 4 * c + 4, 4);
                s0 = q4 ? _mm512_dpbusd_epi32(s0, wv[c], _mm512_set1_epi32(p0))
                        : _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(p0), wv[c]);
                s1 = q4 ? _mm512_dpbusd_epi32(s1, wv[c + 1], _mm512_set1_epi32(p1))
                        : _mm512_dpbusd_epi32(s1, _mm512_set1_epi32(p1), wv[c + 1]);
            }
            __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            if (!q4) {
                const __m512 sums = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(s8 + b * 8)),
                                                       _mm256_loadu_ps(s8 + nb * 8 + b * 8), 1);
                dot = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), sums, dot);
            }
            acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(x->d[(m0 + i) * nb + b])), dot, acc[i]);
            if (q4) macc[i] = _mm512_fmadd_ps(mins, _mm512_set1_ps(x->s[(m0 + i) * nb + b]), macc[i]);
        }
    }
    for (int i = 0; i < RM; i++) {
        float *o = out + (m0 + i) * ldo + 8 * g;
        const __m512 res = _mm512_add_ps(acc[i], macc[i]);
        _mm512_storeu_ps(o, accumulate ? _mm512_add_ps(_mm512_loadu_ps(o), res) : res);
    }
}
#endif

#define GEMM8_ROWS 4 /* activation rows per tile */
#define GEMM16_MIN_ROWS 2 /* from here on activation rows run sixteen weight rows at a time */

/* Every activation row against groups of eight interleaved rows, GEMM8_ROWS rows a tile. */
static void gemm8_all(const weights_t *w, const acts_t *x, int64_t M, int64_t groups, float *out,
                      int64_t ldo, int accumulate) {
    const int64_t group_bytes = w->nb * QI_BYTES(w->q4);
    int64_t first = 0;
/* CALL(q4, rm) with the format and the tile's row count as constants, so each shape
 * compiles to its own branch-free loop. */
#define BY_SHAPE(CALL, q4, RM)                                                       \
    switch ((q4) * 8 + (RM)) {                                                       \
    case 8 + 4: CALL(1, 4); break;                                                   \
    case 8 + 3: CALL(1, 3); break;                                                   \
    case 8 + 2: CALL(1, 2); break;                                                   \
    case 8 + 1: CALL(1, 1); break;                                                   \
    case 4: CALL(0, 4); break;                                                       \
    case 3: CALL(0, 3); break;                                                       \
    case 2: CALL(0, 2); break;                                                       \
    default: CALL(0, 1); break;                                                      \
    }
#ifdef GEMM16
    if (M >= GEMM16_MIN_ROWS) {
        #pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < groups / 2; p++)
            for (int64_t m0 = 0; m0 < M; m0 += GEMM8_ROWS) {
                const int RM = M - m0 < GEMM8_ROWS ? (int)(M - m0) : GEMM8_ROWS;
                const uint8_t *ahead = M <= GEMM8_ROWS && 2 * p + 3 < groups ? w->qi + (2 * p + 2) * group_bytes : NULL;
#define G16(q4, rm) gemm16(w, q4, 2 * p, x, m0, rm, out, ldo, accumulate, ahead)
                BY_SHAPE(G16, w->q4 != 0, RM)
#undef G16
            }
        first = groups - groups % 2; /* an odd last group runs as gemm8 */
    }
#endif
    #pragma omp parallel for schedule(static)
    for (int64_t g = first; g < groups; g++)
        for (int64_t m0 = 0; m0 < M; m0 += GEMM8_ROWS) {
            const uint8_t *ahead = M <= GEMM8_ROWS && g + 2 < groups ? w->qi + (g + 2) * group_bytes : NULL;
            const int RM = M - m0 < GEMM8_ROWS ? (int)(M - m0) : GEMM8_ROWS;
#define G8(q4, rm) gemm8(w, q4, g, x, m0, rm, out, ldo, accumulate, ahead)
            BY_SHAPE(G8, w->q4 != 0, RM)
#undef G8
        }
#undef BY_SHAPE
}
