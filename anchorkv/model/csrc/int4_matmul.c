/* y = x W^T for a decode step's rows, bfloat16 in and out, W held as P int4 parts that sum to it, in groups of
   32 inputs: w = (q - 8) * scale + zero, as torch's int4 kernel reads them.

   x: [M, K]; nib: [P, N / 16, K / 2, 16], byte i of pair j of tile t holding inputs 2j (low nibble) and 2j + 1
   (high) of output 16t + i; sz: [P, N / 16, K / 32, 2, 16], each group's 16 scales then 16 zeros; y: [M, N].

   A tile of 16 outputs is one unit of work. Its weights are widened once for up to ROWS rows: to float
   (q * scale + (zero - 8 scale)), then rounded to bfloat16 pairs, each pair a dot product with the row's
   two inputs into float accumulators, even and odd pairs apart, summed at the end. That order is the same
   for any M, so a row's bits never depend on the other rows. */
#include "bf16_math.h"

#define ROWS 8

static const short PAIRS[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* a pair of inputs' 16 weights (16 bytes of nibbles) as bfloat16 pairs: lane i holds output i's two */
static inline __m512bh bf16_pairs(const uint8_t *b16, __m512 scale, __m512 zero, __m512i pairs) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b16));
    __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))), scale, zero);
    __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), scale, zero);
    return (__m512bh)_mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

static inline __attribute__((always_inline)) void tile(const uint16_t *x, const uint8_t *nib, const uint16_t *sz,
                                                       uint16_t *y, int mb, int64_t N, int64_t K, int64_t P,
                                                       int64_t tiles, int64_t t) {
    __m512 even[ROWS], odd[ROWS];
    for (int m = 0; m < mb; m++) even[m] = odd[m] = _mm512_setzero_ps();
    const __m512i pairs = _mm512_loadu_si512(PAIRS);
    for (int64_t p = 0; p < P; p++) {
        const uint8_t *w = nib + (p * tiles + t) * (K / 2) * 16;
        const uint16_t *s = sz + (p * tiles + t) * (K / 32) * 32;
        for (int64_t g = 0; g < K / 32; g++) {
            __m512 scale = widen(_mm256_loadu_si256((const __m256i *)(s + g * 32)));
            __m512 zero = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, widen(_mm256_loadu_si256((const __m256i *)(s + g * 32 + 16))));
            for (int j = 0; j < 16; j += 2) {
                __m512bh w0 = bf16_pairs(w + (g * 16 + j) * 16, scale, zero, pairs);
                __m512bh w1 = bf16_pairs(w + (g * 16 + j + 1) * 16, scale, zero, pairs);
                int64_t k = g * 32 + 2 * j;
#pragma GCC unroll 8
                for (int m = 0; m < mb; m++) {
                    even[m] = _mm512_dpbf16_ps(even[m], w0, (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + m * K + k)));
                    odd[m] = _mm512_dpbf16_ps(odd[m], w1, (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + m * K + k + 2)));
                }
            }
        }
    }
    for (int m = 0; m < mb; m++)
        _mm256_storeu_si256((__m256i *)(y + m * N + t * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(even[m], odd[m])));
}

int int4_matmul_bf16(const uint16_t *x, const uint8_t *nib, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                     int64_t K, int64_t P, int threads) {
    if (M < 1 || N % 16 || K % 32) return -1;
    int64_t tiles = N / 16;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const uint16_t *xm = x + m0 * K;
            uint16_t *ym = y + m0 * N;
            switch (M - m0 < ROWS ? M - m0 : ROWS) {
                case 1: tile(xm, nib, sz, ym, 1, N, K, P, tiles, t); break;
                case 2: tile(xm, nib, sz, ym, 2, N, K, P, tiles, t); break;
                case 3: tile(xm, nib, sz, ym, 3, N, K, P, tiles, t); break;
                case 4: tile(xm, nib, sz, ym, 4, N, K, P, tiles, t); break;
                case 5: tile(xm, nib, sz, ym, 5, N, K, P, tiles, t); break;
                case 6: tile(xm, nib, sz, ym, 6, N, K, P, tiles, t); break;
                case 7: tile(xm, nib, sz, ym, 7, N, K, P, tiles, t); break;
                default: tile(xm, nib, sz, ym, 8, N, K, P, tiles, t); break;
            }
        }
    return 0;
}
