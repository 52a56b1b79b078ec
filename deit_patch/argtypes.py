"""Typed command-line numbers: argparse ``type=`` validators that refuse a bad value where it enters.

``positive_int``, ``non_negative_int``, ``finite_float``, ``positive_float``, ``non_negative_float``,
``seed_int``, ``probability`` ([0, 1]), ``rate`` ([0, 1): dropout, smoothing, mask ratios), ``fraction`` and
``keep_fraction`` ((0, 1]) turn the flag's text into a number or raise ``argparse.ArgumentTypeError`` saying what
is wrong and what to pass;
argparse puts the flag in front (``argument --lr: nan is not a finite number: pass ...``), so every refusal names
its flag. ``Number.check`` applies the same rule to a value that did not come through argparse (a ``Namespace``
built or changed in code). ``OneLineParser`` prints a usage error as one line and exits with code 2.

Used by both command lines (``main_maskedkd.py`` and ``python -m deit_patch.timm_train``); nothing here imports
timm, so the plugin keeps working on every timm it supports.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import math
import re
import sys
from typing import Any, Optional, Type


class Number:
    """An argparse ``type=``: ``kind`` (int or float) within ``[low, high]`` (bounds open where asked), finite.

    ``parses_to`` is the Python type of the value, for code that records flag types.
    """

    def __init__(self, name: str, kind: Type, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, meaning: str = ""):
        self.__name__ = name
        self.parses_to = kind
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.meaning = meaning

    def expected(self) -> str:
        """What the flag takes, in words: 'a whole number >= 1', 'a number in [0, 1)'."""
        what = "a whole number" if self.parses_to is int else "a finite number"
        low, high = _bound(self.low), _bound(self.high)
        if self.low is not None and self.high is not None:
            what += f" in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            what += f" {'>' if self.low_open else '>='} {low}"
        elif self.high is not None:
            what += f" {'<' if self.high_open else '<='} {high}"
        return what + (f" ({self.meaning})" if self.meaning else "")

    def __call__(self, text: str) -> Any:
        try:
            value = int(text) if self.parses_to is int else float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text} is not {self._noun()}: pass {self.expected()}") from None
        return self._checked(value, shown=text)

    def check(self, value: Any, flag: str) -> None:
        """Raise ValueError naming ``flag`` unless ``value`` (already a number) satisfies this type."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                self.parses_to is int and not float(value).is_integer()):
            raise ValueError(f"{flag} {value!r} is not {self._noun()}: pass {self.expected()}")
        try:
            self._checked(value, shown=str(value))
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{flag} {error}") from None

    def _noun(self) -> str:
        return "a whole number" if self.parses_to is int else "a number"

    def _checked(self, value: Any, *, shown: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{shown} is not a finite number: pass {self.expected()}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise argparse.ArgumentTypeError(f"{shown} is out of range: pass {self.expected()}")
        return value

    def __repr__(self) -> str:
        return self.__name__


def _bound(value: Optional[float]) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


positive_int = Number("positive_int", int, low=1)
non_negative_int = Number("non_negative_int", int, low=0)
# numpy seeds are 32-bit and the rank is added to the seed: stay well inside.
seed_int = Number("seed_int", int, low=0, high=2 ** 31 - 1)
finite_float = Number("finite_float", float)
positive_float = Number("positive_float", float, low=0, low_open=True)
non_negative_float = Number("non_negative_float", float, low=0)
probability = Number("probability", float, low=0, high=1)
rate = Number("rate", float, low=0, high=1, high_open=True)
fraction = Number("fraction", float, low=0, high=1, low_open=True)
keep_fraction = Number("keep_fraction", float, low=0, high=1, low_open=True, meaning="1.0 keeps every patch")


class KeywordArgs(argparse.Action):
    """``--x-kwargs K=V ...`` into a dict (values read as Python literals, else kept as text), strictly.

    timm's ``ParseKwargs`` raised a bare ValueError (a traceback) on an item without ``=``, and silently kept the
    last of a repeated key or of a repeated flag: each is a usage error here, naming the flag and the item.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if current and current is not self.default:
            raise argparse.ArgumentError(self, "given twice (the second would silently replace the first): put "
                                               "every KEY=VALUE after one " + str(option_string))
        kwargs: dict = {}
        for item in values:
            key, sep, text = item.partition("=")
            if not sep or not key.isidentifier() or not text:
                raise argparse.ArgumentError(self, f"{item!r} is not KEY=VALUE with a name and a value: write e.g. "
                                                   "depth=6 embed_dim=256")
            if key in kwargs:
                raise argparse.ArgumentError(self, f"{key} is given twice ({key}={kwargs[key]!r} and {item}): "
                                                   "give each name once")
            try:
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                kwargs[key] = text  # plain text needs no quoting on the command line, as in timm
        setattr(namespace, self.dest, kwargs)


def _option_hint(parser: argparse.ArgumentParser, message: str) -> str:
    """' (did you mean --num_workers?)' for an unrecognized flag close to a real one (DeiT mixes - and _)."""
    found = re.match(r"unrecognized arguments: (--[\w-]+)", message)
    if not found:
        return ""
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    flag = found.group(1)
    folded = {o.replace("_", "-"): o for o in options}
    close = [folded[flag.replace("_", "-")]] if flag.replace("_", "-") in folded else \
        difflib.get_close_matches(flag, options, n=3, cutoff=0.75)
    return f"; did you mean {' or '.join(close)}?" if close else ""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (``<prefix>: error: ...; see --help``), exit 2.

    An unrecognized flag close to a real one names it (``--num-workers``: did you mean ``--num_workers``?).
    """

    error_prefix: Optional[str] = None

    def error(self, message: str) -> None:  # argparse's contract: must not return
        prefix = self.error_prefix if self.error_prefix is not None else f"{self.prog}: "
        sys.stderr.write(f"{prefix}error: {message}{_option_hint(self, message)} (see --help)\n")
        sys.exit(2)


__all__ = ["KeywordArgs", "Number", "OneLineParser", "finite_float", "fraction", "keep_fraction", "non_negative_float",
           "non_negative_int", "positive_float", "positive_int", "probability", "rate", "seed_int"]
