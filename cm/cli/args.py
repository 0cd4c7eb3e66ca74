"""A command's arguments, declared once, in click's words.

The declarations below take the arguments of click's decorators and build a click command from them, and
click stays the command's face: its usage errors, its ``--help``, its messages. But importing click costs
a command ~32 ms, more than half of a 50 ms budget, so ``Command.parse`` reads the usual command lines
itself: known options (``--name VALUE``, ``--name=VALUE``, ``-x VALUE``, flags), ``--`` and positional
arguments, with values the declared type accepts. Anything else (``--help``, a typo, a bad value, grouped
short options, a missing argument) is not guessed at: click parses it, and says what is wrong.
tests/unit/test_cli_args.py checks that both read every command line the same way.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a command ~10 ms
    from typing import Any, Callable, NoReturn


class IntRange:
    def __init__(self, min: int):
        self.min = min

    def convert(self, text: str) -> int:
        value = int(text)
        if value < self.min:
            raise ValueError(f"{value} < {self.min}")
        return value

    def click(self, click):
        return click.IntRange(self.min)


class Choice:
    def __init__(self, choices: list[str]):
        self.choices = list(choices)

    def convert(self, text: str) -> str:
        if text not in self.choices:
            raise ValueError(text)
        return text

    def click(self, click):
        return click.Choice(self.choices)


class Convert:
    """A value made by ``function(text)``, which raises ValueError with the message for the user."""

    def __init__(self, function: Callable[[str], Any], name: str):
        self.function = function
        self.name = name

    def convert(self, text: str) -> Any:
        return self.function(text)

    def click(self, click):
        function, name = self.function, self.name

        class Type(click.ParamType):
            def convert(self, value, param, ctx):
                if not isinstance(value, str):
                    return value
                try:
                    return function(value)
                except ValueError as exc:
                    self.fail(str(exc), param, ctx)

        Type.name = name
        return Type()


class _Plain:
    """str, int, and click.UNPROCESSED (the words of a command to run, taken as they are)."""

    def __init__(self, kind: type, unprocessed: bool = False):
        self.kind = kind
        self.unprocessed = unprocessed

    def convert(self, text: str) -> Any:
        return self.kind(text)

    def click(self, click):
        return click.UNPROCESSED if self.unprocessed else self.kind


UNPROCESSED = _Plain(str, unprocessed=True)


def _type_of(declared: Any) -> Any:
    if declared is None or declared is str:
        return _Plain(str)
    if declared is int:
        return _Plain(int)
    if isinstance(declared, (IntRange, Choice, Convert, _Plain)):
        return declared
    raise TypeError(f"cm.cli.args has no type {declared!r}: add one that both parsers know")


KNOWN = {"type", "default", "is_flag", "multiple", "nargs", "required", "help", "metavar", "show_default", "hidden"}


class Param:
    def __init__(self, kind: str, decls: tuple[str, ...], attrs: dict[str, Any]):
        unknown = set(attrs) - KNOWN
        if unknown or attrs.get("nargs", 1) not in ((1, -1) if kind == "argument" else (1,)):
            raise TypeError(f"{decls}: cm.cli.args reads no {sorted(unknown) or 'nargs'}: teach both parsers first")
        self.kind = kind  # "option" or "argument"
        self.decls = decls
        self.attrs = attrs
        self.type = _type_of(attrs.get("type"))
        default = attrs.get("default")
        if isinstance(default, str) and self.type.convert(default) != default:
            raise TypeError(f"{decls}: a default that click would convert; give it converted")
        self.flag = bool(attrs.get("is_flag"))
        self.multiple = bool(attrs.get("multiple"))
        self.nargs = attrs.get("nargs", 1)
        named = [d for d in decls if not d.startswith("-")]
        if named:
            self.name = named[0]
        else:  # click's rule: the first long option, else the first short one
            longest = next((d for d in decls if d.startswith("--")), decls[0])
            self.name = longest.lstrip("-").replace("-", "_").lower()
        self.switches = [d for d in decls if d.startswith("-")]

    def default(self) -> Any:
        if self.flag:
            return bool(self.attrs.get("default", False))
        if self.multiple or self.nargs == -1:
            return ()
        value = self.attrs.get("default")
        return value() if callable(value) else value

    @property
    def required(self) -> bool:
        if "required" in self.attrs:
            return self.attrs["required"]
        return self.kind == "argument" and "default" not in self.attrs and self.nargs > 0  # click's rule


def option(*decls: str, **attrs: Any):
    return _declare("option", decls, attrs)


def argument(*decls: str, **attrs: Any):
    return _declare("argument", decls, attrs)


def _declare(kind: str, decls: tuple[str, ...], attrs: dict[str, Any]):
    def decorate(f):
        f.__dict__.setdefault("params", []).insert(0, Param(kind, decls, attrs))  # decorators run bottom-up
        return f

    return decorate


class Defer(Exception):
    """This command line is click's to read."""


class Command:
    def __init__(self, prog: str, function: Callable[..., None], params: list[Param], interspersed: bool):
        self.prog = prog
        self.function = function
        self.params = params
        self.interspersed = interspersed
        self.options = {s: p for p in params if p.kind == "option" for s in p.switches}
        self.arguments = [p for p in params if p.kind == "argument"]

    def parse(self, argv: list[str]) -> dict[str, Any] | None:
        """The parameters click would call the command with, or None where click must read the line."""
        try:
            return self._parse(argv)
        except (Defer, ValueError, TypeError):
            return None

    def _parse(self, argv: list[str]) -> dict[str, Any]:
        given: dict[str, list[str]] = {}
        flags: set[str] = set()
        positional: list[str] = []
        rest = list(argv)
        while rest:
            token = rest.pop(0)
            if token == "--":
                positional += rest
                break
            if token[:1] == "-" and len(token) > 1:
                name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
                param = self.options.get(name)
                if param is None:
                    raise Defer(token)
                if param.flag:
                    if eq:
                        raise Defer(token)
                    flags.add(param.name)
                    continue
                if not eq:
                    if not rest:
                        raise Defer(token)
                    value = rest.pop(0)
                given.setdefault(param.name, []).append(value)
            elif self.interspersed:
                positional.append(token)
            else:
                positional += [token, *rest]
                break
        params: dict[str, Any] = {}
        for p in self.params:
            if p.kind != "option":
                continue
            if p.flag:
                params[p.name] = True if p.name in flags else p.default()
            elif p.name in given:
                values = [p.type.convert(v) for v in given[p.name]]
                params[p.name] = tuple(values) if p.multiple else values[-1]
            elif p.required:
                raise Defer(p.name)
            else:
                params[p.name] = p.default()
        for p in self.arguments:
            if p.nargs == -1:
                params[p.name], positional = tuple(p.type.convert(v) for v in positional), []
                if p.required and not params[p.name]:
                    raise Defer(p.name)
            elif positional:
                params[p.name] = p.type.convert(positional.pop(0))
            elif p.required:
                raise Defer(p.name)
            else:
                params[p.name] = p.default()
        if positional:
            raise Defer(positional[0])
        return params

    def click(self):
        """The click command: the one that reads what parse() leaves, and the one --help describes."""
        import click

        f = self.function
        for p in reversed(self.params):
            attrs = dict(p.attrs)
            if "type" in attrs:
                attrs["type"] = p.type.click(click)
            f = (click.option if p.kind == "option" else click.argument)(*p.decls, **attrs)(f)
        settings = {"help_option_names": ["-h", "--help"], "allow_interspersed_args": self.interspersed}
        return click.command(name=self.prog, context_settings=settings, help=self.function.__doc__)(f)

    def main(self, argv: list[str] | None = None) -> NoReturn:
        completing = f"_{self.prog.replace('-', '_').upper()}_COMPLETE" in os.environ  # click's shell completion
        params = None if completing else self.parse(sys.argv[1:] if argv is None else argv)
        if params is None:
            run_as_program(lambda: self.click()(args=argv, prog_name=self.prog))
        else:
            run_as_program(lambda: self.function(**params))


def command(prog: str, interspersed: bool = True):
    """The command's function, with its options and arguments declared by option() and argument() above it."""

    def decorate(f) -> Command:
        return Command(prog, f, f.__dict__.pop("params", []), interspersed)

    return decorate


def run_as_program(body: Callable[[], Any]) -> NoReturn:
    """Run body as the process's whole work, and leave without the interpreter's teardown (a few ms of
    every command's run: nothing is left to clean up once output is flushed)."""
    try:
        body()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away (`cminfo | head`)
        code = code or 1
    os._exit(code)
