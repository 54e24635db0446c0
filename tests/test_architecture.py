"""The package's shape: an acyclic, layered import graph, a core install without the optional extras, and one
way in for weights (the same damaged file gives the same error through every command that reads weights)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcaformer.cli import main
from fcaformer.errors import EXTRAS
from tests.conftest import REPO_ROOT, shared_path

SRC = REPO_ROOT / "src"

# Layers, bottom to top: a module may import its own layer and the ones below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("fcaformer.errors", "fcaformer.files", "fcaformer.images"),
    ("fcaformer.layers",),
    ("fcaformer.models", "fcaformer.fast", "fcaformer.lean", "fcaformer.profile"),
    ("fcaformer.weights",),
    ("fcaformer.train", "fcaformer.analysis", "fcaformer.detection", "fcaformer.segmentation", "fcaformer.deploy",
     "fcaformer.export", "fcaformer.benchmark"),
    ("fcaformer.cli", "fcaformer.__main__"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "fcaformer").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``name`` imports (function-local imports too), resolved to the module files."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            wanted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            wanted = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in wanted:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def _layer(name: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    return len(LAYERS)  # the package's own __init__: the public API, above everything


def test_import_graph_is_acyclic_and_layered() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, f"imports up the layers: {upward}"
    assert "fcaformer" not in set().union(*graph.values()), "a module imports the package's public __init__"
    # depth-first search for a back edge (a cycle), reporting the cycle's modules
    state: dict[str, int] = {}
    trail: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        trail.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        trail.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 60  # the walk saw the whole package


def test_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The check above could fail: a models module importing the weights package is reported."""
    fake = tmp_path / "bad.py"
    fake.write_text("from ..weights import read_weights\n")
    modules = {**_modules(), "fcaformer.models.bad": fake}
    targets = _imports("fcaformer.models.bad", fake, modules)
    assert targets == {"fcaformer.weights"} and _layer("fcaformer.weights") > _layer("fcaformer.models.bad")


def test_core_dependencies_leave_the_extras_out() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    core = {dep.split(">")[0].split("=")[0].split("[")[0].strip().lower() for dep in project["dependencies"]}
    optional = {"pycocotools", "segmentation-models-pytorch", "torchmetrics", "onnx", "onnxscript", "onnxruntime",
                "openvino", "nncf", "tensorboard"}
    assert not core & optional
    extras = project["optional-dependencies"]
    assert {"dense", "export", "deploy", "dev"} <= set(extras)
    listed = " ".join(dep for deps in extras.values() for dep in deps)
    assert all(name in listed for name in optional)  # every optional package is in some extra


def test_core_commands_import_no_optional_package() -> None:
    """The models in timm, training, eval / predict, analysis and conversion work from the core install: none of
    them imports a package that only an extra installs."""
    code = (
        "import sys, timm, fcaformer; "
        "from fcaformer.cli import build_parser; build_parser(); "
        "import fcaformer.train.engine, fcaformer.train.inference, fcaformer.train.predict, fcaformer.analysis, "
        "fcaformer.weights, fcaformer.fast; "
        "timm.create_model('fcaformer_atto').eval()(__import__('torch').randn(1, 3, 32, 32)); "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(EXTRAS)!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("hidden", "argv", "extra"), [
    ("pycocotools", ["detect", "train", "--data-root", "x", "--ann", "x.json", "--out", "o"], "dense"),
    ("segmentation_models_pytorch", ["segment", "train", "--img-dir", "x", "--ann-dir", "y", "--num-classes", "2",
                                     "--out", "o"], "dense"),
    ("onnx", ["export", "--model", "fcaformer_atto", "--format", "onnx", "--img-size", "32", "-o", "m.onnx"],
     "export"),
])
def test_a_missing_extra_is_one_line_naming_the_install(tmp_path: Path, hidden: str, argv: list[str],
                                                         extra: str) -> None:
    code = (f"import sys; sys.modules[{hidden!r}] = None; from fcaformer.cli import main; "
            f"sys.exit(main({argv!r}))")  # None in sys.modules: what an install without the package sees
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines[-1] == (f"error: {hidden} is not installed" + (" (ONNX export needs it)" if hidden == "onnx" else "")
                         + f": pip install 'fcaformer[{extra}]'")
    assert "Traceback" not in done.stderr


def test_the_same_damaged_file_gives_the_same_error_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """eval, predict, analyze, export, convert and train --pretrained all read weights through
    fcaformer.weights.read_weights: a truncated checkpoint and a file that is no checkpoint at all each give one
    error line, the same in every command, and exit status 2."""
    source = shared_path("parity", "official_custom_cls_cab2.pt")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    not_weights = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "notes": "no tensors here"}, not_weights)
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (40, 40), (60 * i, 90, 120)).save(images / f"{i}.png")
    for bad in (truncated, not_weights):
        commands = {
            "eval": ["eval", str(bad), "--data", str(tmp_path / "images")],
            "predict": ["predict", str(images / "0.png"), "--model", str(bad)],
            "analyze": ["analyze", str(bad), "--images", str(images), "--out", str(tmp_path / "analysis")],
            "export": ["export", "--checkpoint", str(bad), "--format", "torchscript", "-o", str(tmp_path / "m.ts")],
            "convert": ["convert", str(bad), str(tmp_path / "hub")],
            "train --pretrained": ["train", "--pretrained", str(bad), "--output", str(tmp_path / "run"),
                                   "--set", "run.epochs=1"],
        }
        errors = {}
        for command, argv in commands.items():
            assert main(argv) == 2, command
            lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
            assert len(lines) == 1, (command, lines)
            errors[command] = lines[0]
        assert len(set(errors.values())) == 1, json.dumps(errors, indent=1)
        message = next(iter(errors.values()))
        assert bad.name in message and ("truncated" in message if bad == truncated else "no tensors" in message)
    assert not (tmp_path / "hub").exists() and not (tmp_path / "m.ts").exists()
