// Host-side argument checks shared by the CPU and CUDA ops (messages name the op and the
// argument, and say what is expected).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "secure_noise.h"

namespace dpk {

inline void check_words(at::IntArrayRef words, size_t count, const char* name, const char* op,
                        uint32_t* out) {
  TORCH_CHECK(words.size() == count, op, ": ", name, " must be ", count,
              " 32-bit words (little-endian, as RFC 8439 reads its bytes), got ", words.size());
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK(words[i] >= 0 && words[i] <= 0xffffffffLL, op, ": ", name, "[", i,
                "] must be in [0, 2^32), got ", words[i]);
    out[i] = static_cast<uint32_t>(words[i]);
  }
}

inline void check_normal_args(const at::Tensor& out, at::IntArrayRef key, int64_t stream,
                              double std_dev, int64_t offset, c10::DeviceType device,
                              uint32_t* k) {
  const char* op = "dpkernels::secure_normal_";
  check_words(key, 8, "key", op, k);
  TORCH_CHECK(out.device().type() == device, op, ": out is on ", out.device(),
              " but this kernel runs on ", c10::DeviceTypeName(device));
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, op,
              ": out must be float32 or float64 (noise is drawn in float64 and rounded), got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(stream >= 0, op, ": stream must be >= 0, got ", stream);
  TORCH_CHECK(std::isfinite(std_dev) && std_dev >= 0, op,
              ": std must be finite and >= 0, got ", std_dev);
  TORCH_CHECK(offset >= 0, op, ": offset (the position in the stream of out's first "
              "element) must be >= 0, got ", offset);
  // 2 elements per block and a 32-bit block counter: one stream covers 2^33 elements
  constexpr int64_t kStreamElements = int64_t(kElementsPerBlock) << 32;
  TORCH_CHECK(out.numel() <= kStreamElements && offset <= kStreamElements - out.numel(), op,
              ": stream elements [offset, offset + numel) with offset=", offset, " and numel=",
              out.numel(), " do not fit in one stream, which holds 2^33 elements; split the "
              "tensor over several streams");
}

}  // namespace dpk
