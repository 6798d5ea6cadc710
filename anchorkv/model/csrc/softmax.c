/* Attention softmax over rows of bfloat16 scores, in place, with the causal mask of the chunk's own keys.

   Row i of an [R, L] block (row stride ld) belongs to query q = (row0 + i) mod T of a T-token chunk whose
   keys are the last T of L: it sees keys [0, L - T + q] and every later key gets probability 0. exp is a
   degree-6 polynomial of 2^f after splitting x log2(e) = n + f (relative error about 2e-7 in float, far
   below bfloat16's 4e-3). Each row is computed by one thread, so a row's bits depend only on its values. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 load(const uint16_t *p, __mmask16 m) {
    __m256i v = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline __mmask16 lanes(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

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
