// CUDA kernel of dpkernels::secure_normal_: one thread per ChaCha20 block (two elements),
// the same header functions as the CPU op, so the two give the same bits.  The thread's work
// is dpk::normal_block, which the CPU test op secure_normal_per_block_ also runs.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "secure_noise.h"
#include "secure_noise_checks.h"

namespace {

struct Key {
  uint32_t key[8];
  uint32_t nonce[3];
};

// Thread t draws block first_block(offset) + t: stream elements [offset, end) go to
// out[0, end - offset).
template <typename T>
__global__ void secure_normal_kernel(T* __restrict__ out, int64_t offset, int64_t end,
                                     int64_t blocks, Key k, double std_dev) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= blocks) return;
  const int64_t b = dpk::first_block(offset) + t;
  dpk::normal_block<T>(k.key, k.nonce, static_cast<uint32_t>(b), std_dev, out, offset, end);
}

void secure_normal_cuda(at::Tensor& out, at::IntArrayRef key, int64_t stream, double std_dev,
                        int64_t offset) {
  Key k;
  dpk::check_normal_args(out, key, stream, std_dev, offset, at::kCUDA, k.key);
  dpk::stream_nonce(static_cast<uint64_t>(stream), k.nonce);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t blocks = dpk::end_block(offset, numel) - dpk::first_block(offset);
  const int threads = 256;
  const int64_t grid = (blocks + threads - 1) / threads;
  TORCH_CHECK(grid <= 0x7fffffffLL, "dpkernels::secure_normal_: out is too large for one launch");
  cudaStream_t s = c10::cuda::getCurrentCUDAStream();
  if (out.scalar_type() == at::kFloat)
    secure_normal_kernel<float><<<static_cast<unsigned>(grid), threads, 0, s>>>(
        out.data_ptr<float>(), offset, offset + numel, blocks, k, std_dev);
  else
    secure_normal_kernel<double><<<static_cast<unsigned>(grid), threads, 0, s>>>(
        out.data_ptr<double>(), offset, offset + numel, blocks, k, std_dev);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(dpkernels, CUDA, m) { m.impl("secure_normal_", &secure_normal_cuda); }
