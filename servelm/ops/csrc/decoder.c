/* A whole decode step of a Llama-family model's layers in one call from Python.
 *
 * In eager torch one layer is ~35 small ops; at batch 1 on a small model each costs more in
 * dispatch than in arithmetic, so 30 layers spend milliseconds in Python per token. Here
 * Python calls once per step with the flat rows (one new token each); every layer runs in C:
 * RMSNorm, the fused QKV matmul (+ bias), per-head q/k RMSNorm (Qwen3), RoPE, the K/V write
 * into the paged cache, paged attention, the output projection added into the residual,
 * RMSNorm, gate/up, SiLU * up and the down projection added into the residual.
 *
 * The matmuls read block-quantized or bfloat16 weights (qgemm.c, bgemm.c, included so one
 * library holds the step) and attention reads the cache through the block tables. Rows are decodes only:
 * row r attends to cache indices [0, ctx[r]) of its request and its own K/V goes to slot
 * slots[r]. Everything is float32.
 *
 * Under tensor parallelism each rank runs its heads and MLP columns, and the output and
 * down projections' partial sums go through `dims.allreduce` (the shared-memory all-reduce,
 * shm_allreduce.c) before they join the residual: still one call per step.
 */
#include "bgemm.c"
#include "qgemm.c"

typedef struct {
    const void *q;
    const uint16_t *d, *m;   /* m: NULL for 8-bit */
    const uint16_t *d8, *m8; /* [N / 8, ns, 8] copies (qgemm.c), or NULL */
    const float *s8;         /* 8-bit: per-block sums of q (qgemm.c), or NULL */
    const uint8_t *qi;       /* q interleaved eight rows at a time (qgemm.c), or NULL */
    const uint16_t *bf16;    /* bfloat16 rows [N, K] (bgemm.c) instead of blocks, or NULL */
    int64_t group;
} qweight_t;

typedef struct {
    qweight_t qkv, o, gate_up, down;
    const float *input_norm, *post_norm, *qkv_bias, *q_norm, *k_norm; /* bias / q,k norms may be NULL */
    void *k_cache, *v_cache; /* [slots, num_kv, head_dim] float32, or bfloat16 if dims.kv16 */
} layer_t;

typedef struct {
    int64_t hidden, intermediate, num_heads, num_kv, head_dim, block_size;
    float eps, scale;
    const float *cos, *sin; /* [max_positions, head_dim] */
    int64_t kv16;           /* the cache holds bfloat16 */
    int (*allreduce)(void *ctx, float *x, int64_t n); /* tensor parallelism's sum, or NULL */
    void *allreduce_ctx;
} dims_t;

static int matmul(const float *x, int64_t M, int64_t K, const qweight_t *w, int64_t N, float *out,
                  int accumulate) {
    if (w->bf16) return bgemm_bf16(x, M, K, w->bf16, N, out, N, accumulate);
    weights_t wt;
    if (make_weights(&wt, K, w->group, w->m != NULL, w->q, w->d, w->m, w->d8, w->m8, w->s8, w->qi)) return -1;
    return qgemm(x, M, &wt, N, out, N, accumulate);
}

static void rms_norm_rows(const float *x, int64_t rows, int64_t n, const float *w, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float ss = 0.0f;
        #pragma omp simd reduction(+:ss)
        for (int64_t i = 0; i < n; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) out[r * n + i] = w[i] * (xr[i] * inv);
    }
}

/* Rotate-halves RoPE of `heads` heads of one row in place. */
static void rope(float *x, int64_t heads, int64_t d, const float *cos, const float *sin) {
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * d;
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even; no NaNs arise here */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#include "decode_attention.c"

/* x [T, H] += in [T, K] times w: in place, or with tensor parallelism this rank's partial
 * product summed over the ranks first (in `part`); -3 when the all-reduce fails. */
static int project_into_residual(const float *in, int64_t T, int64_t K, const qweight_t *w, int64_t H,
                                 float *x, float *part, const dims_t *dm) {
    if (!dm->allreduce) return matmul(in, T, K, w, H, x, 1);
    int rc = matmul(in, T, K, w, H, part, 0);
    if (rc) return rc;
    if (dm->allreduce(dm->allreduce_ctx, part, T * H)) return -3;
    for (int64_t i = 0; i < T * H; i++) x[i] += part[i];
    return 0;
}

/* x [T, hidden] in/out: the residual stream through `num_layers` layers. */
int decoder_layers(const layer_t *layers, int64_t num_layers, const dims_t *dm, float *x, int64_t T,
                   const int64_t *positions, const int64_t *slots, const int64_t *block_tables,
                   int64_t max_blocks, const int64_t *ctx) {
    const int64_t H = dm->hidden, I = dm->intermediate, D = dm->head_dim;
    const int64_t qs = dm->num_heads * D, kvs = dm->num_kv * D, qkv_n = qs + 2 * kvs;
    float *h = malloc(sizeof(float) * (size_t)(T * (H > qs ? H : qs)));
    float *qkv = malloc(sizeof(float) * (size_t)(T * qkv_n));
    float *q = malloc(sizeof(float) * (size_t)(T * qs)), *attn = malloc(sizeof(float) * (size_t)(T * qs));
    float *gu = malloc(sizeof(float) * (size_t)(T * 2 * I)), *act = malloc(sizeof(float) * (size_t)(T * I));
    float *part = dm->allreduce ? malloc(sizeof(float) * (size_t)(T * H)) : NULL;
    int64_t *run_rows = malloc(sizeof(int64_t) * (size_t)(2 * T));
    int rc = (!h || !qkv || !q || !attn || !gu || !act || !run_rows || (dm->allreduce && !part)) ? -2 : 0;
    runs_t runs = {0, NULL, NULL};
    if (!rc) find_runs(block_tables, max_blocks, ctx, T, dm->block_size, run_rows, &runs);
    for (int64_t l = 0; l < num_layers && !rc; l++) {
        const layer_t *L = layers + l;
        rms_norm_rows(x, T, H, L->input_norm, dm->eps, h);
        if ((rc = matmul(h, T, H, &L->qkv, qkv_n, qkv, 0))) break;
        for (int64_t r = 0; r < T; r++) {
            float *row = qkv + r * qkv_n, *k = row + qs, *v = row + qs + kvs;
            if (L->qkv_bias)
                for (int64_t i = 0; i < qkv_n; i++) row[i] += L->qkv_bias[i];
            if (L->q_norm) {
                rms_norm_rows(row, dm->num_heads, D, L->q_norm, dm->eps, row);
                rms_norm_rows(k, dm->num_kv, D, L->k_norm, dm->eps, k);
            }
            const float *c = dm->cos + positions[r] * D, *s = dm->sin + positions[r] * D;
            rope(row, dm->num_heads, D, c, s);
            rope(k, dm->num_kv, D, c, s);
            memcpy(q + r * qs, row, sizeof(float) * (size_t)qs);
            if (dm->kv16) {
                uint16_t *kd = (uint16_t *)L->k_cache + slots[r] * kvs, *vd = (uint16_t *)L->v_cache + slots[r] * kvs;
                for (int64_t i = 0; i < kvs; i++) {
                    kd[i] = float_to_bf16(k[i]);
                    vd[i] = float_to_bf16(v[i]);
                }
            } else {
                memcpy((float *)L->k_cache + slots[r] * kvs, k, sizeof(float) * (size_t)kvs);
                memcpy((float *)L->v_cache + slots[r] * kvs, v, sizeof(float) * (size_t)kvs);
            }
        }
        rc = dm->kv16 ? decode_attention(q, L->k_cache, L->v_cache, attn, block_tables, max_blocks, ctx, &runs,
                                         T, dm->num_heads, dm->num_kv, D, dm->block_size, dm->scale, 1)
                      : decode_attention(q, L->k_cache, L->v_cache, attn, block_tables, max_blocks, ctx, &runs,
                                         T, dm->num_heads, dm->num_kv, D, dm->block_size, dm->scale, 0);
        if (rc) break;
        if ((rc = project_into_residual(attn, T, qs, &L->o, H, x, part, dm))) break;
        rms_norm_rows(x, T, H, L->post_norm, dm->eps, h);
        if ((rc = matmul(h, T, H, &L->gate_up, 2 * I, gu, 0))) break;
        for (int64_t r = 0; r < T; r++) {
            const float *g = gu + r * 2 * I, *u = g + I;
            #pragma omp simd
            for (int64_t i = 0; i < I; i++) act[r * I + i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        if ((rc = project_into_residual(act, T, I, &L->down, H, x, part, dm))) break;
    }
    free(h), free(qkv), free(q), free(attn), free(gu), free(act), free(part), free(run_rows);
    return rc;
}
