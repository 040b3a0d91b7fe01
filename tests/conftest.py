"""Shared test set-up. Run the suite with: python -m pytest -q tests"""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

# 2-core CI machine: more threads than cores only adds contention
torch.set_num_threads(2)

needs_shared = pytest.mark.skipif(not (SHARED / "data").is_dir(),
                                  reason="../shared/data is absent (only CI and dev machines have it)")


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A private $NANOCHAT_BASE_DIR so no test touches ~/.cache/nanochat."""
    d = tmp_path / "nanochat"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d
