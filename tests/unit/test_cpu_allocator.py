"""The tunestack command turns on torch's page-aligned, huge-page CPU allocator before torch is imported
(peak RSS of a CPU LoRA step 5.5 -> 3.9 GB in bench/), unless the environment says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import tunestack.cli, os, torch
ptrs = [torch.empty(1 << 20).data_ptr() for _ in range(20)]  # 4 MB blocks
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), all(p % 4096 == 0 for p in ptrs))
"""


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_cli_enables_the_page_aligned_allocator_unless_told_not_to() -> None:
    assert _probe() == "1 True"  # torch read it: its blocks of 2 MB and more are page-aligned
    assert _probe(THP_MEM_ALLOC_ENABLE="0") == "0 False"
