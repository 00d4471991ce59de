"""The --config YAML file read into flag values, each checked like its command-line flag.

    values = yaml_values(parser, "run.yaml")      # {dest: value}; parser.error (exit 2) on bad input

YAML gives typed values, argparse only strings, so each value is checked against its flag's
action before the action's own type converts it (the same messages then apply):
- a switch (`no-progress:`) takes a YAML boolean: `'false'` (a string) or `1` would read as true;
- an int flag takes an integer (`train-iters: 2.9` is not silently 2; `3.0` is 3), never a boolean;
- a float flag takes a number (a string such as '1e-3', which YAML 1.1 reads for unsigned 1e-3, is
  converted as argparse would), never a boolean (`lr: true` is not 1.0);
- a flag with N values (`rpg-clip: [0.2, 0.28, 3]`) takes a list of exactly N; any other a scalar;
- `null` sets nothing for a flag without a default and is an error for one with a default;
- a key given twice is an error (PyYAML would keep the last one silently).
Every message names the key as written in the file and the file.
"""
from __future__ import annotations

import argparse
import difflib

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_values(parser: argparse.ArgumentParser, path: str) -> dict:
    """{dest: value} of the YAML file at `path`, every value checked against its flag's action."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except OSError as error:
        parser.error(f"--config {path}: cannot read it ({error.strerror})")
    except UnicodeDecodeError as error:
        parser.error(f"--config {path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8")
    except yaml.YAMLError as error:
        parser.error(f"--config {path}: not valid YAML ({error})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: must hold a mapping of flag names to values")
    known = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    result = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known:
            close = difflib.get_close_matches(dest, known, n=3)
            hint = f"; did you mean {', '.join(name.replace('_', '-') for name in close)}?" if close else ""
            parser.error(f"--config {path}: unknown key {key!r}{hint}")
        try:
            result[dest] = _checked(known[dest], value)
        except ValueError as error:
            parser.error(f"--config {path}: `{key}: {value!r}` {error}")
    return result


def _checked(action: argparse.Action, value):
    """The value for `action`, converted by its type; ValueError saying what the flag takes."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # a switch (store_true)
        if value is None or isinstance(value, bool):
            return value
        raise ValueError(f"is not a YAML boolean; {flag} is a switch: write true or false, unquoted")
    if value is None:
        if action.default is not None:
            raise ValueError(f"gives {flag} no value; give one (default {action.default!r}) or drop the key")
        return None
    if isinstance(action.nargs, int):
        if not isinstance(value, list) or len(value) != action.nargs:
            raise ValueError(f"must be a list of {action.nargs} values ({flag} takes {action.nargs}: "
                             f"{' '.join(action.metavar or ())})")
        value = [_scalar(action, item) for item in value]
    else:
        value = _scalar(action, value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"is not one of {list(action.choices)}")
    return value


def _scalar(action: argparse.Action, value):
    flag, kind = action.option_strings[0], action.type
    if isinstance(value, (list, dict)) or isinstance(value, bool):
        raise ValueError(f"is a {type(value).__name__}; {flag} takes one {_kind_name(kind)}")
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"is not an integer; {flag} takes a whole number")
            return int(value)
    if kind is None:
        return str(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"is not a valid {_kind_name(kind)} for {flag}") from None


def _kind_name(kind) -> str:
    return {int: "integer", float: "number", None: "string"}.get(kind, getattr(kind, "__name__", "value"))
