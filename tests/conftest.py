"""Shared test fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def vllm_tiny(tmp_path_factory) -> Path:
    """The tiny models with 32-wide attention heads (gpg-vl build-tiny --head-dim 32): vLLM's
    CPU attention runs no narrower ones."""
    from gpg_vl.models.tiny import VLLM_HEAD_DIM, build_tiny_models

    out = tmp_path_factory.mktemp("tiny-vllm")
    build_tiny_models(out, head_dim=VLLM_HEAD_DIM)
    return out
