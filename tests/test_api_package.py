"""The package around the API: ``import onnxrep`` from a source checkout without an install,
``python -m onnxrep``, no logger changed by importing, ``py.typed`` and the subpackages in the
wheel, the public names."""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import onnxrep

ROOT = Path(__file__).resolve().parent.parent


def _bare_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` with the site-packages on sys.path but none of their .pth files processed
    (``-S``): the editable install's finder of onnxrep is not there, the dependencies are."""
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    prelude = f"import sys; sys.path[1:1] = {paths!r}\n"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_from_the_repository_root_without_an_install():
    code = (
        "import sys\n"
        "assert not any('__editable__' in type(f).__module__ for f in sys.meta_path), 'editable finder present'\n"
        "import onnxrep\n"
        "from onnxrep import engine\n"
        "assert 'passes' not in sys.modules and 'models' not in sys.modules\n"
        "import onnxrep.passes, onnxrep.models\n"
        "print(onnxrep.__file__, onnxrep.passes.__file__, len(engine.available_passes()))\n"
        "from onnx import helper, TensorProto\n"
        "x = helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 2])\n"
        "y = helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 2])\n"
        "m = helper.make_model(helper.make_graph([helper.make_node('Relu', ['x'], ['y'])], 'g', [x], [y]))\n"
        "out, report = onnxrep.optimize(m)\n"
        "print('ok', report.rewritten)\n"
    )
    res = _bare_python(code, ROOT)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.splitlines()
    module, passes, count = first.split()
    assert Path(module) == ROOT / "onnxrep" / "__init__.py"
    assert Path(passes) == ROOT / "passes" / "__init__.py"
    assert int(count) == len(onnxrep.engine.available_passes())
    assert second == "ok 0"


def test_python_dash_m_onnxrep_runs_the_command_line():
    res = subprocess.run([sys.executable, "-m", "onnxrep", "--version"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"onnxrep, version {onnxrep.__version__}"
    res = subprocess.run([sys.executable, "-m", "onnxrep", "passes"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "parallel-merge" in res.stdout


def test_importing_onnxrep_changes_no_logger():
    code = (
        "import logging\n"
        "import onnx_graphsurgeon as gs\n"
        "def state():\n"
        "    return {n: logging.getLogger(n).level for n in list(logging.root.manager.loggerDict)} | "
        "{'': logging.root.level, 'G_LOGGER': gs.logger.G_LOGGER.severity}\n"
        "before = state()\n"
        "import onnxrep\n"
        "after = state()\n"
        "changed = {k: (before.get(k), v) for k, v in after.items() if k in before and before[k] != v}\n"
        "assert not changed, changed\n"
        "assert logging.getLogger('onnxrep').level == logging.NOTSET\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_the_wheel_ships_py_typed_and_the_subpackages(tmp_path):
    src = tmp_path / "src"
    for name in ("onnxrep", "passes", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {res.stderr.strip().splitlines()[-1:]}")
    (wheel,) = (tmp_path / "dist").glob("onnxrep-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"onnxrep/py.typed", "onnxrep/__main__.py", "onnxrep/api.py", "onnxrep/cleanup.py", "onnxrep/passes/__init__.py"} <= names
    assert not any(n.startswith(("passes/", "models/", "tests/")) for n in names)


def test_public_names():
    for name in ("optimize", "verify", "load", "save", "Report", "Progress", "VerifyResult", "UsageError", "InputError", "VerificationError", "OnnxrepError"):
        assert name in onnxrep.__all__ and hasattr(onnxrep, name)
    assert issubclass(onnxrep.UsageError, ValueError)
    assert onnxrep.Report is onnxrep.api.Report
    assert onnxrep.Report.__doc__ and "schema_version" in onnxrep.Report.__doc__
