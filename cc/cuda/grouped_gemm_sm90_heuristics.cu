// Tile configuration choice for the SM90 grouped GEMM (see the header for the reasoning). Host
// code only; a .cu so that the cc/cuda glob builds it.
#include "cc/cuda/grouped_gemm_sm90_heuristics.h"

#include "cc/cuda/grouped_gemm_sm90_kernel.h"
#include "cc/cuda/grouped_gemm_sm90_layout.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <mutex>
#include <set>

namespace mxmoe {
namespace cuda {
namespace sm90 {

std::string GemmProblem::ToString() const {
  return "rows=" + std::to_string(rows) + " n=" + std::to_string(n) + " k=" + std::to_string(k) +
         " experts=" + std::to_string(num_experts) + " sms=" + std::to_string(num_sms);
}

std::string GemmConfig::ToString() const {
  return "block_m(weights)=128 block_n(tokens)=" + std::to_string(block_n) +
         " block_k=128 grid=" + std::to_string(grid) + " pingpong=" + (pingpong ? "1" : "0") +
         " gemv=" + (gemv ? "1" : "0");
}

namespace {

bool GemvFits(const GemmProblem& problem) {
  return GemvSmemBytes(problem.num_experts, problem.k) <= kGemvSmemLimit;
}

}  // namespace

GemmConfig ChooseGemmConfig(const GemmProblem& problem) {
  GemmConfig config;
  const double per_expert =
      static_cast<double>(problem.rows) / (problem.num_experts > 0 ? problem.num_experts : 1);
  // Routing is uneven: leave headroom of ~1.5x the average before widening the tile.
  const double want = per_expert * 1.5;
  if (want <= 16) {
    config.block_n = 16;
  } else if (want <= 32) {
    config.block_n = 32;
  } else if (want <= 64) {
    config.block_n = 64;
  } else {
    config.block_n = 128;
  }
  config.grid = (problem.num_sms > 0 ? problem.num_sms : 132) * GemmCtasPerSm(config.block_n);
  config.gemv = GemvFits(problem) &&
                (problem.rows <= kGemvMaxRows ||
                 (problem.rows <= kGemvWideMaxRows && GemvWaves(problem) <= kGemvWideMaxWaves));
  return config;
}

int64_t GemvWaves(const GemmProblem& problem) {
  const int64_t active = std::min<int64_t>(problem.rows, std::max<int32_t>(problem.num_experts, 1));
  const int64_t ctas = std::max<int64_t>(active, 1) * NumPanels(problem.n);
  const int64_t slots = int64_t{kGemvCtasPerSm} * (problem.num_sms > 0 ? problem.num_sms : 132);
  return std::max<int64_t>(1, (ctas + slots - 1) / slots);
}

GemmConfig ChooseGemmConfigWithOverride(const GemmProblem& problem) {
  GemmConfig config = ChooseGemmConfig(problem);
  if (const char* forced = getenv("MXMOE_SM90_BLOCK_N")) {
    const int v = atoi(forced);
    for (int choice : kBlockNChoices) {
      if (v == choice) config.block_n = v;
    }
    config.grid = (problem.num_sms > 0 ? problem.num_sms : 132) * GemmCtasPerSm(config.block_n);
    config.gemv = false;  // a forced token tile is a WGMMA kernel's
  }
  if (const char* pp = getenv("MXMOE_SM90_PINGPONG")) config.pingpong = atoi(pp) != 0;
  if (const char* gv = getenv("MXMOE_SM90_GEMV")) config.gemv = atoi(gv) != 0 && GemvFits(problem);
  const char* print = getenv("MXMOE_PRINT_CONFIG");
  if (print != nullptr && strcmp(print, "1") == 0) {
    static std::mutex mu;
    static std::set<std::string>* printed = new std::set<std::string>();
    const std::string line = problem.ToString() + " -> " + config.ToString();
    std::lock_guard<std::mutex> lock(mu);
    if (printed->insert(line).second) {
      fprintf(stderr, "mxmoe sm90 grouped_gemm: %s\n", line.c_str());
    }
  }
  return config;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace mxmoe
