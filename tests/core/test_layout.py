"""The shape the code keeps: small functions, one version (checks on the source, not on behaviour)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXEMPT = {"define_schema", "execute"}  # a node's schema and entry point are long by nature


def test_no_function_is_over_60_lines_or_10_parameters():
    too_big = []
    for folder in ("nodes", "selfperc_core", "selfperc_headless"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name in EXEMPT:
                    continue
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [v.arg for v in (a.vararg, a.kwarg)
                                                                                 if v is not None]
                params = [p for p in params if p not in ("self", "cls")]
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 or len(params) > 10:
                    too_big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines, "
                                   f"{len(params)} parameters")
    assert not too_big, too_big


def test_one_version_for_the_pack():
    from selfperc_core import __version__

    pyproject = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert pyproject == __version__


def test_one_tap_class_and_one_feature_reader():
    """The feature tap is selfperc_core.features.FeatureTap (block_probe's ProbedTap specialises it) for every host, and its reader
    model_view's frozen_features_fn (no host builds its own)."""
    taps, readers = [], []
    for folder in ("nodes", "selfperc_core", "selfperc_headless"):
        for path in sorted((ROOT / folder).glob("*.py")):
            tree = ast.parse(path.read_text())
            taps += [f"{path.name}:{n.name}" for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and "Tap" in n.name
                     # the generic tap's probe specialises it in the core (the one exception)
                     and not (path.name == "block_probe.py" and n.name == "ProbedTap")]
            readers += [path.name for n in ast.walk(tree) if isinstance(n, ast.Call)
                        and getattr(n.func, "attr", getattr(n.func, "id", "")) == "features"
                        and path.name != "model_view.py"]
    assert taps == ["features.py:FeatureTap"], taps
    assert not readers, f"features read outside frozen_features_fn: {readers}"
