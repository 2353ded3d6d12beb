/* modelpress.codecs._fcodec: the `fans` lossless float codec (float byte planes + static rANS).
 *
 * Model. Each element (width 2 or 4 bytes, little-endian) is rotated left by one bit, so the sign
 * moves to bit 0 and the top byte holds the exponent alone (fp32, bf16) or the exponent and the
 * three top mantissa bits (fp16). The rotated elements are split into byte planes, plane 0 being
 * the most significant. Plane 0 is coded with a static rANS model of the chunk, either alone
 * (order-0) or jointly with the top two bits of plane 1 (one symbol of 10 bits: the exponent and
 * the mantissa's skew inside its exponent bucket), the other 6 bits of plane 1 then packed raw.
 * Every other plane is order-0 rANS, constant, or raw, whichever is smallest for the chunk.
 * Width 1 is plain bytes (no rotation): one plane, order-0 rANS / constant / raw.
 *
 * Payload layout, version 1 (all integers little-endian):
 *
 *   u8  version = 1
 *   u8  width (1, 2 or 4)
 *   u32 n, the number of elements (the decoded size is n * width bytes)
 *   then `width` plane records, plane 0 (most significant byte of the rotated element) first:
 *     u8 mode, then
 *       mode 0 RAW     n bytes, the plane as is
 *       mode 1 CONST   u8 value: every byte of the plane equals it
 *       mode 2 ORDER0  table, stream; symbol i is byte i of the plane
 *       mode 3 JOINT   (plane 0 of width 2 or 4 only) joint table, stream; symbol i is
 *                      (byte i of plane 0) << 2 | (byte i of plane 1) >> 6. Plane 1's record
 *                      must then be mode 4.
 *       mode 4 LOW6    (plane 1 only, exactly when plane 0 is JOINT) ceil(6n / 8) bytes: the low
 *                      6 bits of byte i of plane 1 are bits [6i, 6i + 6) of this bit string (bit
 *                      j is bit j % 8 of byte j / 8); any unused high bits of the last byte are 0
 *   Nothing may follow the last plane record.
 *
 *   table (ORDER0): u8 k (0..8): 2^k bins of 2^(8-k) consecutive byte values each; a presence
 *           bitmap of ceil(2^k / 8) bytes (bin b is bit b % 8 of byte b / 8); for each present
 *           bin in order, u - 1 in one byte (u - 1 < 0x80) or two bytes big-endian with the top
 *           bit set (0x8000 | (u - 1)). The u sum to exactly 2^(4+k); each symbol of bin b has
 *           frequency u_b out of 2^12 = 4096, so symbol frequencies sum to 4096; none may have
 *           all 4096 (a constant plane is mode 1).
 *   joint table (JOINT): a 32-byte presence bitmap of plane-0 values; for each present value t
 *           in increasing order, one byte whose bits 0..3 (not all 0; bits 4..7 are 0) mark which
 *           of the symbols t << 2 | h, h = 0..3, are present, then each present symbol's
 *           frequency f - 1 as above. All f sum to exactly 4096 and none exceeds 2048.
 *   stream: u32 L, then L bytes: 32 u32 initial rANS states, one per lane, then (L - 128) / 2
 *           u16 words shared by the lanes. Symbol i is decoded by lane i % 32, in order of i:
 *           the lane's state x gives the symbol s whose slot range [start_s, start_s + f_s)
 *           (symbols in increasing order) holds x % 4096, becomes
 *           f_s * (x >> 12) + (x % 4096) - start_s, and, when below 2^15, takes the stream's
 *           next word w: x = (x << 16) | w. States start in [2^15, 2^31); after the last symbol
 *           every state equals 2^15 and every word has been read.
 *
 * The decoder checks every length, table and state, so any payload either decodes or raises
 * ValueError; it never reads or writes outside its buffers. Both entry points release the GIL.
 * On x86-64 with AVX2 the coder runs eight lanes per instruction (same format, same bytes).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(FCODEC_NO_SIMD) && (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1 /* compiled for AVX2 per function, chosen at run time; -DFCODEC_NO_SIMD drops it */
#include <immintrin.h>
#else
#define HAVE_AVX2_PATH 0
#endif

#define VERSION 1
#define HEADER_SIZE 6
#define SCALE_BITS 12
#define TOTAL (1u << SCALE_BITS)
#define NLANES 32
#define STATE_BYTES (4 * NLANES)
#define STREAM_OVERHEAD (4 + STATE_BYTES) /* stream length and initial states */
#define RANS_L (1u << 15)
#define JOINT_MAX_FREQ 2048 /* a joint decode entry holds f - 1 in 11 bits */
#define NT_MIN_BYTES (1u << 18) /* outputs this large are written with non-temporal stores */
#define BLOCK 8192          /* elements decoded per block: the block's planes stay in L1 */

enum { MODE_RAW = 0, MODE_CONST = 1, MODE_ORDER0 = 2, MODE_JOINT = 3, MODE_LOW6 = 4 };

static double LOG2[TOTAL + 1]; /* LOG2[f] = log2(f), filled once at import */

static inline uint32_t ld16(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8;
}

static inline uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void st32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

static size_t low6_bytes(size_t n)
{
    return (6 * n + 7) / 8;
}

/* ------------------------------------------------------------------------------------------- */
/* Frequency tables                                                                             */

/* Frequencies f[b] > 0 for cnt[b] > 0, f[b] = 0 otherwise, summing exactly to `total` (at least
 * the number of nonzero counts). All counts zero: the uniform table. */
static void normalise(const uint32_t *cnt, int nb, uint32_t total, uint32_t *f)
{
    uint64_t n = 0, n_big = 0;
    uint32_t fixed = 0, sum = 0;
    for (int b = 0; b < nb; b++) {
        n += cnt[b];
    }
    if (!n) {
        for (int b = 0; b < nb; b++) {
            f[b] = total / (uint32_t)nb;
        }
        return;
    }
    for (int b = 0; b < nb; b++) { /* symbols too rare for one slot get exactly one */
        if (cnt[b] && (uint64_t)cnt[b] * total < n) {
            fixed++;
        } else {
            n_big += cnt[b];
        }
    }
    uint64_t rest = total - fixed;
    for (int b = 0; b < nb; b++) {
        if (!cnt[b]) {
            f[b] = 0;
        } else if ((uint64_t)cnt[b] * total < n) {
            f[b] = 1;
        } else {
            uint64_t v = ((uint64_t)cnt[b] * rest + n_big / 2) / n_big;
            f[b] = v ? (uint32_t)v : 1;
        }
        sum += f[b];
    }
    while (sum < total) { /* give a slot where it saves most: largest cnt / f */
        int best = -1;
        for (int b = 0; b < nb; b++) {
            if (cnt[b] && (best < 0 || (uint64_t)cnt[b] * f[best] > (uint64_t)cnt[best] * f[b])) {
                best = b;
            }
        }
        f[best]++;
        sum++;
    }
    while (sum > total) { /* take a slot where it costs least: smallest cnt / (f - 1) */
        int best = -1;
        for (int b = 0; b < nb; b++) {
            if (f[b] > 1 && (best < 0 || (uint64_t)cnt[b] * (f[best] - 1) < (uint64_t)cnt[best] * (f[b] - 1))) {
                best = b;
            }
        }
        f[best]--;
        sum--;
    }
}

/* Estimated coded bytes of counts under frequencies f (out of TOTAL). */
static double coded_bytes(const uint32_t *cnt, const uint32_t *f, int nb)
{
    double bits = 0;
    for (int b = 0; b < nb; b++) {
        if (cnt[b]) {
            bits += (double)cnt[b] * (SCALE_BITS - LOG2[f[b]]);
        }
    }
    return bits / 8;
}

static size_t freq_bytes(uint32_t f)
{
    return f - 1 < 0x80 ? 1 : 2;
}

static uint8_t *write_freq(uint8_t *p, uint32_t f)
{
    uint32_t v = f - 1;
    if (v < 0x80) {
        *p++ = (uint8_t)v;
    } else {
        *p++ = (uint8_t)(0x80 | (v >> 8));
        *p++ = (uint8_t)v;
    }
    return p;
}

/* Read one frequency at *pp into *f; NULL on success. */
static const char *read_freq(const uint8_t **pp, const uint8_t *end, uint32_t *f)
{
    const uint8_t *p = *pp;
    if (p >= end) {
        return "truncated frequency table";
    }
    uint32_t v = *p++;
    if (v & 0x80) {
        if (p >= end) {
            return "truncated frequency table";
        }
        v = (v & 0x7f) << 8 | *p++;
    }
    *f = v + 1;
    *pp = p;
    return NULL;
}

/* An order-0 model: 2^k bins of 2^(8-k) byte values, each value of bin b with frequency u[b]. */
typedef struct {
    int k;
    uint32_t u[256];
} Model;

static size_t table_bytes(const Model *m)
{
    int nb = 1 << m->k;
    size_t size = 1 + (size_t)((nb + 7) / 8);
    for (int b = 0; b < nb; b++) {
        if (m->u[b]) {
            size += freq_bytes(m->u[b]);
        }
    }
    return size;
}

/* The k-bit binned model of 256 byte counts in *m; returns its estimated size (coded + table). */
static double model_cost(const uint32_t cnt[256], int k, Model *m)
{
    int nb = 1 << k, shift = 8 - k;
    uint32_t bins[256];
    memset(bins, 0, sizeof bins);
    for (int s = 0; s < 256; s++) {
        bins[s >> shift] += cnt[s];
    }
    m->k = k;
    normalise(bins, nb, 1u << (4 + k), m->u);
    double bits = 0;
    for (int b = 0; b < nb; b++) {
        if (bins[b]) {
            bits += (double)bins[b] * (SCALE_BITS - LOG2[m->u[b]]);
        }
    }
    return bits / 8 + (double)table_bytes(m);
}

/* The cheapest model over k in [kmin, 8]. */
static double best_model(const uint32_t cnt[256], int kmin, Model *best)
{
    double best_cost = -1;
    Model m;
    for (int k = kmin; k <= 8; k++) {
        double cost = model_cost(cnt, k, &m);
        if (best_cost < 0 || cost < best_cost) {
            best_cost = cost;
            *best = m;
        }
    }
    return best_cost;
}

static void model_freqs(const Model *m, uint32_t freq[256])
{
    int shift = 8 - m->k;
    for (int s = 0; s < 256; s++) {
        freq[s] = m->u[s >> shift];
    }
}

static uint8_t *write_table(uint8_t *p, const Model *m)
{
    int nb = 1 << m->k, nbytes = (nb + 7) / 8;
    *p++ = (uint8_t)m->k;
    memset(p, 0, (size_t)nbytes);
    for (int b = 0; b < nb; b++) {
        if (m->u[b]) {
            p[b >> 3] |= (uint8_t)(1u << (b & 7));
        }
    }
    p += nbytes;
    for (int b = 0; b < nb; b++) {
        if (m->u[b]) {
            p = write_freq(p, m->u[b]);
        }
    }
    return p;
}

/* Parse an order-0 table at *pp into per-symbol frequencies; NULL on success. */
static const char *read_table(const uint8_t **pp, const uint8_t *end, uint32_t freq[256])
{
    const uint8_t *p = *pp;
    if (p >= end) {
        return "truncated frequency table";
    }
    int k = *p++;
    if (k > 8) {
        return "frequency table has more than 256 bins";
    }
    int nb = 1 << k, nbytes = (nb + 7) / 8;
    if (end - p < nbytes) {
        return "truncated frequency table";
    }
    const uint8_t *bitmap = p;
    p += nbytes;
    if (nb < 8 && bitmap[0] >> nb) {
        return "frequency table marks bins that do not exist";
    }
    Model m;
    uint32_t sum = 0;
    m.k = k;
    for (int b = 0; b < nb; b++) {
        m.u[b] = 0;
        if (bitmap[b >> 3] >> (b & 7) & 1) {
            const char *err = read_freq(&p, end, &m.u[b]);
            if (err) {
                return err;
            }
            sum += m.u[b];
        }
    }
    if (sum != 1u << (4 + k)) {
        return "frequency table does not sum to its total";
    }
    model_freqs(&m, freq);
    for (int s = 0; s < 256; s++) {
        if (freq[s] == TOTAL) {
            return "frequency table gives one symbol every slot (a constant plane must use mode 1)";
        }
    }
    *pp = p;
    return NULL;
}

static size_t joint_table_bytes(const uint32_t f[1024])
{
    size_t size = 32;
    for (int t = 0; t < 256; t++) {
        const uint32_t *ft = f + 4 * t;
        size += (ft[0] | ft[1] | ft[2] | ft[3]) ? 1 : 0;
        for (int h = 0; h < 4; h++) {
            size += ft[h] ? freq_bytes(ft[h]) : 0;
        }
    }
    return size;
}

/* Joint counts cj[t << 2 | h] -> frequencies f (1024 entries); returns the estimated size of
 * table and coded symbols, or -1 when a symbol is too frequent for the joint decode table. */
static double joint_cost(const uint32_t cj[1024], uint32_t f[1024])
{
    normalise(cj, 1024, TOTAL, f);
    for (int s = 0; s < 1024; s++) {
        if (f[s] > JOINT_MAX_FREQ) {
            return -1;
        }
    }
    return (double)joint_table_bytes(f) + coded_bytes(cj, f, 1024);
}

static uint8_t *write_joint_table(uint8_t *p, const uint32_t f[1024])
{
    memset(p, 0, 32);
    for (int t = 0; t < 256; t++) {
        if (f[4 * t] | f[4 * t + 1] | f[4 * t + 2] | f[4 * t + 3]) {
            p[t >> 3] |= (uint8_t)(1u << (t & 7));
        }
    }
    uint8_t *q = p + 32;
    for (int t = 0; t < 256; t++) {
        if (p[t >> 3] >> (t & 7) & 1) {
            uint8_t *bins = q++;
            *bins = 0;
            for (int h = 0; h < 4; h++) {
                if (f[4 * t + h]) {
                    *bins |= (uint8_t)(1u << h);
                    q = write_freq(q, f[4 * t + h]);
                }
            }
        }
    }
    return q;
}

static const char *read_joint_table(const uint8_t **pp, const uint8_t *end, uint32_t f[1024])
{
    const uint8_t *p = *pp;
    if (end - p < 32) {
        return "truncated joint frequency table";
    }
    const uint8_t *bitmap = p;
    p += 32;
    uint32_t sum = 0;
    memset(f, 0, 1024 * sizeof(uint32_t));
    for (int t = 0; t < 256; t++) {
        if (!(bitmap[t >> 3] >> (t & 7) & 1)) {
            continue;
        }
        if (p >= end) {
            return "truncated joint frequency table";
        }
        uint32_t bins = *p++;
        if (!bins || bins > 0xf) {
            return "joint frequency table has an invalid bin mask";
        }
        for (int h = 0; h < 4; h++) {
            if (bins >> h & 1) {
                const char *err = read_freq(&p, end, &f[4 * t + h]);
                if (err) {
                    return err;
                }
                if (f[4 * t + h] > JOINT_MAX_FREQ) {
                    return "joint frequency table has a frequency above 2048";
                }
                sum += f[4 * t + h];
            }
        }
    }
    if (sum != TOTAL) {
        return "joint frequency table does not sum to 4096";
    }
    *pp = p;
    return NULL;
}

/* ------------------------------------------------------------------------------------------- */
/* rANS: 32-bit states, 16-bit renormalisation, NLANES interleaved lanes sharing one word stream */
/* (after ryg_rans and its SIMD variants)                                                       */

/* Encoder view of a symbol: freq | start << 16 (0 when absent). */
static void build_enc(const uint32_t *freq, int nsym, uint32_t *es)
{
    uint32_t start = 0;
    for (int s = 0; s < nsym; s++) {
        es[s] = freq[s] | start << 16;
        start += freq[s];
    }
}

/* Decode-table entry of each slot. Byte symbols: s | (slot - start) << 8 | f << 20 (f < 4096).
 * Joint symbols: s | (slot - start) << 10 | (f - 1) << 21 (f <= 2048). */
static void build_dec(const uint32_t *freq, int nsym, int joint, uint32_t *T)
{
    uint32_t start = 0;
    for (uint32_t s = 0; s < (uint32_t)nsym; s++) {
        uint32_t f = freq[s];
        for (uint32_t j = 0; j < f; j++) {
            T[start + j] = joint ? s | j << 10 | (f - 1) << 21 : s | j << 8 | f << 20;
        }
        start += f;
    }
}

/* Symbol index for element i: a[i], or a[i] << 2 | b[i] >> 6 for joint symbols. */
static inline uint32_t sym_at(const uint8_t *a, const uint8_t *b, size_t i)
{
    return b ? (uint32_t)a[i] << 2 | b[i] >> 6 : a[i];
}

#if HAVE_AVX2_PATH
static int use_avx2; /* set at import when the CPU has AVX2 (tests may switch it off) */
static uint32_t PERM[256][8];  /* decoder: for a mask of renormalising lanes, where each lane's word is */
static uint32_t CPERM[256][8]; /* encoder: lanes to pick so the masked ones end the vector, in order */

static void init_perm(void)
{
    for (int m = 0; m < 256; m++) {
        int k = 0, c = __builtin_popcount((unsigned)m);
        for (int j = 0; j < 8; j++) {
            PERM[m][j] = (m >> j & 1) ? (uint32_t)k++ : 0;
            CPERM[m][j] = 0;
        }
        k = 8 - c;
        for (int j = 0; j < 8; j++) {
            if (m >> j & 1) {
                CPERM[m][k++] = (uint32_t)j;
            }
        }
    }
}

/* AVX2 encoding of the whole groups of symbols [0, i) (i a multiple of NLANES), after the scalar
 * encoder did the partial group: the same arithmetic and word order as ENC_PUT, eight lanes per
 * register. x / f comes from a float division: after renormalisation x < f * 2^19, so the float
 * quotient is within one of the true one, and one correction step each way makes it exact.
 * Returns the new stream start, or NULL when the stream would pass `limit`. */
__attribute__((target("avx2"))) static uint8_t *enc_avx2(const uint8_t *a, const uint8_t *b, size_t i,
                                                         const uint32_t *es, uint32_t *xs, uint8_t *ptr,
                                                         const uint8_t *limit)
{
    enum { NREG = NLANES / 8 };
    __m256i X[NREG];
    for (int k = 0; k < NREG; k++) {
        X[k] = _mm256_loadu_si256((const __m256i *)(xs + 8 * k));
    }
    const int *base = (const int *)es;
    const __m256i low16 = _mm256_set1_epi32(0xffff), zero = _mm256_setzero_si256(), one = _mm256_set1_epi32(1);
    const __m256i pick16 = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                            0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    while (i) {
        if (ptr < limit) { /* the scalar encoder's check, so both make the same payload */
            return NULL;
        }
        i -= NLANES;
        for (int k = NREG - 1; k >= 0; k--) {
            __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a + i + 8 * k)));
            if (b) {
                __m256i hb = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + i + 8 * k)));
                idx = _mm256_or_si256(_mm256_slli_epi32(idx, 2), _mm256_srli_epi32(hb, 6));
            }
            __m256i fs = _mm256_i32gather_epi32(base, idx, 4);
            __m256i f = _mm256_and_si256(fs, low16);
            __m256i x = X[k];
            /* renormalise while x >= f << 19 (both below 2^31) */
            __m256i r = _mm256_cmpgt_epi32(x, _mm256_sub_epi32(_mm256_slli_epi32(f, 31 - SCALE_BITS), one));
            int bits = _mm256_movemask_ps(_mm256_castsi256_ps(r));
            __m256i wv = _mm256_permutevar8x32_epi32(x, _mm256_loadu_si256((const __m256i *)CPERM[bits]));
            wv = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(wv, pick16), 0x08);
            _mm_storeu_si128((__m128i *)(ptr - 16), _mm256_castsi256_si128(wv));
            ptr -= 2 * __builtin_popcount((unsigned)bits);
            x = _mm256_blendv_epi8(x, _mm256_srli_epi32(x, 16), r);
            /* q = x / f, rem = x % f */
            __m256i q = _mm256_cvttps_epi32(_mm256_div_ps(_mm256_cvtepi32_ps(x), _mm256_cvtepi32_ps(f)));
            __m256i rem = _mm256_sub_epi32(x, _mm256_mullo_epi32(q, f));
            __m256i over = _mm256_cmpgt_epi32(zero, rem);
            q = _mm256_add_epi32(q, over);
            rem = _mm256_add_epi32(rem, _mm256_and_si256(over, f));
            __m256i under = _mm256_cmpgt_epi32(rem, _mm256_sub_epi32(f, one));
            q = _mm256_sub_epi32(q, under);
            rem = _mm256_sub_epi32(rem, _mm256_and_si256(under, f));
            X[k] = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(q, SCALE_BITS), rem), _mm256_srli_epi32(fs, 16));
        }
    }
    for (int k = 0; k < NREG; k++) {
        _mm256_storeu_si256((__m256i *)(xs + 8 * k), X[k]);
    }
    return ptr;
}
#endif

/* Encode the n symbols sym_at(a, b, i) backwards into buf[0..cap); es holds freq | start << 16
 * per symbol. Symbol i goes to lane i % NLANES. Returns the stream's start, or NULL when it would
 * not fit in cap bytes (the caller then stores the plane another way). */
static uint8_t *rans_encode(const uint8_t *a, const uint8_t *b, size_t n, const uint32_t *es, uint8_t *buf, size_t cap)
{
    uint32_t x[NLANES];
    uint8_t *ptr = buf + cap;
    const size_t guard = STATE_BYTES + 2 * NLANES + 16; /* room for one group, then the states */
    if (cap < guard) {
        return NULL;
    }
    for (int j = 0; j < NLANES; j++) {
        x[j] = RANS_L;
    }
    /* x -> x' for a symbol of frequency f and start c: emit the low word while x >= f << 19
     * (written unconditionally, kept only then), then x' = (x / f) << 12 | (x % f + c). */
#define ENC_PUT(xj, e)                                                                   \
    do {                                                                                 \
        uint32_t f_ = (e) & 0xffff, r_ = (xj) >= f_ << (31 - SCALE_BITS);                \
        ptr[-2] = (uint8_t)(xj);                                                         \
        ptr[-1] = (uint8_t)((xj) >> 8);                                                  \
        ptr -= r_ << 1;                                                                  \
        (xj) >>= r_ << 4;                                                                \
        uint32_t q_ = (xj) / f_;                                                         \
        (xj) = (q_ << SCALE_BITS) + (xj) - q_ * f_ + ((e) >> 16);                        \
    } while (0)
    size_t i = n;
    while (i % NLANES) { /* the last, partial group first: the decoder reads it last */
        i--;
        uint32_t e = es[sym_at(a, b, i)];
        ENC_PUT(x[i % NLANES], e);
    }
#if HAVE_AVX2_PATH
    if (use_avx2) {
        ptr = enc_avx2(a, b, i, es, x, ptr, buf + guard);
        if (!ptr) {
            return NULL;
        }
        i = 0;
    }
#endif
    while (i) {
        if ((size_t)(ptr - buf) < guard) {
            return NULL;
        }
        i -= NLANES;
        for (int j = NLANES - 1; j >= 0; j--) {
            uint32_t e = es[sym_at(a, b, i + (size_t)j)];
            ENC_PUT(x[j], e);
        }
    }
#undef ENC_PUT
    for (int j = NLANES - 1; j >= 0; j--) {
        ptr -= 4;
        st32(ptr, x[j]);
    }
    return ptr;
}

/* A plane's decoder: lane states, the position in its word stream, its decode table. */
typedef struct {
    uint32_t x[NLANES];
    const uint8_t *in, *end;
    const uint32_t *T;
} Dec;

static const char *dec_init(Dec *d, const uint8_t *in, const uint8_t *end, const uint32_t *T)
{
    if (end - in < STATE_BYTES) {
        return "rANS stream is shorter than its states";
    }
    if ((end - in - STATE_BYTES) % 2) {
        return "rANS stream has an odd number of word bytes";
    }
    for (int j = 0; j < NLANES; j++) {
        d->x[j] = ld32(in + 4 * j);
        if (d->x[j] < RANS_L || d->x[j] >= (1u << 31)) {
            return "rANS stream has an invalid initial state";
        }
    }
    d->in = in + STATE_BYTES;
    d->end = end;
    d->T = T;
    return NULL;
}

static const char *dec_finish(const Dec *d)
{
    if (d->in != d->end) {
        return "rANS stream has unread words";
    }
    for (int j = 0; j < NLANES; j++) {
        if (d->x[j] != RANS_L) {
            return "rANS stream ends in an unexpected state";
        }
    }
    return NULL;
}

/* Split a decode entry into symbol, frequency, and slot offset. */
#define ENTRY_SYM(e, joint) ((joint) ? (e) & 0x3ff : (e) & 0xff)
#define ENTRY_FREQ(e, joint) ((joint) ? ((e) >> 21) + 1 : (e) >> 20)
#define ENTRY_BIAS(e, joint) ((joint) ? ((e) >> 10) & 0x7ff : ((e) >> 8) & 0xfff)

/* Scalar decoding of the next `count` symbols (lanes continue from symbol i0) into out8 (byte
 * symbols) or out16 (joint symbols). NULL on success. */
static inline const char *dec_scalar(Dec *d, size_t i0, size_t count, uint8_t *out8, uint16_t *out16, int joint)
{
    const uint8_t *in = d->in, *end = d->end;
    const uint32_t *T = d->T;
    size_t i = 0;
    if (i0 % NLANES == 0) {
        while (count - i >= NLANES && end - in >= 2 * NLANES) { /* a whole group cannot run out */
            for (int j = 0; j < NLANES; j++) {
                uint32_t x = d->x[j], e = T[x & (TOTAL - 1)];
                if (joint) {
                    out16[i + j] = (uint16_t)ENTRY_SYM(e, 1);
                } else {
                    out8[i + j] = (uint8_t)e;
                }
                x = ENTRY_FREQ(e, joint) * (x >> SCALE_BITS) + ENTRY_BIAS(e, joint);
                uint32_t w = ld16(in), r = x < RANS_L;
                d->x[j] = x << (r << 4) | (w & (0u - r));
                in += r << 1;
            }
            i += NLANES;
        }
    }
    for (; i < count; i++) {
        uint32_t *x = &d->x[(i0 + i) % NLANES], e = T[*x & (TOTAL - 1)];
        if (joint) {
            out16[i] = (uint16_t)ENTRY_SYM(e, 1);
        } else {
            out8[i] = (uint8_t)e;
        }
        *x = ENTRY_FREQ(e, joint) * (*x >> SCALE_BITS) + ENTRY_BIAS(e, joint);
        if (*x < RANS_L) {
            if (end - in < 2) {
                d->in = in;
                return "rANS stream ends early";
            }
            *x = *x << 16 | ld16(in);
            in += 2;
        }
    }
    d->in = in;
    return NULL;
}

#if HAVE_AVX2_PATH
/* Store 32 bytes at p (32-byte aligned when nt): non-temporal when nt, so that a large output is
 * written without first reading each line into cache (the decoder is bound by memory traffic). */
static inline __attribute__((always_inline, target("avx2"))) void put256(uint8_t *p, __m256i v, int nt)
{
    if (nt) {
        _mm256_stream_si256((__m256i *)p, v);
    } else {
        _mm256_storeu_si256((__m256i *)p, v);
    }
}

/* 16 elements of a JOINT block from their joint symbols v (16 x u16, in order), their low-6 fields
 * packed at q (12 bytes used, 16 readable) and, for width 4, their plane-2 and plane-3 bytes c and
 * dd, rotated back and stored at out (16 * w bytes). */
static inline __attribute__((always_inline, target("avx2"))) void
join_joint16(__m256i v, const uint8_t *q, const uint8_t *c, const uint8_t *dd, int w, uint8_t *out, int nt)
{
    /* 16-bit lane j of each half takes bytes (b, b + 1) holding field j, shifted up so that the
     * field sits at bits 6..11 */
    const __m256i spread = _mm256_setr_epi8(0, 1, 0, 1, 1, 2, 2, 3, 3, 4, 3, 4, 4, 5, 5, 6,
                                            0, 1, 0, 1, 1, 2, 2, 3, 3, 4, 3, 4, 4, 5, 5, 6);
    const __m256i mult = _mm256_setr_epi16(64, 1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16);
    const __m256i m63 = _mm256_set1_epi16(63);
    __m128i raw = _mm_loadu_si128((const __m128i *)q);
    __m256i bytes = _mm256_set_m128i(_mm_srli_si128(raw, 6), raw);
    __m256i lo = _mm256_and_si256(_mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, spread), mult), 6), m63);
    __m256i hi = _mm256_or_si256(_mm256_slli_epi16(v, 6), lo);
    if (w == 2) {
        __m256i y = _mm256_or_si256(_mm256_srli_epi16(hi, 1), _mm256_slli_epi16(hi, 15));
        put256(out, y, nt);
    } else {
        __m128i cc = _mm_loadu_si128((const __m128i *)c), d = _mm_loadu_si128((const __m128i *)dd);
        __m128i low[2] = {_mm_unpacklo_epi8(d, cc), _mm_unpackhi_epi8(d, cc)};
        __m128i high[2] = {_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
        for (int half = 0; half < 2; half++) {
            __m256i y = _mm256_set_m128i(_mm_unpackhi_epi16(low[half], high[half]),
                                         _mm_unpacklo_epi16(low[half], high[half]));
            y = _mm256_or_si256(_mm256_srli_epi32(y, 1), _mm256_slli_epi32(y, 31));
            put256(out + 32 * half, y, nt);
        }
    }
}

/* AVX2 decoding of whole groups; returns how many symbols it decoded (dec_scalar does the rest).
 * Four registers of eight lanes: all four decode steps first, then the four renormalisations in
 * lane order, which is dec_scalar's word order. With `lo` (byte symbols only), symbol i is not
 * stored but joined at once with lo[i] into element i of a width-2 output (see join2_avx2). With
 * `jo` (joint symbols only), symbol i is joined at once with the block's low-6 string `low6`
 * (low6_len bytes from there on) and planes pl[2..w) into element i at jo (see join_planes). */
static inline __attribute__((always_inline, target("avx2"))) size_t
dec_avx2_impl(Dec *d, size_t count, uint8_t *out8, uint16_t *out16, int joint, const uint8_t *lo,
              const uint8_t *low6, size_t low6_len, const uint8_t *const *pl, int w, uint8_t *jo, int nt)
{
    enum { NREG = NLANES / 8 };
    const uint8_t *in = d->in, *end = d->end;
    const int *T = (const int *)d->T;
    __m256i X[NREG], E[NREG];
    for (int k = 0; k < NREG; k++) {
        X[k] = _mm256_loadu_si256((const __m256i *)(d->x + 8 * k));
    }
    const __m256i slot_mask = _mm256_set1_epi32(TOTAL - 1), lim = _mm256_set1_epi32(RANS_L);
    const __m256i sym_mask = _mm256_set1_epi32(joint ? 0x3ff : 0xff);
    const __m256i bias_mask = _mm256_set1_epi32(joint ? 0x7ff : 0xfff), one = _mm256_set1_epi32(joint ? 1 : 0);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    size_t i = 0;
    /* each register reads 16 bytes, uses at most 16; a fused joint group reads 16 low-6 bytes at 3i/4 + 12 */
    while (count - i >= NLANES && end - in >= NREG * 16 && (!jo || i / 4 * 3 + 28 <= low6_len)) {
        for (int k = 0; k < NREG; k++) {
            E[k] = _mm256_i32gather_epi32(T, _mm256_and_si256(X[k], slot_mask), 4);
            __m256i f = _mm256_add_epi32(_mm256_srli_epi32(E[k], joint ? 21 : 20), one);
            __m256i b = _mm256_and_si256(_mm256_srli_epi32(E[k], joint ? 10 : 8), bias_mask);
            X[k] = _mm256_add_epi32(_mm256_mullo_epi32(f, _mm256_srli_epi32(X[k], SCALE_BITS)), b);
        }
        for (int k = 0; k < NREG; k++) {
            __m256i m = _mm256_cmpgt_epi32(lim, X[k]);
            int bits = _mm256_movemask_ps(_mm256_castsi256_ps(m));
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)in));
            w = _mm256_permutevar8x32_epi32(w, _mm256_loadu_si256((const __m256i *)PERM[bits]));
            X[k] = _mm256_blendv_epi8(X[k], _mm256_or_si256(_mm256_slli_epi32(X[k], 16), w), m);
            in += 2 * __builtin_popcount((unsigned)bits);
        }
        if (joint) {
            for (int k = 0; k < NREG; k += 2) {
                __m256i p = _mm256_packus_epi32(_mm256_and_si256(E[k], sym_mask), _mm256_and_si256(E[k + 1], sym_mask));
                p = _mm256_permute4x64_epi64(p, 0xd8);
                if (jo) {
                    size_t g = i + 8 * (size_t)k;
                    join_joint16(p, low6 + g / 4 * 3, w == 4 ? pl[2] + g : NULL, w == 4 ? pl[3] + g : NULL, w,
                                 jo + (size_t)w * g, nt);
                } else {
                    _mm256_storeu_si256((__m256i *)(out16 + i + 8 * k), p);
                }
            }
        } else {
            __m256i p01 = _mm256_packus_epi32(_mm256_and_si256(E[0], sym_mask), _mm256_and_si256(E[1], sym_mask));
            __m256i p23 = _mm256_packus_epi32(_mm256_and_si256(E[2], sym_mask), _mm256_and_si256(E[3], sym_mask));
            __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), order);
            if (lo) {
                __m256i vb = _mm256_loadu_si256((const __m256i *)(lo + i));
                __m256i l = _mm256_unpacklo_epi8(vb, bytes), h = _mm256_unpackhi_epi8(vb, bytes);
                l = _mm256_or_si256(_mm256_srli_epi16(l, 1), _mm256_slli_epi16(l, 15));
                h = _mm256_or_si256(_mm256_srli_epi16(h, 1), _mm256_slli_epi16(h, 15));
                put256(out8 + 2 * i, _mm256_permute2x128_si256(l, h, 0x20), nt);
                put256(out8 + 2 * i + 32, _mm256_permute2x128_si256(l, h, 0x31), nt);
            } else {
                _mm256_storeu_si256((__m256i *)(out8 + i), bytes);
            }
        }
        i += NLANES;
    }
    for (int k = 0; k < NREG; k++) {
        _mm256_storeu_si256((__m256i *)(d->x + 8 * k), X[k]);
    }
    d->in = in;
    return i;
}

__attribute__((target("avx2"))) static size_t dec_avx2_bytes(Dec *d, size_t count, uint8_t *out)
{
    return dec_avx2_impl(d, count, out, NULL, 0, NULL, NULL, 0, NULL, 0, NULL, 0);
}

__attribute__((target("avx2"))) static size_t dec_avx2_joint(Dec *d, size_t count, uint16_t *out)
{
    return dec_avx2_impl(d, count, NULL, out, 1, NULL, NULL, 0, NULL, 0, NULL, 0);
}

/* Byte symbols joined with the low plane `lo` straight into width-2 elements at out. */
__attribute__((target("avx2"))) static size_t dec_avx2_join2(Dec *d, size_t count, const uint8_t *lo, uint8_t *out,
                                                             int nt)
{
    return dec_avx2_impl(d, count, out, NULL, 0, lo, NULL, 0, NULL, 0, NULL, nt);
}

/* Joint symbols joined with the low-6 string and planes pl[2..w) straight into elements at out. */
__attribute__((target("avx2"))) static size_t dec_avx2_jjoin(Dec *d, size_t count, const uint8_t *low6, size_t low6_len,
                                                             const uint8_t *const *pl, int w, uint8_t *out, int nt)
{
    return w == 2 ? dec_avx2_impl(d, count, NULL, NULL, 1, NULL, low6, low6_len, pl, 2, out, nt)
                  : dec_avx2_impl(d, count, NULL, NULL, 1, NULL, low6, low6_len, pl, 4, out, nt);
}
#endif

/* Decode the next `count` symbols of a plane (symbol index i0 on) into out8 or out16. */
static const char *dec_run(Dec *d, size_t i0, size_t count, uint8_t *out8, uint16_t *out16)
{
    size_t done = 0;
#if HAVE_AVX2_PATH
    if (use_avx2 && i0 % NLANES == 0) {
        done = out16 ? dec_avx2_joint(d, count, out16) : dec_avx2_bytes(d, count, out8);
    }
#endif
    if (out16) {
        return dec_scalar(d, i0 + done, count - done, NULL, out16 + done, 1);
    }
    return dec_scalar(d, i0 + done, count - done, out8 + done, NULL, 0);
}

/* ------------------------------------------------------------------------------------------- */
/* Planes                                                                                       */

/* Histogram of n bytes, four interleaved tables so that runs of one value do not serialise. */
static void histogram(const uint8_t *p, size_t n, uint32_t h[256])
{
    uint32_t t[4][256];
    memset(t, 0, sizeof t);
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        t[0][p[i]]++;
        t[1][p[i + 1]]++;
        t[2][p[i + 2]]++;
        t[3][p[i + 3]]++;
    }
    for (; i < n; i++) {
        t[0][p[i]]++;
    }
    for (int s = 0; s < 256; s++) {
        h[s] = t[0][s] + t[1][s] + t[2][s] + t[3][s];
    }
}

#define SAMPLE 8 /* planes 1..3 are first judged on every 8th element */

/* Split the rotated elements into planes P and count J[a << 2 | b >> 6], the joint counts of
 * plane-0 byte a and the top two bits of plane-1 byte b (the rotated element's top 10 bits),
 * and hs[k], the histogram of plane k over every SAMPLE-th element. */
static void analyse(const uint8_t *raw, size_t n, int w, uint8_t *P, uint32_t J[1024], uint32_t hs[4][256])
{
    uint32_t tj[4][1024]; /* four interleaved tables */
    memset(tj, 0, sizeof tj);
    memset(hs, 0, 4 * 256 * sizeof(uint32_t));
    size_t i = 0;
#define SPLIT(i, l, sampled)                                                             \
    do {                                                                                 \
        uint32_t v_;                                                                     \
        if (w == 2) {                                                                    \
            v_ = ld16(raw + 2 * (i));                                                    \
            v_ = (v_ << 1 | v_ >> 15) & 0xffff;                                          \
            P[i] = (uint8_t)(v_ >> 8);                                                   \
            P[n + (i)] = (uint8_t)v_;                                                    \
            tj[l][v_ >> 6]++;                                                            \
            if (sampled) {                                                               \
                hs[1][v_ & 0xff]++;                                                      \
            }                                                                            \
        } else {                                                                         \
            v_ = ld32(raw + 4 * (i));                                                    \
            v_ = v_ << 1 | v_ >> 31;                                                     \
            P[i] = (uint8_t)(v_ >> 24);                                                  \
            P[n + (i)] = (uint8_t)(v_ >> 16);                                            \
            P[2 * n + (i)] = (uint8_t)(v_ >> 8);                                         \
            P[3 * n + (i)] = (uint8_t)v_;                                                \
            tj[l][v_ >> 22]++;                                                           \
            if (sampled) {                                                               \
                hs[1][(v_ >> 16) & 0xff]++;                                              \
                hs[2][(v_ >> 8) & 0xff]++;                                               \
                hs[3][v_ & 0xff]++;                                                      \
            }                                                                            \
        }                                                                                \
    } while (0)
    for (; i + 8 <= n; i += 8) {
        SPLIT(i, 0, 1);
        SPLIT(i + 1, 1, 0);
        SPLIT(i + 2, 2, 0);
        SPLIT(i + 3, 3, 0);
        SPLIT(i + 4, 0, 0);
        SPLIT(i + 5, 1, 0);
        SPLIT(i + 6, 2, 0);
        SPLIT(i + 7, 3, 0);
    }
    for (; i < n; i++) {
        SPLIT(i, 0, i % SAMPLE == 0);
    }
#undef SPLIT
    for (int s = 0; s < 1024; s++) {
        J[s] = tj[0][s] + tj[1][s] + tj[2][s] + tj[3][s];
    }
}

/* Element i of a JOINT payload: the 16 high bits of the rotated element, from joint symbol v
 * (plane 0 and the top 2 bits of plane 1) and the low 6 bits of plane 1. */
static inline uint32_t joint_high16(uint32_t v, uint32_t lo6)
{
    return v << 6 | lo6;
}

/* Store rotated element y (w bytes) at out, undoing the rotation. */
static inline void put_element(uint8_t *out, uint32_t y, int w)
{
    if (w == 2) {
        y = y >> 1 | (y & 1) << 15;
        out[0] = (uint8_t)y;
        out[1] = (uint8_t)(y >> 8);
    } else {
        st32(out, y >> 1 | y << 31);
    }
}

#if HAVE_AVX2_PATH
/* AVX2 join of whole groups of 16 elements of a JOINT block (see join_planes); returns how many
 * elements it joined. low6 must have 16 readable bytes at each group: the caller leaves the
 * last group(s) to the scalar loop. */
__attribute__((target("avx2"))) static size_t join_joint_avx2(const uint8_t *const *pl, const uint16_t *v,
                                                              const uint8_t *low6, size_t n, size_t low6_len,
                                                              int w, uint8_t *out, int nt)
{
    size_t i = 0;
    for (; i + 16 <= n && i / 4 * 3 + 16 <= low6_len; i += 16) {
        join_joint16(_mm256_loadu_si256((const __m256i *)(v + i)), low6 + i / 4 * 3, w == 4 ? pl[2] + i : NULL,
                     w == 4 ? pl[3] + i : NULL, w, out + (size_t)w * i, nt);
    }
    return i;
}

/* AVX2 join of whole groups of 32 elements of two plain byte planes (width 2): element i is
 * a[i] << 8 | b[i], rotated right by one bit. Returns how many elements it joined. */
__attribute__((target("avx2"))) static size_t join2_avx2(const uint8_t *a, const uint8_t *b, size_t n, uint8_t *out, int nt)
{
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i va = _mm256_loadu_si256((const __m256i *)(a + i)), vb = _mm256_loadu_si256((const __m256i *)(b + i));
        __m256i lo = _mm256_unpacklo_epi8(vb, va), hi = _mm256_unpackhi_epi8(vb, va); /* 0-7 16-23, 8-15 24-31 */
        lo = _mm256_or_si256(_mm256_srli_epi16(lo, 1), _mm256_slli_epi16(lo, 15));
        hi = _mm256_or_si256(_mm256_srli_epi16(hi, 1), _mm256_slli_epi16(hi, 15));
        put256(out + 2 * i, _mm256_permute2x128_si256(lo, hi, 0x20), nt);
        put256(out + 2 * i + 32, _mm256_permute2x128_si256(lo, hi, 0x31), nt);
    }
    return i;
}
#endif

/* Elements [0, n) of a block into out (n * w bytes): from byte planes pl[0..w), or, when v is
 * given, from joint symbols v, the low 6 bits of plane 1 packed at low6 (low6_len bytes from
 * there to the end of the packed string; the block starts on a multiple of 4 elements), and
 * planes pl[2..w). */
static void join_planes(const uint8_t *const *pl, const uint16_t *v, const uint8_t *low6, size_t low6_len,
                        size_t n, int w, uint8_t *out, int nt)
{
    if (v) {
        size_t i = 0;
#if HAVE_AVX2_PATH
        if (use_avx2) {
            i = join_joint_avx2(pl, v, low6, n, low6_len, w, out, nt);
        }
#else
        (void)low6_len;
        (void)nt;
#endif
        for (; i < n; i += 4) {
            const uint8_t *q = low6 + i / 4 * 3;
            size_t r = n - i < 4 ? n - i : 4;
            uint32_t bits = q[0]; /* four 6-bit fields in 3 bytes; fewer at the end */
            if (r > 1) {
                bits |= (uint32_t)q[1] << 8;
            }
            if (r > 2) {
                bits |= (uint32_t)q[2] << 16;
            }
            for (size_t j = 0; j < r; j++) {
                uint32_t y = joint_high16(v[i + j], bits >> (6 * j) & 63);
                if (w == 4) {
                    y = y << 16 | (uint32_t)pl[2][i + j] << 8 | pl[3][i + j];
                }
                put_element(out + (size_t)w * (i + j), y, w);
            }
        }
    } else if (w == 2) {
        const uint8_t *a = pl[0], *b = pl[1];
        size_t i = 0;
#if HAVE_AVX2_PATH
        if (use_avx2) {
            i = join2_avx2(a, b, n, out, nt);
        }
#endif
        for (; i < n; i++) {
            put_element(out + 2 * i, (uint32_t)a[i] << 8 | b[i], 2);
        }
    } else {
        const uint8_t *a = pl[0], *b = pl[1], *c = pl[2], *d = pl[3];
        for (size_t i = 0; i < n; i++) {
            put_element(out + 4 * i, (uint32_t)a[i] << 24 | (uint32_t)b[i] << 16 | (uint32_t)c[i] << 8 | d[i], 4);
        }
    }
}

#if HAVE_AVX2_PATH
/* AVX2 packing of groups of 32 bytes (24 bytes out each), leaving at least 8 bytes to the scalar
 * loop so that the 4 scratch bytes each store writes past its group stay inside the string.
 * Returns how many bytes it packed. */
__attribute__((target("avx2"))) static size_t pack_low6_avx2(const uint8_t *b, size_t n, uint8_t *p)
{
    const __m256i m63 = _mm256_set1_epi8(63), pairs = _mm256_set1_epi16(64 << 8 | 1);
    const __m256i quads = _mm256_set1_epi32(4096 << 16 | 1);
    const __m256i compact = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,
                                             0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    size_t i = 0;
    for (; i + 40 <= n; i += 32, p += 24) {
        __m256i x = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(b + i)), m63);
        __m256i y = _mm256_madd_epi16(_mm256_maddubs_epi16(x, pairs), quads); /* 8 x 24-bit groups */
        y = _mm256_shuffle_epi8(y, compact);
        _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(y));
        _mm_storeu_si128((__m128i *)(p + 12), _mm256_extracti128_si256(y, 1));
    }
    return i;
}
#endif

/* The low 6 bits of each of n bytes, packed (see mode LOW6); returns the end. */
static uint8_t *pack_low6(const uint8_t *b, size_t n, uint8_t *p)
{
    size_t i = 0;
#if HAVE_AVX2_PATH
    if (use_avx2) {
        i = pack_low6_avx2(b, n, p);
        p += i / 4 * 3;
    }
#endif
    for (; i + 4 <= n; i += 4) {
        uint32_t v = (b[i] & 63u) | (b[i + 1] & 63u) << 6 | (b[i + 2] & 63u) << 12 | (b[i + 3] & 63u) << 18;
        p[0] = (uint8_t)v;
        p[1] = (uint8_t)(v >> 8);
        p[2] = (uint8_t)(v >> 16);
        p += 3;
    }
    if (i < n) {
        uint32_t v = 0;
        size_t r = n - i;
        for (size_t j = 0; j < r; j++) {
            v |= (b[i + j] & 63u) << (6 * j);
        }
        for (size_t j = 0; j < (6 * r + 7) / 8; j++) {
            *p++ = (uint8_t)(v >> (8 * j));
        }
    }
    return p;
}

/* How one plane (or, for JOINT, planes 0 and 1) is stored. */
typedef struct {
    int mode;
    uint8_t value; /* CONST */
    Model m;       /* ORDER0 */
} Plan;

static int single_symbol(const uint32_t h[256], uint8_t *value)
{
    int present = 0;
    for (int s = 0; s < 256; s++) {
        if (h[s]) {
            present++;
            *value = (uint8_t)s;
        }
    }
    return present == 1;
}

/* Plan for a plane coded on its own: constant, order-0 rANS or raw. Returns the estimated size. */
static double plan_plain(const uint32_t h[256], size_t n, int kmin, Plan *plan)
{
    if (n && single_symbol(h, &plan->value)) {
        plan->mode = MODE_CONST;
        return 2;
    }
    plan->mode = MODE_RAW;
    if (n >= 64) {
        double cost = 1 + best_model(h, kmin, &plan->m) + STREAM_OVERHEAD;
        if (cost < (double)(1 + n)) {
            plan->mode = MODE_ORDER0;
            return cost;
        }
    }
    return (double)(1 + n);
}

/* Plan a plane from its sampled histogram first: only when that suggests coding pays (or the
 * plane is short) count it all and plan exactly. Returns the estimated record size. */
static double plan_sampled(const uint8_t *plane, size_t n, const uint32_t hs[256], int kmin, Plan *plan)
{
    if (n >= 64 * SAMPLE) {
        uint32_t scaled[256];
        for (int s = 0; s < 256; s++) {
            scaled[s] = hs[s] * SAMPLE;
        }
        double est = plan_plain(scaled, n, kmin, plan);
        if (plan->mode == MODE_RAW || est > 0.99 * (double)(1 + n)) {
            plan->mode = MODE_RAW;
            return (double)(1 + n);
        }
    }
    uint32_t h[256];
    histogram(plane, n, h);
    return plan_plain(h, n, kmin, plan);
}

/* Append a stream (u32 length, bytes) at p. */
static uint8_t *write_stream(uint8_t *p, const uint8_t *s, size_t len)
{
    st32(p, (uint32_t)len);
    memcpy(p + 4, s, len);
    return p + 4 + len;
}

/* Write one plane record at p (room for 1 + n bytes) following plan; returns the end. `buf` is
 * stream scratch of n bytes (a coded plane is kept only when smaller than the raw one), `es`
 * room for 256 encoder symbols. */
static uint8_t *write_plane(uint8_t *p, const uint8_t *plane, size_t n, const Plan *plan, uint8_t *buf, uint32_t *es)
{
    if (plan->mode == MODE_CONST) {
        *p++ = MODE_CONST;
        *p++ = plan->value;
        return p;
    }
    if (plan->mode == MODE_ORDER0) {
        uint32_t freq[256];
        model_freqs(&plan->m, freq);
        build_enc(freq, 256, es);
        uint8_t *s = rans_encode(plane, NULL, n, es, buf, n);
        size_t slen = s ? (size_t)(buf + n - s) : n;
        if (s && table_bytes(&plan->m) + 4 + slen < n) {
            *p++ = MODE_ORDER0;
            p = write_table(p, &plan->m);
            return write_stream(p, s, slen);
        }
    }
    *p++ = MODE_RAW;
    memcpy(p, plane, n);
    return p + n;
}

/* Encode without the GIL. Returns the payload length, or 0 when out of memory. `out` has room
 * for HEADER_SIZE + w * (1 + n) bytes. */
static size_t encode_impl(const uint8_t *raw, size_t n, int w, uint8_t *out)
{
    size_t cap = 2 * n + 2; /* stream scratch: a joint stream is kept when smaller than 2 planes */
    uint8_t *P = malloc((size_t)w * n + cap);
    uint32_t *es = malloc(sizeof(uint32_t) * 1024);
    if (!P || !es) {
        free(P);
        free(es);
        return 0;
    }
    uint8_t *buf = P + (size_t)w * n;
    uint32_t hs[4][256], J[1024], fj[1024], h0[256];
    const uint8_t *pl[4];
    if (w == 1) {
        histogram(raw, n, h0);
        pl[0] = raw;
    } else {
        analyse(raw, n, w, P, J, hs);
        for (int a = 0; a < 256; a++) {
            h0[a] = J[4 * a] + J[4 * a + 1] + J[4 * a + 2] + J[4 * a + 3];
        }
        for (int k = 0; k < w; k++) {
            pl[k] = P + (size_t)k * n;
        }
    }
    uint8_t *p = out;
    *p++ = VERSION;
    *p++ = (uint8_t)w;
    st32(p, (uint32_t)n);
    p += 4;
    Plan plan[4];
    int k = 0;
    memset(plan, 0, sizeof plan);
    double plane0 = plan_plain(h0, n, 8, &plan[0]);
    if (w > 1 && n >= 64) { /* planes 0 and 1: separately, or jointly when that is smaller */
        double plain = plane0 + plan_sampled(pl[1], n, hs[1], 0, &plan[1]);
        double joint = joint_cost(J, fj);
        if (joint >= 0 && 2 + joint + STREAM_OVERHEAD + (double)low6_bytes(n) < plain) {
            build_enc(fj, 1024, es);
            uint8_t *s = rans_encode(pl[0], pl[1], n, es, buf, cap);
            size_t slen = s ? (size_t)(buf + cap - s) : cap;
            if (s && 2 + joint_table_bytes(fj) + 4 + slen + low6_bytes(n) <= 2 * (1 + n)) {
                *p++ = MODE_JOINT;
                p = write_stream(write_joint_table(p, fj), s, slen);
                *p++ = MODE_LOW6;
                p = pack_low6(pl[1], n, p);
                k = 2;
            }
        }
    } else if (w > 1) {
        plan_sampled(pl[1], n, hs[1], 0, &plan[1]);
    }
    for (; k < w; k++) {
        if (k >= 2) {
            plan_sampled(pl[k], n, hs[k], 8, &plan[k]);
        }
        p = write_plane(p, pl[k], n, &plan[k], buf, es);
    }
    free(P);
    free(es);
    return (size_t)(p - out);
}

#define OUT_OF_MEMORY ((const char *)1)

/* One plane record of a payload being decoded. */
typedef struct {
    int mode;
    uint8_t value;       /* CONST */
    const uint8_t *data; /* RAW, LOW6 */
    Dec dec;             /* ORDER0, JOINT */
} PlaneIn;

/* Parse plane k's record at *pp, building its decode table in T; NULL on success. */
static const char *parse_plane(const uint8_t **pp, const uint8_t *end, int k, int w, size_t n, int joint_before,
                               PlaneIn *pi, uint32_t *T)
{
    const uint8_t *p = *pp;
    if (p >= end) {
        return "payload is truncated before a plane";
    }
    pi->mode = *p++;
    if (joint_before != (pi->mode == MODE_LOW6)) {
        return "a joint plane 0 must be followed by a LOW6 plane 1, and only then";
    }
    if (pi->mode == MODE_RAW || pi->mode == MODE_LOW6) {
        size_t len = pi->mode == MODE_RAW ? n : low6_bytes(n);
        if ((size_t)(end - p) < len) {
            return "raw plane is truncated";
        }
        if (pi->mode == MODE_LOW6 && n % 4 && p[len - 1] >> (6 * n % 8)) {
            return "LOW6 plane has bits set past its last element";
        }
        pi->data = p;
        *pp = p + len;
        return NULL;
    }
    if (pi->mode == MODE_CONST) {
        if (p >= end) {
            return "constant plane is truncated";
        }
        pi->value = *p;
        *pp = p + 1;
        return NULL;
    }
    uint32_t freq[1024];
    const char *err;
    if (pi->mode == MODE_ORDER0) {
        err = read_table(&p, end, freq);
        if (!err) {
            build_dec(freq, 256, 0, T);
        }
    } else if (pi->mode == MODE_JOINT) {
        if (k != 0 || w == 1) {
            return "only plane 0 of a width 2 or 4 payload may be joint";
        }
        err = read_joint_table(&p, end, freq);
        if (!err) {
            build_dec(freq, 1024, 1, T);
        }
    } else {
        return "plane has an unknown mode";
    }
    if (err) {
        return err;
    }
    if (end - p < 4 || (size_t)(end - p - 4) < ld32(p)) {
        return "rANS stream is truncated";
    }
    size_t slen = ld32(p);
    p += 4;
    *pp = p + slen;
    return dec_init(&pi->dec, p, p + slen, T);
}

/* Decode without the GIL. NULL on success, OUT_OF_MEMORY, or the reason the payload is invalid. */
static const char *decode_impl(const uint8_t *payload, size_t len, uint8_t *out, size_t outlen, int w)
{
    const uint8_t *p = payload, *end = payload + len;
    if (len < HEADER_SIZE) {
        return "payload is shorter than its header";
    }
    if (p[0] != VERSION) {
        return "payload has an unknown version (written by a newer modelpress?)";
    }
    if (p[1] != w) {
        return "payload's element width differs from the codec parameter";
    }
    size_t n = ld32(p + 2);
    if (n * (size_t)w != outlen) {
        return "payload's element count does not match the output size";
    }
    p += HEADER_SIZE;
    /* one decode table per plane, then block buffers: joint symbols and 4 byte planes */
    uint32_t *T = malloc(sizeof(uint32_t) * TOTAL * 4 + sizeof(uint16_t) * BLOCK + 4 * BLOCK + sizeof(PlaneIn) * 4);
    if (!T) {
        return OUT_OF_MEMORY;
    }
    uint16_t *vblk = (uint16_t *)(T + TOTAL * 4);
    uint8_t *blk = (uint8_t *)(vblk + BLOCK);
    PlaneIn *pi = (PlaneIn *)(blk + 4 * BLOCK);
    const char *err = NULL;
    for (int k = 0; k < w && !err; k++) {
        int joint_before = k == 1 && pi[0].mode == MODE_JOINT;
        err = parse_plane(&p, end, k, w, n, joint_before, &pi[k], T + (size_t)TOTAL * k);
    }
    if (!err && p != end) {
        err = "payload has trailing bytes after the last plane";
    }
    for (int k = 0; k < w && !err; k++) {
        if (pi[k].mode == MODE_CONST) {
            memset(blk + (size_t)k * BLOCK, pi[k].value, BLOCK);
        }
    }
    /* Output of a chunk or more goes round the cache: it will not be read again before it would be
     * evicted, and plain stores would first read every line they write (measured ~1.2x faster on
     * two threads). Every vector store lands on a multiple of 32 bytes from out. */
#if HAVE_AVX2_PATH
    int nt = use_avx2 && outlen >= NT_MIN_BYTES && ((uintptr_t)out & 31) == 0;
#else
    int nt = 0;
#endif
#if HAVE_AVX2_PATH
    /* the common fp16 case, plane 0 order-0 and plane 1 stored: decode and join in one pass */
    int fuse = !err && use_avx2 && w == 2 && pi[0].mode == MODE_ORDER0
               && (pi[1].mode == MODE_RAW || pi[1].mode == MODE_CONST);
#else
    int fuse = 0;
#endif
    for (size_t b0 = 0; fuse && b0 < n && !err; b0 += BLOCK) {
        size_t cnt = n - b0 < BLOCK ? n - b0 : BLOCK, done = 0;
        const uint8_t *pl[2] = {blk, pi[1].mode == MODE_RAW ? pi[1].data + b0 : blk + BLOCK};
#if HAVE_AVX2_PATH
        done = dec_avx2_join2(&pi[0].dec, cnt, pl[1], out + 2 * b0, nt);
#endif
        err = dec_scalar(&pi[0].dec, b0 + done, cnt - done, blk + done, NULL, 0);
        if (!err) {
            const uint8_t *rest[2] = {blk + done, pl[1] + done};
            join_planes(rest, NULL, NULL, 0, cnt - done, 2, out + 2 * (b0 + done), nt);
        }
    }
    for (size_t b0 = 0; !fuse && b0 < n && !err; b0 += BLOCK) {
        size_t cnt = n - b0 < BLOCK ? n - b0 : BLOCK;
        const uint8_t *pl[4] = {NULL, NULL, NULL, NULL}, *low6 = NULL;
        size_t low6_len = 0;
        const uint16_t *v = NULL;
        for (int k = 0; k < w && !err; k++) {
            PlaneIn *q = &pi[k];
            uint8_t *dst = w == 1 ? out + b0 : blk + (size_t)k * BLOCK;
            pl[k] = dst;
            if (q->mode == MODE_RAW) {
                pl[k] = q->data + b0;
            } else if (q->mode == MODE_CONST) {
                pl[k] = blk + (size_t)k * BLOCK;
            } else if (q->mode == MODE_LOW6) {
                low6 = q->data + b0 / 4 * 3; /* BLOCK is a multiple of 4 */
                low6_len = low6_bytes(n) - b0 / 4 * 3;
            } else if (q->mode == MODE_ORDER0) {
                err = dec_run(&q->dec, b0, cnt, dst, NULL);
            } else if (q->mode == MODE_JOINT) {
                v = vblk; /* decoded below, once the other planes of the block are ready */
            }
        }
        if (err) {
            break;
        }
        size_t done = 0;
        if (v) { /* joint symbols joined with the other planes as they are decoded, then the tail */
#if HAVE_AVX2_PATH
            if (use_avx2) {
                done = dec_avx2_jjoin(&pi[0].dec, cnt, low6, low6_len, pl, w, out + b0 * (size_t)w, nt);
            }
#endif
            err = dec_scalar(&pi[0].dec, b0 + done, cnt - done, NULL, vblk + done, 1);
            if (err) {
                break;
            }
        }
        if (w == 1) {
            if (pl[0] != out + b0) {
                memcpy(out + b0, pl[0], cnt);
            }
        } else if (done < cnt) {
            const uint8_t *rest[4];
            for (int k = 0; k < 4; k++) {
                rest[k] = pl[k] ? pl[k] + done : NULL;
            }
            join_planes(rest, v ? v + done : NULL, low6 ? low6 + done / 4 * 3 : NULL, low6_len - done / 4 * 3,
                        cnt - done, w, out + (b0 + done) * (size_t)w, nt);
        }
    }
    for (int k = 0; k < w && !err; k++) {
        if (pi[k].mode == MODE_ORDER0 || pi[k].mode == MODE_JOINT) {
            err = dec_finish(&pi[k].dec);
        }
    }
#if HAVE_AVX2_PATH
    if (nt) {
        _mm_sfence(); /* order the streaming stores before the caller reads or hands on the output */
    }
#endif
    free(T);
    return err;
}

/* ------------------------------------------------------------------------------------------- */
/* Python bindings                                                                              */

static int check_width(int width)
{
    if (width != 1 && width != 2 && width != 4) {
        PyErr_Format(PyExc_ValueError, "fans codec: element width must be 1, 2 or 4, not %d", width);
        return 0;
    }
    return 1;
}

static PyObject *py_encode(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer raw;
    int width;
    if (!PyArg_ParseTuple(args, "y*i:encode", &raw, &width)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (!check_width(width)) {
        goto done;
    }
    if (raw.len % width) {
        PyErr_Format(PyExc_ValueError, "fans codec: %zd bytes are not a whole number of %d-byte elements",
                     raw.len, width);
        goto done;
    }
    size_t n = (size_t)raw.len / (size_t)width;
    if (n > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fans codec: a chunk holds at most 2^32 - 1 elements; split it");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(HEADER_SIZE + (size_t)width * (1 + n)));
    if (!result) {
        goto done;
    }
    size_t len;
    Py_BEGIN_ALLOW_THREADS
    len = encode_impl(raw.buf, n, width, (uint8_t *)PyBytes_AS_STRING(result));
    Py_END_ALLOW_THREADS
    if (!len) {
        Py_CLEAR(result);
        PyErr_NoMemory();
        goto done;
    }
    _PyBytes_Resize(&result, (Py_ssize_t)len);
done:
    PyBuffer_Release(&raw);
    return result;
}

static PyObject *py_decode_into(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer payload, out;
    int width;
    if (!PyArg_ParseTuple(args, "y*w*i:decode_into", &payload, &out, &width)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (check_width(width)) {
        const char *err;
        Py_BEGIN_ALLOW_THREADS
        err = decode_impl(payload.buf, (size_t)payload.len, out.buf, (size_t)out.len, width);
        Py_END_ALLOW_THREADS
        if (err == OUT_OF_MEMORY) {
            PyErr_NoMemory();
        } else if (err) {
            PyErr_Format(PyExc_ValueError, "fans codec: %s", err);
        } else {
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&payload);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_simd(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *enabled = Py_None;
    if (!PyArg_ParseTuple(args, "|O:_simd", &enabled)) {
        return NULL;
    }
#if HAVE_AVX2_PATH
    if (enabled != Py_None) {
        int on = PyObject_IsTrue(enabled);
        if (on < 0) {
            return NULL;
        }
        use_avx2 = on && __builtin_cpu_supports("avx2");
    }
    return PyBool_FromLong(use_avx2);
#else
    return PyBool_FromLong(0);
#endif
}

/* The functions' docstrings, beside the table that names them. */
PyDoc_STRVAR(encode_doc,
"encode(raw, width) -> bytes\n\n"
"Losslessly code a buffer of width-byte little-endian elements (width 1, 2 or 4).");

PyDoc_STRVAR(decode_into_doc,
"decode_into(payload, out, width) -> None\n\n"
"Decode a payload written by encode() into the writable buffer out, which must hold exactly the\n"
"decoded size. Raises ValueError if the payload is invalid.");

PyDoc_STRVAR(simd_doc,
"_simd(enabled=None) -> bool\n\n"
"Test hook: whether the AVX2 paths are used; with an argument, switch them on (when the CPU has\n"
"AVX2) or off. Not thread-safe; payloads are identical either way.");

static PyMethodDef methods[] = {
    {"encode", py_encode, METH_VARARGS, encode_doc},
    {"decode_into", py_decode_into, METH_VARARGS, decode_into_doc},
    {"_simd", py_simd, METH_VARARGS, simd_doc},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module)
{
    LOG2[0] = 0;
    for (uint32_t f = 1; f <= TOTAL; f++) {
        LOG2[f] = log2((double)f);
    }
#if HAVE_AVX2_PATH
    init_perm();
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2");
#endif
    return PyModule_AddIntConstant(module, "VERSION", VERSION);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "modelpress.codecs._fcodec",
    "The fans lossless float codec: byte planes coded with static rANS (see _fcodec.c).",
    0, methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fcodec(void)
{
    return PyModuleDef_Init(&moduledef);
}
