"""The ``onnxrep`` command line: optimize, check, inspect, verify, bench, passes, demo.

Every command checks all of its options before any work, reports a failure as one line on
stderr (``error: ...``) and exits with one of the codes below, the same in every command:

====  ================================================================================
0     success (``check``: nothing left to fold)
1     error: an input that cannot be read or is not a valid model, an output that cannot
      be written, a failure while running
2     usage error: an unknown option or pass, a value out of range, a dim or input the
      model does not have (click's own usage errors exit 2 as well)
3     verification mismatch: the optimized model's outputs differ (nothing written)
4     ``optimize --fail-if-unchanged``: nothing changed (nothing written)
5     ``check``: a model still holds foldable training-time structure
130   interrupted
====  ================================================================================

The work itself goes through :mod:`onnxrep.api`; this module parses options and formats.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

import click

import numpy as np

from . import __version__, api, engine, misses
from .api import mismatch_error
from .errors import InputError, OnnxrepError, UsageError, VerificationError, first_line

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_MISMATCH = 3
EXIT_UNCHANGED = 4
EXIT_FOLDABLE = 5
EXIT_INTERRUPTED = 130

#: The exit codes, as documented (README and ``onnxrep --help``).
EXIT_CODES = {
    EXIT_OK: "success (check: nothing left to fold)",
    EXIT_ERROR: "error: unreadable or invalid input, output cannot be written, failure while running",
    EXIT_USAGE: "usage error: unknown option or pass, value out of range, dim or input the model does not have",
    EXIT_MISMATCH: "verification mismatch: the outputs differ (nothing written)",
    EXIT_UNCHANGED: "optimize --fail-if-unchanged: nothing changed (nothing written)",
    EXIT_FOLDABLE: "check: foldable training-time structure left",
    EXIT_INTERRUPTED: "interrupted",
}

STDOUT = "-"

#: What each command's arguments are (click shows arguments without help; the README's option
#: tables take it from here).
ARGUMENTS = {
    ("optimize", "IN"): "The model to optimize (.onnx; external data beside it).",
    ("optimize", "OUT"): "Where to write the result (or -o OUT). May be IN.",
    ("check", "MODEL..."): "One or more models to check (as pre-commit passes them).",
    ("inspect", "IN"): "The model to inspect.",
    ("verify", "A"): "The reference model.",
    ("verify", "B"): "The model that must compute the same outputs.",
    ("bench", "MODEL..."): "The models to time; ratios are to the first.",
}


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Unchanged(OnnxrepError):
    """``optimize --fail-if-unchanged`` and nothing to rewrite."""


def exit_code(err: OnnxrepError) -> int:
    """The exit code of an error: usage 2, verification mismatch 3, nothing to rewrite with
    ``--fail-if-unchanged`` 4, anything else 1."""
    if isinstance(err, _Unchanged):
        return EXIT_UNCHANGED
    if isinstance(err, UsageError):
        return EXIT_USAGE
    if isinstance(err, VerificationError):
        return EXIT_MISMATCH
    return EXIT_ERROR


def _guarded(fn):
    """Turn any failure into one line on stderr and its exit code (ONNXREP_DEBUG=1: traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxrepError as err:
            _Progress.clear_line()
            _fail(str(err), exit_code(err))
        except KeyboardInterrupt:
            _Progress.clear_line()
            _fail("interrupted", EXIT_INTERRUPTED)
        except Exception as err:  # an internal error still gets one line, not a traceback
            if os.environ.get("ONNXREP_DEBUG"):
                raise
            _Progress.clear_line()
            _fail(f"internal error: {type(err).__name__}: {first_line(err)} (set ONNXREP_DEBUG=1 for a traceback)")

    return wrapper


# --------------------------------------------------------------------------------------------
# option values
# --------------------------------------------------------------------------------------------


def _split(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _positive_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _parse_dims(values: tuple[str, ...]) -> dict[str, int]:
    """``--dim H=8 --dim W=8`` or ``--dim H=8,W=8``."""
    dims = {}
    for item in _split(values):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or _positive_int(value) is None:
            raise UsageError(f"--dim expects NAME=POSITIVE_INT, got {item!r}")
        dims[name.strip()] = int(value)
    return dims


def _parse_input_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    """``--input-shapes NAME:1,3,224,224`` (repeatable, or several in one value separated by
    spaces; the name may itself hold ``:``)."""
    shapes: dict[str, list[int]] = {}
    for item in (v for value in values for v in value.split()):  # "x:1,3 y:1,4" in one value too
        name, sep, dims = item.strip().rpartition(":")
        sizes = [_positive_int(d) for d in dims.split(",")] if dims.strip() else []
        if not sep or not name or not sizes or any(s is None for s in sizes):
            raise UsageError(f"--input-shapes expects NAME:D1,D2,... with positive sizes, got {item!r}")
        if name in shapes:
            raise UsageError(f"--input-shapes: input {name!r} given twice")
        shapes[name] = [int(s) for s in sizes]
    return shapes


def _load_inputs(specs: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    """User input sets: each ``FILE.npz`` is one set (arrays named by input); every ``NAME:FILE.npy``
    together make one more."""
    sets: list[dict[str, np.ndarray]] = []
    pairs: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.rpartition(":") if not spec.endswith(".npz") else ("", "", spec)
        if not path.endswith((".npy", ".npz")) or (path.endswith(".npy") and not (sep and name)):
            raise UsageError(f"--check-inputs expects NAME:FILE.npy or FILE.npz, got {spec!r}")
        if name in pairs:
            raise UsageError(f"--check-inputs: input {name!r} given twice")
        try:
            if path.endswith(".npz"):
                with np.load(path, allow_pickle=False) as data:
                    sets.append({k: data[k] for k in data.files})
            else:
                pairs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise InputError(f"--check-inputs: cannot read {path}: {first_line(err)}") from None
    if pairs:
        sets.append(pairs)
    return sets


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.abspath(a) == os.path.abspath(b) or (
            os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
        )
    except OSError:
        return False


def _check_json_target(path: str | None, models: list[str], outputs: list[str] = ()) -> None:
    """A ``--json`` file: writable, and neither a model read nor the model written."""
    if not path or path == STDOUT:
        return
    if path.endswith(".onnx"):
        raise UsageError(f"--json {path}: a report is not written over a .onnx file (a model given after --json?)")
    for other in [*models, *outputs]:
        if _same_file(path, other):
            raise UsageError(f"--json {path}: is also a model path; the report would replace it")
    api.check_writable(path)


def _write_json(path: str, data: dict) -> None:
    """``data`` as JSON to stdout (``-``) or to ``path``, atomically (a temporary file beside it,
    created with the permissions of any new file under the umask, then renamed)."""
    text = json.dumps(data, indent=2) + "\n"
    if path == STDOUT:
        click.echo(text, nl=False)
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Out:
    """Where the human-readable text goes: stdout, or stderr when stdout carries the JSON
    (``--json -``); nowhere with ``-q``."""

    def __init__(self, quiet: bool, json_path: str | None):
        self.quiet = quiet
        self.err = json_path == STDOUT

    def __call__(self, text: str = "") -> None:
        if not self.quiet and text:
            click.echo(text, err=self.err)


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


_STAGE_WORDS = {
    "load": "loaded",
    "passes": "passes:",
    "cleanup": "cleaned up",
    "verify": "verified",
    "bisect": "bisected",
    "not_rewritten": "listed the structures left standing",
    "write": "wrote",
    "bench": "timed",
}


class _Progress:
    """Progress of the stages (load, pass rounds, verification, write) on stderr: a status line
    rewritten in place on a terminal, a plain line per finished stage otherwise, nothing with
    ``quiet``. Keeps each stage's wall time (``timings``)."""

    _live = False  # a status line is on the terminal (cleared before any other output)

    def __init__(self, quiet: bool = False, lines: bool = True, **names: str):
        self.quiet = quiet
        self.tty = _stderr_is_tty()
        self.lines = lines  # the plain lines off a terminal (check prints a result per model instead)
        self.timings: dict[str, float] = {}
        self.names = names  # stage -> what it works on (a path), for the lines
        self._start: dict[str, float] = {}
        self._rounds = 0

    def __call__(self, event) -> None:
        """Take an :class:`onnxrep.Progress` event of the API."""
        stage = event.stage
        if event.end:
            self.end(stage, _rounds(self._rounds) if stage == "passes" else self.names.get(stage, ""))
        elif event.done == 0 and not self.running(stage):
            self._rounds = 0
            self.start(stage, event.detail or self.names.get(stage, ""))
        else:
            if stage == "passes":
                self._rounds = event.done
            self.step(stage, event.done, event.total, event.detail)

    @classmethod
    def clear_line(cls) -> None:
        if cls._live:
            click.echo("\r\033[K", err=True, nl=False)
            cls._live = False

    def _status(self, text: str) -> None:
        if self.quiet or not self.tty:
            return
        width = 100
        click.echo("\r\033[K" + text[:width], err=True, nl=False)
        type(self)._live = True

    def start(self, stage: str, detail: str = "") -> None:
        self._start[stage] = time.perf_counter()
        self._status(f"{stage} {detail}".rstrip() + " ...")

    def step(self, stage: str, done: int, total: int | None = None, detail: str = "") -> None:
        if stage not in self._start:
            self._start[stage] = time.perf_counter()
        count = f"{done}/{total}" if total else f"{done}"
        word = "round" if stage == "passes" else ""
        self._status(f"{stage} {word} {count} {detail}".replace("  ", " ").rstrip())

    def end(self, stage: str, detail: str = "") -> float:
        seconds = time.perf_counter() - self._start.pop(stage, time.perf_counter())
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        if self.quiet:
            return seconds
        if self.tty:
            self.clear_line()
        elif self.lines:
            click.echo(f"onnxrep: {_STAGE_WORDS.get(stage, stage)} {detail} in {seconds:.2f} s".replace("  ", " "), err=True)
        return seconds

    def running(self, stage: str) -> bool:
        return stage in self._start


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return ""


def _macs(n: int, exact: bool) -> str:
    text = f"{n / 1e9:.3f} G" if n >= 1e8 else f"{n / 1e6:.3f} M"
    return text if exact else text + "*"


def _value_text(value: dict) -> str:
    """``float32 [N, 3, 224, 224]`` from an entry of :func:`onnxrep.api.interface`."""
    shape = value.get("shape")
    if shape is None:
        return f"{value.get('dtype', '?')} (rank unknown)"
    return f"{value.get('dtype', '?')} [{', '.join('?' if d is None else str(d) for d in shape)}]"


def interface_rows(before: dict | None, after: dict | None) -> list[tuple[str, str, str]]:
    """Table rows of two :func:`onnxrep.api.interface` dicts: opset / IR version, then each input
    and output with its dtype and shape, before and after."""
    if not before or not after:
        return []
    rows = [("opset / IR", f"{before['opset']} / {before['ir_version']}", f"{after['opset']} / {after['ir_version']}")]
    for kind in ("inputs", "outputs"):
        b = {v["name"]: _value_text(v) for v in before[kind]}
        a = {v["name"]: _value_text(v) for v in after[kind]}
        for name in list(b) + [n for n in a if n not in b]:
            rows.append((f"{kind[:-1]} {name}", b.get(name, "-"), a.get(name, "-")))
    return rows


def _table(header: tuple[str, ...], sections: list[list[tuple[str, ...]]]) -> list[str]:
    rows = [r for s in sections for r in s]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"  # noqa: E731
    out = [line, fmt(header), line]
    for s in sections:
        if s:
            out.extend(fmt(r) for r in s)
            out.append(line)
    return out


def op_table(
    report: engine.Report,
    size_before: int | None = None,
    size_after: int | None = None,
    before: dict | None = None,
    after: dict | None = None,
) -> str:
    """The model's interface (opset and IR version, inputs and outputs with dtypes and shapes,
    from :func:`onnxrep.api.interface` dicts when given), the op histogram of the main graph before and after, the
    node count inside If / Loop / Scan bodies when there are any, MACs, weights and size."""
    head = interface_rows(before, after)
    ops = sorted(set(report.ops_before) | set(report.ops_after), key=lambda o: (-report.ops_before.get(o, 0), o))
    body = [(op, str(report.ops_before.get(op, 0)), str(report.ops_after.get(op, 0))) for op in ops]
    tail = [("nodes", str(sum(report.ops_before.values())), str(sum(report.ops_after.values())))]
    if report.body_ops_before or report.body_ops_after:
        tail.append(("nodes in bodies", str(sum(report.body_ops_before.values())), str(sum(report.body_ops_after.values()))))
    cb, ca = report.cost_before, report.cost_after
    tail.append(("MACs", _macs(cb.macs, cb.exact), _macs(ca.macs, ca.exact)))
    tail.append(("weights", f"{cb.params:,}", f"{ca.params:,}"))
    if size_before is not None and size_after is not None:
        tail.append(("size", _size(size_before), _size(size_after)))
    out = _table(("op" if not head else "", "before", "after"), [head, body, tail])
    if not (cb.exact and ca.exact):
        out.append("* MACs with symbolic or unknown dims counted as 1")
    return "\n".join(out)


def pass_summary(report: engine.Report, details: bool) -> str:
    """A line per pass that matched something (every pass with ``details``, and each rewrite and
    skip under it); empty when no pass matched anything (and not ``details``)."""
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


def nothing_line(report: engine.Report) -> str:
    """The plain "nothing to rewrite" line: why, in counts."""
    skipped = sum(len(p.skipped) for p in report.passes)
    if skipped:
        return f"nothing to rewrite: {skipped} candidate{'s' if skipped != 1 else ''} matched, all skipped (reasons above)"
    return "nothing to rewrite: no pass matched anything"


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


def _rounds(n: int) -> str:
    return f"{n} round{'' if n == 1 else 's'}"


def _timing_line(timings: dict[str, float]) -> str:
    """``1.23 s (load 0.01, passes 0.40, ...)`` from a report's stage timings."""
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in timings.items() if k != "total")
    total = timings.get("total", sum(v for k, v in timings.items() if k != "total"))
    return f"{total:.2f} s" + (f" ({parts})" if parts else "")


def cleanup_line(report) -> str:
    """What the generic cleanup did, in counts (empty when it did nothing or was off)."""
    done = {k: v for k, v in (getattr(report, "cleanup", None) or {}).items() if v}
    return ("cleanup: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in done.items())) if done else ""


# --------------------------------------------------------------------------------------------
# options shared by commands
# --------------------------------------------------------------------------------------------


def _options(*opts):
    def decorate(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return decorate


_pass_options = _options(
    click.option("--passes", "only", multiple=True, metavar="NAMES", help="Comma-separated passes to run (default: all; repeatable). See `onnxrep passes`."),
    click.option("--skip", multiple=True, metavar="NAMES", help="Comma-separated passes to leave out (repeatable)."),
    click.option(
        "--allow-cost-increase", is_flag=True, help="Also apply rewrites that raise MACs or weights (e.g. HetConv densifying)."
    ),
    click.option(
        "--tolerance",
        type=click.FloatRange(min=0.0),
        default=0.0,
        show_default=True,
        metavar="T",
        help="identical-filters: also merge filters that differ by at most this (max abs). Not exact: opt-in.",
    ),
    click.option(
        "--input-shapes",
        "input_shapes",
        multiple=True,
        metavar="NAME:D1,D2,...",
        help="Fix an input's shape for the passes (and the verification), e.g. x:1,3,224,224; static shapes let more folds apply (repeatable, or several in one quoted value: \"x:1,3 y:1,4\").",
    ),
)

_check_options = _options(
    click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1), metavar="N", help="Random seeds for verification (each at magnitudes x1, x10, x1000)."),
    click.option("--dim", "dims", multiple=True, metavar="NAME=INT", help="Value of a symbolic dim for verification (repeatable, or comma-separated: H=8,W=8)."),
    click.option("--check-inputs", "check_inputs", multiple=True, metavar="NAME:FILE.npy|FILE.npz", help="Also verify on these inputs: NAME:FILE.npy (together one set) or FILE.npz (one set each); repeatable."),
    click.option("--rtol", type=click.FloatRange(min=0.0), default=None, metavar="FLOAT", help="Relative tolerance (default: from each output's dtype)."),
    click.option("--atol", type=click.FloatRange(min=0.0), default=None, metavar="FLOAT", help="Absolute tolerance (default: from each output's dtype)."),
)


def _json_option(what: str):
    return click.option(
        "--json", "json_path", metavar="PATH", type=click.Path(path_type=str), is_flag=False, flag_value=STDOUT,
        help=f"Write {what} as JSON to PATH; to stdout with '-' or no PATH (the text then goes to stderr).",
    )


_cleanup_option = click.option(
    "--cleanup/--no-cleanup",
    default=True,
    show_default=True,
    help="After folding, turn Constant nodes into initializers, remove Identity nodes, drop unused and share duplicate initializers (default: on).",
)

_quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (and JSON asked for with --json -).")


class _Group(click.Group):
    """click's group, with a usage error told in one line (``error: ...``, exit status 2) instead
    of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _fail("interrupted", EXIT_INTERRUPTED)
        except getattr(click.exceptions, "NoArgsIsHelpError", ()) as err:
            # no command given: the help itself, as click prints it, and the usage exit status
            click.echo(err.ctx.get_help(), err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as err:
            hint = f" (see '{err.ctx.command_path} --help')" if getattr(err, "ctx", None) is not None else ""
            _fail(f"{err.format_message()}{hint}", err.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


_EPILOG = "Exit codes (every command):\n\n\b\n" + "\n".join(f"  {k:<4} {v}" for k, v in EXIT_CODES.items())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.version_option(__version__, prog_name="onnxrep")
def main() -> None:
    """Fold the training-time branches of re-parameterizable CNNs in ONNX models into single convs."""


# --------------------------------------------------------------------------------------------
# optimize
# --------------------------------------------------------------------------------------------


_SHAPE_LIKE = re.compile(r"^[^/\\]+:\d+(,\d+)*$")


def _output_path(positional: str | None, option: str | None) -> str:
    if positional and _SHAPE_LIKE.match(positional) and not positional.endswith(".onnx"):
        raise UsageError(
            f"OUT {positional!r} looks like an input shape: give each shape its own --input-shapes "
            f"(or all in one quoted value)"
        )
    if positional and option and not _same_file(positional, option):
        raise UsageError(f"two different outputs given: OUT {positional!r} and -o {option!r}")
    path = positional or option
    if not path:
        raise UsageError("missing output: give OUT or -o OUT")
    return path


@main.command()
@click.argument("input_path", metavar="IN", type=click.Path(path_type=str))
@click.argument("output_arg", metavar="[OUT]", required=False, type=click.Path(path_type=str))
@click.option("-o", "--output", "output_opt", metavar="OUT", type=click.Path(path_type=str), help="Where to write the optimized model (or OUT as the second argument).")
@_pass_options
@_json_option("the report")
@click.option("--report", "report_path", metavar="PATH", type=click.Path(path_type=str), help="Same as --json.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime equivalence check.")
@_check_options
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Save weights to OUT.data (default: as the input; always from 1.8 GB of tensors on).",
)
@click.option(
    "--on-mismatch",
    type=click.Choice(list(api.ON_MISMATCH)),
    default="fail",
    show_default=True,
    help="On a verification mismatch: write nothing (fail), or leave out the rewrites responsible and verify again (bisect).",
)
@_cleanup_option
@click.option("--fail-if-unchanged", is_flag=True, help=f"Exit {EXIT_UNCHANGED} and write nothing when the run changes nothing (no rewrite, no cleanup step).")
@click.option("-v", "--verbose", is_flag=True, help="List every rewrite and skip.")
@_quiet_option
@_guarded
def optimize(
    input_path, output_arg, output_opt, only, skip, allow_cost_increase, tolerance, input_shapes, json_path, report_path,
    no_verify, seeds, dims, check_inputs, rtol, atol, external_data, on_mismatch, cleanup, fail_if_unchanged, verbose, quiet,
):
    """Optimize IN and write the result to OUT (verified in onnxruntime first)."""
    # every option is checked before any work, and where the results go too
    output_path = _output_path(output_arg, output_opt)
    if json_path and report_path and json_path != report_path:
        raise UsageError(f"two different reports given: --json {json_path!r} and --report {report_path!r}")
    json_path = json_path or report_path
    only, skip = _split(only), _split(skip)
    shapes = _parse_input_shapes(input_shapes)
    if no_verify:
        unused = [name for name, given in (
            ("--dim", dims), ("--check-inputs", check_inputs), ("--rtol", rtol is not None), ("--atol", atol is not None),
            ("--on-mismatch", on_mismatch != "fail"),
        ) if given]
        if unused:
            raise UsageError(f"{', '.join(unused)} shape{'s' if len(unused) == 1 else ''} the verification, which --no-verify turns off")
    check = api.Check(seeds, _parse_dims(dims), tuple(_load_inputs(check_inputs)), rtol, atol)
    api.check_options(only, skip, on_mismatch, tolerance, check)
    api.check_writable(output_path)
    _check_json_target(json_path, [input_path], [output_path])
    say = _Out(quiet, json_path)
    progress = _Progress(quiet, load=input_path, write=output_path)
    report = api.optimize_file(
        input_path, output_path, external_data=external_data, write_unchanged=not fail_if_unchanged, passes=only,
        skip=skip, allow_cost_increase=allow_cost_increase, verify=not no_verify, seeds=check.seeds, dims=check.dims,
        progress=progress, on_mismatch=on_mismatch, tolerance=tolerance, rtol=rtol, atol=atol, inputs=check.inputs,
        input_shapes=shapes or None, cleanup=cleanup,
    )
    left_out = (report.verification or {}).get("left_out")
    if left_out:
        names = ", ".join(f"{c['candidate']} ({c['pass']})" for c in left_out)
        verb = "was" if len(left_out) == 1 else "were"
        click.echo(f"warning: rewrite{'s' if len(left_out) > 1 else ''} {names} broke equivalence and {verb} left out", err=True)
    say(op_table(report, report.size_before, report.size_after, report.interface_before, report.interface_after))
    say(pass_summary(report, verbose))
    say(layer_table(report))
    say(cleanup_line(report))
    if not report.rewritten:
        unchanged = not report.changed and report.output is not None
        say(nothing_line(report) + (f"; {output_path} is the input unchanged" if unchanged else ""))
    say(f"verification: {'skipped' if no_verify else verification_line(report.verification)}")
    if report.output is not None:
        say(f"written {output_path} in {_timing_line(report.seconds)}")
    if json_path:
        _write_json(json_path, report.to_dict() | {"input": input_path})
    if report.output is None:
        raise _Unchanged(f"nothing to rewrite or clean up in {input_path} (--fail-if-unchanged): nothing written")


# --------------------------------------------------------------------------------------------
# inspect / check
# --------------------------------------------------------------------------------------------


def _foldable_counts(found: list[dict]) -> str:
    counts: dict[str, int] = {}
    for f in found:
        counts[f["pass"]] = counts.get(f["pass"], 0) + 1
    return ", ".join(f"{n} {p}" for p, n in counts.items())


@main.command()
@click.argument("input_path", metavar="IN", type=click.Path(path_type=str))
@_pass_options
@_json_option("the report")
@_cleanup_option
@click.option("-v", "--verbose", is_flag=True, help="List every structure that is not rewritten (default: counts and the first few).")
@_quiet_option
@_guarded
def inspect(input_path, only, skip, allow_cost_increase, tolerance, input_shapes, json_path, cleanup, verbose, quiet):
    """Show what optimize would rewrite in IN, why the rest is skipped, and every sum, affine op
    next to a linear layer and conv chain left standing, with the condition that stopped it.
    Writes no model."""
    only, skip = _split(only), _split(skip)
    shapes = _parse_input_shapes(input_shapes)
    api.check_options(only, skip, tolerance=tolerance)
    _check_json_target(json_path, [input_path])
    say = _Out(quiet, json_path)
    _, report, left = api.inspect(
        input_path, passes=only, skip=skip, allow_cost_increase=allow_cost_increase, tolerance=tolerance,
        input_shapes=shapes or None, cleanup=cleanup, progress=_Progress(quiet, load=input_path),
    )
    say(op_table(report, report.size_before, report.size_after, report.interface_before, report.interface_after))
    say(pass_summary(report, details=True))
    say(layer_table(report))
    say(cleanup_line(report))
    if not report.rewritten:
        say(nothing_line(report))
    say(misses.summary(left, details=verbose) or "not rewritten: 0")
    if json_path:
        _write_json(json_path, report.to_dict() | {"input": input_path})


@main.command()
@click.argument("paths", metavar="MODEL...", nargs=-1, required=True, type=click.Path(path_type=str))
@_pass_options
@_json_option("the findings")
@click.option("-v", "--verbose", is_flag=True, help="Also list every structure left standing that no pass can fold, with its reason.")
@_quiet_option
@_guarded
def check(paths, only, skip, allow_cost_increase, tolerance, input_shapes, json_path, verbose, quiet):
    """Fail (exit 5) when a MODEL still holds training-time structure that optimize would fold;
    list it. For CI and pre-commit; writes no model."""
    only, skip = _split(only), _split(skip)
    shapes = _parse_input_shapes(input_shapes)
    api.check_options(only, skip, tolerance=tolerance)
    _check_json_target(json_path, list(paths))
    say = _Out(quiet, json_path)
    results, code = [], EXIT_OK
    for path in paths:
        try:
            _, report, left = api.inspect(
                path, passes=only, skip=skip, allow_cost_increase=allow_cost_increase, tolerance=tolerance,
                input_shapes=shapes or None, cleanup=False, progress=_Progress(quiet, lines=False),
            )
        except UsageError:
            raise  # the same for every model (an input_shapes name this one lacks): a usage error
        except OnnxrepError as err:
            _Progress.clear_line()
            click.echo(f"error: {err}", err=True)
            results.append({"path": path, "ok": False, "error": str(err)})
            code = EXIT_ERROR
            continue
        found = api.foldable(report)
        results.append({"path": path, "ok": not found, "foldable": found, "not_rewritten": report.not_rewritten})
        if found:
            code = code or EXIT_FOLDABLE
            say(f"{path}: {len(found)} foldable ({_foldable_counts(found)}); fold with: onnxrep optimize {path} OUT")
            for f in found:
                say(f"  {f['pass']} {f['candidate']}: {f['summary']}")
        else:
            standing = f" ({len(left)} structures left standing that no pass folds, -v to list)" if left and not verbose else ""
            say(f"{path}: ok, nothing to fold{standing}")
        if verbose and left:
            say("\n".join("  " + line for line in misses.summary(left, details=True).splitlines()))
    if json_path:
        _write_json(json_path, {"ok": code == EXIT_OK, "exit_code": code, "models": results})
    sys.exit(code)


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


@main.command()
@click.argument("model_a", metavar="A", type=click.Path(path_type=str))
@click.argument("model_b", metavar="B", type=click.Path(path_type=str))
@_check_options
@click.option("--input-shapes", "input_shapes", multiple=True, metavar="NAME:D1,D2,...", help="Fix an input's shape in both models, e.g. x:1,3,224,224 (repeatable, or several in one quoted value).")
@_json_option("the verification result")
@_quiet_option
@_guarded
def verify(model_a, model_b, seeds, dims, check_inputs, rtol, atol, input_shapes, json_path, quiet):
    """Check that B computes the same outputs as A in onnxruntime (exit 3 if not)."""
    check = api.Check(seeds, _parse_dims(dims), tuple(_load_inputs(check_inputs)), rtol, atol)
    api.check_options([], [], check=check)
    shapes = _parse_input_shapes(input_shapes)
    _check_json_target(json_path, [model_a, model_b])
    say = _Out(quiet, json_path)
    result = api.verify(
        model_a, model_b, seeds=check.seeds, dims=check.dims, rtol=rtol, atol=atol, inputs=check.inputs,
        progress=_Progress(quiet, load=f"{model_a} and {model_b}"), input_shapes=shapes or None,
    )
    for o in result.outputs:
        say(f"{'ok  ' if o.ok else 'FAIL'} {o.describe()}")
    say(f"verification: {verification_line(result.to_dict())}")
    if json_path:
        _write_json(json_path, {"a": model_a, "b": model_b} | result.to_dict())
    if not result.ok:
        raise mismatch_error(result, result.regions)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


@main.command()
@click.argument("paths", metavar="MODEL...", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--ep", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Execution provider.")
@click.option("--batch", default=None, type=click.IntRange(min=1), metavar="N", help="Batch size: the value of symbolic batch dims (default 1); a model with a static batch is refused unless it is that size.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1), metavar="N", help="Intra-op threads (CPU).")
@click.option("--rounds", default=50, show_default=True, type=click.IntRange(min=1), metavar="N", help="Timed interleaved rounds.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0), metavar="N", help="Untimed runs of each model first.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=INT", help="Value of a symbolic dim (repeatable, or comma-separated).")
@_json_option("the timings")
@_quiet_option
@_guarded
def bench(paths, ep, batch, threads, rounds, warmup, dims, json_path, quiet):
    """Time models in onnxruntime, interleaved round by round; ratios to the first model."""
    from . import bench as bench_mod

    dims = _parse_dims(dims)
    _check_json_target(json_path, list(paths))
    provider = bench_mod.provider_for(ep)
    say = _Out(quiet, json_path)
    progress = _Progress(quiet)
    progress.start("load")
    models = {}
    for path in paths:
        models[path if path not in models else f"{path} ({len(models)})"] = api.load(path)
    names = list(models)
    api.check_model_args(models[names[0]], api.Check(dims=dims))
    feeds = bench_mod.feeds_for(models, dims=dims, batch=batch)
    progress.end("load", f"{len(models)} model{'s' if len(models) > 1 else ''}")
    progress.start("bench")
    try:
        timings = bench_mod.interleaved_latency(
            models, rounds=rounds, warmup=warmup, threads=threads, provider=provider,
            progress=lambda done: progress.step("bench", done, rounds), feeds=feeds,
        )
    except OnnxrepError:
        raise
    except Exception as err:
        raise bench_mod.run_failure(err, models[names[0]], dims) from None
    progress.end("bench", f"{rounds} rounds")
    ref = timings[names[0]].median_ms
    width = max(len(n) for n in names)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    say(f"onnxruntime {provider}, inputs {shapes}, {threads} threads, {warmup} warm-up + {rounds} interleaved rounds")
    say(f"{'model':{width}}  {'median ms':>10}  {'min ms':>8}  {'max ms':>8}  {'ratio':>6}")
    for name in names:
        t = timings[name]
        say(f"{name:{width}}  {t.median_ms:10.3f}  {t.min_ms:8.3f}  {t.max_ms:8.3f}  {t.median_ms / ref:6.3f}")
    if json_path:
        _write_json(json_path, {
            "provider": provider, "batch": bench_mod.batch_of(feeds), "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "threads": threads, "rounds": rounds, "warmup": warmup,
            "models": {n: timings[n].to_dict() | {"ratio": timings[n].median_ms / ref} for n in names},
        })


# --------------------------------------------------------------------------------------------
# passes / demo
# --------------------------------------------------------------------------------------------


@main.command(name="passes")
def list_passes():
    """List the available passes."""
    for name, cls in engine.available_passes().items():
        click.echo(f"{name:18} {cls.summary}")


@main.command()
@click.option("--family", default="repvgg-a0", show_default=True, metavar="NAME", help="Which network from onnxrep.models.")
@click.option("--resolution", default=224, show_default=True, type=click.IntRange(min=8), metavar="PIXELS", help="Input height and width.")
@click.option("--width-scale", default=1.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True), metavar="FLOAT", help="Channel width multiplier.")
@click.option("--rounds", default=20, show_default=True, type=click.IntRange(min=1), metavar="N", help="Timed rounds per model.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1), metavar="N", help="Intra-op threads (CPU).")
@click.option("--save-dir", type=click.Path(file_okay=False, path_type=str), metavar="DIR", help="Also save the three models here.")
@_guarded
def demo(family, resolution, width_scale, rounds, threads, save_dir):
    """Build a training-time network, optimize and verify it, and compare latency on the CPU."""
    from . import bench, models

    if family not in models.BUILDERS:
        raise UsageError(f"unknown family {family!r}; available: {', '.join(models.BUILDERS)}")
    build = models.BUILDERS[family]
    click.echo(f"building {family} (training form and hand-built deploy form) at {resolution}x{resolution}")
    train = build(deploy=False, resolution=resolution, width_scale=width_scale)
    deploy = build(deploy=True, resolution=resolution, width_scale=width_scale)
    progress = _Progress()
    optimized, report = api.optimize(train, verify=True, progress=progress)
    click.echo(op_table(report, report.size_before, report.size_after, report.interface_before, report.interface_after))
    click.echo(pass_summary(report, details=False))
    click.echo(f"optimized; verified against the training graph: ok; {_timing_line(report.seconds)}")
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        for name, m in (("train", train), ("optimized", optimized), ("deploy", deploy)):
            api.save(m, os.path.join(save_dir, f"{family}_{name}.onnx"))
    click.echo(f"onnxruntime CPU latency, {threads} threads, {rounds} interleaved rounds:")
    models_ = {"training": train, "onnxrep": optimized, "deploy": deploy}
    progress.start("bench")
    timings = bench.interleaved_latency(models_, rounds=rounds, threads=threads, progress=lambda done: progress.step("bench", done, rounds))
    progress.end("bench")
    ref = timings["deploy"].median_ms
    for name, t in timings.items():
        click.echo(f"  {name:9} median {t.median_ms:8.2f} ms   min {t.min_ms:8.2f} ms   vs deploy {t.median_ms / ref:5.2f}x")


if __name__ == "__main__":  # pragma: no cover
    main()
