// WorkspaceCarver (cc/base/workspace.h): measured size == what carving needs at any base
// alignment, slices 256-byte aligned and disjoint, overflow fails with WORKSPACE_TOO_SMALL naming
// the slice, empty slices take no space.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <vector>

#include "cc/base/workspace.h"
#include "tests/cc/expect.h"

namespace {

using mxmoe_test::failures;

struct Slices {
  float* logits;
  int32_t* ids;
  uint8_t* empty;
  uint16_t* rows;
};

mxmoe_status Carve(mxmoe::WorkspaceCarver* carver, Slices* s) {
  MXMOE_RETURN_IF_ERROR(carver->Carve("logits", 1000, &s->logits));
  MXMOE_RETURN_IF_ERROR(carver->Carve("ids", 3, &s->ids));
  MXMOE_RETURN_IF_ERROR(carver->Carve("empty", 0, &s->empty));
  MXMOE_RETURN_IF_ERROR(carver->Carve("rows", 777, &s->rows));
  return MXMOE_STATUS_OK;
}

}  // namespace

int main() {
  mxmoe::WorkspaceCarver measure;
  Slices s;
  EXPECT(Carve(&measure, &s) == MXMOE_STATUS_OK, "measuring failed");
  const size_t needed = measure.RequiredBytes();
  // 4000 -> 4096, 12 -> 256, 0 -> 0, 1554 -> 1792, plus 255 bytes of base-alignment slack.
  EXPECT(needed == 4096 + 256 + 1792 + 255, "measured %zu", needed);
  EXPECT(mxmoe::WorkspaceCarver().RequiredBytes() == 0, "nothing measured must need 0 bytes");

  std::vector<uint8_t> buffer(needed + 512);
  for (size_t offset = 0; offset < 300; offset += 37) {
    mxmoe::WorkspaceCarver carver(buffer.data() + offset, needed);
    Slices c;
    EXPECT(Carve(&carver, &c) == MXMOE_STATUS_OK, "base offset %zu: %s", offset,
           mxmoe::LastError());
    const uintptr_t lo = reinterpret_cast<uintptr_t>(buffer.data() + offset);
    const uintptr_t hi = lo + needed;
    EXPECT(reinterpret_cast<uintptr_t>(c.logits) % 256 == 0 &&
               reinterpret_cast<uintptr_t>(c.ids) % 256 == 0 &&
               reinterpret_cast<uintptr_t>(c.rows) % 256 == 0,
           "base offset %zu: slices not 256-byte aligned", offset);
    EXPECT(reinterpret_cast<uintptr_t>(c.logits) >= lo &&
               reinterpret_cast<uintptr_t>(c.logits + 1000) <= reinterpret_cast<uintptr_t>(c.ids) &&
               reinterpret_cast<uintptr_t>(c.ids + 3) <= reinterpret_cast<uintptr_t>(c.rows) &&
               reinterpret_cast<uintptr_t>(c.rows + 777) <= hi,
           "base offset %zu: slices overlap or leave the buffer", offset);
    EXPECT(c.empty == nullptr, "an empty slice has no address");
  }
  // One byte short at the worst alignment (base = 1 mod 256: 255 bytes lost to alignment; the
  // last slice ends at 255 + 4096 + 256 + 1554): the failure names the slice that did not fit.
  const size_t misalign = (257 - reinterpret_cast<uintptr_t>(buffer.data()) % 256) % 256;
  mxmoe::WorkspaceCarver small(buffer.data() + misalign, 255 + 4096 + 256 + 1554 - 1);
  Slices c;
  const mxmoe_status status = Carve(&small, &c);
  EXPECT(status == MXMOE_STATUS_WORKSPACE_TOO_SMALL, "status %d", status);
  EXPECT(std::string(mxmoe::LastError()).find("slice 'rows'") != std::string::npos &&
             std::string(mxmoe::LastError()).find("1554 bytes") != std::string::npos,
         "message: %s", mxmoe::LastError());
  if (failures != 0) {
    fprintf(stderr, "workspace_test: %d failure(s)\n", failures);
    return 1;
  }
  printf("workspace_test: all passed (%s)\n", "carving at 9 base alignments");
  return 0;
}
