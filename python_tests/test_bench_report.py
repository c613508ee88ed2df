"""bench/report.py measured_build: a benchmark refuses to time a comet_ext that is not this
tree's code (a stale in-place _C, or an installed copy from another commit), since its numbers
would be recorded under this tree's commit; bench/child.py hands the checked package on."""
from __future__ import annotations

import os
import shutil
import sys

import pytest

import comet_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import child  # noqa: E402  (bench/child.py)
import report  # noqa: E402  (bench/report.py)
from build_env import source_digest  # noqa: E402  (tools/build_env.py)


@pytest.fixture
def as_built(monkeypatch):
    """Makes comet_ext look built from `digest` and imported from `package`."""
    monkeypatch.setattr(report, "_CHECKED", [])

    def pretend(package: str, digest: str):
        monkeypatch.setattr(comet_ext, "__file__", os.path.join(package, "__init__.py"))
        info = {**comet_ext.build_info(), "source_digest": digest}
        monkeypatch.setattr(comet_ext, "build_info", lambda: info)

    return pretend


def _installed_copy(tmp_path) -> str:
    site = tmp_path / "site-packages"
    shutil.copytree(os.path.join(ROOT, "comet_ext"), site / "comet_ext",
                    ignore=shutil.ignore_patterns("*.so", "models", "__pycache__"))
    return str(site / "comet_ext")


def test_the_trees_own_build_is_measured(as_built):
    as_built(os.path.join(ROOT, "comet_ext"), source_digest(ROOT))
    assert report.measured_build() == ROOT


def test_an_up_to_date_installed_copy_is_measured(as_built, tmp_path):
    package = _installed_copy(tmp_path)
    as_built(package, source_digest(ROOT))
    assert report.measured_build() == os.path.dirname(package)


def test_a_c_extension_built_from_other_sources_is_refused(as_built, monkeypatch):
    as_built(os.path.join(ROOT, "comet_ext"), "0123456789abcdef")
    with pytest.raises(report.StaleBuild, match="built from other sources.*0123456789abcdef"):
        report.measured_build()
    with pytest.raises(report.StaleBuild):  # the label too: commit() checks before it names HEAD
        report.commit()
    monkeypatch.setenv("COMET_COMMIT", "abc1234")  # the tree's commit, before any build (device_check)
    assert report.commit(check_build=False) == "abc1234"


def test_a_build_that_recorded_no_digest_is_refused(as_built):
    as_built(os.path.join(ROOT, "comet_ext"), None)
    with pytest.raises(report.StaleBuild, match="not recorded"):
        report.measured_build()


def test_an_installed_copy_with_other_python_files_is_refused(as_built, tmp_path):
    package = _installed_copy(tmp_path)
    with open(os.path.join(package, "modeling.py"), "a") as f:
        f.write("\n# an older commit\n")
    os.remove(os.path.join(package, "segments.py"))
    as_built(package, source_digest(ROOT))
    with pytest.raises(report.StaleBuild, match=r"differ from this tree's: modeling\.py, segments\.py"):
        report.measured_build()


def test_the_digest_follows_every_build_input(tmp_path):
    tree = tmp_path / "tree"
    for rel in ("csrc/cpu/a.cpp", "csrc/checks.h", "setup.py", "tools/build_env.py", "tools/cpu_flags.py",
                "comet_ext/ops.py"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(rel)
    before = source_digest(str(tree))
    (tree / "comet_ext/ops.py").write_text("python is not compiled")
    assert source_digest(str(tree)) == before
    for rel in ("csrc/cpu/a.cpp", "setup.py", "tools/cpu_flags.py"):
        (tree / rel).write_text(rel + " changed")
        assert source_digest(str(tree)) != before, rel
        before = source_digest(str(tree))
    (tree / "csrc/cpu/a.cpp").rename(tree / "csrc/cpu/b.cpp")  # a rename is a change
    assert source_digest(str(tree)) != before


def test_children_import_the_measured_package(as_built, tmp_path):
    package = _installed_copy(tmp_path)
    as_built(package, source_digest(ROOT))
    res = child.run_child("import os; print(os.environ['PYTHONPATH'].split(os.pathsep)[0])", check=True)
    assert res.stdout.strip() == os.path.dirname(package)
