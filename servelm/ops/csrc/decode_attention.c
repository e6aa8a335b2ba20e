/* Decode attention over the paged cache for the fused decoder (decoder.c includes it).
 *
 * Each row's query heads attend to its ctx[r] cached tokens, split over (run, kv head, slice
 * of ATT_SLICE tokens) so that even one row keeps every thread busy. Each slice keeps its own
 * running max, sum and weighted V per row and head (online softmax), merged at the end
 * (flash-decoding). A run is a few consecutive rows of one sequence, the drafts of a chain
 * verified as decodes: they read the same cached tokens, so a task loads each K and V row
 * once for all of them instead of once per row.
 *
 * The slices depend on a row's own length only, and a row's arithmetic is the same in a run
 * as alone, so its result is too: speculative chains match plain decoding bit for bit.
 */

#ifdef QGEMM_AVX2
/* Lane t of the result: the sum of the 8 lanes of v[t]. */
static inline __m256 sum_lanes8_ps(const __m256 v[8]) {
    const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 a = _mm256_hadd_ps(s01, s23), b = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

#define ATT_CHUNK 32
#define ATT_SLICE (4 * ATT_CHUNK) /* tokens per thread task of decode attention */
#define MAX_GROUP 64 /* query heads per KV head */
#define MAX_HEAD_DIM 512
#define MAX_RUN 8 /* rows of one sequence per task */

/* A cache row as float32: the row itself, or a bfloat16 row widened into `buf` (a shift per
 * value, which vectorizes; kv16 is a constant after inlining). */
static inline __attribute__((always_inline)) const float *kv_row(const void *row, int64_t D, const int kv16,
                                                                 float *buf) {
    if (!kv16) return (const float *)row;
    const uint16_t *h = (const uint16_t *)row;
    #pragma omp simd
    for (int64_t i = 0; i < D; i++) {
        const union { uint32_t u; float f; } wide = {.u = (uint32_t)h[i] << 16};
        buf[i] = wide.f;
    }
    return buf;
}

/* a[0, D) += sum_j p[j] v[j] over the first n tokens (none if n <= 0), in token order, a
 * kept in registers through the tokens rather than loaded and stored once per token. */
static inline void weigh_values(float *a, const float *p, const float *const *v, int64_t n, int64_t D) {
    int64_t e = 0;
#ifdef QGEMM_AVX2
    for (; e + 32 <= D; e += 32) {
        __m256 a0 = _mm256_loadu_ps(a + e), a1 = _mm256_loadu_ps(a + e + 8);
        __m256 a2 = _mm256_loadu_ps(a + e + 16), a3 = _mm256_loadu_ps(a + e + 24);
        for (int64_t j = 0; j < n; j++) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v[j] + e), a0);
            a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v[j] + e + 8), a1);
            a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v[j] + e + 16), a2);
            a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v[j] + e + 24), a3);
        }
        _mm256_storeu_ps(a + e, a0), _mm256_storeu_ps(a + e + 8, a1);
        _mm256_storeu_ps(a + e + 16, a2), _mm256_storeu_ps(a + e + 24, a3);
    }
    for (; e + 8 <= D; e += 8) {
        __m256 a0 = _mm256_loadu_ps(a + e);
        for (int64_t j = 0; j < n; j++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v[j] + e), a0);
        _mm256_storeu_ps(a + e, a0);
    }
#endif
    for (; e < D; e++) {
        float acc = a[e];
        for (int64_t j = 0; j < n; j++) acc += p[j] * v[j][e];
        a[e] = acc;
    }
}

typedef struct {
    int64_t count, *start, *len; /* run u is rows start[u] .. start[u] + len[u] - 1 */
} runs_t;

/* The step's rows as runs: in a run each row has one more cached token than the one before,
 * and their block tables agree on every block the longest reads. The same for every layer,
 * so found once a step; `start` holds 2T values (len is its second half). */
static void find_runs(const int64_t *tables, int64_t max_blocks, const int64_t *ctx, int64_t T, int64_t bs,
                      int64_t *start, runs_t *runs) {
    *runs = (runs_t){0, start, start + T};
    for (int64_t r = 0; r < T; r += runs->len[runs->count++]) {
        int64_t n = 1;
        while (r + n < T && n < MAX_RUN && ctx[r + n] == ctx[r + n - 1] + 1 &&
               !memcmp(tables + r * max_blocks, tables + (r + n) * max_blocks,
                       sizeof(int64_t) * (size_t)((ctx[r + n] + bs - 1) / bs)))
            n++;
        runs->start[runs->count] = r;
        runs->len[runs->count] = n;
    }
}

/* Slice sp of the rows r0 .. r0 + R - 1 of a run against kv head kvh: each row's running
 * max, sum and weighted V per head into pm, pl and pacc. */
static inline __attribute__((always_inline)) void attend_slice(
    const float *q, const void *kc, const void *vc, const int64_t *table, const int64_t *ctx, int64_t r0,
    int64_t R, int64_t kvh, int64_t sp, int64_t splits, int64_t H, int64_t KV, int64_t D, int64_t bs,
    float scale, const int kv16, float *pm, float *pl, float *pacc) {
    const int64_t elem = kv16 ? 2 : 4, G = H / KV, lo = sp * ATT_SLICE;
#define HEAD(i, g) ((r0 + (i)) * H + kvh * G + (g)) /* row i's query head g, across all rows */
#define PART(i, g) (HEAD(i, g) * splits + sp)     /* its slice's entry in pm, pl, pacc / D */
    float m[MAX_RUN][MAX_GROUP], l[MAX_RUN][MAX_GROUP], s[MAX_RUN][MAX_GROUP][ATT_CHUNK];
    float row_buf[MAX_HEAD_DIM], vbuf[ATT_CHUNK][MAX_HEAD_DIM];
#ifdef QGEMM_AVX2
    float rows8[8][MAX_HEAD_DIM];
#endif
    int64_t end[MAX_RUN], hi = lo; /* row i reads tokens [lo, end[i]): empty past its length */
    for (int64_t i = 0; i < R; i++) {
        const int64_t n = ctx[r0 + i];
        end[i] = n > lo ? (lo + ATT_SLICE < n ? lo + ATT_SLICE : n) : lo;
        hi = end[i] > hi ? end[i] : hi;
        for (int64_t g = 0; g < G; g++) {
            m[i][g] = -INFINITY;
            l[i][g] = 0.0f;
            memset(pacc + PART(i, g) * D, 0, sizeof(float) * (size_t)D);
        }
    }
    for (int64_t c0 = lo; c0 < hi; c0 += ATT_CHUNK) {
        const int64_t cmax = hi - c0 < ATT_CHUNK ? hi - c0 : ATT_CHUNK;
        /* row i's tokens here: [0, cn[i]) (none if <= 0), eight at a time up to vec[i] */
        int64_t cn[MAX_RUN], vec[MAX_RUN], slot[ATT_CHUNK], first_scalar = cmax;
        for (int64_t i = 0; i < R; i++) {
            cn[i] = end[i] - c0 < ATT_CHUNK ? end[i] - c0 : ATT_CHUNK;
#ifdef QGEMM_AVX2
            vec[i] = D % 8 == 0 && cn[i] > 0 ? cn[i] - cn[i] % 8 : 0;
#else
            vec[i] = 0;
#endif
            if (cn[i] > vec[i] && vec[i] < first_scalar) first_scalar = vec[i];
        }
        for (int64_t j = 0; j < cmax; j++) {
            const int64_t pos = c0 + j;
            slot[j] = (table[pos / bs] * bs + pos % bs) * KV + kvh;
        }
        /* The cache rows are scattered by the block table and come from DRAM (the weights
         * streamed since evicted them): ask for the next chunk's now, so its loads overlap
         * this chunk's arithmetic. */
        for (int64_t j = c0 + ATT_CHUNK; j < hi && j < c0 + 2 * ATT_CHUNK; j++) {
            const int64_t next = (table[j / bs] * bs + j % bs) * KV + kvh;
            for (int64_t i = 0; i < D * elem; i += 64) {
                __builtin_prefetch((const char *)kc + next * D * elem + i);
                __builtin_prefetch((const char *)vc + next * D * elem + i);
            }
        }
#ifdef QGEMM_AVX2
        /* Eight tokens at a time: eight 8-lane partial dot products per head, summed across
         * lanes together (one transposing add tree instead of a horizontal sum per token). */
        for (int64_t j = 0; D % 8 == 0 && j + 8 <= cmax; j += 8) {
            const float *k8[8];
            for (int t = 0; t < 8; t++) k8[t] = kv_row((const char *)kc + slot[j + t] * D * elem, D, kv16, rows8[t]);
            for (int64_t i = 0; i < R; i++) {
                if (j + 8 > vec[i]) continue;
                for (int64_t g = 0; g < G; g++) {
                    const float *qh = q + HEAD(i, g) * D;
                    __m256 part[8];
                    for (int t = 0; t < 8; t++) part[t] = _mm256_setzero_ps();
                    for (int64_t e = 0; e < D; e += 8) {
                        const __m256 qv = _mm256_loadu_ps(qh + e);
                        for (int t = 0; t < 8; t++) part[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k8[t] + e), part[t]);
                    }
                    _mm256_storeu_ps(s[i][g] + j, _mm256_mul_ps(sum_lanes8_ps(part), _mm256_set1_ps(scale)));
                }
            }
        }
#endif
        for (int64_t j = first_scalar; j < cmax; j++) { /* the tokens past each row's last eight */
            const float *k = kv_row((const char *)kc + slot[j] * D * elem, D, kv16, row_buf);
            for (int64_t i = 0; i < R; i++) {
                if (j < vec[i] || j >= cn[i]) continue;
                for (int64_t g = 0; g < G; g++) {
                    const float *qh = q + HEAD(i, g) * D;
                    float dot = 0.0f;
                    #pragma omp simd reduction(+:dot)
                    for (int64_t e = 0; e < D; e++) dot += qh[e] * k[e];
                    s[i][g][j] = dot * scale;
                }
            }
        }
        for (int64_t i = 0; i < R; i++)
            for (int64_t g = 0; g < G && cn[i] > 0; g++) {
                float mx = m[i][g];
                for (int64_t j = 0; j < cn[i]; j++) mx = s[i][g][j] > mx ? s[i][g][j] : mx;
                const float corr = expf(m[i][g] - mx);
                float *a = pacc + PART(i, g) * D;
                l[i][g] *= corr;
                #pragma omp simd
                for (int64_t e = 0; e < D; e++) a[e] *= corr;
                for (int64_t j = 0; j < cn[i]; j++) {
                    s[i][g][j] = expf(s[i][g][j] - mx);
                    l[i][g] += s[i][g][j];
                }
                m[i][g] = mx;
            }
        const float *v[ATT_CHUNK]; /* the chunk's V rows, widened once for every row and head */
        for (int64_t j = 0; j < cmax; j++) v[j] = kv_row((const char *)vc + slot[j] * D * elem, D, kv16, vbuf[j]);
        for (int64_t i = 0; i < R; i++)
            for (int64_t g = 0; g < G; g++)
                weigh_values(pacc + PART(i, g) * D, s[i][g], v, cn[i], D);
    }
    for (int64_t i = 0; i < R; i++)
        for (int64_t g = 0; g < G; g++) {
            pm[PART(i, g)] = m[i][g];
            pl[PART(i, g)] = l[i][g];
        }
#undef PART
#undef HEAD
}

/* out [T, H * D]: every row's heads attended over its cache, then the slices merged. */
static inline __attribute__((always_inline)) int decode_attention(
    const float *q, const void *kc, const void *vc, float *out, const int64_t *tables, int64_t max_blocks,
    const int64_t *ctx, const runs_t *runs, int64_t T, int64_t H, int64_t KV, int64_t D, int64_t bs, float scale,
    const int kv16) {
    const int64_t G = H / KV;
    int64_t longest = 1;
    for (int64_t r = 0; r < T; r++) longest = ctx[r] > longest ? ctx[r] : longest;
    const int64_t splits = (longest + ATT_SLICE - 1) / ATT_SLICE;
    float *pm = malloc(sizeof(float) * (size_t)(T * H * splits)), *pl = malloc(sizeof(float) * (size_t)(T * H * splits));
    float *pacc = malloc(sizeof(float) * (size_t)(T * H * splits * D));
    if (!pm || !pl || !pacc || G > MAX_GROUP || D > MAX_HEAD_DIM) {
        free(pm), free(pl), free(pacc);
        return -2;
    }
    #pragma omp parallel for collapse(3) schedule(static)
    for (int64_t u = 0; u < runs->count; u++)
        for (int64_t kvh = 0; kvh < KV; kvh++)
            for (int64_t sp = 0; sp < splits; sp++)
                attend_slice(q, kc, vc, tables + runs->start[u] * max_blocks, ctx, runs->start[u], runs->len[u], kvh,
                             sp, splits, H, KV, D, bs, scale, kv16, pm, pl, pacc);
    for (int64_t rh = 0; rh < T * H; rh++) {
        float top = -INFINITY, total = 0.0f;
        for (int64_t sp = 0; sp < splits; sp++) top = pm[rh * splits + sp] > top ? pm[rh * splits + sp] : top;
        float *o = out + rh * D;
        memset(o, 0, sizeof(float) * (size_t)D);
        for (int64_t sp = 0; sp < splits; sp++) {
            const float w = pl[rh * splits + sp] > 0.0f ? expf(pm[rh * splits + sp] - top) : 0.0f;
            const float *a = pacc + (rh * splits + sp) * D;
            total += w * pl[rh * splits + sp];
            for (int64_t i = 0; i < D; i++) o[i] += w * a[i];
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        for (int64_t i = 0; i < D; i++) o[i] *= inv;
    }
    free(pm), free(pl), free(pacc);
    return 0;
}
