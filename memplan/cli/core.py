"""What every command shares: one-line errors and exit codes, output that survives pipes and odd encodings,
plain ``--help`` with option panels, and cheap parsing of option values.

Exit codes: 0 answered (and it fits, where that is the question), 1 an answer of "does not fit", 2 bad
input or an output that cannot be written, 3 an internal error (a bug; ``MEMPLAN_DEBUG=1`` shows it).
"""

from __future__ import annotations

import errno
import functools
import math
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.25 vendors click
    from typer._click.exceptions import BadParameter, ClickException
except ImportError:  # pragma: no cover - older typer depends on click
    from click.exceptions import BadParameter, ClickException  # type: ignore[assignment]

from memplan.errors import MemplanError

EXIT_INPUT = 2
EXIT_INTERNAL = 3
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print one sentence on stderr and return the exit for bad input (code 2)."""
    message = " ".join(message.split())  # one line, whatever the message carried
    if not message.endswith((".", "?", "!")):
        message += "."
    say(f"memplan: {message}\n")
    return typer.Exit(code=EXIT_INPUT)


def say(text: str) -> None:
    """Write to stderr, replacing what its encoding cannot show (stderr must never fail the command)."""
    try:
        sys.stderr.write(text)
    except UnicodeEncodeError:
        encoding = getattr(sys.stderr, "encoding", None) or "ascii"
        sys.stderr.write(text.encode(encoding, "replace").decode(encoding))
    except OSError:
        pass


def output_error(exc: OSError | UnicodeEncodeError) -> int:
    """One sentence on stderr for output that cannot be written, and exit code 2 (a closed pipe, ``| head``,
    included: stderr usually still reaches the terminal)."""
    if isinstance(exc, UnicodeEncodeError):
        say(f"memplan: stdout's encoding ({exc.encoding}) cannot show {exc.object[exc.start:exc.end]!r}; "
            "set PYTHONIOENCODING=utf-8.\n")
        return EXIT_INPUT
    if exc.errno == errno.EPIPE:
        say("memplan: stdout was closed before the output was written.\n")
        silence_stdout()
        return EXIT_INPUT
    say(f"memplan: cannot write the output: {exc.strerror or exc}.\n")
    silence_stdout()
    return EXIT_INPUT


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again (and print a traceback)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def handled(func: F) -> F:
    """Turn user-fixable errors into one line on stderr and exit code 2; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MemplanError as exc:
            raise fail(str(exc)) from None
        except RecursionError:
            raise fail("the input is nested too deeply to read.") from None
        except (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
            raise
        except (UnicodeEncodeError, BrokenPipeError) as exc:
            raise typer.Exit(code=output_error(exc)) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EBADF):
                raise typer.Exit(code=output_error(exc)) from None
            raise internal(exc) from None
        except Exception as exc:  # a bug in memplan: one line, not a traceback, unless asked for
            raise internal(exc) from None

    return wrapper  # type: ignore[return-value]


def internal(exc: Exception) -> typer.Exit:
    if os.environ.get("MEMPLAN_DEBUG"):
        raise exc
    say(f"memplan: internal error ({type(exc).__name__}: {exc}); set MEMPLAN_DEBUG=1 for the traceback and please report it.\n")
    return typer.Exit(code=EXIT_INTERNAL)


MISSING_EXTRA = "{command} needs torch and transformers (and peft for LoRA); install memplan[measure]."


def require_extra(command: str = "measure") -> None:
    """A MemplanError (exit 2) naming ``command`` when torch or transformers is not importable."""
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("torch", "transformers")):
        raise MemplanError(MISSING_EXTRA.format(command=command))


def echo(text: str, *, nl: bool = True) -> None:
    """Write ``text`` to stdout (click's echo, which the test runner captures)."""
    typer.echo(text, nl=nl)


def console() -> Any:
    """A rich console for a terminal; tables fold long names rather than cut them."""
    from rich.console import Console

    return Console(soft_wrap=False)


def usage_sentence(exc: Any) -> str:
    """``memplan: <click's message, lower-cased first letter> (see 'memplan CMD --help').`` plus a newline."""
    message = exc.format_message().strip()
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help text itself (already printed)
        return f"{message}\n" if message else ""
    path = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "memplan"
    message = (message[:1].lower() + message[1:]).rstrip(".") or "invalid command line"
    return f"memplan: {message} (see '{path} --help').\n"


def run_group(group: TyperGroup, main: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """click's main without its standalone mode: parser errors are one sentence with exit 2, and output
    errors (closed pipe, full disk, an encoding that cannot show a character) are one line too."""
    try:
        code = main(*args, standalone_mode=False, **kwargs)
    except ClickException as exc:
        say(usage_sentence(exc))
        sys.exit(exc.exit_code)
    except (typer.Abort, EOFError):
        say("memplan: aborted.\n")
        sys.exit(1)
    except (UnicodeEncodeError, BrokenPipeError) as exc:
        sys.exit(output_error(exc))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EPIPE, errno.EIO):
            raise
        sys.exit(output_error(exc))
    try:
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        sys.exit(output_error(exc) if isinstance(exc, OSError) else EXIT_INPUT)
    sys.exit(code if isinstance(code, int) else 0)


# -- parsing: values coerced by plain Python, not one pydantic TypeAdapter per option ---------------

def _scalar(annotation: Any) -> Callable[[Any], Any] | None:
    """A converter for a scalar annotation, or None when typer should handle it."""
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return functools.partial(_enum, annotation)
    converters: dict[Any, Callable[[Any], Any]] = {str: str, int: _int, float: _float, bool: _bool, Path: Path}
    return converters.get(annotation)


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{value!r} is not a valid integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a valid integer") from None


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a valid number") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ValueError(f"{value!r} is not a finite number")
    return out


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "y", "t"):
        return True
    if text in ("0", "false", "no", "off", "n", "f"):
        return False
    raise ValueError(f"{value!r} is not a valid boolean")


def _enum(kind: type[Enum], value: Any) -> Enum:
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        from memplan.errors import did_you_mean

        names = [str(m.value) for m in kind]
        raise ValueError(f"{value!r} is not one of {', '.join(names)}.{did_you_mean(str(value), names)}") from None


class FastValue:
    """typer's runtime coercion contract (``coerce(value, param, ctx)``) for scalar and list-of-scalar
    options, without building a pydantic TypeAdapter for each (45 of them cost 0.18 s per run)."""

    def __init__(self, convert: Callable[[Any], Any]) -> None:
        self.convert = convert

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        many = param.multiple or param.nargs == -1
        if value is None:
            return () if many else None
        try:
            if many:
                return [self.convert(v) for v in value]
            return self.convert(value)
        except ValueError as exc:
            raise BadParameter(str(exc).rstrip("."), ctx=ctx, param=param) from None


def fast_value(annotation: Any) -> FastValue | None:
    if get_origin(annotation) in (list, tuple):
        inner = get_args(annotation)
        convert = _scalar(inner[0]) if len(inner) == 1 or (len(inner) == 2 and inner[1] is Ellipsis) else None
    else:
        convert = _scalar(annotation)
    return None if convert is None else FastValue(convert)


def install_fast_values(params: list[Any]) -> None:
    """Give each scalar option a ``FastValue`` before typer builds its own (typer keeps one it finds)."""
    for param in params:
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is not None and getattr(param, "_runtime_param", "") is None:
            fast = fast_value(descriptor.annotation)
            if fast is not None:
                param._runtime_param = fast


class Command(TyperCommand):
    """A command whose options parse cheaply (``FastValue``) and whose ``--help`` lists them under their
    panels (Hardware, Job, ...) in click's plain text, so ``--help`` does not import rich."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        install_fast_values(self.get_params(ctx))
        return super().parse_args(ctx, args)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                title = "Arguments" if param.param_type_name == "argument" else (
                    getattr(param, "rich_help_panel", None) or "Options")
                panels.setdefault(title, []).append(record)
        for title in sorted(panels, key=lambda t: (t != "Arguments", t == "Options", t == "Output")):
            with formatter.section(title):
                formatter.write_dl(panels[title])


def command_app() -> typer.Typer:
    """A one-command typer app for a command module (the root app loads it by name when it is called)."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
