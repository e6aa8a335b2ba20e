/* Paged attention for CPU: every query row reads its K/V straight from the block table.
 *
 * Row r of the flat batch belongs to request row_req[r] and attends to positions
 * [0, row_ctx[r]) of that request (causality is just a per-row context length, so decodes
 * and prefill chunks over a cached prefix are the same loop). One task per row handles all
 * heads, so each token's K and V rows (all KV heads, contiguous) are streamed once.
 * Softmax is computed online, in float32.
 *
 * The cache is either in the compute dtype (float32 / bfloat16, same as q) or quantized:
 * one byte per value (int8 or fp8 e4m3) plus a float32 scale per (slot, kv head). Bytes
 * decode with plain arithmetic (a sign-extending convert for int8, bit placement for fp8)
 * rather than a lookup table, so the compiler can vectorize the row loads; a table lookup
 * per value made the 8-bit kernel 1.6x slower than the bf16 one.
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

#define NO_SCALE(slot, kvh) 1.0f

static inline float i8_load(const int8_t *p, int64_t i) { return (float)p[i]; }

/* fp8 e4m3fn: sign, 4 exponent bits e (bias 7), 3 mantissa bits m. The value is
 * (m + 8 if e > 0) * 2^(max(e, 1) - 10): normal and subnormal codes in one branch-free
 * formula of integer ops, an int-to-float convert and a multiply, which vectorizes. The
 * NaN codes (0x7f, 0xff) never occur in the cache. */
static inline float fp8_e4m3_load(const uint8_t *p, int64_t i) {
    const uint32_t b = p[i], e = (b >> 3) & 15u, m = b & 7u;
    const uint32_t pow2_bits = ((e > 0u ? e : 1u) + 117u) << 23; /* 2^(max(e,1) - 10) */
    float pow2, mag = (float)(int32_t)(m | (e > 0u ? 8u : 0u));
    memcpy(&pow2, &pow2_bits, sizeof pow2);
    return (b & 0x80u) ? -(mag * pow2) : mag * pow2;
}

/* Quantized cache: scales are [slots, num_kv] per K / V half. */
#define K_SCALE_AT(slot, kvh) k_scales[(slot) * num_kv + (kvh)]
#define V_SCALE_AT(slot, kvh) v_scales[(slot) * num_kv + (kvh)]

/* Shared body. T: q / out element type; KV_T: cache element type; KV_LOAD(p, i) gives the
 * float value of p[i] before scaling; K_SCALE / V_SCALE(slot, kv_head) give that row's scale.
 *
 * A scale is constant over one (slot, kv head) row of head_dim values, so it factors out of
 * the sums: q.(s_k * k) = s_k * (q.k) and p * (s_v * v) = (p * s_v) * v. Applying it once to
 * the dot product and once to the probability costs 2 multiplies per (token, head) instead
 * of 2 * head_dim, and keeps the per-element loops identical to the float cache's. The
 * softmax denominator uses the unscaled probability; only the V accumulation sees s_v. */
#define PAGED_ATTENTION_BODY(T, KV_T, LOAD, STORE, KV_LOAD, K_SCALE, V_SCALE)                   \
{                                                                                               \
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
                const KV_T *krow = k_cache + slot[j] * row_len;                                 \
                _Pragma("omp simd")                                                             \
                for (int64_t i = 0; i < row_len; i++) kv_row[i] = KV_LOAD(krow, i);             \
                for (int64_t h = 0; h < num_heads; h++) {                                       \
                    const float *qh = qf + h * head_dim, *kh = kv_row + (h / group) * head_dim; \
                    float dot = 0.0f;                                                           \
                    _Pragma("omp simd reduction(+:dot)")                                        \
                    for (int64_t i = 0; i < head_dim; i++) dot += qh[i] * kh[i];                \
                    s[h][j] = dot * K_SCALE(slot[j], h / group);                                \
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
                const KV_T *vrow = v_cache + slot[j] * row_len;                                 \
                _Pragma("omp simd")                                                             \
                for (int64_t i = 0; i < row_len; i++) kv_row[i] = KV_LOAD(vrow, i);             \
                for (int64_t h = 0; h < num_heads; h++) {                                       \
                    const float p = s[h][j] * V_SCALE(slot[j], h / group);                      \
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

#define PAGED_ATTENTION_PARAMS(T, KV_T)                                                         \
    const T *q, const KV_T *k_cache, const KV_T *v_cache, T *out,                               \
    const int64_t *block_tables, int64_t max_blocks, const int64_t *row_req,                    \
    const int64_t *row_ctx, int64_t num_rows, int64_t num_heads, int64_t num_kv,                \
    int64_t head_dim, int64_t block_size, float scale

/* Cache in the compute dtype. */
#define DEFINE_PAGED_ATTENTION(NAME, T, LOAD, STORE)                                            \
int NAME(PAGED_ATTENTION_PARAMS(T, T))                                                          \
PAGED_ATTENTION_BODY(T, T, LOAD, STORE, LOAD, NO_SCALE, NO_SCALE)

/* 8-bit cache: same arguments with 8-bit K/V, plus the K and V scale halves ([slots, num_kv]
 * float32 each). */
#define DEFINE_PAGED_ATTENTION_QUANT(NAME, T, LOAD, STORE, KV_T, KV_LOAD)                        \
int NAME(PAGED_ATTENTION_PARAMS(T, KV_T), const float *k_scales, const float *v_scales)         \
PAGED_ATTENTION_BODY(T, KV_T, LOAD, STORE, KV_LOAD, K_SCALE_AT, V_SCALE_AT)

DEFINE_PAGED_ATTENTION(paged_attention_f32, float, f32_load, F32_STORE)
DEFINE_PAGED_ATTENTION(paged_attention_bf16, uint16_t, bf16_load, bf16_round)

/* float32 compute over a bfloat16 cache (the default under quantized weights). */
int paged_attention_bf16kv_f32(PAGED_ATTENTION_PARAMS(float, uint16_t))
PAGED_ATTENTION_BODY(float, uint16_t, f32_load, F32_STORE, bf16_load, NO_SCALE, NO_SCALE)
DEFINE_PAGED_ATTENTION_QUANT(paged_attention_i8_f32, float, f32_load, F32_STORE, int8_t, i8_load)
DEFINE_PAGED_ATTENTION_QUANT(paged_attention_i8_bf16, uint16_t, bf16_load, bf16_round, int8_t, i8_load)
DEFINE_PAGED_ATTENTION_QUANT(paged_attention_fp8_f32, float, f32_load, F32_STORE, uint8_t, fp8_e4m3_load)
DEFINE_PAGED_ATTENTION_QUANT(paged_attention_fp8_bf16, uint16_t, bf16_load, bf16_round, uint8_t,
                             fp8_e4m3_load)
