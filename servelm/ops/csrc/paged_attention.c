/* Paged attention for CPU: every query row reads its K/V straight from the block table.
 *
 * Row r of the flat batch belongs to request row_req[r] and attends to positions
 * [0, row_ctx[r]) of that request (causality is just a per-row context length, so decodes
 * and prefill chunks over a cached prefix are the same loop). One task per row handles all
 * heads, so each token's K and V rows (all KV heads, contiguous) are streamed once.
 * Softmax is computed online, in float32.
 *
 * Built at first use by servelm/ops/cpu_kernels.py and called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEADS 64
#define MAX_ROW 4096 /* num_kv_heads * head_dim */
#define MAX_Q 8192   /* num_heads * head_dim */
#define CHUNK 16

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
#define F32_STORE(x) (x)

#define DEFINE_PAGED_ATTENTION(NAME, T, LOAD, STORE)                                          \
int NAME(const T *q, const T *k_cache, const T *v_cache, T *out,                               \
         const int64_t *block_tables, int64_t max_blocks, const int64_t *row_req,              \
         const int64_t *row_ctx, int64_t num_rows, int64_t num_heads, int64_t num_kv,          \
         int64_t head_dim, int64_t block_size, float scale) {                                   \
    const int64_t group = num_heads / num_kv, row_len = num_kv * head_dim;                      \
    if (num_heads > MAX_HEADS || row_len > MAX_ROW || num_heads * head_dim > MAX_Q) return -1;  \
    _Pragma("omp parallel for schedule(dynamic, 4)")                                            \
    for (int64_t r = 0; r < num_rows; r++) {                                                    \
        float qf[MAX_Q], acc[MAX_Q], kv_row[MAX_ROW];                                           \
        float row_max[MAX_HEADS], denom[MAX_HEADS], s[MAX_HEADS][CHUNK];                        \
        const int64_t *table = block_tables + row_req[r] * max_blocks;                          \
        const int64_t ctx = row_ctx[r];                                                         \
        const T *qrow = q + r * num_heads * head_dim;                                           \
        for (int64_t i = 0; i < num_heads * head_dim; i++) {                                    \
            qf[i] = LOAD(qrow, i) * scale;                                                      \
            acc[i] = 0.0f;                                                                      \
        }                                                                                       \
        for (int64_t h = 0; h < num_heads; h++) {                                               \
            row_max[h] = -INFINITY;                                                             \
            denom[h] = 0.0f;                                                                    \
        }                                                                                       \
        for (int64_t start = 0; start < ctx; start += CHUNK) {                                  \
            const int64_t n = ctx - start < CHUNK ? ctx - start : CHUNK;                        \
            int64_t slot[CHUNK];                                                                \
            for (int64_t j = 0; j < n; j++) {                                                   \
                const int64_t pos = start + j;                                                  \
                slot[j] = table[pos / block_size] * block_size + pos % block_size;              \
            }                                                                                   \
            for (int64_t j = 0; j < n; j++) {                                                   \
                const T *krow = k_cache + slot[j] * row_len;                                    \
                _Pragma("omp simd")                                                             \
                for (int64_t i = 0; i < row_len; i++) kv_row[i] = LOAD(krow, i);               \
                for (int64_t h = 0; h < num_heads; h++) {                                       \
                    const float *qh = qf + h * head_dim, *kh = kv_row + (h / group) * head_dim; \
                    float dot = 0.0f;                                                           \
                    _Pragma("omp simd reduction(+:dot)")                                        \
                    for (int64_t i = 0; i < head_dim; i++) dot += qh[i] * kh[i];                \
                    s[h][j] = dot;                                                              \
                }                                                                               \
            }                                                                                   \
            for (int64_t h = 0; h < num_heads; h++) {                                           \
                float m = row_max[h];                                                           \
                for (int64_t j = 0; j < n; j++) m = s[h][j] > m ? s[h][j] : m;                  \
                const float correction = expf(row_max[h] - m);                                  \
                denom[h] *= correction;                                                         \
                float *ah = acc + h * head_dim;                                                 \
                _Pragma("omp simd")                                                             \
                for (int64_t i = 0; i < head_dim; i++) ah[i] *= correction;                     \
                for (int64_t j = 0; j < n; j++) {                                               \
                    s[h][j] = expf(s[h][j] - m);                                                \
                    denom[h] += s[h][j];                                                        \
                }                                                                               \
                row_max[h] = m;                                                                 \
            }                                                                                   \
            for (int64_t j = 0; j < n; j++) {                                                   \
                const T *vrow = v_cache + slot[j] * row_len;                                    \
                _Pragma("omp simd")                                                             \
                for (int64_t i = 0; i < row_len; i++) kv_row[i] = LOAD(vrow, i);                \
                for (int64_t h = 0; h < num_heads; h++) {                                       \
                    const float p = s[h][j];                                                    \
                    float *ah = acc + h * head_dim;                                             \
                    const float *vh = kv_row + (h / group) * head_dim;                          \
                    _Pragma("omp simd")                                                         \
                    for (int64_t i = 0; i < head_dim; i++) ah[i] += p * vh[i];                  \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        T *orow = out + r * num_heads * head_dim;                                               \
        for (int64_t h = 0; h < num_heads; h++) {                                               \
            const float inv = denom[h] > 0.0f ? 1.0f / denom[h] : 0.0f;                         \
            for (int64_t i = 0; i < head_dim; i++)                                              \
                orow[h * head_dim + i] = STORE(acc[h * head_dim + i] * inv);                    \
        }                                                                                       \
    }                                                                                           \
    return 0;                                                                                   \
}

DEFINE_PAGED_ATTENTION(paged_attention_f32, float, f32_load, F32_STORE)
DEFINE_PAGED_ATTENTION(paged_attention_bf16, uint16_t, bf16_load, bf16_round)
