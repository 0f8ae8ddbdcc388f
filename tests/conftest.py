"""Shared test settings: quiet, local-only Ray and MLflow; paths to the shared eval data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The real instruction eval sets, beside the project (never copied into it).
SHARED_INSTRUCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct"


@pytest.fixture(scope="session")
def instruct_dir() -> Path:
    if not SHARED_INSTRUCT.is_dir():
        pytest.skip(f"shared eval data not found at {SHARED_INSTRUCT} (../shared/data/instruct)")
    return SHARED_INSTRUCT
