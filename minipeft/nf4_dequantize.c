/* NF4 -> float dequantisation on the CPU, compiled on first use by minipeft.quant
   (cc -O3 -march=native).

   x = NF4_CODE[q] * absmax (QLoRA's dequant(c, X) = X / c, with c = 1 / absmax), computed in
   float32 and rounded to the output type.
   Each byte holds two 4-bit indices q, the first value in the high nibble; every `blocksize` values
   share one absmax. This file only handles whole blocks of at least 32 values (16 bytes);
   minipeft.quant does the rest in PyTorch.

   Why C: the work per value is one 16-entry table lookup and one multiply, so speed is the number
   of values a loop handles per instruction. GCC's vector extensions write the lookup as
   __builtin_shuffle, one instruction on AVX-512 (vpermps for 16 float32 values, vpermw for 32
   16-bit ones); AVX2 has neither, and its lookups are written with intrinsics (vpermps over two
   8-entry tables; vpshufb over 16-byte tables). PyTorch's gather does one value at a time. */
/* The #error messages are split by a backslash-newline, which the preprocessor removes first: they
   read exactly as if on one line. */
#if defined(__clang__) || !defined(__GNUC__) || __GNUC__ < 9
#error "nf4_dequantize.c needs GCC 9 or newer (GCC's vector extensions: __builtin_shuffle, \
__builtin_convertvector)"
#endif
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "nf4_dequantize.c reads pairs of 16-bit lanes as one 32-bit lane: little-endian machines \
only"
#endif
#include <stdint.h>
#include <string.h>
#if __has_include(<sys/mman.h>)
#include <sys/mman.h>
#endif
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x32 __attribute__((vector_size(64)));

enum { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2 };

/* 16 float32 values rounded to `dtype` (bfloat16 or float16, to nearest even): the 16-bit
   pattern of value i in the low half of 32-bit lane i, so that read as 16-bit lanes the values
   sit at 0, 2, 4, ... 30. */
static inline u32x16 to_16_bits(f32x16 v, int dtype) {
    if (dtype == BFLOAT16) {  /* the top 16 bits of the float32, rounded */
        const u32x16 bits = (u32x16)v;
        return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
    }
#ifdef __F16C__  /* GCC converts to _Float16 one value at a time; F16C converts 8 */
    __m256 low, high;
    memcpy(&low, &v, sizeof low);
    memcpy(&high, (const char *)&v + sizeof low, sizeof high);
    const __m256i halves = _mm256_set_m128i(_mm256_cvtps_ph(high, _MM_FROUND_TO_NEAREST_INT),
                                            _mm256_cvtps_ph(low, _MM_FROUND_TO_NEAREST_INT));
    return __builtin_convertvector((u16x16)halves, u32x16);
#else
    u16x16 halves;
    for (int i = 0; i < 16; i++) {
        const _Float16 h = (_Float16)v[i];
        memcpy(&halves[i], &h, sizeof h);
    }
    return __builtin_convertvector(halves, u32x16);
#endif
}

/* The output is usually fresh memory, which the OS maps on first write, one 4 KiB page at a time:
   for a 4096 x 4096 bfloat16 matrix, 8192 page faults that cost more than the dequantisation
   itself. Asking for 2 MiB pages (Linux; a hint: ignored where unsupported, and memory already
   mapped stays as it is) makes that 16. Called once per output, before the threads start: it
   changes the process's memory map, which page faults in other threads wait for. */
void ask_for_huge_pages(char *start, int64_t size) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)1 << 21;
    const uintptr_t first = ((uintptr_t)start + huge - 1) & ~(huge - 1);
    const uintptr_t last = ((uintptr_t)start + size) & ~(huge - 1);
    if (last > first) madvise((void *)first, last - first, MADV_HUGEPAGE);
#else
    (void)start, (void)size;
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
#define AVX2_FLOAT32   /* GCC cannot turn a 16-entry float32 shuffle into AVX2 instructions */
#endif
#if defined(__AVX2__) && !defined(__AVX512BW__)
#define AVX2_16_BITS   /* nor a 32-lane 16-bit one (vpermw is AVX-512BW) */
#endif

/* The `count` bytes at `bytes` (a multiple of 16) become 2 * count float32 values at `dst`, each
   looked up in `table`: the first value of a byte from its high nibble, the second from its low. */
static inline void lookup_float32(f32x16 table, const uint8_t *bytes, int64_t count, float *dst) {
#ifdef AVX2_FLOAT32
    /* vpermps picks from an 8-entry table: pick from each half, then between the halves by
       bit 3 of q (384 x 384 and 1536 x 384: 2.2x the generic loop's speed at 2 threads, 3-5x on
       one; 2026-12-01) */
    __m256 low_table, high_table;
    memcpy(&low_table, &table, sizeof low_table);
    memcpy(&high_table, (const char *)&table + sizeof low_table, sizeof high_table);
    for (int64_t i = 0; i < count; i += 8) {
        const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + i)));
        const __m256i q_high = _mm256_srli_epi32(q, 4);
        const __m256i q_low = _mm256_and_si256(q, _mm256_set1_epi32(15));
        const __m256 high = _mm256_blendv_ps(  /* first value of each byte */
            _mm256_permutevar8x32_ps(low_table, q_high),
            _mm256_permutevar8x32_ps(high_table, q_high),
            _mm256_castsi256_ps(_mm256_slli_epi32(q_high, 28)));
        const __m256 low = _mm256_blendv_ps(   /* second value */
            _mm256_permutevar8x32_ps(low_table, q_low),
            _mm256_permutevar8x32_ps(high_table, q_low),
            _mm256_castsi256_ps(_mm256_slli_epi32(q_low, 28)));
        const __m256 a = _mm256_unpacklo_ps(high, low);   /* interleave */
        const __m256 b = _mm256_unpackhi_ps(high, low);
        _mm256_storeu_ps(dst + 2 * i, _mm256_permute2f128_ps(a, b, 0x20));
        _mm256_storeu_ps(dst + 2 * i + 8, _mm256_permute2f128_ps(a, b, 0x31));
    }
#else
    const i32x16 first_half = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const i32x16 second_half = first_half + 8;
    for (int64_t i = 0; i < count; i += 16) {
        i32x16 q;
        for (int j = 0; j < 16; j++) q[j] = bytes[i + j];   /* widened to 32 bits */
        const f32x16 high = __builtin_shuffle(table, q >> 4);   /* first value of each byte */
        const f32x16 low = __builtin_shuffle(table, q & 15);    /* second value */
        const f32x16 first = __builtin_shuffle(high, low, first_half);     /* interleave */
        const f32x16 second = __builtin_shuffle(high, low, second_half);
        memcpy(dst + 2 * i, &first, sizeof first);
        memcpy(dst + 2 * i + 16, &second, sizeof second);
    }
#endif
}

/* The same for 16-bit outputs: `table` holds the 16 values as to_16_bits leaves them. */
static inline void lookup_16_bits(u32x16 table, const uint8_t *bytes, int64_t count,
                                  uint16_t *dst) {
#ifdef AVX2_16_BITS
    /* vpshufb looks up 32 bytes at once in a 16-byte table: one table of the values' low bytes,
       one of their high bytes, each in both 128-bit lanes */
    const u16x16 narrow = __builtin_convertvector(table, u16x16);
    __m256i values;
    memcpy(&values, &narrow, sizeof values);
    const __m256i split = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(values, _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)), _MM_SHUFFLE(3, 1, 2, 0));
    const __m256i low_bytes = _mm256_permute2x128_si256(split, split, 0x00);
    const __m256i high_bytes = _mm256_permute2x128_si256(split, split, 0x11);
    const __m128i nibble = _mm_set1_epi8(15);
    for (int64_t i = 0; i < count; i += 16) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(bytes + i));
        const __m128i q_high = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
        const __m128i q_low = _mm_and_si128(b, nibble);
        const __m256i q = _mm256_set_m128i(_mm_unpackhi_epi8(q_high, q_low),   /* output order */
                                           _mm_unpacklo_epi8(q_high, q_low));
        const __m256i low = _mm256_shuffle_epi8(low_bytes, q);
        const __m256i high = _mm256_shuffle_epi8(high_bytes, q);
        const __m256i a = _mm256_unpacklo_epi8(low, high);   /* values 0-7 and 16-23 */
        const __m256i c = _mm256_unpackhi_epi8(low, high);   /* values 8-15 and 24-31 */
        _mm256_storeu_si256((__m256i *)(dst + 2 * i), _mm256_permute2x128_si256(a, c, 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 2 * i + 16), _mm256_permute2x128_si256(a, c, 0x31));
    }
#else
    const u16x32 values = (u16x32)table;
    for (int64_t i = 0; i < count; i += 16) {
        i32x16 q;
        for (int j = 0; j < 16; j++) q[j] = bytes[i + j];
        /* 32-bit lane j = (2 * low nibble) << 16 | 2 * high nibble: read as 16-bit lanes
           (little-endian), the table positions of values 2j and 2j + 1, in output order */
        const u16x32 index = (u16x32)(((q >> 4) << 1) | ((q & 15) << 17));
        const u16x32 result = __builtin_shuffle(values, index);
        memcpy(dst + 2 * i, &result, sizeof result);
    }
#endif
}

/* Per block: the 16 possible outputs c_q * absmax (one float32 rounding each, then one to `dtype`)
   form a table; the block's nibbles, in output order, pick their values from it. */
void nf4_dequantize(const uint8_t *packed, const float *absmax, const float *code,
                    int64_t num_blocks, int64_t blocksize, int dtype, void *out) {
    const int64_t block_bytes = blocksize / 2;
    f32x16 codes;
    memcpy(&codes, code, sizeof codes);
    for (int64_t block = 0; block < num_blocks; block++) {
        const f32x16 values = codes * absmax[block];  /* x = c_q * absmax, for all 16 q */
        const uint8_t *bytes = packed + block * block_bytes;
        if (dtype == FLOAT32)
            lookup_float32(values, bytes, block_bytes, (float *)out + block * blocksize);
        else
            lookup_16_bits(to_16_bits(values, dtype), bytes, block_bytes,
                           (uint16_t *)out + block * blocksize);
    }
}
