"""``pagedattn.alloc`` depends on the standard library and numpy only: no torch, no GPU."""

import ast
import subprocess
import sys
from pathlib import Path

import pagedattn.alloc

ALLOC_DIR = Path(pagedattn.alloc.__file__).resolve().parent


def test_no_module_of_the_allocator_imports_torch():
    imported = set()
    for path in sorted(ALLOC_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert imported, "no imports found: wrong directory?"
    third_party = imported - set(sys.stdlib_module_names) - {"pagedattn", "__future__"}
    assert third_party == {"numpy"}, f"unexpected dependencies: {sorted(third_party)}"


def test_allocator_runs_with_torch_unimportable():
    """Load the allocator in a fresh interpreter where ``import torch`` fails, bypassing the
    top-level package (whose ``__init__`` may import torch), and use it."""
    code = f"""
import sys, types
sys.modules["torch"] = None  # any "import torch" now raises ImportError
package = types.ModuleType("pagedattn")
package.__path__ = [{str(ALLOC_DIR.parent)!r}]
sys.modules["pagedattn"] = package
from pagedattn.alloc import BlockManager
mgr = BlockManager(8, 4, 4)
assert mgr.allocate("a", list(range(9))) == 0
mgr.fork("a", "b")
assert mgr.append_slots("b", [1]) != []
meta = mgr.build_metadata(["a", "b"])
mgr.swap_out(["a"])
mgr.check_invariants()
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m])
print("OK", loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK []"
