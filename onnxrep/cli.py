"""The ``onnxrep`` command line: optimize, inspect, verify, demo, passes."""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import click

import numpy as np

from . import __version__, api, engine, io, misses
from .api import mismatch_error
from .equivalence import progress_steps
from .errors import InputError, OnnxrepError, UsageError, first_line
from .rewrite import Options

EXIT_ERROR = 1


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _guarded(fn):
    """Turn any failure into one line on stderr and a non-zero exit (ONNXREP_DEBUG=1: traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxrepError as err:
            _fail(str(err))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as err:  # an internal error still gets one line, not a traceback
            if os.environ.get("ONNXREP_DEBUG"):
                raise
            _fail(f"internal error: {type(err).__name__}: {first_line(err)} (set ONNXREP_DEBUG=1 for a traceback)")

    return wrapper


def _split(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _parse_dims(values: tuple[str, ...]) -> dict[str, int]:
    dims = {}
    for item in _split(values):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) <= 0:
            raise UsageError(f"--dim expects NAME=POSITIVE_INT, got {item!r}")
        dims[name.strip()] = int(value)
    return dims


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return ""


def _macs(n: int, exact: bool) -> str:
    text = f"{n / 1e9:.3f} G" if n >= 1e8 else f"{n / 1e6:.3f} M"
    return text if exact else text + "*"


def op_table(report: engine.Report, size_before: int | None = None, size_after: int | None = None) -> str:
    """The op histogram of the main graph before and after, the node count inside If / Loop / Scan
    bodies when there are any, MACs, weights and size, as a text table."""
    ops = sorted(set(report.ops_before) | set(report.ops_after), key=lambda o: (-report.ops_before.get(o, 0), o))
    rows = [(op, str(report.ops_before.get(op, 0)), str(report.ops_after.get(op, 0))) for op in ops]
    rows.append(("nodes", str(sum(report.ops_before.values())), str(sum(report.ops_after.values()))))
    if report.body_ops_before or report.body_ops_after:
        rows.append(("nodes in bodies", str(sum(report.body_ops_before.values())), str(sum(report.body_ops_after.values()))))
    cb, ca = report.cost_before, report.cost_after
    rows.append(("MACs", _macs(cb.macs, cb.exact), _macs(ca.macs, ca.exact)))
    rows.append(("weights", f"{cb.params:,}", f"{ca.params:,}"))
    if size_before is not None and size_after is not None:
        rows.append(("size", _size(size_before), _size(size_after)))
    header = ("op", "before", "after")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"  # noqa: E731
    body = [fmt(r) for r in rows[: len(ops)]]
    tail = [fmt(r) for r in rows[len(ops) :]]
    out = [line, fmt(header), line, *body, line, *tail, line]
    if not (cb.exact and ca.exact):
        out.append("* MACs with symbolic or unknown dims counted as 1")
    return "\n".join(out)


def pass_summary(report: engine.Report, details: bool) -> str:
    """A line per pass that matched something (every pass with ``details``, and each rewrite and
    skip under it)."""
    lines = []
    for p in report.passes:
        if not details and not p.matched:
            continue
        skipped = ", ".join(f"{c} {n}" for c, n in sorted(p.skipped_by_condition().items()))
        lines.append(
            f"{p.name}: {p.matched} matched, {p.rewritten} rewritten, {len(p.skipped)} skipped"
            + (f" ({skipped})" if skipped else "")
        )
        if details:
            lines.extend(f"  rewrite {r['candidate']}: {r['summary']}" for r in p.rewrites)
            lines.extend(f"  skip    {k}: {v}" for k, v in p.skipped.items())
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def layer_table(report: engine.Report) -> str:
    """Per layer whose channels were pruned: channels, weights and MACs before -> after."""
    rows = [
        (r["details"]["layer"], *(f"{_count(a)} -> {_count(b)}" for a, b in (r["details"][k] for k in ("channels", "params", "macs"))))
        for p in report.passes
        for r in p.rewrites
        if r.get("details") and "channels" in r["details"]
    ]
    if not rows:
        return ""
    header = ("pruned layer", "channels", "weights", "MACs")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def _write_json(path: str, data: dict) -> None:
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent if str(target.parent) else ".")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, target)


_PASS_OPTIONS = [
    click.option("--passes", "only", multiple=True, help="Comma-separated passes to run (default: all). See `onnxrep passes`."),
    click.option("--skip", multiple=True, help="Comma-separated passes to leave out."),
    click.option(
        "--allow-cost-increase", is_flag=True, help="Also apply rewrites that raise MACs or weights (e.g. HetConv densifying)."
    ),
    click.option(
        "--tolerance",
        type=click.FloatRange(min=0.0),
        default=0.0,
        show_default=True,
        help="identical-filters: also merge filters that differ by at most this (max abs). Not exact: opt-in.",
    ),
]


def _pass_options(fn):
    for opt in reversed(_PASS_OPTIONS):
        fn = opt(fn)
    return fn


class _Group(click.Group):
    """click's group, with a usage error told in one line (``error: ...``, exit status 2) instead
    of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _fail("interrupted", 130)
        except click.ClickException as err:
            hint = f" (see '{err.ctx.command_path} --help')" if getattr(err, "ctx", None) is not None else ""
            _fail(f"{err.format_message()}{hint}", err.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxrep")
def main() -> None:
    """Fold the training-time branches of re-parameterizable CNNs in ONNX models into single convs."""


def _load_inputs(specs: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    """User input sets: each ``FILE.npz`` is one set (arrays named by input); every ``NAME:FILE.npy``
    together make one more."""
    sets: list[dict[str, np.ndarray]] = []
    pairs: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.rpartition(":") if not spec.endswith(".npz") else ("", "", spec)
        if not path.endswith((".npy", ".npz")) or (path.endswith(".npy") and not (sep and name)):
            raise UsageError(f"--check-inputs expects NAME:FILE.npy or FILE.npz, got {spec!r}")
        try:
            if path.endswith(".npz"):
                with np.load(path, allow_pickle=False) as data:
                    sets.append({k: data[k] for k in data.files})
            else:
                pairs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"--check-inputs: cannot read {path}: {first_line(err)}") from None
    if pairs:
        sets.append(pairs)
    return sets


_CHECK_OPTIONS = [
    click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1), help="Random seeds for verification (each at magnitudes x1, x10, x1000)."),
    click.option("--dim", "dims", multiple=True, help="Value of a symbolic dim for verification, NAME=INT (repeatable, or comma-separated)."),
    click.option("--check-inputs", "check_inputs", multiple=True, help="Also verify on these inputs: NAME:FILE.npy (together one set) or FILE.npz (one set each); repeatable."),
    click.option("--rtol", type=click.FloatRange(min=0.0), default=None, help="Relative tolerance (default: from each output's dtype)."),
    click.option("--atol", type=click.FloatRange(min=0.0), default=None, help="Absolute tolerance (default: from each output's dtype)."),
]


def _check_options(fn):
    for opt in reversed(_CHECK_OPTIONS):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(path_type=str), help="Where to write the optimized model.")
@_pass_options
@click.option("--report", "report_path", type=click.Path(path_type=str), help="Write a JSON report here.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime equivalence check.")
@_check_options
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Save weights to OUT.data (default: as the input; always above 2 GB).",
)
@click.option(
    "--on-mismatch",
    type=click.Choice(list(api.ON_MISMATCH)),
    default="fail",
    show_default=True,
    help="On a verification mismatch: write nothing (fail), or leave out the rewrites responsible and verify again (bisect).",
)
@click.option("-v", "--verbose", is_flag=True, help="List every rewrite and skip.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_guarded
def optimize(input_path, output_path, only, skip, allow_cost_increase, tolerance, report_path, no_verify, seeds, dims, check_inputs, rtol, atol, external_data, on_mismatch, verbose, quiet):
    """Optimize IN and write the result to OUT (verified in onnxruntime first)."""
    only, skip = _split(only), _split(skip)
    check = api.Check(seeds, _parse_dims(dims), tuple(_load_inputs(check_inputs)), rtol, atol)
    api.check_options(only, skip, on_mismatch, tolerance, check)
    # where the results go is checked before any work: nothing is written when it cannot be
    io.check_writable(output_path)
    if report_path:
        io.check_writable(report_path)
    # without verification the input's weights are read only where a pass needs them; the
    # untouched ones go from the input file to the output when it is written
    model, had_external = io.load(input_path, lazy=no_verify)
    if not no_verify:
        api.check_model_args(model, check)
    size_before = io.tensor_bytes(model)
    t0 = time.perf_counter()
    options = Options(allow_cost_increase, tolerance=tolerance)
    with _progress(progress_steps(check.seeds, check.inputs, model), "verifying", quiet or no_verify) as step:
        out, report = api.run(
            model, only, skip, options, verify=None if no_verify else check, on_mismatch=on_mismatch, verify_progress=step
        )
    del model
    elapsed = time.perf_counter() - t0
    left_out = (report.verification or {}).get("left_out")
    if left_out:
        names = ", ".join(f"{c['candidate']} ({c['pass']})" for c in left_out)
        verb = "was" if len(left_out) == 1 else "were"
        click.echo(f"warning: rewrite{'s' if len(left_out) > 1 else ''} {names} broke equivalence and {verb} left out", err=True)
    size_after = io.tensor_bytes(out)
    io.save(out, output_path, external=had_external if external_data is None else external_data)
    if report_path:
        data = report.to_dict() | {"input": input_path, "output": output_path, "seconds": round(elapsed, 3)}
        data["not_rewritten"] = misses.to_list(misses.find(out, report))
        _write_json(report_path, data)
    if not quiet:
        click.echo(op_table(report, size_before, size_after))
        click.echo(pass_summary(report, verbose))
        layers = layer_table(report)
        if layers:
            click.echo(layers)
        verdict = "skipped" if no_verify else verification_line(report.verification)
        click.echo(f"verification: {verdict}; written {output_path} in {elapsed:.2f} s")


def verification_line(verification: dict) -> str:
    """One line: the input sets, the worst relative error per output and the regions checked."""
    sets = verification.get("input_sets", [])
    outputs = verification.get("outputs", [])
    worst = ", ".join(f"{o['name']} {o.get('max_rel_error', 0.0):.2g}" for o in outputs)
    text = f"{'ok' if verification.get('ok') else 'FAILED'} ({len(sets)} input sets"
    shapes = sorted({", ".join(f"{k} {v}" for k, v in s.get("shapes", {}).items()) for s in sets})
    if shapes:
        text += f"; shapes {' | '.join(shapes)}"
    text += f"; worst relative error {worst})" if worst else ")"
    regions_ = verification.get("regions", [])
    if regions_:
        proven = sum(1 for r in regions_ if r.get("proven"))
        one = len(regions_) == 1
        text += f"; {len(regions_)} rewritten region{'' if one else 's'} checked on {'its' if one else 'their'} own, {proven} proven"
    return text


@contextmanager
def _progress(length: int, label: str, quiet: bool = False):
    """A progress bar on stderr when it is a terminal; yields a step callback (a no-op otherwise)."""
    if quiet or not sys.stderr.isatty():
        yield lambda _: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield lambda _: bar.update(1)


@main.command()
@click.argument("input_path", metavar="IN", type=click.Path(path_type=str))
@_pass_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List every structure that is not rewritten (default: counts and the first few).")
@_guarded
def inspect(input_path, only, skip, allow_cost_increase, tolerance, as_json, verbose):
    """Show what optimize would rewrite in IN, why the rest is skipped, and every sum, affine op
    next to a linear layer and conv chain left standing, with the condition that stopped it.
    Writes nothing."""
    model, _ = io.load(input_path)
    out, report = engine.run(model, _split(only), _split(skip), Options(allow_cost_increase, tolerance=tolerance))
    left = misses.find(out, report)
    if as_json:
        click.echo(json.dumps(report.to_dict() | {"not_rewritten": misses.to_list(left)}, indent=2))
        return
    click.echo(op_table(report))
    click.echo(pass_summary(report, details=True))
    layers = layer_table(report)
    if layers:
        click.echo(layers)
    click.echo(misses.summary(left, details=verbose) or "not rewritten: 0")


@main.command()
@click.argument("model_a", metavar="A", type=click.Path(path_type=str))
@click.argument("model_b", metavar="B", type=click.Path(path_type=str))
@_check_options
@_guarded
def verify(model_a, model_b, seeds, dims, check_inputs, rtol, atol):
    """Check that B computes the same outputs as A in onnxruntime (exit 1 if not)."""
    check = api.Check(seeds, _parse_dims(dims), tuple(_load_inputs(check_inputs)), rtol, atol)
    api.check_options([], [], check=check)
    a, _ = io.load(model_a)
    b, _ = io.load(model_b)
    with _progress(progress_steps(check.seeds, check.inputs, a), "verifying") as step:
        result = api.verify(a, b, check.seeds, check.dims, check.rtol, check.atol, check.inputs, step)
    for o in result.outputs:
        click.echo(f"{'ok  ' if o.ok else 'FAIL'} {o.describe()}")
    click.echo(f"verification: {verification_line(result.to_dict())}")
    if not result.ok:
        raise mismatch_error(result, result.regions)


@main.command()
@click.argument("paths", metavar="MODEL...", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--ep", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Execution provider.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Value of symbolic batch dims.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1), help="Intra-op threads (CPU).")
@click.option("--rounds", default=50, show_default=True, type=click.IntRange(min=1), help="Timed interleaved rounds.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0), help="Untimed runs of each model first.")
@click.option("--dim", "dims", multiple=True, help="Value of a symbolic dim, NAME=INT (repeatable).")
@click.option("--json", "json_path", type=click.Path(path_type=str), help="Write the timings as JSON here.")
@_guarded
def bench(paths, ep, batch, threads, rounds, warmup, dims, json_path):
    """Time models in onnxruntime, interleaved round by round; ratios to the first model."""
    from . import bench as bench_mod

    dims = _parse_dims(dims)
    if json_path:
        io.check_writable(json_path)
    provider = bench_mod.provider_for(ep)
    models = {}
    for path in paths:
        models[path if path not in models else f"{path} ({len(models)})"] = io.load(path)[0]
    names = list(models)
    try:
        with _progress(rounds, "timing") as step:
            timings = bench_mod.interleaved_latency(
                models, rounds=rounds, warmup=warmup, threads=threads, dims=dims, provider=provider,
                progress=step, batch=batch,
            )
    except Exception as err:
        raise OnnxrepError(f"the models do not run in onnxruntime: {first_line(err)}") from None
    ref = timings[names[0]].median_ms
    width = max(len(n) for n in names)
    click.echo(f"onnxruntime {provider}, batch {batch}, {threads} threads, {warmup} warm-up + {rounds} interleaved rounds")
    click.echo(f"{'model':{width}}  {'median ms':>10}  {'min ms':>8}  {'max ms':>8}  {'ratio':>6}")
    for name in names:
        t = timings[name]
        click.echo(f"{name:{width}}  {t.median_ms:10.3f}  {t.min_ms:8.3f}  {t.max_ms:8.3f}  {t.median_ms / ref:6.3f}")
    if json_path:
        _write_json(json_path, {
            "provider": provider, "batch": batch, "threads": threads, "rounds": rounds, "warmup": warmup,
            "models": {n: timings[n].to_dict() | {"ratio": timings[n].median_ms / ref} for n in names},
        })


@main.command(name="passes")
def list_passes():
    """List the available passes."""
    for name, cls in engine.available_passes().items():
        click.echo(f"{name:18} {cls.summary}")


@main.command()
@click.option("--family", default="repvgg-a0", show_default=True, help="Which network from onnxrep.models.")
@click.option("--resolution", default=224, show_default=True, type=click.IntRange(min=8))
@click.option("--width-scale", default=1.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True))
@click.option("--rounds", default=20, show_default=True, type=click.IntRange(min=1), help="Timed rounds per model.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--save-dir", type=click.Path(file_okay=False, path_type=str), help="Also save the three models here.")
@_guarded
def demo(family, resolution, width_scale, rounds, threads, save_dir):
    """Build a training-time network, optimize and verify it, and compare latency on the CPU."""
    from . import bench, models

    if family not in models.BUILDERS:
        raise OnnxrepError(f"unknown family {family!r}; available: {', '.join(models.BUILDERS)}")
    build = models.BUILDERS[family]
    click.echo(f"building {family} (training form and hand-built deploy form) at {resolution}x{resolution}")
    train = build(deploy=False, resolution=resolution, width_scale=width_scale)
    deploy = build(deploy=True, resolution=resolution, width_scale=width_scale)
    t0 = time.perf_counter()
    optimized, report = engine.run(train)
    elapsed = time.perf_counter() - t0
    with _progress(progress_steps(3, (), train), "verifying") as step:
        api.verify_rewrite(train, optimized, report, api.Check(), step)
    if not report.verification["ok"]:
        raise OnnxrepError(f"verification failed: {verification_line(report.verification)}")
    click.echo(op_table(report, io.tensor_bytes(train), io.tensor_bytes(optimized)))
    click.echo(pass_summary(report, details=False))
    click.echo(f"optimized in {elapsed:.2f} s; verified against the training graph: ok")
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        for name, m in (("train", train), ("optimized", optimized), ("deploy", deploy)):
            io.save(m, os.path.join(save_dir, f"{family}_{name}.onnx"))
    click.echo(f"onnxruntime CPU latency, {threads} threads, {rounds} interleaved rounds:")
    models_ = {"training": train, "onnxrep": optimized, "deploy": deploy}
    with _progress(rounds, "timing") as step:
        timings = bench.interleaved_latency(models_, rounds=rounds, threads=threads, progress=step)
    ref = timings["deploy"].median_ms
    for name, t in timings.items():
        click.echo(f"  {name:9} median {t.median_ms:8.2f} ms   min {t.min_ms:8.2f} ms   vs deploy {t.median_ms / ref:5.2f}x")


if __name__ == "__main__":  # pragma: no cover
    main()
