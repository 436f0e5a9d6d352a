// The dpkernels._C extension: secure Gaussian noise ops (torch.library namespace
// "dpkernels"), their CPU kernels, and dpkernels::with_cuda(), which says whether the CUDA
// kernels (secure_noise_cuda.cu) were compiled in.
// Only the headers it needs (not torch/extension.h): the build is part of every install.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "secure_noise.h"
#include "secure_noise_checks.h"

namespace {

// Bytes of blocks [counter, counter + num_blocks) of the RFC 8439 keystream (for the tests).
at::Tensor chacha20_keystream(at::IntArrayRef key, at::IntArrayRef nonce, int64_t counter,
                              int64_t num_blocks) {
  uint32_t k[8], n[3];
  dpk::check_words(key, 8, "key", "dpkernels::chacha20_keystream", k);
  dpk::check_words(nonce, 3, "nonce", "dpkernels::chacha20_keystream", n);
  TORCH_CHECK(num_blocks >= 0, "dpkernels::chacha20_keystream: num_blocks must be >= 0, got ",
              num_blocks);
  TORCH_CHECK(counter >= 0 && counter + num_blocks <= (int64_t(1) << 32),
              "dpkernels::chacha20_keystream: blocks [counter, counter + num_blocks) must lie "
              "in the 32-bit block counter range [0, 2^32), got counter=", counter,
              " num_blocks=", num_blocks);
  at::Tensor out = at::empty({num_blocks * 64}, at::kByte);
  uint8_t* p = out.data_ptr<uint8_t>();
  for (int64_t b = 0; b < num_blocks; ++b) {
    uint32_t w[16];
    dpk::chacha20_block(k, static_cast<uint32_t>(counter + b), n, w);
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 4; ++j) p[b * 64 + 4 * i + j] = static_cast<uint8_t>(w[i] >> (8 * j));
  }
  return out;
}

// Stream elements [offset, offset + numel) into out[0, numel): the keystream of a batch of
// blocks first, then the normals from it (an L1-sized buffer): 1.5x faster on the CPU than
// dpk::normal_block's block-then-normals, same arithmetic.
template <typename T>
void fill_cpu(T* out, int64_t numel, int64_t offset, const uint32_t key[8],
              const uint32_t nonce[3], double std_dev) {
  constexpr int64_t kBatch = 32;
  const int64_t end = offset + numel;
  at::parallel_for(dpk::first_block(offset), dpk::end_block(offset, numel), 2048,
                   [&](int64_t begin, int64_t stop) {
    uint32_t w[kBatch * dpk::kBlockWords];
    for (int64_t b0 = begin; b0 < stop; b0 += kBatch) {
      const int64_t nb = std::min(kBatch, stop - b0);
      for (int64_t j = 0; j < nb; ++j)
        dpk::chacha20_block(key, static_cast<uint32_t>(b0 + j), nonce, w + dpk::kBlockWords * j);
      // the stream elements of these blocks that the draw covers
      const int64_t first = b0 * dpk::kElementsPerBlock;
      const int64_t lo = std::max(first, offset);
      const int64_t hi = std::min(first + nb * dpk::kElementsPerBlock, end);
      for (int64_t e = lo; e < hi; ++e)
        out[e - offset] = dpk::scaled_normal<T>(w + dpk::kWordsPerElement * (e - first), std_dev);
    }
  });
}

void secure_normal_cpu(at::Tensor& out, at::IntArrayRef key, int64_t stream, double std_dev,
                       int64_t offset) {
  uint32_t k[8];
  dpk::check_normal_args(out, key, stream, std_dev, offset, at::kCPU, k);
  uint32_t n[3];
  dpk::stream_nonce(static_cast<uint64_t>(stream), n);
  if (out.scalar_type() == at::kFloat)
    fill_cpu<float>(out.data_ptr<float>(), out.numel(), offset, k, n, std_dev);
  else
    fill_cpu<double>(out.data_ptr<double>(), out.numel(), offset, k, n, std_dev);
}

// The CUDA kernel's per-thread code (dpk::normal_block, one call per block) run serially on
// the CPU: for the tests, which check its indexing (odd offsets, partial blocks) against
// fill_cpu where no GPU is present.  Same arguments and checks as secure_normal_.
template <typename T>
void fill_per_block(T* out, int64_t numel, int64_t offset, const uint32_t key[8],
                    const uint32_t nonce[3], double std_dev) {
  for (int64_t b = dpk::first_block(offset); b < dpk::end_block(offset, numel); ++b)
    dpk::normal_block<T>(key, nonce, static_cast<uint32_t>(b), std_dev, out, offset,
                         offset + numel);
}

void secure_normal_per_block_cpu(at::Tensor& out, at::IntArrayRef key, int64_t stream,
                                 double std_dev, int64_t offset) {
  uint32_t k[8];
  dpk::check_normal_args(out, key, stream, std_dev, offset, at::kCPU, k);
  uint32_t n[3];
  dpk::stream_nonce(static_cast<uint64_t>(stream), n);
  if (out.scalar_type() == at::kFloat)
    fill_per_block<float>(out.data_ptr<float>(), out.numel(), offset, k, n, std_dev);
  else
    fill_per_block<double>(out.data_ptr<double>(), out.numel(), offset, k, n, std_dev);
}

bool with_cuda() {
#ifdef DPK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(dpkernels, m) {
  m.def("chacha20_keystream(int[] key, int[] nonce, int counter, int num_blocks) -> Tensor",
        &chacha20_keystream);
  // out <- std * z, z = elements [offset, offset + numel) of the N(0, 1) i.i.d. sequence of
  // stream `stream` of the ChaCha20 key `key` (a draw in chunks equals the whole draw)
  m.def("secure_normal_(Tensor(a!) out, int[] key, int stream, float std, int offset=0) -> ()");
  // the same values through the CUDA kernel's per-block code, on the CPU (tests only)
  m.def("secure_normal_per_block_(Tensor(a!) out, int[] key, int stream, float std, "
        "int offset=0) -> ()");
  m.def("with_cuda() -> bool", &with_cuda);
}

TORCH_LIBRARY_IMPL(dpkernels, CPU, m) {
  m.impl("secure_normal_", &secure_normal_cpu);
  m.impl("secure_normal_per_block_", &secure_normal_per_block_cpu);
}

// Importing dpkernels._C runs the registrations above; the module itself is empty.
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
