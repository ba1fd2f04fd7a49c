"""pytest imports test modules by basename (rootdir-relative 'prepend' mode, which the kernel
tests' ``from labs import ...`` relies on): two test files with one name abort collection."""
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
