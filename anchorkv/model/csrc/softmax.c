/* Attention softmax over rows of bfloat16 scores, in place, with the causal mask of the chunk's own keys.

   Row i of an [R, L] block (row stride ld) belongs to query q = (row0 + i) mod T of a T-token chunk whose
   keys are the last T of L: it sees keys [0, L - T + q] and every later key gets probability 0. Each row
   is computed by one thread, so a row's bits depend only on its values. */
#include <math.h>

#include "bf16_math.h"

static void row_softmax(uint16_t *row, int64_t n, int64_t L, float *buf) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 m = lanes(n - j);
        mx = _mm512_mask_max_ps(mx, m, mx, load(row + j, m));
    }
    __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 m = lanes(n - j);
        __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(load(row + j, m), top)));
        _mm512_storeu_ps(buf + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < n; j += 16) {
        __m256i p = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(buf + j), inv));
        _mm256_mask_storeu_epi16(row + j, lanes(n - j), p);
    }
    for (int64_t j = n; j < L; j++) row[j] = 0;
}

void softmax_bf16(uint16_t *s, int64_t rows, int64_t L, int64_t ld, int64_t row0, int64_t T, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *buf = (float *)_mm_malloc((size_t)(L + 16) * sizeof(float), 64);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) row_softmax(s + i * ld, L - T + (row0 + i) % T + 1, L, buf);
        _mm_free(buf);
    }
}
