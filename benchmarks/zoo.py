#!/usr/bin/env python
"""The real-model zoo: how far onnxrep takes timm's re-parameterizable models.

For every model of ``tests/zoo_models.py`` (the smallest variant of each timm family that
``timm.utils.reparameterize_model`` changes, random seeded weights with randomized BatchNorm
statistics and layer scales, 64x64, batch 1) and every exporter setting (TorchScript with and
without constant folding, dynamo), the training form and the deploy form are exported into a
cache folder (reused while model, seed and versions are unchanged), the training export is
optimized with ``onnxrep.optimize`` (defaults), and the three models are compared:

* node counts of the training export, the onnxrep output and the deploy export: Conv+Gemm+MatMul,
  BatchNormalization, Add/Sub/Mul/Div, all nodes;
* exact: onnxrep's output equals the training export's in onnxruntime (graph optimizations off)
  element by element within ``|a - ref| <= 1e-4 |ref| + 1e-4 max|ref|`` (zoo_models.compare), and
  the largest error relative to max|ref|;
* reaches deploy: no more Conv+Gemm+MatMul and no more BatchNormalization nodes than the deploy
  export; left over: the ops onnxrep's output has more of than the deploy export, and the
  conditions under which the passes declined candidates.

Writes the table to ``ZOO.md`` and the full results to ``benchmarks/results/zoo-cpu-<date>.json``
(machine, versions, onnxrep's git commit, date, command). It also says which rows of
``zoo_models.KNOWN_MISSES`` (the xfail table of ``tests/test_zoo.py``) no longer hold and which
misses it lacks, and with ``--print-table`` prints the table as it should be.

    python benchmarks/zoo.py                                  # everything (35 min on 2 busy cores; 4 once exported)
    python benchmarks/zoo.py --models repvgg_a0 fastvit_t8 --exporters dynamo --no-write
    python benchmarks/zoo.py --cache /tmp/zoo --print-table
    python benchmarks/zoo.py --at HEAD                         # onnxrep as committed, not the working tree
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import zoo_models as zm  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnxrep" / "zoo"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def git_commit(rev: str | None = None) -> str:
    """onnxrep's git commit (of ``rev``), else HEAD's with ``+dirty`` when the package's tracked
    files in the working tree differ from it."""
    if rev is not None:
        return subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "onnxrep", "passes", "models"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def use_onnxrep_at(rev: str, folder: Path) -> None:
    """Import onnxrep from commit ``rev`` instead of the working tree: ``git archive`` of it into
    ``folder``, and a finder ahead of the editable install's for ``onnxrep``, ``onnxrep.passes``,
    ``onnxrep.models`` and their modules (the working tree may hold other work in progress)."""
    import importlib.machinery
    import importlib.util

    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    mapping = {"onnxrep": folder / "onnxrep", "onnxrep.passes": folder / "passes", "onnxrep.models": folder / "models"}

    class Finder:
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            if fullname in mapping:
                init = mapping[fullname] / "__init__.py"
                return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(mapping[fullname])])
            parent = fullname.rpartition(".")[0]
            if parent in mapping:
                return importlib.machinery.PathFinder.find_spec(fullname, [str(mapping[parent])])
            return None

    if any(name == "onnxrep" or name.startswith("onnxrep.") for name in sys.modules):
        raise RuntimeError("onnxrep was imported before use_onnxrep_at")
    sys.meta_path.insert(0, Finder)


def environment(rev: str | None = None) -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch

    import onnxrep

    timm = zm.import_timm()
    import torchvision

    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_model)
    except OSError:
        pass
    return {
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_model": cpu_model,
            "cpu_count": os.cpu_count(),
            "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__,
            "onnxrep": onnxrep.__version__,
            "onnxrep_commit": git_commit(rev),
            "onnxrep_path": str(Path(onnxrep.__file__).parent),
        },
    }


def run_case(builder: zm.Builder, name: str, exporter: str) -> dict:
    t0 = time.perf_counter()
    try:
        result = zm.measure(builder, name, exporter)
        result.pop("optimized")
    except Exception as exc:  # a failed export or optimize is a row of the table, not the end
        result = {"model": name, "exporter": exporter, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                  "traceback": traceback.format_exc(limit=6)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------


def triple(r: dict, key: str) -> str:
    c = r["counts"]
    return f"{c['train'][key]} / {c['onnxrep'][key]} / {c['deploy'][key]}"


def relative_error(r: dict) -> str:
    return f"{r['max_error'] / r['max_ref']:.1e}" if r["max_ref"] else f"{r['max_error']:.1e}"


def table(results: list[dict]) -> list[str]:
    lines = [
        "| model | exporter | Conv+Gemm+MatMul | BN | Add/Sub/Mul/Div | nodes | exact | max err / max\\|ref\\| | reaches deploy | left over (onnxrep - deploy) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | | | | | | | | failed: {r['error'].replace('|', '/')} |")
            continue
        lines.append(
            f"| {r['model']} | {r['exporter']} | {triple(r, 'linear')} | {triple(r, 'bn')} | {triple(r, 'add_mul')} | "
            f"{triple(r, 'nodes')} | {'yes' if r['exact'] else '**no**'} | {relative_error(r)} | "
            f"{'yes' if r['reaches_deploy'] else '**no**'} | {r['left_over'] or '-'} |"
        )
    return lines


def misses(results: list[dict]) -> dict[tuple[str, str], str]:
    """(model, exporter) -> reason, for every case that fails tests/test_zoo.py's checks."""
    out = {}
    for r in results:
        key = (r["model"], r["exporter"])
        if "error" in r:
            out[key] = f"fails: {r['error']}"
            continue
        why = []
        if not r["exact"]:
            why.append(f"not exact (max error {relative_error(r)} of max|ref|)")
        if not r["reaches_deploy"]:
            c = r["counts"]
            gaps = []
            if c["onnxrep"]["linear"] > c["deploy"]["linear"]:
                gaps.append(f"Conv+Gemm+MatMul {c['onnxrep']['linear']} > {c['deploy']['linear']}")
            if c["onnxrep"]["bn"] > c["deploy"]["bn"]:
                gaps.append(f"BatchNormalization {c['onnxrep']['bn']} > {c['deploy']['bn']}")
            why.append(", ".join(gaps) + f" (left over: {r['left_over']}; declined: {top_skips(r, 3)})")
        if why:
            out[key] = "; ".join(why)
    return out


def top_skips(r: dict, n: int = 4) -> str:
    items = list(r.get("skipped", {}).items())[:n]
    return ", ".join(f"{k} x{v}" for k, v in items) or "nothing matched"


def markdown(doc: dict) -> str:
    results = doc["results"]
    env = doc["versions"]
    done = [r for r in results if "error" not in r]
    reached = sum(1 for r in done if r["reaches_deploy"] and r["exact"])
    lines = [
        "# Real-model zoo",
        "",
        "How far onnxrep takes the re-parameterizable models of [timm](https://github.com/huggingface/pytorch-image-models):",
        "the smallest variant of every family that `timm.utils.reparameterize_model` changes, built with",
        "random seeded weights (`pretrained=False`), randomized BatchNorm statistics and affine parameters",
        "and randomized layer scales (so that no fold is the identity), eval mode, 64x64, batch 1",
        "(`tests/zoo_models.py`). Each is exported in its training form and in its deploy form",
        "(`reparameterize_model`) with three exporter settings: `torchscript` (`dynamo=False`,",
        "`do_constant_folding=True`, opset 17), `torchscript-nofold` (the same, `do_constant_folding=False`)",
        "and `dynamo` (`dynamo=True`). The training export is optimized with `onnxrep.optimize` (defaults).",
        "",
        "Columns: node counts as *training export / onnxrep / deploy export*; **exact**: onnxrep's output",
        "equals the training export's in onnxruntime (graph optimizations off) element by element,",
        "`|a - ref| <= 1e-4 |ref| + 1e-4 max|ref|`; **reaches deploy**: no more Conv+Gemm+MatMul and no more",
        "BatchNormalization nodes than the deploy export; **left over**: the ops onnxrep's output has more",
        "of than the deploy export. `tests/test_zoo.py` asserts exact and reaches deploy for every row;",
        "the rows that do not yet are its strict xfails (`zoo_models.KNOWN_MISSES`).",
        "",
        f"Result: {reached} of {len(results)} cases exact and at the deploy form's counts"
        + (f"; {len(results) - len(done)} failed to export or optimize" if len(done) < len(results) else "") + ".",
        "",
        *table(results),
        "",
    ]
    behind = [r for r in done if not r["reaches_deploy"] or not r["exact"]]
    if behind:
        lines += ["## Why: the conditions that declined candidates", "",
                  "Per case that does not reach the deploy form: the passes' declines, most frequent first",
                  "(`pass/condition xN`; all of them in the JSON).", "",
                  "| model | exporter | declined |", "| --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['exporter']} | {top_skips(r)} |" for r in behind]
        lines.append("")
    if doc["absent"]:
        lines += ["## Not in this timm", ""] + [f"- `{k}`: {v}" for k, v in doc["absent"].items()] + [""]
    stale, missing = doc["known_misses"]["no_longer_missed"], doc["known_misses"]["not_in_table"]
    if stale or missing:
        lines += ["## The xfail table against this run", ""]
        lines += [f"- now passes, remove from `KNOWN_MISSES`: {m} / {e}" for m, e in stale]
        lines += [f"- fails, not in `KNOWN_MISSES`: {m} / {e}" for m, e in missing]
        lines.append("")
    lines += [
        "## Run",
        "",
        f"`{doc['command']}` on {doc['date'][:16].replace('T', ' ')} UTC, {doc['elapsed_s'] / 60:.0f} min;",
        f"{doc['machine']['cpu_model']} ({doc['machine']['cpu_usable']} usable cores, shared).",
        "Python {python}, torch {torch}, torchvision {torchvision}, timm {timm}, onnx {onnx}, onnxruntime {onnxruntime},".format(**env),
        f"onnxrep {env['onnxrep']} at `{env['onnxrep_commit']}`. Full results: `{doc['json']}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="zoo model names (default: all)")
    ap.add_argument("--exporters", nargs="+", default=list(zm.EXPORTERS), choices=zm.EXPORTERS)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"export folder (default {DEFAULT_CACHE})")
    ap.add_argument("--seed", type=int, default=zm.SEED)
    ap.add_argument("--markdown", type=Path, default=ROOT / "ZOO.md")
    ap.add_argument("--json", type=Path, default=None, help="default benchmarks/results/zoo-cpu-<date>.json")
    ap.add_argument("--no-write", action="store_true", help="print the table, write no files")
    ap.add_argument("--print-table", action="store_true", help="print KNOWN_MISSES as this run finds it")
    ap.add_argument("--at", metavar="REV", default=None,
                    help="run onnxrep as of git commit REV (e.g. HEAD), not the working tree")
    args = ap.parse_args(argv)
    if args.at is not None:
        tree = tempfile.TemporaryDirectory(prefix="onnxrep-at-")
        use_onnxrep_at(args.at, Path(tree.name))

    absent = zm.absent_models()
    names = args.models or [m.name for m in zm.ZOO if m.name not in absent]
    unknown = [n for n in names if n not in zm.BY_NAME]
    if unknown:
        ap.error(f"not in the zoo: {', '.join(unknown)}; the zoo: {', '.join(zm.BY_NAME)}")

    start = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    env = environment(args.at)
    builder = zm.Builder(args.cache, seed=args.seed)
    results = []
    for name in names:
        for exporter in args.exporters:
            r = run_case(builder, name, exporter)
            results.append(r)
            status = r.get("error") or (f"exact={r['exact']} reaches_deploy={r['reaches_deploy']} left over: {r['left_over'] or '-'}")
            log(f"{name:18s} {exporter:18s} {r['seconds']:6.1f}s  {status}")
        builder._models.pop(name, None)  # one model in memory at a time

    found = misses(results)
    known = {k: v for k, v in zm.KNOWN_MISSES.items() if k[0] in names and k[1] in args.exporters}
    json_path = args.json or ROOT / "benchmarks" / "results" / f"zoo-cpu-{start.date().isoformat()}.json"
    doc = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/zoo.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": start.isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        **env,
        "settings": {"seed": args.seed, "resolution": zm.RESOLUTION, "rtol": zm.RTOL, "atol_of_max": zm.ATOL_OF_MAX,
                     "torchscript_opset": zm.TORCHSCRIPT_OPSET, "exporters": args.exporters, "models": names},
        "absent": absent,
        "known_misses": {
            "no_longer_missed": sorted(k for k in known if k not in found),
            "not_in_table": sorted(k for k in found if k not in known),
        },
        "misses": {f"{m} / {e}": why for (m, e), why in found.items()},
        "json": str(json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path),
        "results": results,
    }
    text = markdown(doc)
    if args.no_write:
        print(text)
    else:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
        args.markdown.write_text(text)
        log(f"wrote {args.markdown} and {json_path}")
    if args.print_table:
        print(known_misses_source(found))
    return 0


def known_misses_source(found: dict[tuple[str, str], str]) -> str:
    """``zoo_models.KNOWN_MISSES`` as Python source, for ``found`` (:func:`misses`)."""
    lines = ["KNOWN_MISSES: dict[tuple[str, str], str] = {"]
    for (model, exporter), why in sorted(found.items()):
        head, sep, tail = why.partition("; declined: ")
        lines.append(f'    ("{model}", "{exporter}"): (')
        lines.append(f"        {json.dumps(head + sep)}" if sep else f"        {json.dumps(head)}")
        if sep:
            lines.append(f"        {json.dumps(tail)}")
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
