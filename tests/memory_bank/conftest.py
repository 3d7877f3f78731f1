"""Shared helpers for the memory_bank tests: state round trips through real files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file


def _roundtrip(tmp_path):
    counter = iter(range(10**6))

    def through_files(state):
        """(tensors, meta) -> written as safetensors + JSON, read back (no pickle anywhere)."""
        tensors, meta = state
        i = next(counter)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / f"s{i}.safetensors"))
        (tmp_path / f"s{i}.json").write_text(json.dumps(meta))
        return load_file(str(tmp_path / f"s{i}.safetensors")), json.loads(
            (tmp_path / f"s{i}.json").read_text()
        )

    return through_files


@pytest.fixture
def through_files(tmp_path):
    return _roundtrip(tmp_path)


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, t in a.items():
        assert t.dtype == b[k].dtype, k
        assert torch.equal(t, b[k]), k


@pytest.fixture
def same_tensors():
    """assert two dicts of tensors are equal key by key, bit for bit."""
    return _assert_same_tensors
