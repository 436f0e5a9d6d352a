// Cryptographically secure Gaussian noise: the ChaCha20 block function (RFC 8439, section
// 2.3) and its mapping to normals, as functions that compile both as plain C++ (the CPU op)
// and as CUDA __host__ __device__ code (the GPU op), so that both paths run the same source.
//
// Stream layout (docs/DESIGN.md, "Secure noise"): a 256-bit key drawn from os.urandom for
// each step; the 96-bit nonce holds the stream id (the parameter's index), so every
// parameter has its own stream; the 32-bit block counter walks that stream.  Stream element
// e uses block e / 2 and, within it, the eight 32-bit words starting at 8 * (e % 2).  A draw
// may start anywhere in the stream (`offset`, in elements): since the block counter is the
// position, a draw of elements [a, b) equals elements a..b-1 of a draw of [0, b), bit for
// bit, so a parameter's noise can be drawn in chunks.
//
// Normal mapping (resists the floating-point attacks of Mironov 2012 and Holohan & Braghin
// 2021): four 53-bit uniforms u1, t1, u2, t2 per element, two float64 Box-Muller normals
// sqrt(-2 ln u) cos(2 pi t) that share no uniform, summed and divided by sqrt(2), multiplied
// by std, and only then rounded to the output dtype.  log and cos are computed here from
// +, -, *, / and sqrt alone (IEEE-exact on both sides; no fused multiply-add on the device,
// -ffp-contract=off on the host), so the CPU and the CUDA op give the same bits.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define DPK_HD __host__ __device__ __forceinline__
#else
#define DPK_HD inline
#endif

namespace dpk {

// Rounded arithmetic that the compiler may not fuse into an FMA on the device.
#if defined(__CUDA_ARCH__)
#define DPK_ADD(a, b) __dadd_rn((a), (b))
#define DPK_SUB(a, b) __dsub_rn((a), (b))
#define DPK_MUL(a, b) __dmul_rn((a), (b))
#define DPK_DIV(a, b) __ddiv_rn((a), (b))
#define DPK_SQRT(a) __dsqrt_rn(a)
#else
#define DPK_ADD(a, b) ((a) + (b))
#define DPK_SUB(a, b) ((a) - (b))
#define DPK_MUL(a, b) ((a) * (b))
#define DPK_DIV(a, b) ((a) / (b))
#define DPK_SQRT(a) __builtin_sqrt(a)
#endif

constexpr int kBlockWords = 16;
constexpr int kWordsPerElement = 8;   // four 64-bit draws
constexpr int kElementsPerBlock = kBlockWords / kWordsPerElement;

DPK_HD uint32_t rotl32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

// One quarter round on four state words held in local variables (an array indexed through
// function arguments is not kept in registers by gcc: 10x slower).
#define DPK_QR(a, b, c, d)                   \
  a += b; d ^= a; d = dpk::rotl32(d, 16);    \
  c += d; b ^= c; b = dpk::rotl32(b, 12);    \
  a += b; d ^= a; d = dpk::rotl32(d, 8);     \
  c += d; b ^= c; b = dpk::rotl32(b, 7);

// RFC 8439 2.3: out = the 16 little-endian words of block `counter` for (key, nonce).
DPK_HD void chacha20_block(const uint32_t key[8], uint32_t counter, const uint32_t nonce[3],
                           uint32_t out[16]) {
  const uint32_t i0 = 0x61707865u, i1 = 0x3320646eu, i2 = 0x79622d32u, i3 = 0x6b206574u;
  uint32_t x0 = i0, x1 = i1, x2 = i2, x3 = i3;
  uint32_t x4 = key[0], x5 = key[1], x6 = key[2], x7 = key[3];
  uint32_t x8 = key[4], x9 = key[5], x10 = key[6], x11 = key[7];
  uint32_t x12 = counter, x13 = nonce[0], x14 = nonce[1], x15 = nonce[2];
  for (int round = 0; round < 10; ++round) {  // 20 rounds: 10 column + 10 diagonal
    DPK_QR(x0, x4, x8, x12) DPK_QR(x1, x5, x9, x13) DPK_QR(x2, x6, x10, x14)
    DPK_QR(x3, x7, x11, x15)
    DPK_QR(x0, x5, x10, x15) DPK_QR(x1, x6, x11, x12) DPK_QR(x2, x7, x8, x13)
    DPK_QR(x3, x4, x9, x14)
  }
  out[0] = x0 + i0; out[1] = x1 + i1; out[2] = x2 + i2; out[3] = x3 + i3;
  out[4] = x4 + key[0]; out[5] = x5 + key[1]; out[6] = x6 + key[2]; out[7] = x7 + key[3];
  out[8] = x8 + key[4]; out[9] = x9 + key[5]; out[10] = x10 + key[6]; out[11] = x11 + key[7];
  out[12] = x12 + counter; out[13] = x13 + nonce[0]; out[14] = x14 + nonce[1];
  out[15] = x15 + nonce[2];
}

#undef DPK_QR

DPK_HD uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
#endif
}

DPK_HD double double_of(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// `cond ? a : b` through bit masks: the conditions below are random bits of the keystream,
// and as branches they would be mispredicted half the time (3x slower on the CPU).
DPK_HD double select(bool cond, double a, double b) {
  const uint64_t mask = 0 - static_cast<uint64_t>(cond);
  return double_of((bits_of(a) & mask) | (bits_of(b) & ~mask));
}

// Natural log of a positive normal double: x = m 2^e with m in (sqrt(1/2), sqrt(2)], then
// log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172: the series to s^23 leaves a
// truncation error below 1e-18, so the result is within a few ulps.
DPK_HD double log_pos(double x) {
  const uint64_t b = bits_of(x);
  int e = static_cast<int>((b >> 52) & 0x7ff) - 1023;
  double m = double_of((b & 0x000fffffffffffffull) | 0x3ff0000000000000ull);  // [1, 2)
  const bool high = m > 1.4142135623730951;
  m = select(high, DPK_MUL(m, 0.5), m);  // exact
  e += high;
  const double s = DPK_DIV(DPK_SUB(m, 1.0), DPK_ADD(m, 1.0));
  const double s2 = DPK_MUL(s, s);
  const double c[12] = {1.0, 0.3333333333333333, 0.2, 0.14285714285714285,
                        0.1111111111111111, 0.09090909090909091, 0.07692307692307693,
                        0.06666666666666667, 0.058823529411764705, 0.05263157894736842,
                        0.047619047619047616, 0.043478260869565216};  // 1 / (2k + 1)
  double p = c[11];
  for (int k = 10; k >= 0; --k) p = DPK_ADD(DPK_MUL(p, s2), c[k]);
  const double log_m = DPK_MUL(DPK_MUL(2.0, s), p);
  // ln 2 split so that e * kLn2Hi is exact for |e| < 2^11
  const double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  const double de = static_cast<double>(e);
  return DPK_ADD(DPK_MUL(de, kLn2Hi), DPK_ADD(DPK_MUL(de, kLn2Lo), log_m));
}

// sin(y) and cos(y) for y in [0, pi/4]: Taylor series to y^17 and y^18 (next terms < 1e-19).
DPK_HD double sin_small(double y) {
  const double c[9] = {1.0, -0.16666666666666666, 0.008333333333333333,
                       -0.0001984126984126984, 2.7557319223985893e-06,
                       -2.505210838544172e-08, 1.6059043836821613e-10,
                       -7.647163731819816e-13, 2.8114572543455206e-15};  // (-1)^k / (2k+1)!
  const double y2 = DPK_MUL(y, y);
  double p = c[8];
  for (int k = 7; k >= 0; --k) p = DPK_ADD(DPK_MUL(p, y2), c[k]);
  return DPK_MUL(y, p);
}

DPK_HD double cos_small(double y) {
  const double c[10] = {1.0, -0.5, 0.041666666666666664, -0.001388888888888889,
                        2.48015873015873e-05, -2.755731922398589e-07, 2.08767569878681e-09,
                        -1.1470745597729725e-11, 4.779477332387385e-14,
                        -1.5619206968586225e-16};  // (-1)^k / (2k)!
  const double y2 = DPK_MUL(y, y);
  double p = c[9];
  for (int k = 8; k >= 0; --k) p = DPK_ADD(DPK_MUL(p, y2), c[k]);
  return p;
}

// cos(2 pi t) for t in [0, 1): quadrant from 4t (exact), then an angle in [0, pi/4].
DPK_HD double cos_2pi(double t) {
  const double x = DPK_MUL(t, 4.0);  // exact
  const int q = static_cast<int>(x);
  double f = DPK_SUB(x, static_cast<double>(q));  // exact, in [0, 1)
  // cos(pi/2 (q + f)) = cos(a), -sin(a), -cos(a), sin(a) for q = 0..3, a = pi/2 f
  // cos(pi/2 f) = sin(pi/2 (1 - f)) and vice versa; 1 - f is exact
  const bool flip = f > 0.5;
  f = select(flip, DPK_SUB(1.0, f), f);
  const bool use_sin = ((q & 1) != 0) != flip;
  const uint64_t negate = (q == 1 || q == 2) ? 1u : 0u;
  const double y = DPK_MUL(f, 1.5707963267948966);
  const double v = select(use_sin, sin_small(y), cos_small(y));
  return double_of(bits_of(v) ^ (negate << 63));  // -v
}

// A 53-bit uniform from a 64-bit draw: in (0, 1] (for the log) or [0, 1) (for the angle).
DPK_HD double open_unit(uint64_t w) {
  return DPK_MUL(static_cast<double>((w >> 11) + 1), 0x1p-53);
}
DPK_HD double closed_unit(uint64_t w) {
  return DPK_MUL(static_cast<double>(w >> 11), 0x1p-53);
}

DPK_HD double box_muller(uint64_t wu, uint64_t wt) {
  const double r = DPK_SQRT(DPK_MUL(-2.0, log_pos(open_unit(wu))));
  return DPK_MUL(r, cos_2pi(closed_unit(wt)));
}

// One standard normal from eight keystream words (two independent Box-Muller draws).
DPK_HD double normal_from_words(const uint32_t* w) {
  uint64_t d[4];
  for (int k = 0; k < 4; ++k)
    d[k] = static_cast<uint64_t>(w[2 * k]) | (static_cast<uint64_t>(w[2 * k + 1]) << 32);
  return DPK_MUL(DPK_ADD(box_muller(d[0], d[1]), box_muller(d[2], d[3])), 0.7071067811865475);
}

// The nonce of stream `stream`: its 64 bits, then a zero word.
DPK_HD void stream_nonce(uint64_t stream, uint32_t nonce[3]) {
  nonce[0] = static_cast<uint32_t>(stream);
  nonce[1] = static_cast<uint32_t>(stream >> 32);
  nonce[2] = 0u;
}

// One output element: std * z rounded to T (the only rounding below float64).
template <typename T>
DPK_HD T scaled_normal(const uint32_t* w, double std_dev) {
  return static_cast<T>(DPK_MUL(std_dev, normal_from_words(w)));
}

// The blocks that hold stream elements [offset, offset + numel): element e of a stream is in
// block e / 2, so a draw that starts at an odd offset begins in the middle of a block.
DPK_HD int64_t first_block(int64_t offset) { return offset / kElementsPerBlock; }
DPK_HD int64_t end_block(int64_t offset, int64_t numel) {
  return (offset + numel + kElementsPerBlock - 1) / kElementsPerBlock;
}

// Block `block` of the stream, for a draw of stream elements [offset, end) into `out`
// (stream element e goes to out[e - offset]): each of the block's two elements is written if
// it lies in [offset, end).  One call per block is the CUDA kernel's thread (the CPU kernel
// runs the same arithmetic over a batch of blocks; the CPU op secure_normal_per_block_ runs
// this function, so the tests check its indexing without a GPU).  Constant word offsets (no
// loop over the elements) keep the block in registers on the device.
template <typename T>
DPK_HD void normal_block(const uint32_t key[8], const uint32_t nonce[3], uint32_t block,
                         double std_dev, T* out, int64_t offset, int64_t end) {
  static_assert(kElementsPerBlock == 2, "normal_block writes two elements per block");
  uint32_t w[kBlockWords];
  chacha20_block(key, block, nonce, w);
  const int64_t e = static_cast<int64_t>(block) * kElementsPerBlock;
  if (e >= offset && e < end) out[e - offset] = scaled_normal<T>(w, std_dev);
  if (e + 1 >= offset && e + 1 < end)
    out[e + 1 - offset] = scaled_normal<T>(w + kWordsPerElement, std_dev);
}

}  // namespace dpk
