import importlib.machinery
import subprocess
import sys

import pytest

import memory_bank


def test_kernels_is_this_repos_package_from_any_working_directory(tmp_path):
    # Outside the repo root an editable install puts site-packages first on sys.path: a
    # foreign top-level `kernels` there (Hugging Face's) would win over ours.
    code = "import models, kernels; print(kernels.__file__); print(kernels.sparse_gather.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == str(memory_bank._PACKAGES_ROOT / "kernels" / "__init__.py")
    assert out[1] == "sparse_gather"


def test_a_foreign_kernels_package_is_refused_with_the_fix(monkeypatch, tmp_path):
    foreign = tmp_path / "site-packages" / "kernels" / "__init__.py"
    spec = importlib.machinery.ModuleSpec("kernels", None, origin=str(foreign))
    monkeypatch.setattr(memory_bank.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(memory_bank.ForeignKernelsPackageError, match="pip uninstall kernels"):
        memory_bank._require_own_kernels()
