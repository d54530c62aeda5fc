/* The kernels of CPU decode that torch and numpy run poorly at its shapes (lmforge/cpu/native.py loads them): the
 * product of one or a few token rows with a weight matrix, fp32 or integer codes (int8, int4), and attention of new
 * tokens over a paged KV cache.
 * Compiled on the user's machine with -O3 -march=native, so the vectors are the widest the CPU has; parallel over
 * `threads` OpenMP threads. */

#include <math.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VW 16 /* floats per vector */
#else
#define VW 8
#endif
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MR 6 /* token rows per tile: 6 rows x 4 vectors = 24 accumulators, within AVX-512's 32 registers */
#define PW (4 * VW) /* columns of W^T per panel: a tile's 4 vectors */
#define AHEAD 32 /* rows of a panel prefetched ahead on its first pass, which streams it from memory */
typedef float vec __attribute__((vector_size(VW * 4), aligned(4)));

/* y[i, 0 : nv VW] = sum_k x[i, k] w[k, 0 : nv VW] for mr rows of x, w a panel's rows ws apart: each step over k loads
 * nv vectors of one row of the panel and broadcasts one element of each row of x into nv fused multiply-adds. Inlined
 * with constant mr and nv, so the accumulators stay in registers.
 * The weights come from memory on a panel's first pass (first), which prefetches AHEAD rows ahead (~8% faster at 16-32
 * rows of x than the hardware prefetcher alone). Later passes read the panel from cache, and fetch `lines` of the
 * 64-byte lines of each row of the next panel (from line0 on) into L2, so that the next first pass finds it there:
 * memory and arithmetic overlap (~1.1-1.3x at 16-32 rows). */
static inline __attribute__((always_inline)) void tile(const int mr, const int nv, const int first, const float *x,
                                                        long xs, const float *w, long ws, float *y, long ys, int K,
                                                        const float *next, int lines, int line0, int add) {
    vec acc[MR][16];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nv; j++) acc[i][j] = (vec){0};
    for (int k = 0; k < K; k++) {
        const float *wk = w + (long)k * ws;
        vec b[16];
        if (first)
            for (int j = 0; j < nv; j++) __builtin_prefetch(wk + AHEAD * ws + j * VW);
        else
            for (int j = 0; j < lines; j++) __builtin_prefetch(next + (long)k * ws + (line0 + j) * 16, 0, 2);
        for (int j = 0; j < nv; j++) memcpy(&b[j], wk + j * VW, sizeof(vec));
        for (int i = 0; i < mr; i++) {
            const float a = x[(long)i * xs + k];
            for (int j = 0; j < nv; j++) acc[i][j] += b[j] * a;
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nv; j++) {
            float *yij = y + (long)i * ys + j * VW;
            if (add) {
                vec old;
                memcpy(&old, yij, sizeof(vec));
                acc[i][j] = old + acc[i][j];
            }
            memcpy(yij, &acc[i][j], sizeof(vec));
        }
}

/* The columns of y right of the last whole vector. */
static void edge(int M, int nr, const float *x, long xs, const float *w, long ws, float *y, long ys, int K, int add) {
    for (int i = 0; i < M; i++)
        for (int n = 0; n < nr; n++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += x[(long)i * xs + k] * w[(long)k * ws + n];
            y[(long)i * ys + n] = add ? y[(long)i * ys + n] + s : s;
        }
}

/* Every tile of x over the panel of NV vectors at WP (column n of y), the rows dealt evenly (8 rows: 4 + 4, not
 * 6 + 2); NEXT: the thread's next panel, or NULL. The tiles after the first share the prefetching of NEXT's lines. */
#define ROW_TILES(NV, WP, NEXT)                                                                                       \
    {                                                                                                                 \
        const int tiles = (M + MR - 1) / MR, lines = NV * VW / 16;                                                    \
        const int share = tiles > 1 && (NEXT) ? (lines + tiles - 2) / (tiles - 1) : 0;                               \
        for (int m0 = 0, i = 0, rows; m0 < M; m0 += rows, i++) {                                                      \
            const float *xt = x + (long)m0 * xs;                                                                      \
            float *yt = y + (long)m0 * ys + n;                                                                        \
            const int line0 = i ? (i - 1) * share : 0, count = i && line0 < lines ? MIN(share, lines - line0) : 0;    \
            rows = (M - m0 + tiles - i - 1) / (tiles - i); /* the rows left over the tiles left, rounded up */        \
            switch (rows) {                                                                                           \
            case 1: tile(1, NV, i == 0, xt, xs, WP, ws, yt, ys, K, NEXT, count, line0, add); break;                   \
            case 2: tile(2, NV, i == 0, xt, xs, WP, ws, yt, ys, K, NEXT, count, line0, add); break;                   \
            case 3: tile(3, NV, i == 0, xt, xs, WP, ws, yt, ys, K, NEXT, count, line0, add); break;                   \
            case 4: tile(4, NV, i == 0, xt, xs, WP, ws, yt, ys, K, NEXT, count, line0, add); break;                   \
            case 5: tile(5, NV, i == 0, xt, xs, WP, ws, yt, ys, K, NEXT, count, line0, add); break;                   \
            default: tile(6, NV, i == 0, xt, xs, WP, ws, yt, ys, K, NEXT, count, line0, add); break;                  \
            }                                                                                                         \
        }                                                                                                             \
    }

/* y = W x for a row-major W (N, K), an nn.Linear weight as it is: every row a dot product, the rows split over the
 * threads. Each thread reads one contiguous block, the fastest way through memory, which batch-1 decode is bound by
 * (OpenBLAS keeps weights under ~460k elements on one thread). */
static void gemv(const float *w, long row_stride, const float *x, float *y, int rows, int cols, int add, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const float *row = w + (long)r * row_stride;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int c = 0; c < cols; c++) sum += row[c] * x[c];
        y[r] = add ? y[r] + sum : sum;
    }
}

void lmforge_gemv(const float *w, long row_stride, const float *x, float *y, int rows, int cols, int threads) {
    gemv(w, row_stride, x, y, rows, cols, 0, threads);
}

/* The number of columns in a panel of W^T: native.py packs the weights in panels of this width. */
int lmforge_panel_width(void) { return PW; }

/* y = x W^T (add: y += x W^T) for M rows of x (M, K) and an nn.Linear weight W (N, K), W^T packed in panels of PW
 * columns: panel p, columns p PW to p PW + PW - 1 of W^T, is one contiguous (K, PW) block (the last one padded), so
 * its rows are read in one sequential stream, which the hardware prefetcher follows (1.3-1.9x a row-major W^T at 2-32
 * rows of x, whose panel rows lie a whole row of W^T apart). Each thread takes an even share of the vectors of
 * columns, walked a panel at a time (a vector at a time where its share cuts a panel), and every tile of x passes over
 * a panel while it stays in cache. */
static void gemm(const float *x, long xs, const float *w, float *y, long ys, int M, int K, int N, int add,
                 int threads) {
    const int units = N / VW;
    const long ws = PW, panel_stride = (long)K * PW;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int start = (int)((long)units * t / nt), end = (int)((long)units * (t + 1) / nt);
        for (int u = start; u < end;) {
            const int n = u * VW;
            const float *panel = w + (long)(u / 4) * panel_stride + u % 4 * VW;
            if (u % 4 == 0 && u + 4 <= end) {
                ROW_TILES(4, panel, u + 8 <= end ? panel + panel_stride : NULL)
                u += 4;
            } else {
                ROW_TILES(1, panel, NULL)
                u += 1;
            }
        }
    }
    if (N % VW) {
        const int n = units * VW;
        edge(M, N % VW, x, xs, w + (long)(n / PW) * panel_stride + n % PW, ws, y + n, ys, K, add);
    }
}

void lmforge_gemm(const float *x, long xs, const float *w, float *y, long ys, int M, int K, int N, int threads) {
    gemm(x, xs, w, y, ys, M, K, N, 0, threads);
}

/* Unaligned vector loads and stores. GCC 12's tuning for recent Xeons splits a 64-byte memcpy into two 32-byte moves
 * through the stack, and the product then reads the vector back (a store-forwarding stall per load): the intrinsics
 * are one instruction. */
static inline vec load(const float *p) {
#if defined(__AVX512F__) && VW == 16
    return (vec)_mm512_loadu_ps(p);
#elif defined(__AVX2__) && VW == 8
    return (vec)_mm256_loadu_ps(p);
#else
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
#endif
}

static inline void store(float *p, vec v) {
#if defined(__AVX512F__) && VW == 16
    _mm512_storeu_ps(p, (__m512)v);
#elif defined(__AVX2__) && VW == 8
    _mm256_storeu_ps(p, (__m256)v);
#else
    memcpy(p, &v, sizeof v);
#endif
}

/* Integer weights (QuantLinear's: w = (code - zero) * scale per group of input columns), read where they lie, with no
 * float copy. A product with one row reads nn.Linear's row order: int8 codes one a byte, int4 codes two a byte (column
 * 2j in the low nibble of byte j, 2j + 1 in the high one); each code is widened to a float, shifted by its zero, and
 * multiplied by x in fp32 (no rounding of the activations), and the group's sum is scaled once: batch-1 decode is bound
 * by memory, which reads 1/4 (int8) or 1/8 (int4) of the fp32 weight's bytes. Many rows read a copy of the codes in
 * panels (the layout of gemm's fp32 panels, the same bytes as the codes), dequantized a block at a time into a buffer
 * the fp32 tiles then stream through from L1: the widening is paid once for all the rows. */
typedef unsigned char bvec __attribute__((vector_size(VW), aligned(1)));
#define KC 128 /* rows of a panel dequantized at a time: KC x PW floats, 32 KB with AVX-512, within L1 */

/* One linear layer's weight W (N, K): bits 32, fp32 (data: row-major W, or gemm's panels); bits 8 or 4, codes (data:
 * row-major, or panels: int8 (panels, K, PW) bytes, int4 (panels, K, PW / 2) bytes whose byte j holds column j in its
 * low nibble and column j + PW / 2 in its high one), with scales and zeros (N, groups) row-major, or for panels scales
 * and offsets (-zero * scale) as (panels, groups, PW). */
typedef struct {
    const void *data;
    const float *scales, *zeros;
    int bits, group_size;
} lmforge_matrix;

/* The VW codes of b as floats. GCC 12 turns __builtin_convertvector from bytes into a byte-by-byte loop (6x slower
 * than fp32's product); on x86 the intrinsics give one zero-extension and one conversion. */
static inline vec widen(bvec b) {
#if defined(__AVX512F__) && VW == 16
    __m128i v;
    memcpy(&v, &b, sizeof v);
    return (vec)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
#elif defined(__AVX2__) && VW == 8
    long long v;
    memcpy(&v, &b, sizeof v);
    return (vec)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v)));
#else
    return __builtin_convertvector(b, vec);
#endif
}

static inline float lanes_sum(vec v) {
    float s = 0.0f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* With AVX-512 VNNI, one row times int8 or int4 codes as llama.cpp's Q8_0 and Q4_0 dot products do: x rounded to int8
 * in blocks of 32 columns (a scale each), and 64 products of code and activation summed into 16 int32 lanes by one
 * vpdpbusd, against ~16 instructions to widen 64 codes to floats and multiply them (the float product ran at ~6 GB/s
 * of codes a core, short of memory's speed). The product moves by ~0.5-1% of its size (the int8 grid of each block's
 * largest value), as much as int8 weights' own rounding. A chunk of 64 columns is two blocks, A and B: int8's 64 bytes
 * put A's products in lanes 0-7 and B's in 8-15; int4's 32 bytes hold the even columns in their low nibbles and the odd
 * ones in their high ones, so the codes come out as A's even, B's even, A's odd, B's odd columns (lanes 0-3, 4-7,
 * 8-11, 12-15) and x is stored in that order. */
#define VNNI 1
typedef struct {
    signed char *xq; /* (K,) x's int8 values, in the codes' order */
    float *lanes;    /* (K / 64, 16) per chunk and lane, the scale of the lane's block */
    float *shift;    /* (groups,) sum over the group's blocks of scale * sum of the block's int8 values */
} qx;

static qx quantize_x(const float *x, int K, int bits, int gs) {
    qx q = {aligned_alloc(64, (size_t)K), aligned_alloc(64, sizeof(float) * (size_t)K / 4),
            calloc((size_t)(K / gs), sizeof(float))};
    for (int b = 0; b < K / 32; b++) {
        const int c = b / 2, half = b % 2; /* chunk, and A or B */
        const float *xb = x + b * 32;
        float top = 0.0f;
        for (int i = 0; i < 32; i++) top = fabsf(xb[i]) > top ? fabsf(xb[i]) : top;
        const float d = top / 127.0f, inverse = top > 0.0f ? 127.0f / top : 0.0f;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            const int at = bits == 8 ? half * 32 + i : (i % 2) * 32 + half * 16 + i / 2;
            sum += q.xq[c * 64 + at] = (signed char)lrintf(xb[i] * inverse);
        }
        for (int lane = 0; lane < 16; lane++)
            if ((bits == 8 ? lane / 8 : lane / 4 % 2) == half) q.lanes[c * 16 + lane] = d;
        q.shift[b * 32 / gs] += d * (float)sum;
    }
    return q;
}

static inline __attribute__((always_inline)) __m512i chunk_codes(const unsigned char *row, int c, int bits) {
    if (bits == 8) return _mm512_loadu_si512(row + (long)c * 64);
    const __m256i b = _mm256_loadu_si256((const __m256i *)(row + (long)c * 32));
    return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1),
                            _mm512_set1_epi8(15));
}

static void vnni_gemv(const lmforge_matrix *m, const float *x, float *y, int rows, int cols, int add, int threads) {
    const int bits = m->bits, gs = m->group_size, groups = cols / gs, chunks = cols / 64;
    const long row_bytes = (long)cols * bits / 8;
    const qx q = quantize_x(x, cols, bits, gs);
    const __mmask16 b_lanes = bits == 8 ? 0xFF00 : 0xF0F0;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const unsigned char *row = (const unsigned char *)m->data + (long)r * row_bytes;
        const float *scale = m->scales + (long)r * groups, *zero = m->zeros + (long)r * groups;
        __m512 total = _mm512_setzero_ps();
        float shift = 0.0f;
        for (int c = 0; c < chunks; c++) {
            const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), chunk_codes(row, c, bits),
                                                    _mm512_load_si512(q.xq + c * 64));
            if (groups == 1) { /* one scale per row (int8 per channel): applied once, at the end */
                total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_load_ps(q.lanes + c * 16), total);
                continue;
            }
            const __m512 s = _mm512_mask_blend_ps(b_lanes, _mm512_set1_ps(scale[c * 64 / gs]),
                                                  _mm512_set1_ps(scale[(c * 64 + 32) / gs]));
            total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_load_ps(q.lanes + c * 16), s), total);
        }
        if (groups == 1) total = _mm512_mul_ps(total, _mm512_set1_ps(scale[0]));
        for (int g = 0; g < groups; g++) shift += scale[g] * zero[g] * q.shift[g];
        const float sum = _mm512_reduce_add_ps(total) - shift;
        y[r] = add ? y[r] + sum : sum;
    }
    free(q.xq), free(q.lanes), free(q.shift);
}
#else
#define VNNI 0
#endif

/* y = W x (add: y += W x) for W's codes in row order; threads split the rows. */
static void qgemv(const lmforge_matrix *m, const float *x, float *y, int rows, int cols, int add, int threads) {
#if VNNI
    if (m->group_size % 32 == 0 && cols % 64 == 0) {
        vnni_gemv(m, x, y, rows, cols, add, threads);
        return;
    }
#endif
    const int bits = m->bits, gs = m->group_size, groups = cols / gs;
    const long row_bytes = (long)cols * bits / 8;
    const unsigned char *codes = m->data;
    /* int4, groups of whole 2 VW-column blocks: x's columns reordered to match each block's VW bytes, the even columns
     * (low nibbles) then the odd ones (high nibbles) */
    const int blocks4 = bits == 4 && gs % (2 * VW) == 0;
    float *xp = NULL;
    if (blocks4) {
        xp = malloc(sizeof(float) * (size_t)cols);
        for (int b = 0; b < cols; b += 2 * VW)
            for (int i = 0; i < VW; i++) xp[b + i] = x[b + 2 * i], xp[b + VW + i] = x[b + 2 * i + 1];
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const unsigned char *row = codes + (long)r * row_bytes;
        const float *scale = m->scales + (long)r * groups, *zero = m->zeros + (long)r * groups;
        vec total = (vec){0};
        float tail = 0.0f;
        for (int g = 0; g < groups; g++) {
            const int k0 = g * gs;
            const vec z = (vec){0} + zero[g];
            vec acc0 = (vec){0}, acc1 = (vec){0};
            int k = k0;
            if (bits == 8) {
                for (; k + 2 * VW <= k0 + gs; k += 2 * VW) {
                    bvec b0, b1;
                    memcpy(&b0, row + k, VW), memcpy(&b1, row + k + VW, VW);
                    acc0 += (widen(b0) - z) * load(x + k);
                    acc1 += (widen(b1) - z) * load(x + k + VW);
                }
                for (; k + VW <= k0 + gs; k += VW) {
                    bvec b0;
                    memcpy(&b0, row + k, VW);
                    acc0 += (widen(b0) - z) * load(x + k);
                }
                float rest = 0.0f;
                for (; k < k0 + gs; k++) rest += ((float)row[k] - zero[g]) * x[k];
                tail += rest * scale[g];
            } else if (blocks4) {
                for (; k < k0 + gs; k += 2 * VW) {
                    bvec b;
                    memcpy(&b, row + k / 2, VW);
                    acc0 += (widen(b & 15) - z) * load(xp + k);
                    acc1 += (widen(b >> 4) - z) * load(xp + k + VW);
                }
            } else {
                float rest = 0.0f;
                for (; k < k0 + gs; k++) rest += ((float)((row[k / 2] >> (4 * (k & 1))) & 15) - zero[g]) * x[k];
                tail += rest * scale[g];
            }
            total += (acc0 + acc1) * scale[g];
        }
        const float sum = lanes_sum(total) + tail;
        y[r] = add ? y[r] + sum : sum;
    }
    free(xp);
}

/* Rows k0 .. k0 + kc - 1 of a panel of codes as floats, (kc, PW), into buf: w = code * scale + offset. */
static void dequantize_panel(const lmforge_matrix *m, const unsigned char *panel, const float *scales,
                             const float *offsets, int k0, int kc, float *buf) {
    const int gs = m->group_size;
    for (int k = k0; k < k0 + kc; k++) {
        const float *s = scales + (long)(k / gs) * PW, *o = offsets + (long)(k / gs) * PW;
        float *out = buf + (long)(k - k0) * PW;
        vec w[4];
        if (m->bits == 8) {
            for (int j = 0; j < 4; j++) {
                bvec b;
                memcpy(&b, panel + (long)k * PW + j * VW, VW);
                w[j] = widen(b);
            }
        } else {
            bvec b0, b1;
            memcpy(&b0, panel + (long)k * (PW / 2), VW), memcpy(&b1, panel + (long)k * (PW / 2) + VW, VW);
            w[0] = widen(b0 & 15), w[1] = widen(b1 & 15), w[2] = widen(b0 >> 4), w[3] = widen(b1 >> 4);
        }
        for (int j = 0; j < 4; j++) {
            store(out + j * VW, w[j] * load(s + j * VW) + load(o + j * VW));
        }
    }
}

/* M rows of x times one dequantized block (K, PW) of a panel, into y (add: y +=): gemm's tiles. */
static void block_product(int M, const float *x, long xs, const float *w, float *y, long ys, int K, int add) {
    const long ws = PW;
    const int n = 0;
    ROW_TILES(4, w, NULL)
}

#if VNNI
/* Many rows times integer codes with VNNI: each row of x rounded to int8 in blocks of 32 (as vnni_gemv), the codes in
 * panels of 64 columns laid out for vpdpbusd: per 4 rows k of W^T, 16 columns' 4 codes side by side in each of 4
 * vectors (int8: 256 bytes; int4: 128, vector 2h in the low nibbles of 64 bytes, 2h + 1 in their high ones). A tile of
 * 3 rows of x sums 4 products per lane and instruction into 12 int32 accumulators over a block of 32 k, then scales
 * them into 12 float ones: scale (weight group's) x scale (x block's), less scale x zero x the block's sum of x. */
#define VR 3
typedef struct {
    signed char *xq; /* (M, K) */
    float *d, *e;    /* (M, K / 32): each block's scale, and scale x sum of its int8 values */
} qrows;

static qrows quantize_rows(const float *x, long xs, int M, int K) {
    qrows q = {malloc((size_t)M * K), malloc(sizeof(float) * (size_t)M * K / 32),
               malloc(sizeof(float) * (size_t)M * K / 32)};
    for (int i = 0; i < M; i++)
        for (int b = 0; b < K / 32; b++) {
            const float *xb = x + (long)i * xs + b * 32;
            float top = 0.0f;
            for (int k = 0; k < 32; k++) top = fabsf(xb[k]) > top ? fabsf(xb[k]) : top;
            const float d = top / 127.0f, inverse = top > 0.0f ? 127.0f / top : 0.0f;
            int sum = 0;
            for (int k = 0; k < 32; k++) sum += q.xq[(long)i * K + b * 32 + k] = (signed char)lrintf(xb[k] * inverse);
            q.d[(long)i * (K / 32) + b] = d, q.e[(long)i * (K / 32) + b] = d * (float)sum;
        }
    return q;
}

static inline __attribute__((always_inline)) void vnni_tile(const int mr, const qrows *q, int i0, int K,
                                                            const unsigned char *panel, int bits, const float *s,
                                                            const float *sz, int gs, float *y, long ys, int add) {
    const int nb = K / 32, quad = bits == 8 ? 256 : 128;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 fa[VR][4];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < 4; j++) fa[i][j] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i ia[VR][4];
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < 4; j++) ia[i][j] = _mm512_setzero_si512();
        for (int k4 = b * 8; k4 < b * 8 + 8; k4++) {
            const unsigned char *wk = panel + (long)k4 * quad;
            __m512i w[4];
            if (bits == 8)
                for (int j = 0; j < 4; j++) w[j] = _mm512_loadu_si512(wk + j * 64);
            else
                for (int h = 0; h < 2; h++) {
                    const __m512i word = _mm512_loadu_si512(wk + h * 64);
                    w[2 * h] = _mm512_and_si512(word, low);
                    w[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(word, 4), low);
                }
            for (int i = 0; i < mr; i++) {
                int four;
                memcpy(&four, q->xq + (long)(i0 + i) * K + k4 * 4, 4);
                const __m512i xb = _mm512_set1_epi32(four);
                for (int j = 0; j < 4; j++) ia[i][j] = _mm512_dpbusd_epi32(ia[i][j], w[j], xb);
            }
        }
        const int g = b * 32 / gs;
        for (int j = 0; j < 4; j++) {
            const __m512 sj = _mm512_loadu_ps(s + g * 64 + j * 16), szj = _mm512_loadu_ps(sz + g * 64 + j * 16);
            for (int i = 0; i < mr; i++) {
                const long at = (long)(i0 + i) * nb + b;
                fa[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][j]), _mm512_mul_ps(sj, _mm512_set1_ps(q->d[at])),
                                           fa[i][j]);
                fa[i][j] = _mm512_fnmadd_ps(szj, _mm512_set1_ps(q->e[at]), fa[i][j]);
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < 4; j++) {
            float *yij = y + (long)(i0 + i) * ys + j * 16;
            store(yij, add ? load(yij) + (vec)fa[i][j] : (vec)fa[i][j]);
        }
}

/* y = x W^T (add: y +=) over VNNI panels (see vnni_tile); threads split the panels, the last (padded) one computed
 * into a buffer. */
static void vnni_gemm(const float *x, long xs, const lmforge_matrix *m, float *y, long ys, int M, int K, int N,
                      int add, int threads) {
    const int panels = (N + 63) / 64, groups = K / m->group_size;
    const long panel_bytes = (long)K * 64 * m->bits / 8;
    const qrows q = quantize_rows(x, xs, M, K);
#pragma omp parallel num_threads(threads)
    {
        float *edge_y = NULL;
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            const unsigned char *panel = (const unsigned char *)m->data + p * panel_bytes;
            const float *s = m->scales + (long)p * groups * 64, *sz = m->zeros + (long)p * groups * 64;
            const int whole = (p + 1) * 64 <= N;
            if (!whole && !edge_y) edge_y = malloc(sizeof(float) * (size_t)M * 64);
            float *out = whole ? y + (long)p * 64 : edge_y;
            const long os = whole ? ys : 64;
            const int tile_add = whole && add;
            for (int i0 = 0; i0 < M; i0 += VR) {
                switch (MIN(VR, M - i0)) {
                case 1: vnni_tile(1, &q, i0, K, panel, m->bits, s, sz, m->group_size, out, os, tile_add); break;
                case 2: vnni_tile(2, &q, i0, K, panel, m->bits, s, sz, m->group_size, out, os, tile_add); break;
                default: vnni_tile(3, &q, i0, K, panel, m->bits, s, sz, m->group_size, out, os, tile_add);
                }
            }
            if (!whole)
                for (int i = 0; i < M; i++)
                    for (int c = 0; c < N - p * 64; c++) {
                        float *yc = y + (long)i * ys + (long)p * 64 + c;
                        *yc = add ? *yc + edge_y[(long)i * 64 + c] : edge_y[(long)i * 64 + c];
                    }
        }
        free(edge_y);
    }
    free(q.xq), free(q.d), free(q.e);
}
#endif

/* Whether lmforge_qgemm reads VNNI panels (vnni_gemm: codes, scales and scale x zero) rather than float ones (qgemm:
 * codes, scales and offsets) for K columns in groups of gs. */
int lmforge_vnni_panels(int K, int gs) { return VNNI && PW == 64 && K % 32 == 0 && gs % 32 == 0; }

/* y = x W^T (add: y += x W^T) for M rows of x (M, K) and W's codes in panels; threads split the panels. A panel
 * right of column N (the last, padded) is computed into a buffer and only its columns left of N are written. */
static void qgemm(const float *x, long xs, const lmforge_matrix *m, float *y, long ys, int M, int K, int N, int add,
                  int threads) {
    const int panels = (N + PW - 1) / PW, groups = K / m->group_size;
    const long panel_bytes = (long)K * PW * m->bits / 8;
#pragma omp parallel num_threads(threads)
    {
        float *buf = aligned_alloc(64, sizeof(float) * KC * PW);
        float *edge_y = NULL;
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            const unsigned char *panel = (const unsigned char *)m->data + p * panel_bytes;
            const float *scales = m->scales + (long)p * groups * PW, *offsets = m->zeros + (long)p * groups * PW;
            const int whole = (p + 1) * PW <= N;
            if (!whole && !edge_y) edge_y = malloc(sizeof(float) * (size_t)M * PW);
            float *out = whole ? y + (long)p * PW : edge_y;
            const long os = whole ? ys : PW;
            for (int k0 = 0; k0 < K; k0 += KC) {
                const int kc = MIN(KC, K - k0);
                dequantize_panel(m, panel, scales, offsets, k0, kc, buf);
                block_product(M, x + k0, xs, buf, out, os, kc, (whole && add) || k0 > 0);
            }
            if (!whole)
                for (int i = 0; i < M; i++)
                    for (int c = 0; c < N - p * PW; c++) {
                        float *yc = y + (long)i * ys + (long)p * PW + c;
                        *yc = add ? *yc + edge_y[(long)i * PW + c] : edge_y[(long)i * PW + c];
                    }
        }
        free(buf);
        free(edge_y);
    }
}

/* Whether lmforge_qgemv rounds x to int8 (AVX-512 VNNI) for groups of 32 columns or a multiple, 64 dividing K. */
int lmforge_vnni(void) { return VNNI; }

void lmforge_qgemv(const lmforge_matrix *m, const float *x, float *y, int rows, int cols, int threads) {
    qgemv(m, x, y, rows, cols, 0, threads);
}

void lmforge_qgemm(const float *x, long xs, const lmforge_matrix *m, float *y, long ys, int M, int K, int N,
                   int threads) {
#if VNNI
    if (lmforge_vnni_panels(K, m->group_size)) {
        vnni_gemm(x, xs, m, y, ys, M, K, N, 0, threads);
        return;
    }
#endif
    qgemm(x, xs, m, y, ys, M, K, N, 0, threads);
}

/* y = x rotated by RoPE's half-split layout (cos, sin: the (D,) rows of its position; NULL: no rotation), times
 * scale. */
static void rotate(const float *x, const float *cos, const float *sin, float *y, int D, float scale) {
    const int half = D / 2;
    if (!cos) {
        for (int d = 0; d < D; d++) y[d] = x[d] * scale;
        return;
    }
    for (int d = 0; d < half; d++) y[d] = (x[d] * cos[d] - x[d + half] * sin[d]) * scale;
    for (int d = half; d < D; d++) y[d] = (x[d] * cos[d] + x[d - half] * sin[d]) * scale;
}

/* e^x for x <= 0 (softmax after subtracting the largest score), to ~1e-7 relative: Cody-Waite range reduction and
 * Cephes' polynomial, plain arithmetic, so a loop over scores is vectorized (libm's expf is a call per element). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x; /* e^-87 ~ 1.6e-38, still a normal float, against the 1 of the largest score */
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round(x / ln 2): the 1.5 * 2^23 trick */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;      /* x - n ln 2, ln 2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int bits = ((int)n + 127) << 23; /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* out[0..3] = the lane sums of a, b, c and d: three rounds of adding halves, ~13 instructions for four sums */
static inline __attribute__((always_inline)) void sum4(vec a, vec b, vec c, vec d, float *out) {
#if VW == 16
    const vec ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const vec cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vec s = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    s += __builtin_shufflevector(s, s, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    s += __builtin_shufflevector(s, s, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    out[0] = s[0], out[1] = s[4], out[2] = s[8], out[3] = s[12];
#else
    const vec ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
    const vec cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
    vec s = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +
            __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
    s += __builtin_shufflevector(s, s, 1, 0, 3, 2, 5, 4, 7, 6);
    out[0] = s[0], out[1] = s[2], out[2] = s[4], out[3] = s[6];
#endif
}

/* scores[s] = q . k_s over the S positions of one kv head, block by block (no division per position), for a head
 * of nv whole vectors: q stays in registers, and every four positions' products are summed across lanes at once. */
static inline __attribute__((always_inline)) void vector_scores(const int nv, const float *q, const float *keys,
                                                                long block_stride, const int *table, int block_size,
                                                                int S, float *scores) {
    vec qv[8], products[4];
    for (int j = 0; j < nv; j++) qv[j] = load(q + j * VW);
    int pending = 0;
    for (int s0 = 0, block = 0; s0 < S; s0 += block_size, block++) {
        const float *kb = keys + (long)table[block] * block_stride;
        for (int s = s0; s < S && s < s0 + block_size; s++) {
            const float *k = kb + (long)(s - s0) * nv * VW;
            vec product = qv[0] * load(k);
            for (int j = 1; j < nv; j++) product += qv[j] * load(k + j * VW);
            products[pending++] = product;
            if (pending == 4) {
                sum4(products[0], products[1], products[2], products[3], scores + s - 3);
                pending = 0;
            }
        }
    }
    if (pending) {
        float last[4];
        for (int i = pending; i < 4; i++) products[i] = (vec){0};
        sum4(products[0], products[1], products[2], products[3], last);
        memcpy(scores + S - pending, last, sizeof(float) * (size_t)pending);
    }
}

/* out = sum_s weights[s] v_s over the S positions of one kv head, block by block, the sum in registers. */
static inline __attribute__((always_inline)) void vector_output(const int nv, const float *weights, const float *values,
                                                                long block_stride, const int *table, int block_size,
                                                                int S, float *out) {
    vec sum[8];
    for (int j = 0; j < nv; j++) sum[j] = (vec){0};
    for (int s0 = 0, block = 0; s0 < S; s0 += block_size, block++) {
        const float *vb = values + (long)table[block] * block_stride;
        for (int s = s0; s < S && s < s0 + block_size; s++) {
            const float *v = vb + (long)(s - s0) * nv * VW, p = weights[s];
            for (int j = 0; j < nv; j++) sum[j] += load(v + j * VW) * p;
        }
    }
    for (int j = 0; j < nv; j++) memcpy(out + j * VW, &sum[j], sizeof(vec));
}

/* The same for any head size, a position at a time. */
static void any_scores(const float *q, const float *keys, long block_stride, const int *table, int block_size, int S,
                       int D, float *scores) {
    for (int s0 = 0, block = 0; s0 < S; s0 += block_size, block++) {
        const float *kb = keys + (long)table[block] * block_stride;
        for (int s = s0; s < S && s < s0 + block_size; s++) {
            const float *k = kb + (long)(s - s0) * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; d++) dot += q[d] * k[d];
            scores[s] = dot;
        }
    }
}

static void any_output(const float *weights, const float *values, long block_stride, const int *table, int block_size,
                       int S, int D, float *out) {
    for (int d = 0; d < D; d++) out[d] = 0.0f;
    for (int s0 = 0, block = 0; s0 < S; s0 += block_size, block++) {
        const float *vb = values + (long)table[block] * block_stride;
        for (int s = s0; s < S && s < s0 + block_size; s++) {
            const float *v = vb + (long)(s - s0) * D, p = weights[s];
#pragma omp simd
            for (int d = 0; d < D; d++) out[d] += p * v[d];
        }
    }
}

#define HEAD_SIZES(CALL)                                                                                              \
    switch (D % VW ? 0 : D / VW) {                                                                                    \
    case 1: CALL(1); break;                                                                                           \
    case 2: CALL(2); break;                                                                                           \
    case 3: CALL(3); break;                                                                                           \
    case 4: CALL(4); break;                                                                                           \
    case 6: CALL(6); break;                                                                                           \
    case 8: CALL(8); break;                                                                                           \
    default: CALL(0);                                                                                                 \
    }

/* One layer's keys and values in a paged pool: the vector of kv head g at position s of a sequence whose block table
 * is `table` starts at keys (values) + g * head_stride + table[s / block_size] * block_stride + (s % block_size) * D. */
typedef struct {
    float *keys, *values;
    long head_stride, block_stride;
    int block_size;
} lmforge_pool;

/* A step's chunks: chunk b is rows first[b] .. first[b+1]-1, the last tokens of a sequence of ends[b] tokens, whose
 * block table is row b of tables (count, width). */
typedef struct {
    const int *tables;
    int width;
    const int *first, *ends;
    int count;
} lmforge_chunks;

/* The attention's heads and positions: RoPE's (positions, D) cos and sin tables or NULL, ALiBi's (Hq,) slopes or
 * NULL, and the scale of the scores (1 / sqrt(D)). */
typedef struct {
    int n_heads, n_kv_heads, head_dim;
    const float *cos, *sin, *slopes;
    float scale;
} lmforge_heads;

/* One layer's attention for a step's new tokens (the rows of `chunks`) over a paged KV cache (PagedAttention). Every
 * new token's k is rotated and written with its v to its slot in `pool`; then each query attends causally over its
 * sequence up to itself.
 * qkv: row r at qkv + r * qkv_stride holds (Hq + 2 Hkv) * D floats, the q heads, then k, then v, not yet rotated.
 * heads: ALiBi's slopes add slope * (s - query position) to the scores.
 * out: row r at out + r * out_stride, (Hq, D). Query head h reads kv head h / (Hq / Hkv). */
void lmforge_attention(const float *qkv, long qkv_stride, const lmforge_pool *pool, const lmforge_chunks *chunks,
                       const lmforge_heads *heads, float *out, long out_stride, int threads) {
    float *k_cache = pool->keys, *v_cache = pool->values;
    const long head_stride = pool->head_stride, block_stride = pool->block_stride;
    const int block_size = pool->block_size;
    const int *tables = chunks->tables, *first = chunks->first, *ends = chunks->ends, width = chunks->width;
    const int B = chunks->count, Hq = heads->n_heads, Hkv = heads->n_kv_heads, D = heads->head_dim;
    const float *cos = heads->cos, *sin = heads->sin, *slopes = heads->slopes, scale = heads->scale;
    const int group = Hq / Hkv, rows = first[B];
    int *chunk_of = malloc(sizeof(int) * (size_t)rows), longest = 0;
    for (int b = 0; b < B; b++) {
        for (int r = first[b]; r < first[b + 1]; r++) chunk_of[r] = b;
        longest = ends[b] > longest ? ends[b] : longest;
    }
#define POSITION(r) (ends[chunk_of[r]] - first[chunk_of[r] + 1] + (r))
#define SLOT(b, s) ((long)tables[(long)(b) * width + (s) / block_size] * block_stride + (long)((s) % block_size) * D)
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            const int pos = POSITION(r);
            const long slot = SLOT(chunk_of[r], pos);
            const float *row = qkv + (long)r * qkv_stride;
            for (int g = 0; g < Hkv; g++) {
                rotate(row + (long)(Hq + g) * D, cos ? cos + (long)pos * D : NULL, sin ? sin + (long)pos * D : NULL,
                       k_cache + g * head_stride + slot, D, 1.0f);
                memcpy(v_cache + g * head_stride + slot, row + (long)(Hq + Hkv + g) * D, sizeof(float) * (size_t)D);
            }
        }  /* the barrier here: every new k and v is in place before any query reads them */
        float *scores = malloc(sizeof(float) * (size_t)longest), *q = malloc(sizeof(float) * (size_t)D);
        /* round robin over (row, head): the rows of a prompt chunk attend over ever longer prefixes */
#pragma omp for schedule(static, 1)
        for (long item = 0; item < (long)rows * Hq; item++) {
            const int r = (int)(item / Hq), h = (int)(item % Hq), b = chunk_of[r], pos = POSITION(r);
            rotate(qkv + (long)r * qkv_stride + (long)h * D, cos ? cos + (long)pos * D : NULL,
                   sin ? sin + (long)pos * D : NULL, q, D, scale);
            const float *kh = k_cache + (h / group) * head_stride, *vh = v_cache + (h / group) * head_stride;
            const int *table = tables + (long)b * width, S = pos + 1;
            float *oh = out + (long)r * out_stride + (long)h * D, top = -INFINITY;
#define SCORES(NV)                                                                                                    \
    if (NV) vector_scores(NV, q, kh, block_stride, table, block_size, S, scores);                                     \
    else any_scores(q, kh, block_stride, table, block_size, S, D, scores)
            HEAD_SIZES(SCORES)
            if (slopes)
                for (int s = 0; s < S; s++) scores[s] += slopes[h] * (float)(s - pos);
#pragma omp simd reduction(max : top)
            for (int s = 0; s < S; s++) top = scores[s] > top ? scores[s] : top;
            float total = 0.0f;
#pragma omp simd reduction(+ : total)
            for (int s = 0; s < S; s++) total += scores[s] = exp_nonpositive(scores[s] - top);
            const float inverse = 1.0f / total;
            for (int s = 0; s < S; s++) scores[s] *= inverse;
#define OUTPUT(NV)                                                                                                    \
    if (NV) vector_output(NV, scores, vh, block_stride, table, block_size, S, oh);                                    \
    else any_output(scores, vh, block_stride, table, block_size, S, D, oh)
            HEAD_SIZES(OUTPUT)
        }
        free(scores);
        free(q);
    }
#undef POSITION
#undef SLOT
#undef SCORES
#undef OUTPUT
    free(chunk_of);
}

/* out[i] = silu(gate[i]) * up[i] for M rows of gu = [gate | up] (H columns each): SwiGLU's product in one pass. */
void lmforge_silu_mul(const float *gu, long gu_stride, float *out, long out_stride, int M, int H, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)M * H >= 1 << 16)
    for (int i = 0; i < M; i++) {
        const float *gate = gu + (long)i * gu_stride, *up = gate + H;
        float *y = out + (long)i * out_stride;
#pragma omp simd
        for (int j = 0; j < H; j++) {
            const float g = gate[j], e = exp_nonpositive(g < 0.0f ? g : -g); /* e^-|g|, never overflowing */
            y[j] = (g < 0.0f ? g * e : g) / (1.0f + e) * up[j];      /* g / (1 + e^-g) either way */
        }
    }
}

/* y = x / sqrt(mean(x^2) + eps) * w for M rows of x (C columns): RMSNorm in one pass over each row. */
void lmforge_rmsnorm(const float *x, long xs, const float *w, float *y, long ys, int M, int C, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)M * C >= 1 << 16)
    for (int i = 0; i < M; i++) {
        const float *row = x + (long)i * xs;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int c = 0; c < C; c++) squares += row[c] * row[c];
        const float scale = 1.0f / sqrtf(squares / (float)C + eps);
        float *out = y + (long)i * ys;
#pragma omp simd
        for (int c = 0; c < C; c++) out[c] = row[c] * scale * w[c];
    }
}

/* A Llama-style decoder's layers: per layer two norm weights and four linear layers' weights, their sizes and
 * heads. */
typedef struct {
    int n_layers, dim, hidden;
    const float *const *norms;
    const lmforge_matrix *matrices;
    int packed;
    float eps;
    lmforge_heads heads;
} lmforge_stack;

/* out (M, N) = in (M, K) W^T (add: out +=) for a weight of any kind: fp32 or integer codes, in panels (packed) or in
 * rows (one row of in). */
static void product(const lmforge_matrix *m, int packed, const float *in, int K, float *out, int N, int M, int add,
                    int threads) {
    if (m->bits == 32 && packed)
        gemm(in, K, m->data, out, N, M, K, N, add, threads);
    else if (m->bits == 32)
        gemv(m->data, K, in, out, N, K, add, threads);
#if VNNI
    else if (packed && lmforge_vnni_panels(K, m->group_size))
        vnni_gemm(in, K, m, out, N, M, K, N, add, threads);
#endif
    else if (packed)
        qgemm(in, K, m, out, N, M, K, N, add, threads);
    else
        qgemv(m, in, out, N, K, add, threads);
}

/* Every layer of a Llama-style decoder (RMSNorm, SwiGLU, no biases) over the M rows of x (M, C), in place: per layer
 * x += proj(attention(qkv(norm(x)))), then x += down(silu(gate) * up(norm(x))). norms: per layer the attention norm's
 * and the MLP norm's (C,) weights; matrices: per layer qkv, proj, gate_up and down, fp32 or integer codes, in panels
 * (packed) or, with packed 0 (one row only), in nn.Linear's row order; pools: every layer's; the step's chunks as for
 * lmforge_attention. scratch: M (C + (Hq + 2 Hkv) D + Hq D + 3 H) floats. One call a step instead of ~10 per layer
 * from Python. */
void lmforge_layers(float *x, int M, const lmforge_stack *stack, const lmforge_pool *pools,
                    const lmforge_chunks *chunks, float *scratch, int threads) {
    const int C = stack->dim, L = stack->n_layers, H = stack->hidden, packed = stack->packed;
    const int Hq = stack->heads.n_heads, Hkv = stack->heads.n_kv_heads, D = stack->heads.head_dim;
    const float eps = stack->eps;
    const int W = (Hq + 2 * Hkv) * D, A = Hq * D;
    float *normed = scratch, *qkv = normed + (long)M * C, *attended = qkv + (long)M * W;
    float *gate_up = attended + (long)M * A, *hidden = gate_up + (long)M * 2 * H;
    for (int l = 0; l < L; l++) {
        const float *const *norm = stack->norms + 2L * l;
        const lmforge_matrix *w = stack->matrices + 4L * l;
        lmforge_rmsnorm(x, C, norm[0], normed, C, M, C, eps, threads);
        product(w, packed, normed, C, qkv, W, M, 0, threads);
        lmforge_attention(qkv, W, pools + l, chunks, &stack->heads, attended, A, threads);
        product(w + 1, packed, attended, A, x, C, M, 1, threads);
        lmforge_rmsnorm(x, C, norm[1], normed, C, M, C, eps, threads);
        product(w + 2, packed, normed, C, gate_up, 2 * H, M, 0, threads);
        lmforge_silu_mul(gate_up, 2L * H, hidden, H, M, H, threads);
        product(w + 3, packed, hidden, H, x, C, M, 1, threads);
    }
}
