/* Paged attention for CPU: every query row reads its K/V straight from the block table.
 *
 * Row r of the flat batch belongs to request row_req[r] and attends to positions
 * [0, row_ctx[r]) of that request (causality is just a per-row context length, so decodes,
 * prefill chunks over a cached prefix and fresh prefills are all the same loop). Work is
 * split over (row, kv head); the G query heads that share a kv head are done together so
 * each K/V row is loaded once. Softmax is computed online, in float32.
 *
 * Built at first use by servelm/ops/cpu_kernels.py and called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define CHUNK 32

static inline float bf16_load(const uint16_t *p, int64_t i) {
    uint32_t u = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float f32_load(const float *p, int64_t i) { return p[i]; }

#define DEFINE_PAGED_ATTENTION(NAME, T, LOAD, STORE)                                          \
int NAME(const T *q, const T *k_cache, const T *v_cache, T *out,                               \
         const int64_t *block_tables, int64_t max_blocks, const int64_t *row_req,              \
         const int64_t *row_ctx, int64_t num_rows, int64_t num_heads, int64_t num_kv,          \
         int64_t head_dim, int64_t block_size, float scale) {                                   \
    const int64_t group = num_heads / num_kv;                                                   \
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM) return -1;                                \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 8)")                                \
    for (int64_t r = 0; r < num_rows; r++) {                                                    \
        for (int64_t h = 0; h < num_kv; h++) {                                                  \
            float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];                    \
            float row_max[MAX_GROUP], denom[MAX_GROUP], s[MAX_GROUP][CHUNK];                    \
            float kv_row[MAX_HEAD_DIM];                                                         \
            const int64_t *table = block_tables + row_req[r] * max_blocks;                      \
            const int64_t ctx = row_ctx[r];                                                     \
            for (int64_t g = 0; g < group; g++) {                                               \
                const T *qrow = q + (r * num_heads + h * group + g) * head_dim;                 \
                for (int64_t i = 0; i < head_dim; i++) {                                        \
                    qf[g][i] = LOAD(qrow, i) * scale;                                           \
                    acc[g][i] = 0.0f;                                                           \
                }                                                                               \
                row_max[g] = -INFINITY;                                                         \
                denom[g] = 0.0f;                                                                \
            }                                                                                   \
            for (int64_t start = 0; start < ctx; start += CHUNK) {                              \
                const int64_t n = ctx - start < CHUNK ? ctx - start : CHUNK;                    \
                int64_t slot[CHUNK];                                                            \
                for (int64_t j = 0; j < n; j++) {                                               \
                    const int64_t pos = start + j;                                              \
                    slot[j] = (table[pos / block_size] * block_size + pos % block_size) * num_kv + h; \
                }                                                                               \
                for (int64_t j = 0; j < n; j++) {                                               \
                    const T *krow = k_cache + slot[j] * head_dim;                               \
                    _Pragma("omp simd")                                                         \
                    for (int64_t i = 0; i < head_dim; i++) kv_row[i] = LOAD(krow, i);           \
                    for (int64_t g = 0; g < group; g++) {                                       \
                        float dot = 0.0f;                                                       \
                        _Pragma("omp simd reduction(+:dot)")                                    \
                        for (int64_t i = 0; i < head_dim; i++) dot += qf[g][i] * kv_row[i];     \
                        s[g][j] = dot;                                                          \
                    }                                                                           \
                }                                                                               \
                for (int64_t g = 0; g < group; g++) {                                           \
                    float m = row_max[g];                                                       \
                    for (int64_t j = 0; j < n; j++) m = s[g][j] > m ? s[g][j] : m;              \
                    const float correction = expf(row_max[g] - m);                              \
                    denom[g] *= correction;                                                     \
                    for (int64_t i = 0; i < head_dim; i++) acc[g][i] *= correction;             \
                    for (int64_t j = 0; j < n; j++) {                                           \
                        s[g][j] = expf(s[g][j] - m);                                            \
                        denom[g] += s[g][j];                                                    \
                    }                                                                           \
                    row_max[g] = m;                                                             \
                }                                                                               \
                for (int64_t j = 0; j < n; j++) {                                               \
                    const T *vrow = v_cache + slot[j] * head_dim;                               \
                    _Pragma("omp simd")                                                         \
                    for (int64_t i = 0; i < head_dim; i++) kv_row[i] = LOAD(vrow, i);           \
                    for (int64_t g = 0; g < group; g++) {                                       \
                        const float p = s[g][j];                                                \
                        _Pragma("omp simd")                                                     \
                        for (int64_t i = 0; i < head_dim; i++) acc[g][i] += p * kv_row[i];      \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            for (int64_t g = 0; g < group; g++) {                                               \
                T *orow = out + (r * num_heads + h * group + g) * head_dim;                     \
                const float inv = denom[g] > 0.0f ? 1.0f / denom[g] : 0.0f;                     \
                for (int64_t i = 0; i < head_dim; i++) orow[i] = STORE(acc[g][i] * inv);        \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    return 0;                                                                                   \
}

#define F32_STORE(x) (x)
DEFINE_PAGED_ATTENTION(paged_attention_f32, float, f32_load, F32_STORE)
DEFINE_PAGED_ATTENTION(paged_attention_bf16, uint16_t, bf16_load, bf16_round)
