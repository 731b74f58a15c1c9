"""Every code block of README.md (and of docs/*.md) runs as written: each ```python block in a fresh
temporary folder (a subprocess, on what the machine has: CI's CPU, or a GPU where there is one), and
again in the same folder when it left files there (a block that fails over its own output fails its
second reader); each `ecf8 ...` line of a ```sh block in order, in a folder holding the bundled
sample where a clone has it (ecf8/data/).  A block that needs a GPU is marked by the line
``<!-- gpu -->`` just before it: it runs only where CuPy and a GPU are (the gpu marker), and there
are few of them.  Other fences (``` alone: output) are not run, nor the lines of a ```sh block that
are not ecf8 commands (pip, pytest: the newcomer's install is checked by hand in a fresh
environment).  No block may need the network: models are built from configs, data is the bundled
sample."""

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import child_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
GPU_MARK = "<!-- gpu -->"
MAX_GPU_BLOCKS = 3


@dataclass(frozen=True)
class Block:
    lang: str
    line: int            # 1-based line of the opening fence
    text: str
    gpu: bool
    doc: str = "README.md"

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(text: str, doc: str = "README.md") -> list[Block]:
    """The fenced blocks of a Markdown text, with their language and GPU mark (an unclosed fence is
    an error: the rest of the README would be code)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not m:
            i += 1
            continue
        start = i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{doc}:{start + 1}: unclosed code fence"
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        out.append(Block(m.group(1), start + 1, "\n".join(lines[start + 1:end]) + "\n", before == GPU_MARK, doc))
        i = end + 1
    return out


BLOCKS = blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for path in DOCS for b in blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
          if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang == "sh"]


def _env() -> dict[str, str]:
    """This checkout first on the path; nothing fetched from the Hub."""
    return child_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run_python(block: Block, cwd: Path, env: dict[str, str], run: str = "") -> str | None:
    """None when the block, run as a script in cwd, exits 0; else the failure, with the block's text."""
    script = cwd.parent / f"{cwd.name}_block.py"          # beside the folder: it sees only its own files
    script.write_text(block.text, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 0:
        return None
    return f"{block.where}: this block failed{run} (exit {proc.returncode}):\n\n{block.text}\n{proc.stderr[-3000:]}"


def _check_python(block: Block, folder: Path) -> str | None:
    """The block run in a new folder, then again there when it left files (None: both ran)."""
    env = _env()
    (folder / "run").mkdir(parents=True)
    failed = _run_python(block, folder / "run", env)
    if failed is None and any((folder / "run").iterdir()):
        failed = _run_python(block, folder / "run", env, " when run a second time, over its own files")
    return failed


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory) -> dict[Block, str | None]:
    """Every CPU block's _check_python, as many at once as there are cores (each is mostly an
    interpreter importing torch or transformers), the slowest (Transformers) first."""
    cpu = sorted((b for b in PYTHON if not b.gpu), key=lambda b: ("transformers" not in b.text, -len(b.text)))
    folders = [tmp_path_factory.mktemp("block") for _ in cpu]
    with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        return dict(zip(cpu, pool.map(_check_python, cpu, folders)))


def _param(block: Block):
    return pytest.param(block, id=block.where, marks=[pytest.mark.gpu] if block.gpu else [])


@pytest.mark.parametrize("block", [_param(b) for b in PYTHON])
def test_python_block_runs(block, request, tmp_path):
    failed = _check_python(block, tmp_path) if block.gpu else request.getfixturevalue("cpu_runs")[block]
    if failed:
        pytest.fail(failed, pytrace=False)


def _sample(folder: Path) -> None:
    """The bundled sample where a clone has it: ecf8/data/ (copies; no package there: ecf8 is
    imported from PYTHONPATH, a folder without __init__.py never shadows it)."""
    from ecf8.bench_cli import sample_paths

    (folder / "ecf8" / "data").mkdir(parents=True)
    for path in sample_paths():
        shutil.copy(path, folder / "ecf8" / "data" / path.name)


def _ecf8_lines(block: Block) -> list[str]:
    return [line.split("  #")[0].strip() for line in block.text.splitlines() if line.startswith("ecf8 ")]


# One interpreter runs a shell block's commands through the command's own entry point, in order
# (a fresh process: compress starts worker processes, which must not fork from pytest's threads).
_DRIVER = """
import shlex, sys
from ecf8.cli import main
for line in sys.argv[1:]:
    status = main(shlex.split(line)[1:])
    if status:
        sys.exit(f"`{line}` exited with status {status}")
"""


def _check_shell(block: Block, folder: Path) -> str | None:
    """None when every `ecf8 ...` line of the block exits 0, run in folder beside the sample."""
    _sample(folder)
    proc = subprocess.run([sys.executable, "-c", _DRIVER, *_ecf8_lines(block)], cwd=folder, env=_env(),
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    return f"{block.where}: this block failed:\n\n{block.text}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"


@pytest.mark.parametrize("block", [_param(b) for b in SHELL])
def test_shell_block_runs(block, tmp_path):
    failed = _check_shell(block, tmp_path)
    if failed:
        pytest.fail(failed, pytrace=False)


def test_the_readme_has_runnable_blocks_and_few_gpu_ones():
    """The parser finds the blocks (a README whose fences it misread would pass every test above
    vacuously), every shell block has an ecf8 command, and GPU-only blocks stay few."""
    assert len(PYTHON) >= 3 and SHELL
    assert all(_ecf8_lines(b) for b in SHELL)
    gpu = [b.where for b in PYTHON + SHELL if b.gpu]
    assert len(gpu) <= MAX_GPU_BLOCKS, f"GPU-only blocks at {gpu}: keep them few"
    assert all(b.lang in ("python", "sh", "") for b in BLOCKS), [(b.line, b.lang) for b in BLOCKS]


def test_a_failing_command_fails_its_shell_block(tmp_path):
    block = Block("sh", 9, "ecf8 info ecf8/data/minilm-layer0-bf16.safetensors  # a plain file\n", False)
    assert re.search(r"(?s)README.md:9: .*plain safetensors.*`ecf8 info .*` exited with status 1",
                     _check_shell(block, tmp_path))


def test_the_parser_sees_marks_and_languages():
    text = "x\n```python\na = 1\n```\n\n<!-- gpu -->\n\n```python\nb = 2\n```\n```sh\necf8 info x  # note\n```\n"
    got = blocks(text)
    assert [(b.lang, b.gpu, b.text) for b in got] == [("python", False, "a = 1\n"), ("python", True, "b = 2\n"),
                                                       ("sh", False, "ecf8 info x  # note\n")]
    assert _ecf8_lines(got[2]) == ["ecf8 info x"]
    with pytest.raises(AssertionError, match="unclosed"):
        blocks("```python\na = 1\n")


def test_a_broken_block_fails_with_its_text(tmp_path):
    """The runner reports a block that raises, with the block's text (the old README's NameError)."""
    bad = Block("python", 7, "import ecf8\ny = model(x)\n", False)
    assert re.search(r"(?s)README.md:7.*y = model\(x\).*NameError", _check_python(bad, tmp_path))


def test_a_block_failing_over_its_own_files_fails_on_the_second_run(tmp_path):
    """The zarr block once created a store that its second run found already there."""
    block = Block("python", 3, "import os\nos.mkdir('store')\n", False, "docs/x.md")
    assert re.search(r"(?s)docs/x.md:3.*second time.*FileExistsError", _check_python(block, tmp_path))
    assert _check_python(Block("python", 3, "import os\nos.makedirs('store', exist_ok=True)\n", False),
                         tmp_path / "x") is None
