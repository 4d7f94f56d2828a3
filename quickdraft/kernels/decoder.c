/* A whole decoder stack (Llama family) for one step on CPU, in one call: for each layer, exactly
 * the calls the Python path makes (models/llama.py, DecoderLayer.forward with the native linears,
 * attention and ops), in the same order and with the same kernels, so the results are
 * bit-identical to it; only the Python overhead of ~10 calls per layer is gone. Activations are
 * float32; each linear is float32 (linear_f32.c) or block-quantized (linear_q8.c), as its
 * descriptor says.
 */
#include <stdint.h>

void qd_paged_attention_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                            const int64_t* query_token, const int64_t* query_pos, const int64_t* query_seq,
                            int64_t num_queries, const int64_t* block_tables, int64_t max_blocks,
                            int64_t block_size, int64_t H, int64_t Hkv, int64_t D, float scale,
                            int64_t window, int64_t max_context, float* out, int64_t out_stride,
                            int num_threads);
void qd_quantize_q8(const float* x, int64_t M, int64_t ldx, int64_t K, int8_t* xq, float* xd, float* xs32,
                    float* xs16, int num_threads);
typedef void (*qd_linear_q8_fn)(int fmt, const int8_t* xq, const float* xd, const float* xs32, const float* xs16,
                                int64_t M, const uint8_t* packed, int64_t N, int64_t K, const float* bias,
                                const float* res, int64_t ldr, float* y, int64_t ldy, int num_threads);
void qd_rms_norm_f32(const float* x, int64_t M, int64_t ldx, int64_t H, const float* w, float eps,
                     float* out, int64_t ldo, int num_threads);
void qd_rope_cache_f32(float* qkv, int64_t T, int64_t ld, int64_t H, int64_t Hkv, int64_t D,
                       const float* cos_t, const float* sin_t, const int64_t* positions,
                       const int64_t* slot_mapping, float* k_cache, float* v_cache, int num_threads);
void qd_silu_mul_f32(const float* gu, int64_t M, int64_t I, float* out, int num_threads);

typedef void (*qd_linear_float_fn)(const float* x, int64_t M, int64_t ldx, const void* packed, int64_t N,
                                   int64_t K, const float* bias, const float* res, int64_t ldr, float* y,
                                   int64_t ldy, int num_threads);
/* One linear layer, as one or more blocks of output rows each packed in its own format (a fused
 * Q/K/V whose V rows are stored in another block type than Q and K, as in Q4_K_M files). A
 * part's fmt 0 = float panels (linear_f32.c; fn is qd_linear_f32, _f16 or _bf16 for the panels'
 * dtype), else a QD_Q_* format of linear_q8.c (fn is the instruction-set variant chosen from the
 * CPU flags). Each output element is computed by exactly one part, with its bias and residual. */
#define QD_MAX_PARTS 4
typedef struct {
    const void* w;
    const void* fn;
    int64_t fmt;
    int64_t rows;
} qd_part;
typedef struct {
    const float* bias;
    int64_t num_parts;
    qd_part parts[QD_MAX_PARTS];
} qd_lin;

typedef struct {
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* q_norm/k_norm: NULL unless Qwen3 */
    qd_lin qkv, o, gate_up, down;
    float *k_cache, *v_cache; /* [slots, Hkv, D] each */
} qd_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, window, block_size;
    float eps, scale;
} qd_dims;

typedef struct {
    int64_t T;
    const int64_t *positions, *slot_mapping;             /* [T] */
    const int64_t *query_token, *query_pos, *query_seq;  /* [num_queries] */
    int64_t num_queries;
    const int64_t* block_tables;                          /* [B, max_blocks] */
    int64_t max_blocks, max_context;
    const float *cos, *sin;                               /* [max_positions, D] */
    float *h, *qkv, *attn, *gate_up, *act;               /* scratch, [T, *] */
    int8_t* xq;                                           /* scratch, [T, max K] */
    float *xd, *xs32, *xs16;                              /* scratch, [T, max K / 32 (16)] */
} qd_step;

/* y [M, N] = x [M, K] (row stride ldx) W^T + bias (+ res, which may be y itself), part by part
 * (the activations quantized once for the quantized parts). */
static void linear(const qd_lin* L, const float* x, int64_t M, int64_t ldx, int64_t N, int64_t K, const float* res,
                   float* y, int64_t ldy, const qd_step* s, int num_threads) {
    int quantized = 0;
    int64_t n0 = 0;
    for (int64_t p = 0; p < L->num_parts; ++p) {
        const qd_part* P = L->parts + p;
        const float* bias = L->bias ? L->bias + n0 : 0;
        const float* r = res ? res + n0 : 0;
        if (P->fmt == 0) {
            ((qd_linear_float_fn)P->fn)(x, M, ldx, P->w, P->rows, K, bias, r, ldy, y + n0, ldy, num_threads);
        } else {
            if (!quantized) qd_quantize_q8(x, M, ldx, K, s->xq, s->xd, s->xs32, s->xs16, num_threads);
            quantized = 1;
            ((qd_linear_q8_fn)P->fn)((int)P->fmt, s->xq, s->xd, s->xs32, s->xs16, M, (const uint8_t*)P->w, P->rows, K,
                                     bias, r, ldy, y + n0, ldy, num_threads);
        }
        n0 += P->rows;
    }
    (void)N; /* the parts' rows add up to N */
}

void qd_decoder(float* x, const qd_layer* layers, int64_t num_layers, const qd_dims* d, const qd_step* s,
                    int num_threads) {
    const int64_t T = s->T, Hd = d->hidden, D = d->head_dim;
    const int64_t q_size = d->heads * D, kv_size = d->kv_heads * D, ld_qkv = q_size + 2 * kv_size;
    for (int64_t l = 0; l < num_layers; ++l) {
        const qd_layer* L = layers + l;
        qd_rms_norm_f32(x, T, Hd, Hd, L->input_norm, d->eps, s->h, Hd, num_threads);
        linear(&L->qkv, s->h, T, Hd, ld_qkv, Hd, 0, s->qkv, ld_qkv, s, num_threads);
        if (L->q_norm) {
            for (int64_t t = 0; t < T; ++t) {
                float* row = s->qkv + t * ld_qkv;
                qd_rms_norm_f32(row, d->heads, D, D, L->q_norm, d->eps, row, D, 1);
                qd_rms_norm_f32(row + q_size, d->kv_heads, D, D, L->k_norm, d->eps, row + q_size, D, 1);
            }
        }
        qd_rope_cache_f32(s->qkv, T, ld_qkv, d->heads, d->kv_heads, D, s->cos, s->sin, s->positions,
                          s->slot_mapping, L->k_cache, L->v_cache, num_threads);
        qd_paged_attention_f32(s->qkv, ld_qkv, L->k_cache, L->v_cache, s->query_token, s->query_pos, s->query_seq,
                               s->num_queries, s->block_tables, s->max_blocks, d->block_size, d->heads,
                               d->kv_heads, D, d->scale, d->window, s->max_context, s->attn, q_size, num_threads);
        linear(&L->o, s->attn, T, q_size, Hd, q_size, x, x, Hd, s, num_threads);
        qd_rms_norm_f32(x, T, Hd, Hd, L->post_norm, d->eps, s->h, Hd, num_threads);
        linear(&L->gate_up, s->h, T, Hd, 2 * d->intermediate, Hd, 0, s->gate_up, 2 * d->intermediate, s,
               num_threads);
        qd_silu_mul_f32(s->gate_up, T, d->intermediate, s->act, num_threads);
        linear(&L->down, s->act, T, d->intermediate, Hd, d->intermediate, x, x, Hd, s, num_threads);
    }
}
