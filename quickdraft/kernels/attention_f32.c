/* Batch-invariant float32 attention over the paged KV cache, for every query of a step (prompt
 * chunks, decode, verification of drafted tokens), for x86-64 CPUs with AVX2 and FMA.
 *
 * For query i (row query_token[i] of q, at absolute position query_pos[i], of the sequence whose
 * block table is row query_seq[i]) and head h, with G = H / Hkv query heads per KV head:
 *     s_j = scale * <q[i, h], k[slot(j), h / G]>          for the keys j in [lo, pos]
 *     out[i, h] = sum_j exp(s_j - max s) v[slot(j), h / G] / sum_j exp(s_j - max s)
 * where slot(j) = block_table[j / block_size] * block_size + j % block_size and lo = 0, or
 * pos - window + 1 with a sliding window. Every sum runs in one fixed order (eight lane
 * accumulators over the head dimension then a fixed tree; keys in increasing j) and exp is
 * simd_f32.h's exp8, so a query's result never depends on which other queries, sequences or
 * threads share the call.
 *
 * Work is shared by (run of up to Q_CHUNK consecutive queries of one sequence, KV head), or by
 * run alone when there are many runs (a large decode batch): the heads of every query in the
 * item read each key and value once per block of K_BLOCK keys, while it is in L1, instead of
 * once per query and head. Partial sums wait in memory between blocks,
 * which does not change their bits, so the per-query order above holds.
 */
#include "simd_f32.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define Q_CHUNK 16 /* queries of one sequence per work item */
#define K_BLOCK 32 /* keys per block */

/* Dot products of q with four keys over D = 8 * nd, each one fixed chain over d then hsum8. */
static inline __attribute__((always_inline)) void dot4_d(const float* q, const float* k0, const float* k1,
                                                         const float* k2, const float* k3, int64_t nd, float* out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < nd; ++d) {
        const __m256 qv = _mm256_loadu_ps(q + 8 * d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 8 * d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + 8 * d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + 8 * d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + 8 * d), a3);
    }
    out[0] = hsum8(a0); out[1] = hsum8(a1); out[2] = hsum8(a2); out[3] = hsum8(a3);
}

static inline __attribute__((always_inline)) float dot_d(const float* q, const float* k, int64_t nd) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < nd; ++d) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * d), _mm256_loadu_ps(k + 8 * d), acc);
    return hsum8(acc);
}

/* Raw scores of one query head for keys [j0, j1): kv[j] + off is key j's vector. */
static inline __attribute__((always_inline)) void scores_range(const float* qv, const float* const* kv, int64_t off,
                                                               int64_t j0, int64_t j1, int64_t nd, float* sc) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) dot4_d(qv, kv[j] + off, kv[j + 1] + off, kv[j + 2] + off, kv[j + 3] + off, nd, sc + j);
    for (; j < j1; ++j) sc[j] = dot_d(qv, kv[j] + off, nd);
}

/* acc[0..8nd) += e_j * v_j (vv[j] + off) and *denom += e_j for keys [j0, j1), in increasing j. */
static inline __attribute__((always_inline)) void values_range(float* acc, float* denom, const float* e,
                                                               const float* const* vv, int64_t off, int64_t j0,
                                                               int64_t j1, int64_t nd) {
    __m256 o[32];
    for (int64_t d = 0; d < nd; ++d) o[d] = _mm256_loadu_ps(acc + 8 * d);
    float den = *denom;
    for (int64_t j = j0; j < j1; ++j) {
        den += e[j];
        const __m256 eb = _mm256_set1_ps(e[j]);
        for (int64_t d = 0; d < nd; ++d) o[d] = _mm256_fmadd_ps(eb, _mm256_loadu_ps(vv[j] + off + 8 * d), o[d]);
    }
    for (int64_t d = 0; d < nd; ++d) _mm256_storeu_ps(acc + 8 * d, o[d]);
    *denom = den;
}

typedef struct {
    int64_t first, count; /* queries [first, first + count), all of one sequence */
} query_run;

/* One work item: the queries of run r with the heads of KV heads [kvh0, kvh0 + nkv). Row
 * r = c * nkv * G + hh is query run.first + c with head kvh0 * G + hh. ws: per-thread space. */
static void attend_item(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                        const int64_t* query_token, const int64_t* query_pos, const int64_t* table,
                        int64_t block_size, query_run run, int64_t kvh0, int64_t nkv, int64_t G, int64_t Hkv,
                        int64_t nd, float scale, int64_t window, float* out, int64_t out_stride, const float** kv,
                        const float** vv, float* scores, float* acc, float* denom, int64_t* lo_of, int64_t ld) {
    const int64_t D = 8 * nd, RH = nkv * G, R = run.count * RH;
    int64_t base = INT64_MAX, hi = 0; /* keys [base, hi) cover every query of the run */
    for (int64_t c = 0; c < run.count; ++c) {
        const int64_t pos = query_pos[run.first + c];
        lo_of[c] = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
        if (lo_of[c] < base) base = lo_of[c];
        if (pos + 1 > hi) hi = pos + 1;
    }
    const int64_t n = hi - base;
    for (int64_t j = 0, blk = base / block_size, off = base % block_size; j < n; ++j) {
        const int64_t slot = table[blk] * block_size + off;
        kv[j] = k_cache + slot * Hkv * D; /* the slot's row: Hkv heads of D */
        vv[j] = v_cache + slot * Hkv * D;
        if (++off == block_size) off = 0, ++blk;
    }
#define ROW_H(r) (kvh0 * G + (r) % RH)
#define ROW_OFF(r) (ROW_H(r) / G * D)
#define ROW_Q(r) (q + query_token[run.first + (r) / RH] * q_stride + ROW_H(r) * D)
#define ROW_J0(r) (lo_of[(r) / RH] - base)
#define ROW_J1(r) (query_pos[run.first + (r) / RH] + 1 - base)
    /* nd == 8 (head_dim 64) calls the inlined helpers with a constant trip count. */
    for (int64_t b0 = 0; b0 < n; b0 += K_BLOCK) {
        const int64_t b1 = b0 + K_BLOCK < n ? b0 + K_BLOCK : n;
        for (int64_t r = 0; r < R; ++r) {
            const int64_t j0 = ROW_J0(r) > b0 ? ROW_J0(r) : b0, j1 = ROW_J1(r) < b1 ? ROW_J1(r) : b1;
            if (j0 >= j1) continue;
            if (nd == 8) scores_range(ROW_Q(r), kv, ROW_OFF(r), j0, j1, 8, scores + r * ld);
            else scores_range(ROW_Q(r), kv, ROW_OFF(r), j0, j1, nd, scores + r * ld);
        }
    }
    for (int64_t r = 0; r < R; ++r) {
        float* sc = scores + r * ld;
        const int64_t j0 = ROW_J0(r), j1 = ROW_J1(r);
        float smax = -INFINITY;
        for (int64_t j = j0; j < j1; ++j) {
            sc[j] *= scale;
            if (sc[j] > smax) smax = sc[j];
        }
        const int64_t jend = j0 + ((j1 - j0 + 7) & ~(int64_t)7);
        for (int64_t j = j1; j < jend; ++j) sc[j] = smax; /* padding lanes, unused */
        const __m256 mx = _mm256_set1_ps(smax);
        for (int64_t j = j0; j < jend; j += 8)
            _mm256_storeu_ps(sc + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mx)));
        memset(acc + r * D, 0, sizeof(float) * (size_t)D);
        denom[r] = 0.0f;
    }
    for (int64_t b0 = 0; b0 < n; b0 += K_BLOCK) {
        const int64_t b1 = b0 + K_BLOCK < n ? b0 + K_BLOCK : n;
        for (int64_t r = 0; r < R; ++r) {
            const int64_t j0 = ROW_J0(r) > b0 ? ROW_J0(r) : b0, j1 = ROW_J1(r) < b1 ? ROW_J1(r) : b1;
            if (j0 >= j1) continue;
            if (nd == 8) values_range(acc + r * D, denom + r, scores + r * ld, vv, ROW_OFF(r), j0, j1, 8);
            else values_range(acc + r * D, denom + r, scores + r * ld, vv, ROW_OFF(r), j0, j1, nd);
        }
    }
    for (int64_t r = 0; r < R; ++r) {
        const __m256 inv = _mm256_set1_ps(1.0f / denom[r]);
        float* ov = out + query_token[run.first + r / RH] * out_stride + ROW_H(r) * D;
        for (int64_t d = 0; d < nd; ++d) _mm256_storeu_ps(ov + 8 * d, _mm256_mul_ps(_mm256_loadu_ps(acc + r * D + 8 * d), inv));
    }
#undef ROW_H
#undef ROW_OFF
#undef ROW_Q
#undef ROW_J0
#undef ROW_J1
}

/* Requires D % 8 == 0 and D <= 256. */
void qd_paged_attention_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                            const int64_t* query_token, const int64_t* query_pos, const int64_t* query_seq,
                            int64_t num_queries, const int64_t* block_tables, int64_t max_blocks,
                            int64_t block_size, int64_t H, int64_t Hkv, int64_t D, float scale,
                            int64_t window, int64_t max_context, float* out, int64_t out_stride,
                            int num_threads) {
    if (num_queries <= 0) return;
    const int64_t G = H / Hkv, nd = D / 8;
    /* Runs of consecutive queries of one sequence, at most Q_CHUNK each. */
    query_run* runs = (query_run*)malloc(sizeof(query_run) * (size_t)num_queries);
    int64_t num_runs = 0;
    for (int64_t i = 0; i < num_queries; ++i) {
        if (num_runs > 0 && query_seq[runs[num_runs - 1].first] == query_seq[i] && runs[num_runs - 1].count < Q_CHUNK)
            runs[num_runs - 1].count++;
        else
            runs[num_runs++] = (query_run){i, 1};
    }
    /* With enough runs to keep the threads busy an item takes every head of its queries and
     * reads whole cache rows in order; otherwise one KV head's group. Same bits either way. */
    const int64_t nkv = num_runs >= 4 * (int64_t)num_threads ? Hkv : 1, items_per_run = Hkv / nkv;
    const int64_t ctx = max_context > 0 ? max_context : 1, ld = ctx + 8, R = Q_CHUNK * nkv * G;
#pragma omp parallel num_threads(num_threads)
    {
        const float** kv = (const float**)malloc(sizeof(float*) * (size_t)ctx);
        const float** vv = (const float**)malloc(sizeof(float*) * (size_t)ctx);
        float* scores = (float*)malloc(sizeof(float) * (size_t)(R * ld));
        float* acc = (float*)malloc(sizeof(float) * (size_t)(R * D));
        float* denom = (float*)malloc(sizeof(float) * (size_t)R);
        int64_t lo_of[Q_CHUNK];
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_runs * items_per_run; ++item) {
            const query_run run = runs[item / items_per_run];
            attend_item(q, q_stride, k_cache, v_cache, query_token, query_pos,
                        block_tables + query_seq[run.first] * max_blocks, block_size, run,
                        item % items_per_run * nkv, nkv, G, Hkv, nd, scale, window, out, out_stride, kv, vv, scores,
                        acc, denom, lo_of, ld);
        }
        free(kv); free(vv); free(scores); free(acc); free(denom);
    }
    free(runs);
}
