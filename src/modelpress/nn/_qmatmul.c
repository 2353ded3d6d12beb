/* modelpress.nn._qmatmul: y = x W^T + b with W read straight from packed integer codes.
 *
 * The weight is a QuantizedTensor's own arrays (modelpress/encodings/quantized.py), never a float
 * copy of it:
 *
 *   codes  (N, row_bytes) uint8, each row packed LSB-first as encodings/packing.py lays it out:
 *          bits 8: one code per byte, row_bytes = K; bits 2, 3, 4: code j of a row occupies
 *          bits [j*b, (j+1)*b) of the row's little-endian bit stream, rows padded with zero codes
 *          to a multiple of 8 codes, row_bytes = ceil(K / 8) * b. So the 8 codes of chunk c are
 *          the b bytes at c*b, read as one little-endian word, code i at bits [i*b, (i+1)*b).
 *   scale  (N, G) float16 bits; G = K / gs groups of gs columns (gs = K per channel)
 *   zero   (N, G) float16 bits in code units, or absent: the midpoint 2^(b-1) (symmetric schemes)
 *
 * and w[n, k] = (code - z) * s is computed in float32 exactly as QuantizedTensor.decode computes
 * it (a subtraction then a multiplication, each rounded once), so each output is a dot product of
 * x with the decoded weights, summed in a fixed order: k in chunks of 8, chunk c into chain c % 4
 * (four independent chains of eight lanes, so the multiply-adds do not wait on each other), the
 * chains added, then the lanes pairwise, then the columns past the last whole chunk. The order depends on nothing else:
 * not on the method, the number of rows of x, the thread count, or how rows are split between
 * threads, so a token's output is bit-identical whether it runs alone (decode) or in a batch
 * (prefill). The scalar path sums in the same order with separate multiply and add (no FMA), so
 * it may differ from the AVX2 path by float rounding only. Build with -ffp-contract=off (setup.py
 * does): a compiler that fused some of the scalar tails' multiply-adds and not others would break
 * the bit-identity between methods.
 *
 * Two methods, chosen by the caller per call (modelpress/nn/qmatmul.py holds the cost model):
 *   FUSED (0)  unpack each chunk of codes into registers and multiply it into 2 rows of x at
 *              once; nothing is written but y. Best for 1-2 rows (decode).
 *   TILED (1)  decode one weight row into a float scratch row (K floats, in L1) once, then take
 *              its dot product with 3 rows of x at a time. Best for more rows (prefill).
 *
 * Paths: AVX2 + FMA where the CPU has them (checked at import), else portable scalar C; `_simd`
 * switches between them for tests. Threads: output rows are cut into chunks (8 per thread) that
 * the caller and a small persistent pthread pool claim one at a time (workers spin briefly, then
 * sleep on a condition variable), so a worker a busy machine has not scheduled leaves its share to
 * the others; the caller passes the thread count (modelpress passes torch's). A call that finds
 * the pool busy (another Python thread inside a kernel) runs on its own thread. The GIL is released
 * while the kernel runs. Every buffer length is checked against the declared shape first.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1
#include <immintrin.h>
#else
#define HAVE_AVX2_PATH 0
#endif

#define MAX_THREADS 64
#define SPIN_ROUNDS 4000 /* pause loops a waiting thread spins before it sleeps (a few microseconds) */

enum { FUSED = 0, TILED = 1, DECODE = 2 }; /* DECODE: decode_rows' job, rows of W into y (N, K) */
enum { PATH_SCALAR = 0, PATH_AVX2 = 1 };

typedef struct {
    const float *x;        /* (M, K) */
    float *y;              /* (M, N) */
    const uint8_t *codes;  /* (N, row_bytes) */
    const uint16_t *scale; /* (N, G) float16 */
    const uint16_t *zero;  /* (N, G) float16, or NULL: the midpoint */
    const float *bias;     /* (N,), or NULL */
    Py_ssize_t M, N, K, row_bytes;
    int bits, gs, G, method, path;
} Job;

static int best_path; /* the best path this CPU runs, set at import */
static int use_path;  /* the path in use (tests may lower it) */
static int use_scratch = 1; /* whether row buffers are allocated (tests switch it off: the no-memory paths) */

/* ------------------------------------------------------------------------------------------ */
/* Scalar helpers                                                                             */

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0) { /* zero or subnormal: man * 2^-24, exact in float32 */
        float f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7F800000u | man << 13 : sign | (exp + 112) << 23 | man << 13;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The group's scale and zero point of row n. */
static inline void group_params(const Job *j, Py_ssize_t n, int g, float *s, float *z)
{
    Py_ssize_t at = n * j->G + g;
    *s = half_to_float(j->scale[at]);
    *z = j->zero ? half_to_float(j->zero[at]) : (float)(1 << (j->bits - 1));
}

/* Code k of a packed row (any width; reads no byte past the code's own). */
static inline uint32_t code_at(const uint8_t *row, Py_ssize_t k, int bits)
{
    if (bits == 8) {
        return row[k];
    }
    Py_ssize_t bit = k * bits;
    uint32_t v = row[bit >> 3];
    if ((bit & 7) + bits > 8) {
        v |= (uint32_t)row[(bit >> 3) + 1] << 8;
    }
    return (v >> (bit & 7)) & ((1u << bits) - 1);
}

/* Chunk c's 8 codes (bits < 8) as one little-endian word. */
static inline uint32_t chunk_word(const uint8_t *row, Py_ssize_t c, int bits)
{
    const uint8_t *p = row + c * bits;
    uint32_t w = p[0] | (uint32_t)p[1] << 8; /* bytes in stream order on any host (one load on x86) */
    if (bits > 2) {
        w |= (uint32_t)p[2] << 16;
    }
    if (bits > 3) {
        w |= (uint32_t)p[3] << 24;
    }
    return w;
}

/* The decoded weight row n into out (K floats). */
static void decode_row_scalar(const Job *j, Py_ssize_t n, float *out)
{
    const uint8_t *row = j->codes + n * j->row_bytes;
    for (int g = 0; g < j->G; g++) {
        float s, z;
        group_params(j, n, g, &s, &z);
        for (Py_ssize_t k = (Py_ssize_t)g * j->gs; k < (Py_ssize_t)(g + 1) * j->gs; k++) {
            out[k] = ((float)code_at(row, k, j->bits) - z) * s;
        }
    }
}

/* sum_k a[k] b[k] in the kernel's order (the top of this file): chunk c of 8 products goes to chain
 * c % 4 (eight lanes each), the chains are added as (0 + 1) + (2 + 3), the lanes pairwise, then the
 * columns past the last whole chunk are added one by one. */
static float dot_scalar(const float *a, const float *b, Py_ssize_t K)
{
    float chain[4][8] = {{0}}, lane[8];
    Py_ssize_t whole = K / 8;
    for (Py_ssize_t c = 0; c < whole; c++) {
        for (int i = 0; i < 8; i++) {
            chain[c & 3][i] += a[8 * c + i] * b[8 * c + i];
        }
    }
    for (int i = 0; i < 8; i++) {
        lane[i] = (chain[0][i] + chain[1][i]) + (chain[2][i] + chain[3][i]);
    }
    float acc = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
    for (Py_ssize_t k = whole * 8; k < K; k++) {
        acc += a[k] * b[k];
    }
    return acc;
}

/* The output for row n of W and one row of x, decoding each weight as it goes (no row buffer): the
 * same products in the same order as dot_scalar over a decoded row. */
static float dot_codes_scalar(const Job *j, Py_ssize_t n, const float *x)
{
    const uint8_t *row = j->codes + n * j->row_bytes;
    float chain[4][8] = {{0}}, lane[8], s = 0.0f, z = 0.0f;
    Py_ssize_t whole = j->K / 8;
    for (Py_ssize_t k = 0; k < j->K; k++) {
        if (k % j->gs == 0) {
            group_params(j, n, (int)(k / j->gs), &s, &z);
        }
        float w = ((float)code_at(row, k, j->bits) - z) * s;
        if (k < whole * 8) {
            chain[(k / 8) & 3][k % 8] += w * x[k];
        }
    }
    for (int i = 0; i < 8; i++) {
        lane[i] = (chain[0][i] + chain[1][i]) + (chain[2][i] + chain[3][i]);
    }
    float acc = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
    for (Py_ssize_t k = whole * 8; k < j->K; k++) {
        float w = ((float)code_at(row, k, j->bits) - z) * s; /* the tail lies in the last group */
        acc += x[k] * w;
    }
    return acc;
}

static void rows_scalar(const Job *j, Py_ssize_t n0, Py_ssize_t n1, float *scratch)
{
    for (Py_ssize_t n = n0; n < n1; n++) {
        decode_row_scalar(j, n, scratch);
        float b = j->bias ? j->bias[n] : 0.0f;
        for (Py_ssize_t m = 0; m < j->M; m++) {
            j->y[m * j->N + n] = dot_scalar(scratch, j->x + m * j->K, j->K) + b;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX2 + FMA                                                                                  */

#if HAVE_AVX2_PATH
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))

/* The 8 codes of chunk c as int32 lanes. */
AVX2_INLINE __m256i chunk_codes(const uint8_t *row, Py_ssize_t c, const int bits)
{
    if (bits == 8) {
        return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8 * c)));
    }
    const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    uint32_t word;
    if (bits == 4) { /* x86 is little-endian: one 4-byte load, broadcast straight from memory */
        memcpy(&word, row + 4 * c, 4);
    } else {
        word = chunk_word(row, c, bits);
    }
    __m256i w = _mm256_set1_epi32((int)word);
    return _mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32((1 << bits) - 1));
}

/* The four chains added as (0 + 1) + (2 + 3), then the lanes: (0+4, 1+5, 2+6, 3+7), then
 * (0+4 + 2+6, 1+5 + 3+7), then their sum: dot_scalar's order. */
AVX2_INLINE float reduce(const __m256 *chain)
{
    __m256 v = _mm256_add_ps(_mm256_add_ps(chain[0], chain[1]), _mm256_add_ps(chain[2], chain[3]));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

/* Walks a weight row chunk by chunk, keeping the current group's scale and zero point. */
typedef struct {
    const Job *j;
    const uint8_t *row;
    Py_ssize_t n, per_group, next; /* chunks per group; the first chunk of the next group */
    int g;
    __m256 vs, vz;
} RowWalk;

AVX2_INLINE RowWalk row_walk(const Job *j, Py_ssize_t n)
{
    RowWalk w = {j, j->codes + n * j->row_bytes, n, j->gs / 8, 0, -1, _mm256_setzero_ps(), _mm256_setzero_ps()};
    return w;
}

/* The 8 decoded weights of chunk c (chunks visited in increasing order). */
AVX2_INLINE __m256 chunk_weights(RowWalk *w, Py_ssize_t c, const int bits)
{
    if (c >= w->next) { /* chunks come in order, one group after another: no division */
        float s, z;
        w->g++;
        w->next += w->per_group;
        group_params(w->j, w->n, w->g, &s, &z);
        w->vs = _mm256_set1_ps(s);
        w->vz = _mm256_set1_ps(z);
    }
    return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(chunk_codes(w->row, c, bits)), w->vz), w->vs);
}

/* acc[r][chain] += w * x[r] over chunk c, for MR rows of x (row stride K). */
#define FMA_ROWS(MR, acc, chain, wv, x, K, c)                                                         \
    for (int r_ = 0; r_ < (MR); r_++) {                                                             \
        (acc)[r_][chain] = _mm256_fmadd_ps((wv), _mm256_loadu_ps((x) + r_ * (K) + 8 * (c)), (acc)[r_][chain]); \
    }

/* FUSED: rows m0..m0+MR-1 of y, column n; codes unpacked once per chunk for all MR rows. */
AVX2_INLINE void fused_block(const Job *j, Py_ssize_t n, Py_ssize_t m0, const int MR, const int bits)
{
    const Py_ssize_t K = j->K, whole = K / 8;
    const float *x = j->x + m0 * K;
    RowWalk walk = row_walk(j, n);
    __m256 acc[2][4];
    for (int r = 0; r < MR; r++) {
        for (int i = 0; i < 4; i++) {
            acc[r][i] = _mm256_setzero_ps();
        }
    }
    Py_ssize_t c = 0;
    for (; c + 4 <= whole; c += 4) {
        for (int i = 0; i < 4; i++) {
            __m256 wv = chunk_weights(&walk, c + i, bits);
            FMA_ROWS(MR, acc, i, wv, x, K, c + i)
        }
    }
    for (int i = 0; c + i < whole; i++) {
        __m256 wv = chunk_weights(&walk, c + i, bits);
        FMA_ROWS(MR, acc, i, wv, x, K, c + i)
    }
    float b = j->bias ? j->bias[n] : 0.0f;
    for (int r = 0; r < MR; r++) {
        float sum = reduce(acc[r]);
        for (Py_ssize_t k = whole * 8; k < K; k++) { /* only per-channel rows have a tail (gs = K) */
            float s, z;
            group_params(j, n, (int)(k / j->gs), &s, &z);
            sum += x[r * K + k] * (((float)code_at(walk.row, k, bits) - z) * s);
        }
        j->y[(m0 + r) * j->N + n] = sum + b;
    }
}

AVX2_INLINE void fused_rows(const Job *j, Py_ssize_t n0, Py_ssize_t n1, const int bits)
{
    for (Py_ssize_t n = n0; n < n1; n++) {
        Py_ssize_t m = 0;
        for (; m + 2 <= j->M; m += 2) {
            fused_block(j, n, m, 2, bits);
        }
        if (m < j->M) {
            fused_block(j, n, m, 1, bits);
        }
    }
}

/* The decoded weight row n into out (K floats): the same values decode_row_scalar writes. */
AVX2_INLINE void decode_row_avx2(const Job *j, Py_ssize_t n, float *out, const int bits)
{
    const Py_ssize_t K = j->K, whole = K / 8;
    RowWalk walk = row_walk(j, n);
    for (Py_ssize_t c = 0; c < whole; c++) {
        _mm256_storeu_ps(out + 8 * c, chunk_weights(&walk, c, bits));
    }
    for (Py_ssize_t k = whole * 8; k < K; k++) {
        float s, z;
        group_params(j, n, (int)(k / j->gs), &s, &z);
        out[k] = ((float)code_at(walk.row, k, bits) - z) * s;
    }
}

/* TILED: rows m0..m0+MR-1 of y, column n, from the decoded row w. */
AVX2_INLINE void tiled_block(const Job *j, Py_ssize_t n, const float *w, Py_ssize_t m0, const int MR)
{
    const Py_ssize_t K = j->K, whole = K / 8;
    const float *x = j->x + m0 * K;
    __m256 acc[3][4];
    for (int r = 0; r < MR; r++) {
        for (int i = 0; i < 4; i++) {
            acc[r][i] = _mm256_setzero_ps();
        }
    }
    Py_ssize_t c = 0;
    for (; c + 4 <= whole; c += 4) {
        for (int i = 0; i < 4; i++) {
            __m256 wv = _mm256_loadu_ps(w + 8 * (c + i));
            FMA_ROWS(MR, acc, i, wv, x, K, c + i)
        }
    }
    for (int i = 0; c + i < whole; i++) {
        __m256 wv = _mm256_loadu_ps(w + 8 * (c + i));
        FMA_ROWS(MR, acc, i, wv, x, K, c + i)
    }
    float b = j->bias ? j->bias[n] : 0.0f;
    for (int r = 0; r < MR; r++) {
        float sum = reduce(acc[r]);
        for (Py_ssize_t k = whole * 8; k < K; k++) {
            sum += x[r * K + k] * w[k];
        }
        j->y[(m0 + r) * j->N + n] = sum + b;
    }
}

AVX2_INLINE void tiled_rows(const Job *j, Py_ssize_t n0, Py_ssize_t n1, float *scratch, const int bits)
{
    for (Py_ssize_t n = n0; n < n1; n++) {
        decode_row_avx2(j, n, scratch, bits);
        Py_ssize_t m = 0;
        for (; m + 3 <= j->M; m += 3) {
            tiled_block(j, n, scratch, m, 3);
        }
        if (j->M - m == 2) {
            tiled_block(j, n, scratch, m, 2);
        } else if (j->M - m == 1) {
            tiled_block(j, n, scratch, m, 1);
        }
    }
}

static AVX2 void decode_row_dispatch(const Job *j, Py_ssize_t n, float *out)
{
    switch (j->bits) {
    case 2: decode_row_avx2(j, n, out, 2); break;
    case 3: decode_row_avx2(j, n, out, 3); break;
    case 4: decode_row_avx2(j, n, out, 4); break;
    default: decode_row_avx2(j, n, out, 8); break;
    }
}

static AVX2 void rows_avx2(const Job *j, Py_ssize_t n0, Py_ssize_t n1, float *scratch)
{
    if (j->method == FUSED || scratch == NULL) {
        switch (j->bits) { /* each width compiled on its own: the shifts and masks become constants */
        case 2: fused_rows(j, n0, n1, 2); break;
        case 3: fused_rows(j, n0, n1, 3); break;
        case 4: fused_rows(j, n0, n1, 4); break;
        default: fused_rows(j, n0, n1, 8); break;
        }
        return;
    }
    switch (j->bits) {
    case 2: tiled_rows(j, n0, n1, scratch, 2); break;
    case 3: tiled_rows(j, n0, n1, scratch, 3); break;
    case 4: tiled_rows(j, n0, n1, scratch, 4); break;
    default: tiled_rows(j, n0, n1, scratch, 8); break;
    }
}
#endif

/* Output columns [n0, n1) of the job; scratch: K floats, or NULL if none could be allocated. */
static void run_range(const Job *j, Py_ssize_t n0, Py_ssize_t n1, float *scratch)
{
    if (j->method == DECODE) {
        for (Py_ssize_t n = n0; n < n1; n++) {
#if HAVE_AVX2_PATH
            if (j->path == PATH_AVX2) {
                decode_row_dispatch(j, n, j->y + n * j->K);
                continue;
            }
#endif
            decode_row_scalar(j, n, j->y + n * j->K);
        }
        return;
    }
#if HAVE_AVX2_PATH
    if (j->path == PATH_AVX2) {
        rows_avx2(j, n0, n1, scratch); /* without scratch memory TILED runs as FUSED: same sums */
        return;
    }
#endif
    if (scratch == NULL) { /* no row buffer: one output at a time, decoding as it goes */
        for (Py_ssize_t n = n0; n < n1; n++) {
            for (Py_ssize_t m = 0; m < j->M; m++) {
                j->y[m * j->N + n] = dot_codes_scalar(j, n, j->x + m * j->K) + (j->bias ? j->bias[n] : 0.0f);
            }
        }
        return;
    }
    rows_scalar(j, n0, n1, scratch);
}

/* ------------------------------------------------------------------------------------------ */
/* The thread pool                                                                             */
/*
 * A job's output columns are cut into chunks; the calling thread and the woken workers claim
 * chunks one at a time from a shared ticket (generation << 40 | threads << 32 | next chunk), so a
 * worker the OS has not scheduled yet (a busy machine) leaves its share to the others instead of
 * making them wait for it. The caller returns when every chunk is done. A worker claims only with
 * a compare-and-swap on a ticket of its own job's generation, and a claimed chunk keeps the job
 * alive (the caller waits for it), so a late worker can never touch a finished job.
 */

#define CHUNKS_PER_THREAD 8

static struct {
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    int workers;              /* workers started (worker i joins a job of more than i threads) */
    atomic_ulong generation;  /* bumped once per job; wakes the workers */
    atomic_ullong ticket;     /* generation (24 bits) | threads (8 bits) | next chunk (32 bits) */
    atomic_llong chunks_done; /* chunks of the current job finished */
    int waiting;              /* the caller sleeps on `done` */
    const Job *job;
    Py_ssize_t chunks, chunk_cols;
} pool;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one pooled call at a time */
static unsigned long start_generation[MAX_THREADS];

static inline void relax(void)
{
#if HAVE_AVX2_PATH
    _mm_pause();
#endif
}

static inline unsigned long long make_ticket(unsigned long generation, int threads, unsigned long long chunk)
{
    return (unsigned long long)(generation & 0xFFFFFF) << 40 | (unsigned long long)threads << 32 | chunk;
}

/* Claim the next chunk of job `generation` for thread `idx` (0 = the caller); -1 when none is left. */
static Py_ssize_t claim(unsigned long generation, int idx)
{
    unsigned long long t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    for (;;) {
        if (t >> 40 != (generation & 0xFFFFFF) || idx >= (int)(t >> 32 & 0xFF) ||
            (Py_ssize_t)(t & 0xFFFFFFFFu) >= pool.chunks) {
            return -1;
        }
        if (atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + 1, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            return (Py_ssize_t)(t & 0xFFFFFFFFu);
        }
    }
}

/* Run chunks of the job until none is left. */
static void work(unsigned long generation, int idx)
{
    float *scratch = NULL;
    int tried = 0;
    Py_ssize_t c;
    while ((c = claim(generation, idx)) >= 0) {
        const Job *j = pool.job;
        if (!tried && use_scratch && j->method != DECODE && (j->path == PATH_SCALAR || j->method == TILED)) {
            scratch = malloc((size_t)j->K * sizeof(float));
            tried = 1;
        }
        Py_ssize_t n0 = c * pool.chunk_cols, n1 = n0 + pool.chunk_cols < j->N ? n0 + pool.chunk_cols : j->N;
        run_range(j, n0, n1, scratch);
        if (atomic_fetch_add_explicit(&pool.chunks_done, 1, memory_order_acq_rel) + 1 == pool.chunks) {
            pthread_mutex_lock(&pool.mu);
            if (pool.waiting) {
                pthread_cond_signal(&pool.done);
            }
            pthread_mutex_unlock(&pool.mu);
        }
    }
    free(scratch);
}

static void *worker(void *arg)
{
    int idx = (int)(intptr_t)arg;
    unsigned long seen = start_generation[idx];
    for (;;) {
        for (int i = 0; i < SPIN_ROUNDS && atomic_load_explicit(&pool.generation, memory_order_acquire) == seen; i++) {
            relax();
        }
        pthread_mutex_lock(&pool.mu);
        while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen) {
            pthread_cond_wait(&pool.start, &pool.mu);
        }
        pthread_mutex_unlock(&pool.mu);
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        work(seen, idx);
    }
    return NULL;
}

/* Start workers until `want` exist; returns how many exist (fewer if the system refuses threads). */
static int grow_pool(int want)
{
    while (pool.workers < want) {
        int idx = pool.workers + 1;
        pthread_t tid;
        pthread_attr_t attr;
        start_generation[idx] = atomic_load(&pool.generation);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&tid, &attr, worker, (void *)(intptr_t)idx);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            break;
        }
        pool.workers = idx;
    }
    return pool.workers;
}

static void run_alone(const Job *j)
{
    int need = use_scratch && j->method != DECODE && (j->path == PATH_SCALAR || j->method == TILED);
    float *scratch = need ? malloc((size_t)j->K * sizeof(float)) : NULL;
    run_range(j, 0, j->N, scratch);
    free(scratch);
}

static void run_job(const Job *j, int threads)
{
    if (threads < 2 || pthread_mutex_trylock(&call_mu) != 0) {
        run_alone(j);
        return;
    }
    int workers = grow_pool(threads - 1);
    if (workers < 1) {
        pthread_mutex_unlock(&call_mu);
        run_alone(j);
        return;
    }
    if (threads > workers + 1) {
        threads = workers + 1;
    }
    Py_ssize_t chunks = (Py_ssize_t)threads * CHUNKS_PER_THREAD;
    if (chunks > j->N) {
        chunks = j->N;
    }
    unsigned long generation = atomic_load(&pool.generation) + 1;
    /* Close the ticket first (no thread may claim from it): a worker still holding the last job's
     * ticket then fails its compare-and-swap instead of claiming from half-written fields. */
    atomic_store_explicit(&pool.ticket, make_ticket(generation, 0, 0), memory_order_release);
    pool.chunk_cols = (j->N + chunks - 1) / chunks;
    pool.chunks = (j->N + pool.chunk_cols - 1) / pool.chunk_cols;
    pool.job = j;
    atomic_store(&pool.chunks_done, 0);
    atomic_store_explicit(&pool.ticket, make_ticket(generation, threads, 0), memory_order_release);
    pthread_mutex_lock(&pool.mu);
    atomic_store_explicit(&pool.generation, generation, memory_order_release);
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.mu);
    work(generation, 0);
    for (int i = 0; i < SPIN_ROUNDS && atomic_load_explicit(&pool.chunks_done, memory_order_acquire) < pool.chunks; i++) {
        relax();
    }
    pthread_mutex_lock(&pool.mu);
    pool.waiting = 1;
    while (atomic_load_explicit(&pool.chunks_done, memory_order_acquire) < pool.chunks) {
        pthread_cond_wait(&pool.done, &pool.mu);
    }
    pool.waiting = 0;
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&call_mu);
}

/* A forked child has none of the parent's threads: start from an empty pool. */
static void pool_after_fork_child(void)
{
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.start, NULL);
    pthread_cond_init(&pool.done, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pool.workers = 0;
    pool.waiting = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Python entry points                                                                        */

static int check_len(const Py_buffer *b, Py_ssize_t want, const char *name)
{
    if (b->len != want) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", name, b->len, want);
        return -1;
    }
    return 0;
}

/* a * b, or -1 if it overflows Py_ssize_t (both non-negative). */
static Py_ssize_t mul_size(Py_ssize_t a, Py_ssize_t b)
{
    if (a < 0 || b < 0 || (a && b > PY_SSIZE_T_MAX / a)) {
        return -1;
    }
    return a * b;
}

static int setup_job(Job *j, Py_buffer *x, Py_buffer *y, Py_buffer *codes, Py_buffer *scale, Py_buffer *zero,
                     Py_buffer *bias, int has_zero, int has_bias)
{
    if (j->bits != 2 && j->bits != 3 && j->bits != 4 && j->bits != 8) {
        PyErr_Format(PyExc_ValueError, "bits must be 2, 3, 4 or 8, not %d", j->bits);
        return -1;
    }
    if (j->M < 0 || j->N < 1 || j->K < 1 || j->K > INT32_MAX || j->N > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "shape out of range");
        return -1;
    }
    if (j->gs == 0) {
        j->gs = (int)j->K; /* per channel */
    }
    if (j->gs < 1 || j->K % j->gs || (j->gs % 8 && j->gs != j->K)) {
        PyErr_Format(PyExc_ValueError, "group size %d must divide K = %zd and be a multiple of 8", j->gs, j->K);
        return -1;
    }
    j->G = (int)(j->K / j->gs);
    j->row_bytes = j->bits == 8 ? j->K : (j->K + 7) / 8 * j->bits;
    Py_ssize_t mk = mul_size(j->M, j->K), mn = mul_size(j->M, j->N), nrow = mul_size(j->N, j->row_bytes);
    Py_ssize_t ng = mul_size(j->N, j->G);
    if (mk < 0 || mn < 0 || nrow < 0 || ng < 0 || mul_size(mk, 4) < 0 || mul_size(mn, 4) < 0) {
        PyErr_SetString(PyExc_ValueError, "shape too large");
        return -1;
    }
    if (check_len(x, mk * 4, "x") || check_len(y, mn * 4, "y") || check_len(codes, nrow, "codes") ||
        check_len(scale, ng * 2, "scale") || (has_zero && check_len(zero, ng * 2, "zero")) ||
        (has_bias && check_len(bias, j->N * 4, "bias"))) {
        return -1;
    }
    if (((uintptr_t)x->buf | (uintptr_t)y->buf | (has_bias ? (uintptr_t)bias->buf : 0)) % 4 ||
        ((uintptr_t)scale->buf | (has_zero ? (uintptr_t)zero->buf : 0)) % 2) {
        PyErr_SetString(PyExc_ValueError, "buffers must be aligned to their element size");
        return -1;
    }
    j->x = x->buf;
    j->y = y->buf;
    j->codes = codes->buf;
    j->scale = scale->buf;
    j->zero = has_zero ? zero->buf : NULL;
    j->bias = has_bias ? bias->buf : NULL;
    j->path = use_path;
    return 0;
}

static PyObject *py_gemm(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer x = {0}, y = {0}, codes = {0}, scale = {0}, zero = {0}, bias = {0};
    PyObject *zero_obj, *bias_obj, *result = NULL;
    Job j = {0};
    int threads;
    if (!PyArg_ParseTuple(args, "y*w*y*y*OOnnniiii:gemm", &x, &y, &codes, &scale, &zero_obj, &bias_obj, &j.M, &j.N,
                          &j.K, &j.bits, &j.gs, &j.method, &threads)) {
        return NULL;
    }
    int has_zero = zero_obj != Py_None, has_bias = bias_obj != Py_None;
    if (has_zero && PyObject_GetBuffer(zero_obj, &zero, PyBUF_SIMPLE) < 0) {
        goto out;
    }
    if (has_bias && PyObject_GetBuffer(bias_obj, &bias, PyBUF_SIMPLE) < 0) {
        goto out;
    }
    if (j.method != FUSED && j.method != TILED) {
        PyErr_Format(PyExc_ValueError, "method must be 0 (fused) or 1 (tiled), not %d", j.method);
        goto out;
    }
    if (setup_job(&j, &x, &y, &codes, &scale, &zero, &bias, has_zero, has_bias) < 0) {
        goto out;
    }
    if (threads < 1) {
        threads = 1;
    }
    if (threads > MAX_THREADS) {
        threads = MAX_THREADS;
    }
    if (threads > j.N) {
        threads = (int)j.N;
    }
    if (j.M > 0) {
        Py_BEGIN_ALLOW_THREADS
        run_job(&j, threads);
        Py_END_ALLOW_THREADS
    }
    result = Py_None;
    Py_INCREF(result);
out:
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scale);
    if (has_zero && zero.obj) {
        PyBuffer_Release(&zero);
    }
    if (has_bias && bias.obj) {
        PyBuffer_Release(&bias);
    }
    return result;
}

/* decode_rows: rows [n0, n1) of W as floats into out, the values the kernels multiply by, on up to
 * `threads` threads (the pool splits the rows as it splits a gemm's output columns). */
static PyObject *py_decode_rows(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer out = {0}, codes = {0}, scale = {0}, zero = {0}, none_x = {0}, none_b = {0};
    PyObject *zero_obj, *result = NULL;
    Job j = {0};
    Py_ssize_t n0, n1;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "w*y*y*Onniinn|i:decode_rows", &out, &codes, &scale, &zero_obj, &j.N, &j.K, &j.bits,
                          &j.gs, &n0, &n1, &threads)) {
        return NULL;
    }
    int has_zero = zero_obj != Py_None;
    if (has_zero && PyObject_GetBuffer(zero_obj, &zero, PyBUF_SIMPLE) < 0) {
        goto out;
    }
    none_x.buf = out.buf; /* no x or y here: M = 0 makes their checked sizes 0 */
    none_b.buf = out.buf;
    if (setup_job(&j, &none_x, &none_b, &codes, &scale, &zero, NULL, has_zero, 0) < 0) {
        goto out;
    }
    if (n0 < 0 || n1 < n0 || n1 > j.N) {
        PyErr_Format(PyExc_ValueError, "rows [%zd, %zd) are not inside [0, %zd)", n0, n1, j.N);
        goto out;
    }
    if (check_len(&out, mul_size(n1 - n0, j.K) * 4, "out") < 0 || (uintptr_t)out.buf % 4) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "out must be aligned to 4 bytes");
        }
        goto out;
    }
    /* the job is rows [n0, n1) alone: its arrays start at row n0, its y is out */
    j.codes += n0 * j.row_bytes;
    j.scale += n0 * j.G;
    if (j.zero) {
        j.zero += n0 * j.G;
    }
    j.N = n1 - n0;
    j.y = out.buf;
    j.method = DECODE;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (threads > j.N) {
        threads = j.N > 0 ? (int)j.N : 1;
    }
    if (j.N > 0) {
        Py_BEGIN_ALLOW_THREADS
        run_job(&j, threads);
        Py_END_ALLOW_THREADS
    }
    result = Py_None;
    Py_INCREF(result);
out:
    PyBuffer_Release(&out);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scale);
    if (has_zero && zero.obj) {
        PyBuffer_Release(&zero);
    }
    return result;
}

static PyObject *py_scratch(PyObject *Py_UNUSED(module), PyObject *args)
{
    int on = -1;
    if (!PyArg_ParseTuple(args, "|i:_scratch", &on)) {
        return NULL;
    }
    if (on >= 0) {
        use_scratch = on != 0;
    }
    return PyBool_FromLong(use_scratch);
}

static PyObject *py_simd(PyObject *Py_UNUSED(module), PyObject *args)
{
    int level = -1;
    if (!PyArg_ParseTuple(args, "|i:_simd", &level)) {
        return NULL;
    }
    if (level >= 0) {
        use_path = level < best_path ? level : best_path;
    }
    return PyLong_FromLong(use_path);
}

PyDoc_STRVAR(gemm_doc,
"gemm(x, y, codes, scale, zero, bias, M, N, K, bits, group_size, method, threads) -> None\n\n"
"y = x W^T + bias for W held as packed codes (see the top of _qmatmul.c): x (M, K) float32, y\n"
"(M, N) float32 written, codes (N, row bytes) uint8, scale and zero (N, K / group_size) float16\n"
"(zero None: symmetric), bias (N,) float32 or None, group_size 0 = per channel, method 0 fused\n"
"or 1 tiled. Every buffer must be C-contiguous and exactly the declared size.");

PyDoc_STRVAR(decode_rows_doc,
"decode_rows(out, codes, scale, zero, N, K, bits, group_size, n0, n1, threads=1) -> None\n\n"
"Rows [n0, n1) of the weight, decoded into out ((n1 - n0, K) float32, C-contiguous), exactly as\n"
"QuantizedTensor.decode computes them, on up to `threads` threads.");

PyDoc_STRVAR(simd_doc,
"_simd(level=-1) -> int\n\n"
"Test hook: the path in use (0 scalar C, 1 AVX2 + FMA); with a level, use that path or the best\n"
"this CPU runs below it. Not thread-safe; results differ between paths by float rounding only.");

PyDoc_STRVAR(scratch_doc,
"_scratch(on=-1) -> bool\n\n"
"Test hook: whether the kernels allocate a row buffer; off, they run as when malloc fails (the\n"
"tiled method as fused, the scalar path decoding weight by weight). Results are the same.");

static PyMethodDef methods[] = {
    {"gemm", py_gemm, METH_VARARGS, gemm_doc},
    {"decode_rows", py_decode_rows, METH_VARARGS, decode_rows_doc},
    {"_simd", py_simd, METH_VARARGS, simd_doc},
    {"_scratch", py_scratch, METH_VARARGS, scratch_doc},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module)
{
    static int initialised;
    if (!initialised) {
        pool_after_fork_child(); /* the same initialisation as a fresh child's */
        pthread_atfork(NULL, NULL, pool_after_fork_child);
        initialised = 1;
    }
    best_path = PATH_SCALAR;
#if HAVE_AVX2_PATH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        best_path = PATH_AVX2;
    }
#endif
    use_path = best_path;
    if (PyModule_AddIntConstant(module, "BEST_PATH", best_path) < 0) {
        return -1;
    }
    return PyModule_AddIntConstant(module, "MAX_THREADS", MAX_THREADS);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "modelpress.nn._qmatmul",
    "Matmul kernels that read packed integer weight codes directly (see _qmatmul.c).",
    0, methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__qmatmul(void)
{
    return PyModuleDef_Init(&moduledef);
}
