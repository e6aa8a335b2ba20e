/* A whole decode step of a Llama-family model's layers in one call from Python.
 *
 * In eager torch one layer is ~35 small ops; at batch 1 on a small model each costs more in
 * dispatch than in arithmetic, so 30 layers spend milliseconds in Python per token. Here
 * Python calls once per step with the flat rows (one new token each); every layer runs in C:
 * RMSNorm, the fused QKV matmul (+ bias), per-head q/k RMSNorm (Qwen3), RoPE, the K/V write
 * into the paged cache, paged attention, the output projection added into the residual,
 * RMSNorm, gate/up, SiLU * up and the down projection added into the residual.
 *
 * The matmuls read block-quantized weights (qgemm.c) and attention reads the float32 cache
 * through the block tables (paged_attention.c); both are included here so one library holds
 * the step. Rows are decodes only: row r attends to cache indices [0, ctx[r]) of its request
 * and its own K/V goes to slot slots[r]. Everything is float32.
 */
#include "qgemm.c"
#include "paged_attention.c"

typedef struct {
    const void *q;
    const uint16_t *d, *m; /* m: NULL for 8-bit */
    int64_t group;
} qweight_t;

typedef struct {
    qweight_t qkv, o, gate_up, down;
    const float *input_norm, *post_norm, *qkv_bias, *q_norm, *k_norm; /* bias / q,k norms may be NULL */
    float *k_cache, *v_cache; /* [slots, num_kv, head_dim] */
} layer_t;

typedef struct {
    int64_t hidden, intermediate, num_heads, num_kv, head_dim, block_size;
    float eps, scale;
    const float *cos, *sin; /* [max_positions, head_dim] */
} dims_t;

static int matmul(const float *x, int64_t M, int64_t K, const qweight_t *w, int64_t N, float *out,
                  int accumulate) {
    weights_t wt;
    if (make_weights(&wt, K, w->group, w->m != NULL, w->q, w->d, w->m)) return -1;
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
    int64_t *rows = malloc(sizeof(int64_t) * (size_t)T);
    int rc = (!h || !qkv || !q || !attn || !gu || !act || !rows) ? -2 : 0;
    for (int64_t r = 0; r < T && !rc; r++) rows[r] = r;
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
            memcpy(L->k_cache + slots[r] * kvs, k, sizeof(float) * (size_t)kvs);
            memcpy(L->v_cache + slots[r] * kvs, v, sizeof(float) * (size_t)kvs);
        }
        if ((rc = paged_attention_f32(q, L->k_cache, L->v_cache, attn, block_tables, max_blocks, rows, ctx,
                                      T, dm->num_heads, dm->num_kv, D, dm->block_size, dm->scale)))
            break;
        if ((rc = matmul(attn, T, qs, &L->o, H, x, 1))) break;
        rms_norm_rows(x, T, H, L->post_norm, dm->eps, h);
        if ((rc = matmul(h, T, H, &L->gate_up, 2 * I, gu, 0))) break;
        for (int64_t r = 0; r < T; r++) {
            const float *g = gu + r * 2 * I, *u = g + I;
            #pragma omp simd
            for (int64_t i = 0; i < I; i++) act[r * I + i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        if ((rc = matmul(act, T, I, &L->down, H, x, 1))) break;
    }
    free(h), free(qkv), free(q), free(attn), free(gu), free(act), free(rows);
    return rc;
}
