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

/* One query token's attention over S cached positions. q: (Hq, D), rotated and scaled; key (g, s, :) of kv head g at
 * position s starts at k + g * k_head + s * k_pos (likewise v); query head h reads kv head h / (Hq / Hkv). slopes:
 * ALiBi's (Hq,) slopes, adding slope * (s - (S - 1)) to the scores, or NULL. out: (Hq, D). The heads are split over
 * the threads; each thread's scores live in a buffer of S floats. */
void lmforge_attend(const float *q, const float *k, long k_head, long k_pos, const float *v, long v_head, long v_pos,
                    const float *slopes, float *out, int Hq, int Hkv, int S, int D, int threads) {
    const int group = Hq / Hkv;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)S);
#pragma omp for schedule(static)
        for (int h = 0; h < Hq; h++) {
            const float *qh = q + (long)h * D, *kh = k + (long)(h / group) * k_head, *vh = v + (long)(h / group) * v_head;
            float *oh = out + (long)h * D;
            float top = -INFINITY;
            for (int s = 0; s < S; s++) {
                const float *ks = kh + (long)s * k_pos;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += qh[d] * ks[d];
                if (slopes) dot += slopes[h] * (float)(s - (S - 1));
                scores[s] = dot;
                top = dot > top ? dot : top;
            }
            float total = 0.0f;
            for (int s = 0; s < S; s++) total += scores[s] = expf(scores[s] - top);
            for (int d = 0; d < D; d++) oh[d] = 0.0f;
            for (int s = 0; s < S; s++) {
                const float *vs = vh + (long)s * v_pos, p = scores[s] / total;
#pragma omp simd
                for (int d = 0; d < D; d++) oh[d] += p * vs[d];
            }
        }
        free(scores);
    }
}
