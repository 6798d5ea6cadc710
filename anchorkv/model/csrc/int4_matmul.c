/* y = x W^T for a decode step's rows, bfloat16 in and out, W held as P int4 parts that sum to it, in groups of
   32 inputs: w = (q - 8) * scale + zero, as torch's int4 kernel reads them.

   x: [M, K]; nib: [P, N / 16, K / 2, 16], byte i of pair j of tile t holding inputs 2j (low nibble) and 2j + 1
   (high) of output 16t + i; sz: [P, N / 16, K / 32, 2, 16], each group's 16 scales then 16 zeros; y: [M, N].

   A tile of 16 outputs is one unit of work. Each group's sum is taken on the integers and scaled after:
   sum_k x_k w_k = scale * sum_k x_k (q_k - 8) + zero * sum_k x_k. (q - 8) is exact in bfloat16, so each
   product is exact in float; a nibble becomes its bfloat16 by one table lookup (vpermw), two a lane, paired
   with the row's two inputs in one dot product. The row's group sums of x are taken once a call. Every sum
   runs in an order fixed by the row alone, so a row's bits never depend on the other rows, nor on the
   thread count. */
#include <stdlib.h>

#include "bf16_math.h"

#define ROWS 8

/* (k mod 16) - 8 in bfloat16, for k = 0..31: a word lane's table */
static const short Q_BF16[32] = {
    (short)0xC100, (short)0xC0E0, (short)0xC0C0, (short)0xC0A0, (short)0xC080, (short)0xC040, (short)0xC000, (short)0xBF80,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    (short)0xC100, (short)0xC0E0, (short)0xC0C0, (short)0xC0A0, (short)0xC080, (short)0xC040, (short)0xC000, (short)0xBF80,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};

/* a pair of inputs' 16 weights (16 bytes of nibbles) as bfloat16 pairs of q - 8: lane i holds output i's two.
   Byte b in a lane: (b | b << 12) & 0x000F000F puts its low nibble in the low word, its high one in the high. */
static inline __m512bh q_pairs(const uint8_t *b16, __m512i table) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b16));
    __m512i idx = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
    return (__m512bh)_mm512_permutexvar_epi16(idx, table);
}

static inline __attribute__((always_inline)) void tile(const uint16_t *x, const float *xs, const uint8_t *nib,
                                                       const uint16_t *sz, uint16_t *y, int mb, int64_t N, int64_t K,
                                                       int64_t P, int64_t tiles, int64_t t) {
    __m512 acc[ROWS], even[ROWS], odd[ROWS];
    for (int m = 0; m < mb; m++) acc[m] = _mm512_setzero_ps();
    const __m512i table = _mm512_loadu_si512(Q_BF16);
    const int64_t groups = K / 32;
    for (int64_t p = 0; p < P; p++) {
        const uint8_t *w = nib + (p * tiles + t) * (K / 2) * 16;
        const uint16_t *s = sz + (p * tiles + t) * groups * 32;
        for (int64_t g = 0; g < groups; g++) {
            for (int m = 0; m < mb; m++) even[m] = odd[m] = _mm512_setzero_ps();
            for (int j = 0; j < 16; j += 2) {
                __m512bh w0 = q_pairs(w + (g * 16 + j) * 16, table);
                __m512bh w1 = q_pairs(w + (g * 16 + j + 1) * 16, table);
                int64_t k = g * 32 + 2 * j;
#pragma GCC unroll 8
                for (int m = 0; m < mb; m++) {
                    even[m] = _mm512_dpbf16_ps(even[m], w0, (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + m * K + k)));
                    odd[m] = _mm512_dpbf16_ps(odd[m], w1, (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + m * K + k + 2)));
                }
            }
            __m512 scale = widen(_mm256_loadu_si256((const __m256i *)(s + g * 32)));
            __m512 zero = widen(_mm256_loadu_si256((const __m256i *)(s + g * 32 + 16)));
#pragma GCC unroll 8
            for (int m = 0; m < mb; m++) {
                acc[m] = _mm512_fmadd_ps(_mm512_add_ps(even[m], odd[m]), scale, acc[m]);
                acc[m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xs[m * groups + g]), acc[m]);
            }
        }
    }
    for (int m = 0; m < mb; m++)
        _mm256_storeu_si256((__m256i *)(y + m * N + t * 16), (__m256i)_mm512_cvtneps_pbh(acc[m]));
}

int int4_matmul_bf16(const uint16_t *x, const uint8_t *nib, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                     int64_t K, int64_t P, int threads) {
    if (M < 1 || N % 16 || K % 32) return -1;
    int64_t tiles = N / 16, groups = K / 32;
    float *xs = malloc(sizeof(float) * M * groups);
    if (xs == NULL) return -2;
    for (int64_t i = 0; i < M * groups; i++) {
        float sum = 0.0f;
        for (int k = 0; k < 32; k++) sum += widen_one(x[i * 32 + k]);
        xs[i] = sum;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const uint16_t *xm = x + m0 * K;
            const float *xsm = xs + m0 * groups;
            uint16_t *ym = y + m0 * N;
            switch (M - m0 < ROWS ? M - m0 : ROWS) {
                case 1: tile(xm, xsm, nib, sz, ym, 1, N, K, P, tiles, t); break;
                case 2: tile(xm, xsm, nib, sz, ym, 2, N, K, P, tiles, t); break;
                case 3: tile(xm, xsm, nib, sz, ym, 3, N, K, P, tiles, t); break;
                case 4: tile(xm, xsm, nib, sz, ym, 4, N, K, P, tiles, t); break;
                case 5: tile(xm, xsm, nib, sz, ym, 5, N, K, P, tiles, t); break;
                case 6: tile(xm, xsm, nib, sz, ym, 6, N, K, P, tiles, t); break;
                case 7: tile(xm, xsm, nib, sz, ym, 7, N, K, P, tiles, t); break;
                default: tile(xm, xsm, nib, sz, ym, 8, N, K, P, tiles, t); break;
            }
        }
    free(xs);
    return 0;
}
