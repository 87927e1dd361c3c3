"""The packages are layered: each imports only what sits below it (docs/design.md,
"Package map"). An import is read from the source, wherever it is (a function-level
import counts too), so an upward dependency fails here instead of hiding in a function.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import its own package and anything in a lower layer.
LAYERS = [
    ["dylora_moe.errors"],                                 # no project imports at all
    ["dylora_moe.fieldtypes", "dylora_moe.ranks"],         # recipe values' types; a result or error on every rank
    ["dylora_moe.model"],                                  # the mixture: no data, no training
    ["dylora_moe.data"],                                   # sources -> batches (labels for model/loss)
    ["dylora_moe.recipe", "dylora_moe.checkpoint"],        # a run's recipe; a run's checkpoints on disk
    ["dylora_moe.eval", "dylora_moe.plan"],                            # using a trained run; planning one
    ["dylora_moe.train", "dylora_moe.serve"],              # making one (its eval comes from eval/); serving one
    ["dylora_moe.vertex"],                                 # running it on Vertex AI
    ["dylora_moe.cli"],                                    # every command
]


def layer_of(module: str) -> tuple[int, str]:
    for index, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return index, name
    raise AssertionError(f"{module}: not in any layer of tests/test_layering.py")


def project_modules():
    for path in sorted((ROOT / "dylora_moe").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(module: str, path: Path):
    """Every project module `module` imports, with the line: module-level or not."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from . import build` names a module
                yield f"{target}.{alias.name}", node.lineno


def test_every_import_goes_down_the_layers():
    upward = []
    for module, path in project_modules():
        if module == "dylora_moe":  # the package's own __init__: the public API (model)
            continue
        here, own = layer_of(module)
        for target, line in imports(module, path):
            if not (target == "dylora_moe" or target.startswith("dylora_moe.")):
                continue
            if target == "dylora_moe":
                continue
            try:
                there, other = layer_of(target)
            except AssertionError:
                continue  # `from pkg import name` also yields pkg.name for plain names
            if there > here or (there == here and other != own):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target} (layer {there}) from layer {here}")
    assert not upward, "\n".join(upward)


def test_the_layering_test_sees_function_level_and_relative_imports():
    source = ROOT / "dylora_moe" / "model" / "moe.py"
    found = {target for target, _ in imports("dylora_moe.model.moe", source)}
    assert "dylora_moe.model.router" in found and "dylora_moe.model.growth" in found
    hook = ROOT / "dylora_moe" / "model" / "generation.py"  # DynamicCache, imported inside the hook
    assert "transformers.DynamicCache" in {target for target, _ in imports("dylora_moe.model.generation", hook)}
