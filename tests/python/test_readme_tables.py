"""The README's H200 MoE tables are bench/results/h200-moe.json's: every table row that
bench/readme_tables.py prints from the file appears in README.md verbatim, and so does the
commit the file records. A new benchmark run without a README update (or the reverse) fails."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def test_readme_tables_come_from_the_result_file():
    script = os.path.join(ROOT, "bench", "readme_tables.py")
    result = os.path.join(ROOT, "bench", "results", "h200-moe.json")
    out = subprocess.run([sys.executable, script, result], check=True, capture_output=True,
                         text=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line
            and not line.startswith("| shape |")]
    assert len(rows) >= 30, out  # 35 rows in the 2026-12-02 file
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    missing = [row for row in rows if row not in readme]
    assert not missing, f"README rows not matching {result}: {missing[:3]}"
    commit = out.splitlines()[0].split("commit ")[1].split(",")[0]
    flowing = " ".join(readme.split())  # prose wraps lines
    assert f"commit {commit}" in flowing, f"README does not name the result file's commit {commit}"
