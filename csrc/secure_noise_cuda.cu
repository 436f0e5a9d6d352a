// CUDA kernel of dpkernels::secure_normal_: one thread per ChaCha20 block (two elements),
// the same header functions as the CPU op, so the two give the same bits.
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

template <typename T>
__global__ void secure_normal_kernel(T* __restrict__ out, int64_t numel, Key k, double std_dev) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = b * dpk::kElementsPerBlock;
  if (first >= numel) return;
  const int64_t left = numel - first;
  const int count = left < dpk::kElementsPerBlock ? static_cast<int>(left) : dpk::kElementsPerBlock;
  dpk::normal_block<T>(k.key, k.nonce, static_cast<uint32_t>(b), std_dev, out + first, count);
}

void secure_normal_cuda(at::Tensor& out, at::IntArrayRef key, int64_t stream, double std_dev) {
  Key k;
  dpk::check_normal_args(out, key, stream, std_dev, at::kCUDA, k.key);
  dpk::stream_nonce(static_cast<uint64_t>(stream), k.nonce);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t blocks = (numel + dpk::kElementsPerBlock - 1) / dpk::kElementsPerBlock;
  const int threads = 256;
  const int64_t grid = (blocks + threads - 1) / threads;
  TORCH_CHECK(grid <= 0x7fffffffLL, "dpkernels::secure_normal_: out is too large for one launch");
  cudaStream_t s = c10::cuda::getCurrentCUDAStream();
  if (out.scalar_type() == at::kFloat)
    secure_normal_kernel<float><<<static_cast<unsigned>(grid), threads, 0, s>>>(
        out.data_ptr<float>(), numel, k, std_dev);
  else
    secure_normal_kernel<double><<<static_cast<unsigned>(grid), threads, 0, s>>>(
        out.data_ptr<double>(), numel, k, std_dev);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(dpkernels, CUDA, m) { m.impl("secure_normal_", &secure_normal_cuda); }
