"""Rules the shipped source follows, read from the source itself (ast; nothing is imported):

- production code reads no environment variable meant for tests: fault injection (K5_TEST_FAIL), the fake-CUDA
  matrix (K5_FAKECUDA) and the server's step gate (K5_SERVE_GATE) live in tests/, and every variable the package
  reads is one it documents (a new one has to be added here on purpose).
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("k5", "engine", "parallel", "kernels", "launch", "serve")  # the wheel's folders (pyproject's package-dir)
TEST_ONLY = re.compile(r"K5_(TEST|FAKECUDA|SERVE_GATE)")
# What the package reads from the environment, and why (README: "Running a real checkpoint", "Batch jobs").
PRODUCTION = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",  # torchrun / srun: this process's place in the job
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",  # the rendezvous store
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",  # set (setdefault) for NCCL's process group
    "TORCHDYNAMO_DISABLE",  # flex attention refuses to run eagerly
    "HF_HOME", "XDG_CACHE_HOME",  # the Hugging Face cache (with HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE below)
    "K5_TINY_CACHE",  # where the tiny checkpoints are built
    "OMP_NUM_THREADS",  # --nproc-per-node: the workers share the machine's cores
    "K5_API_KEY",  # k5 serve: the default of --api-key (README: "Serving over HTTP")
}
# Reads whose name is computed: (file, function) -> the names it may read.
COMPUTED = {("engine/catalogue/resolve.py", "hub_cache"): {"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"}}


def shipped_files() -> list[Path]:
    return sorted(p for folder in SHIPPED for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
        (isinstance(node, ast.Name) and node.id == "environ")


def env_reads(tree: ast.AST):
    """(function name, variable name or None when computed, line) of every environment read."""
    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            key = None
            if isinstance(child, ast.Call):
                f = child.func
                if isinstance(f, ast.Attribute) and f.attr in ("get", "setdefault", "pop") and _is_environ(f.value):
                    key = child.args[0] if child.args else None
                elif isinstance(f, ast.Attribute) and f.attr == "getenv":
                    key = child.args[0] if child.args else None
                else:
                    key = False
            elif isinstance(child, ast.Subscript) and _is_environ(child.value):
                key = child.slice
            elif isinstance(child, ast.Compare) and any(_is_environ(c) for c in child.comparators):
                key = child.left
            else:
                key = False
            if key is not False:
                yield function, key.value if isinstance(key, ast.Constant) else None, child.lineno
            yield from visit(child, name)

    yield from visit(tree, None)


def test_no_production_module_reads_a_test_variable():
    mentions, unknown = [], []
    for path in shipped_files():
        rel = path.relative_to(ROOT).as_posix()
        source = path.read_text()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and TEST_ONLY.search(node.value):
                mentions.append(f"{rel}:{node.lineno}: {node.value[:60]!r}")
        for function, name, line in env_reads(tree):
            computed = COMPUTED.get((rel, function))
            known = computed is not None if name is None else name in PRODUCTION | (computed or set())
            if not known:
                unknown.append(f"{rel}:{line} ({function}): {name or 'a computed name'}")
    assert not mentions, "test variables in shipped code:\n" + "\n".join(mentions)
    assert not unknown, "environment reads that are not documented production variables:\n" + "\n".join(unknown)


def test_the_scan_finds_reads():
    """The scan itself: every form of read is found, with its name (or None when computed)."""
    source = ("import os\ndef f(v):\n    os.environ.get('A')\n    os.getenv('B')\n    os.environ['C']\n"
              "    'D' in os.environ\n    os.environ.setdefault('E', '1')\n    os.environ.get(v)\n")
    assert [(f, n) for f, n, _ in env_reads(ast.parse(source))] == \
        [("f", "A"), ("f", "B"), ("f", "C"), ("f", "D"), ("f", "E"), ("f", None)]
