/* Batch-invariant float32 attention of short queries (decode, verification of drafted tokens)
 * over the paged KV cache, for x86-64 CPUs with AVX2 and FMA.
 *
 * For query i (row query_token[i] of q, at absolute position query_pos[i], of the sequence whose
 * block table is row query_seq[i]) and head h, with G = H / Hkv query heads per KV head:
 *     s_j = scale * <q[i, h], k[slot(j), h / G]>          for the keys j in [lo, pos]
 *     out[i, h] = sum_j exp(s_j - max s) v[slot(j), h / G] / sum_j exp(s_j - max s)
 * where slot(j) = block_table[j / block_size] * block_size + j % block_size and lo = 0, or
 * pos - window + 1 with a sliding window. Every sum runs in one fixed order (eight lane
 * accumulators over the head dimension then a fixed tree; keys in increasing j), so a query's
 * result never depends on which other queries, sequences or threads share the call.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);
    __m128 t = _mm_movehl_ps(s, s);
    s = _mm_add_ps(s, t);
    t = _mm_shuffle_ps(s, s, 0x55);
    return _mm_cvtss_f32(_mm_add_ss(s, t));
}

/* Requires D % 8 == 0 and D <= 256. */
void qd_paged_attention_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                            const int64_t* query_token, const int64_t* query_pos, const int64_t* query_seq,
                            int64_t num_queries, const int64_t* block_tables, int64_t max_blocks,
                            int64_t block_size, int64_t H, int64_t Hkv, int64_t D, float scale,
                            int64_t window, int64_t max_context, float* out, int64_t out_stride,
                            int num_threads) {
    const int64_t G = H / Hkv;
    const int64_t nd = D / 8;
#pragma omp parallel num_threads(num_threads)
    {
        float* scores = (float*)malloc(sizeof(float) * (size_t)(max_context > 0 ? max_context : 1));
#pragma omp for schedule(static, 1)
        for (int64_t item = 0; item < num_queries * H; ++item) {
            const int64_t i = item / H, h = item % H, kvh = h / G;
            const int64_t pos = query_pos[i];
            const int64_t lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
            const int64_t* table = block_tables + query_seq[i] * max_blocks;
            const float* qv = q + query_token[i] * q_stride + h * D;
            float smax = -INFINITY;
            for (int64_t j = lo; j <= pos; ++j) {
                const int64_t slot = table[j / block_size] * block_size + j % block_size;
                const float* kv = k_cache + (slot * Hkv + kvh) * D;
                __m256 acc = _mm256_setzero_ps();
                for (int64_t d = 0; d < nd; ++d)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qv + 8 * d), _mm256_loadu_ps(kv + 8 * d), acc);
                const float s = hsum8(acc) * scale;
                scores[j - lo] = s;
                if (s > smax) smax = s;
            }
            float denom = 0.0f;
            __m256 o[32];
            for (int64_t d = 0; d < nd; ++d) o[d] = _mm256_setzero_ps();
            for (int64_t j = lo; j <= pos; ++j) {
                const float e = expf(scores[j - lo] - smax);
                denom += e;
                const int64_t slot = table[j / block_size] * block_size + j % block_size;
                const float* vv = v_cache + (slot * Hkv + kvh) * D;
                const __m256 eb = _mm256_set1_ps(e);
                for (int64_t d = 0; d < nd; ++d) o[d] = _mm256_fmadd_ps(eb, _mm256_loadu_ps(vv + 8 * d), o[d]);
            }
            const __m256 inv = _mm256_set1_ps(1.0f / denom);
            float* ov = out + query_token[i] * out_stride + h * D;
            for (int64_t d = 0; d < nd; ++d) _mm256_storeu_ps(ov + 8 * d, _mm256_mul_ps(o[d], inv));
        }
        free(scores);
    }
}
