/* The two kernels of batch-1 CPU decode that numpy runs poorly (lmforge/serve/native.py loads them). Compiled on the
 * user's machine with -O3 -march=native, so the inner loops use the widest vectors the CPU has; parallel over
 * `threads` OpenMP threads. */

#include <math.h>
#include <stdlib.h>

/* y = W x for a row-major fp32 W (an nn.Linear weight as it is): every row a dot product, the rows split over the
 * threads (OpenBLAS keeps weights under ~460k elements on one thread). */
void lmforge_gemv(const float *w, long row_stride, const float *x, float *y, int rows, int cols, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const float *row = w + (long)r * row_stride;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int c = 0; c < cols; c++) sum += row[c] * x[c];
        y[r] = sum;
    }
}

/* y = x rotated by RoPE's half-split layout (cos, sin: the (D,) rows of its position; NULL: no rotation), times scale. */
static void rotate(const float *x, const float *cos, const float *sin, float *y, int D, float scale) {
    const int half = D / 2;
    if (!cos) {
        for (int d = 0; d < D; d++) y[d] = x[d] * scale;
        return;
    }
    for (int d = 0; d < half; d++) y[d] = (x[d] * cos[d] - x[d + half] * sin[d]) * scale;
    for (int d = half; d < D; d++) y[d] = (x[d] * cos[d] + x[d - half] * sin[d]) * scale;
}

/* One layer's attention for the newest token of a sequence over a paged KV cache (PagedAttention): rotate its q and k,
 * write its k and v to its slot, and attend its q over positions 0..S-1 (the newest is S-1).
 * qkv: (Hq + 2 Hkv) * D floats, the q heads, then k, then v. k_cache, v_cache: this layer's pool, where the vector of
 * kv head g at position s starts at cache + g * head_stride + table[s / block_size] * block_stride
 * + (s % block_size) * D. slopes: ALiBi's (Hq,) slopes, adding slope * (s - (S - 1)) to the scores, or NULL.
 * out: (Hq, D). Query head h reads kv head h / (Hq / Hkv); the query heads are split over the threads. */
void lmforge_attention(const float *qkv, const float *cos, const float *sin, float *k_cache, float *v_cache,
                       long head_stride, long block_stride, const int *table, int block_size, int S,
                       const float *slopes, float scale, float *out, int Hq, int Hkv, int D, int threads) {
    const int group = Hq / Hkv, newest = S - 1;
    const long slot = (long)table[newest / block_size] * block_stride + (long)(newest % block_size) * D;
    for (int g = 0; g < Hkv; g++) {
        rotate(qkv + (long)(Hq + g) * D, cos, sin, k_cache + g * head_stride + slot, D, 1.0f);
        const float *v = qkv + (long)(Hq + Hkv + g) * D;
        float *v_slot = v_cache + g * head_stride + slot;
        for (int d = 0; d < D; d++) v_slot[d] = v[d];
    }
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)S), *q = malloc(sizeof(float) * (size_t)D);
#pragma omp for schedule(static)
        for (int h = 0; h < Hq; h++) {
            rotate(qkv + (long)h * D, cos, sin, q, D, scale);
            const float *kh = k_cache + (h / group) * head_stride, *vh = v_cache + (h / group) * head_stride;
            float *oh = out + (long)h * D, top = -INFINITY;
            for (int s = 0; s < S; s++) {
                const float *k = kh + (long)table[s / block_size] * block_stride + (long)(s % block_size) * D;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += q[d] * k[d];
                if (slopes) dot += slopes[h] * (float)(s - newest);
                scores[s] = dot;
                top = dot > top ? dot : top;
            }
            float total = 0.0f;
            for (int s = 0; s < S; s++) total += scores[s] = expf(scores[s] - top);
            for (int d = 0; d < D; d++) oh[d] = 0.0f;
            for (int s = 0; s < S; s++) {
                const float *v = vh + (long)table[s / block_size] * block_stride + (long)(s % block_size) * D;
                const float p = scores[s] / total;
#pragma omp simd
                for (int d = 0; d < D; d++) oh[d] += p * v[d];
            }
        }
        free(scores);
        free(q);
    }
}
