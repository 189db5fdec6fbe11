// A small driver for LLVMFuzzerTestOneInput targets where libFuzzer is not available (the
// project's gcc): replays a corpus, then mutates it for a time budget. Without coverage
// instrumentation it keeps an input when it produces a new outcome (target, status, first words
// of the message), which steers it through the validation paths; for coverage-guided runs build
// the same target with clang -fsanitize=fuzzer (tools/fuzz.sh).
//
//   standalone_fuzzer [--seconds=S] [--seed=N] [--max_len=N] [--save_corpus=DIR]
//                     [--crash_file=PATH] CORPUS_DIR_OR_FILE...
//
// A target aborts on a finding; before each input the driver writes it to --crash_file (default
// $TEST_UNDECLARED_OUTPUTS_DIR/crash-input or ./crash-input), so the file that is left is the
// reproducer: `standalone_fuzzer --seconds=0 crash-input`.
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "mxmoe/mxmoe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

using Input = std::vector<uint8_t>;

bool ReadFile(const std::string& path, Input* out) {
  FILE* f = fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  out->clear();
  uint8_t buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), f)) > 0) out->insert(out->end(), buffer, buffer + n);
  fclose(f);
  return true;
}

void WriteFile(const std::string& path, const Input& data) {
  FILE* f = fopen(path.c_str(), "wb");
  if (f == nullptr) return;
  if (!data.empty()) fwrite(data.data(), 1, data.size(), f);
  fclose(f);
}

void AddCorpus(const std::string& path, std::vector<Input>* corpus) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    fprintf(stderr, "corpus path %s does not exist\n", path.c_str());
    exit(2);
  }
  if (!S_ISDIR(st.st_mode)) {
    Input data;
    if (ReadFile(path, &data)) corpus->push_back(data);
    return;
  }
  DIR* dir = opendir(path.c_str());
  std::vector<std::string> names;
  while (dirent* entry = readdir(dir)) {
    if (entry->d_name[0] != '.') names.push_back(entry->d_name);
  }
  closedir(dir);
  std::sort(names.begin(), names.end());  // reproducible order
  for (const std::string& name : names) AddCorpus(path + "/" + name, corpus);
}

// libFuzzer-style mutations: bit flips, interesting bytes, insert/erase, copy a chunk, splice.
Input Mutate(const Input& base, const std::vector<Input>& corpus, std::mt19937_64* rng,
             size_t max_len) {
  Input out = base;
  const int steps = 1 + (*rng)() % 4;
  static constexpr uint8_t kInteresting[] = {0, 1, 2, 31, 32, 33, 127, 128, 129, 255, 0x7F, 0x80};
  for (int step = 0; step < steps; ++step) {
    const size_t n = out.size();
    switch ((*rng)() % 7) {
      case 0:
        if (n) out[(*rng)() % n] ^= static_cast<uint8_t>(1u << ((*rng)() % 8));
        break;
      case 1:
        if (n) out[(*rng)() % n] = kInteresting[(*rng)() % sizeof(kInteresting)];
        break;
      case 2:
        if (n) out[(*rng)() % n] = static_cast<uint8_t>((*rng)());
        break;
      case 3:
        if (n < max_len) out.insert(out.begin() + ((*rng)() % (n + 1)), static_cast<uint8_t>((*rng)()));
        break;
      case 4:
        if (n > 1) out.erase(out.begin() + ((*rng)() % n));
        break;
      case 5:
        if (n > 2) {
          const size_t from = (*rng)() % n;
          const size_t len = 1 + (*rng)() % std::min<size_t>(8, n - from);
          const size_t to = (*rng)() % n;
          Input chunk(out.begin() + from, out.begin() + from + len);
          out.insert(out.begin() + to, chunk.begin(), chunk.end());
        }
        break;
      default:
        if (!corpus.empty()) {
          const Input& other = corpus[(*rng)() % corpus.size()];
          const size_t cut = n ? (*rng)() % n : 0;
          out.resize(cut);
          const size_t from = other.empty() ? 0 : (*rng)() % other.size();
          out.insert(out.end(), other.begin() + from, other.end());
        }
        break;
    }
  }
  if (out.size() > max_len) out.resize(max_len);
  return out;
}

// The outcome of the last call: its first byte (the target), status and message with digits
// dropped (so "got 48" and "got 49" are one outcome).
std::string Outcome(const Input& input) {
  std::string key = std::to_string(input.empty() ? 0 : input[0] % 11) + ":";
  for (const char* p = mxmoe_last_error(); *p && key.size() < 64; ++p) {
    if (*p < '0' || *p > '9') key += *p;
  }
  return key;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 5;
  uint64_t seed = 1;
  size_t max_len = 256;
  std::string save_corpus;
  std::string crash_file;
  if (const char* dir = getenv("TEST_UNDECLARED_OUTPUTS_DIR")) {
    crash_file = std::string(dir) + "/crash-input";
  } else {
    crash_file = "crash-input";
  }
  std::vector<Input> corpus;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--seconds=", 0) == 0) {
      seconds = atof(arg.c_str() + 10);
    } else if (arg.rfind("--seed=", 0) == 0) {
      seed = strtoull(arg.c_str() + 7, nullptr, 10);
    } else if (arg.rfind("--max_len=", 0) == 0) {
      max_len = strtoull(arg.c_str() + 10, nullptr, 10);
    } else if (arg.rfind("--save_corpus=", 0) == 0) {
      save_corpus = arg.substr(14);
    } else if (arg.rfind("--crash_file=", 0) == 0) {
      crash_file = arg.substr(13);
    } else {
      AddCorpus(arg, &corpus);
    }
  }
  if (const char* s = getenv("MXMOE_FUZZ_SECONDS")) seconds = atof(s);
  if (const char* s = getenv("MXMOE_FUZZ_SEED")) seed = strtoull(s, nullptr, 10);

  size_t runs = 0;
  std::set<std::string> outcomes;
  auto run = [&](const Input& input) {
    WriteFile(crash_file, input);  // left behind only if the target aborts
    LLVMFuzzerTestOneInput(input.data(), input.size());
    ++runs;
    return outcomes.insert(Outcome(input)).second;
  };
  for (const Input& input : corpus) run(input);
  const size_t replayed = runs;
  std::mt19937_64 rng(seed);
  std::vector<Input> pool = corpus;
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  while (elapsed() < seconds) {
    Input input;
    if (pool.empty() || rng() % 8 == 0) {
      input.resize(rng() % max_len);
      for (uint8_t& b : input) b = static_cast<uint8_t>(rng());
    } else {
      input = Mutate(pool[rng() % pool.size()], pool, &rng, max_len);
    }
    if (run(input)) {
      pool.push_back(input);
      if (!save_corpus.empty()) {
        WriteFile(save_corpus + "/outcome-" + std::to_string(pool.size()), input);
      }
    }
  }
  remove(crash_file.c_str());
  printf("standalone fuzzer: %zu inputs (%zu from the corpus) in %.1f s, %zu distinct outcomes, "
         "no finding\n",
         runs, replayed, elapsed(), outcomes.size());
  return 0;
}
