"""
Command-line flags from a dataclass, for train_gpt2.py: every field is a flag, --name=value or
--name value, typed by its annotation; --help is built from the comment beside each field. A bad flag is a
ConfigError with one line that names it, never argparse's usage dump. Importing runs nothing.
"""
import argparse
import dataclasses
import inspect
import re
import typing



class ConfigError(ValueError):
    """Bad user input: the message names the flag or file and says what to do."""

BOOL_TYPES = (bool, typing.Optional[bool])


def _value_parser(name, typ):
    """argparse's type= for a field: true/false/1/0 for booleans (and auto for Optional[bool])."""
    def parse(text):
        low = text.lower()
        if typ in BOOL_TYPES:
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            if typ != bool and low in ("auto", "none", ""):
                return None
            raise argparse.ArgumentTypeError(f"--{name}={text}: expected true/false/1/0")
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name}={text}: expected a value of type {typ.__name__}")
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            arg = message.split()[2]
            if not arg.startswith("--"):
                raise ConfigError(f"unexpected argument {arg!r}: flags look like --name=value")
            raise ConfigError(f"unknown flag {arg.split('=')[0]}; valid flags: {self.valid}")
        flag, _, why = message.partition(": ")
        if why == "expected one argument":
            raise ConfigError(f"{flag.split()[-1]} needs a value: {flag.split()[-1]}=VALUE")
        raise ConfigError(why or message)


def parse_flags(cls, argv, bare=None):
    """The flags given in argv as {field: value}. A bare --flag is true for a boolean, bare[name] for the
    fields named in bare, and an error for the rest."""
    parser = _Parser(add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.valid = " ".join(f"--{f.name}" for f in dataclasses.fields(cls))
    for name, typ in typing.get_type_hints(cls).items():
        alone = (bare or {}).get(name, "true" if typ in BOOL_TYPES else None)
        parse = _value_parser(name, typ)
        parser.add_argument(f"--{name}", type=parse, nargs=None if alone is None else "?",
                            const=None if alone is None else parse(alone))
    return vars(parser.parse_args(argv))


def help_text(cls, doc, presets):
    """doc, then each flag's default and the comment beside its field, then the presets' names."""
    notes = dict(re.findall(r"^ +(\w+): [^=\n]+=[^#\n]*# *(.*)$", inspect.getsource(cls), re.M))
    lines = [doc.rstrip(), "", "flags (default, description):"]
    lines += [f"  {f'--{f.name}={f.default}':<28} {notes.get(f.name, '')}" for f in dataclasses.fields(cls)]
    return "\n".join(lines + [f"presets: {', '.join(presets)}"])
