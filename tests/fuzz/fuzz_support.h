// Building blocks of the C API fuzzer (c_api_fuzzer.cc): a decoder that turns fuzz bytes into
// dimensions, enums and metadata biased towards the values that break validation (0, block
// edges, int32/int64 limits), and host buffers of exactly a documented size, poisoned, whose
// every byte is compared after a call.
//
// A buffer whose documented size overflows or exceeds kMaxBufferBytes is passed as NULL: the
// library must then fail (it cannot be given memory it would legitimately use), and a call that
// succeeds with it is a finding. Sizes are computed here independently of the library, with
// checked arithmetic.
#ifndef MXMOE_TESTS_FUZZ_FUZZ_SUPPORT_H_
#define MXMOE_TESTS_FUZZ_FUZZ_SUPPORT_H_

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <limits>
#include <string>
#include <vector>

#include "mxmoe/mxmoe.h"

namespace mxmoe_fuzz {

constexpr uint8_t kPoison = 0xA5;
constexpr size_t kMaxBufferBytes = size_t{1} << 20;  // keeps one run of the CPU backend ~ms
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// Reports a broken promise of the C API and aborts (libFuzzer and the standalone driver both
// save the input that got here).
[[noreturn]] inline void Finding(const char* target, const std::string& what) {
  fprintf(stderr, "\nmxmoe fuzz finding in %s: %s\nlast error: %s\n", target, what.c_str(),
          mxmoe_last_error());
  fflush(stderr);
  abort();
}

// Reads the fuzz input front to back; past its end every read is 0 (so short inputs decode to
// small, mostly valid calls).
class Decoder {
 public:
  Decoder(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  uint32_t U32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = v << 8 | Byte();
    return v;
  }
  uint64_t U64() { return uint64_t{U32()} << 32 | U32(); }
  bool Chance(int percent) { return Byte() % 100 < percent; }

  // A value that validation must handle: 0/1, block and tile edges, int32 and int64 limits,
  // negatives.
  int64_t Edge() {
    static constexpr int64_t kEdges[] = {0,
                                         1,
                                         2,
                                         31,
                                         32,
                                         33,
                                         64,
                                         127,
                                         128,
                                         129,
                                         2880,
                                         65536,
                                         65537,
                                         (int64_t{1} << 31) - 1,
                                         int64_t{1} << 31,
                                         int64_t{1} << 32,
                                         int64_t{1} << 40,
                                         (int64_t{1} << 62) + 32,
                                         int64_t{1} << 62,
                                         kInt64Max,
                                         kInt64Max - 31,
                                         -1,
                                         -32,
                                         std::numeric_limits<int64_t>::min()};
    return kEdges[Byte() % (sizeof(kEdges) / sizeof(kEdges[0]))];
  }

  // A dimension in [0, small] most of the time, an edge value otherwise.
  int64_t Dim(int64_t small, int edge_percent = 8) {
    if (Chance(edge_percent)) return Edge();
    return static_cast<int64_t>(U32() % static_cast<uint32_t>(small + 1));
  }

  // A K-like dimension: a multiple of 32 in [0, 32 * blocks] most of the time.
  int64_t BlockDim(int64_t blocks, int edge_percent = 8) {
    if (Chance(edge_percent)) return Edge();
    const int64_t k = 32 * static_cast<int64_t>(Byte() % (blocks + 1));
    return Chance(4) ? k + 1 + Byte() % 31 : k;
  }

  // An enum: one of the `count` valid values 0..count-1, sometimes an invalid one.
  int32_t Enum(int32_t count) {
    if (Chance(5)) {
      static constexpr int32_t kBad[] = {-1, 7, 255, std::numeric_limits<int32_t>::max(),
                                         std::numeric_limits<int32_t>::min()};
      return kBad[Byte() % 5];
    }
    return Byte() % count;
  }

  // num_experts-like: [1, small] mostly; 0, negatives, 65536, 65537, INT32 limits sometimes.
  int32_t Experts(int32_t small) {
    if (Chance(6)) {
      static constexpr int32_t kBad[] = {0, -1, 65536, 65537, std::numeric_limits<int32_t>::max()};
      return kBad[Byte() % 5];
    }
    return 1 + Byte() % small;
  }

  mxmoe_device Device() {
    if (!Chance(6)) return {MXMOE_DEVICE_CPU, 0};
    static constexpr mxmoe_device kOthers[] = {
        {MXMOE_DEVICE_CUDA, 0}, {MXMOE_DEVICE_CPU, 1}, {7, 0}, {MXMOE_DEVICE_CUDA, -1}};
    return kOthers[Byte() % 4];
  }

  size_t remaining() const { return pos_ < size_ ? size_ - pos_ : 0; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Product of `dims` times `element_bytes`, or -1 when a dim is negative or it overflows int64.
inline int64_t CheckedBytes(std::initializer_list<int64_t> dims, int64_t element_bytes) {
  int64_t total = element_bytes;
  for (int64_t d : dims) {
    if (d < 0) return -1;
    if (d != 0 && total > kInt64Max / d) return -1;
    total *= d;
  }
  return total;
}

inline int64_t RoundUpOr(int64_t x, int64_t m) {
  if (x < 0 || x > kInt64Max - m) return -1;
  return (x + m - 1) / m * m;
}

// One host buffer of a documented size (malloc'ed exactly, so ASan sees one byte past it), or
// NULL when that size is invalid or too large. Inputs are filled from the decoder, outputs
// poisoned; Unchanged() compares every byte with the state before the call.
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { free(ptr_); }

  // `bytes` < 0 (invalid) or > the cap: NULL. Zero bytes: NULL or a 0-byte allocation.
  void Allocate(int64_t bytes, Decoder* in, bool is_output) {
    free(ptr_);
    ptr_ = nullptr;
    size_ = 0;
    valid_ = bytes >= 0 && static_cast<uint64_t>(bytes) <= kMaxBufferBytes;
    if (!valid_) return;
    size_ = static_cast<size_t>(bytes);
    if (size_ == 0 && in->Chance(50)) return;  // NULL is documented as fine for 0 bytes
    ptr_ = static_cast<uint8_t*>(malloc(size_ == 0 ? 0 : size_));
    if (ptr_ == nullptr && size_ > 0) abort();
    if (is_output) {
      if (size_ > 0) memset(ptr_, kPoison, size_);
    } else {
      FillFrom(in);
    }
    snapshot_.assign(ptr_, ptr_ + size_);
  }

  // Input bytes: a short pattern from the decoder, repeated (fuzz bytes are few).
  void FillFrom(Decoder* in) {
    uint8_t pattern[8];
    for (uint8_t& b : pattern) b = in->Byte();
    const uint8_t mode = in->Byte() % 4;
    for (size_t i = 0; i < size_; ++i) {
      // Mode 0: the pattern; 1: a small pseudo-random stream; 2: zeros; 3: one byte value.
      ptr_[i] = mode == 0   ? pattern[i % 8]
                : mode == 1 ? static_cast<uint8_t>((i * 2654435761u >> 13) ^ pattern[i % 8])
                : mode == 2 ? 0
                            : pattern[0];
    }
  }

  // After the bytes were edited on purpose (metadata written by the fuzzer).
  void Resnapshot() { snapshot_.assign(ptr_, ptr_ + size_); }

  bool Unchanged() const { return size_ == 0 || memcmp(ptr_, snapshot_.data(), size_) == 0; }
  // Bytes [begin, end) still hold the poison.
  bool PoisonedRange(size_t begin, size_t end) const {
    for (size_t i = begin; i < end && i < size_; ++i) {
      if (ptr_[i] != kPoison) return false;
    }
    return true;
  }

  uint8_t* data() const { return ptr_; }
  size_t size() const { return size_; }
  // The documented size was valid and within the cap (so the library may legitimately use it).
  bool usable() const { return valid_ && (size_ == 0 || ptr_ != nullptr); }

 private:
  uint8_t* ptr_ = nullptr;
  size_t size_ = 0;
  bool valid_ = false;
  std::vector<uint8_t> snapshot_;
};

// int32 metadata in a Buffer.
inline void PutI32(Buffer* b, int64_t index, int32_t v) {
  if (b->data() != nullptr && (index + 1) * 4 <= static_cast<int64_t>(b->size())) {
    memcpy(b->data() + index * 4, &v, 4);
  }
}

inline int32_t GetI32(const Buffer& b, int64_t index) {
  int32_t v = 0;
  if (b.data() != nullptr && (index + 1) * 4 <= static_cast<int64_t>(b.size())) {
    memcpy(&v, b.data() + index * 4, 4);
  }
  return v;
}

}  // namespace mxmoe_fuzz

#endif  // MXMOE_TESTS_FUZZ_FUZZ_SUPPORT_H_
