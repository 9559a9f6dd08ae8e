"""The vector selectors of a PromQL expression: which metric each names and with which label matchers.

Why a small lexer of our own: no PromQL parser ships on PyPI for Python alone that this project wants to
depend on, and promtool (which checks the syntax: tests/promtool.py) prints no syntax tree. The lexer is
meant for expressions promtool has accepted; on those it tells a metric name from what looks like one: a
function or aggregation (an identifier before "("), a keyword (by, on, and, offset, bool, ...), the label
names of a grouping (by (le, stage)) or of matchers ({stage="denoiser"}), durations ([5m], offset 1h,
subqueries [10m:1m]) and strings. Grafana's variables ($__rate_interval, ${datasource}) are read as tokens
of their own, so a dashboard's expressions can be read as they are written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:[0-9]+(?:ms|[smhdwy]))+)(?![A-Za-z0-9_:])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<variable>\$\{\w+\}|\$\w+)
  | (?P<op>==|!=|=~|!~|<=|>=|[-+*/%^<>=,(){}\[\]@:])
""", re.VERBOSE)
# Keywords are case-insensitive in PromQL; "inf" and "nan" are numbers.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "atan2", "inf", "nan"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}   # followed by a list of label names
_PAIRS = {"(": ")", "[": "]", "{": "}"}


class PromqlLexError(ValueError):
    pass


@dataclass
class Selector:
    """One vector selector: ``metric{label op "value", ...}`` (metric None for a bare ``{...}``)."""

    metric: str | None
    matchers: list[tuple[str, str, str]] = field(default_factory=list)     # (label, op, value)


def tokens(expr: str) -> list[tuple[str, str]]:
    out, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise PromqlLexError(f"cannot read {expr[position:position + 20]!r} in {expr!r}")
        if match.lastgroup not in ("space", "comment"):
            out.append((match.lastgroup, match.group()))
        position = match.end()
    return out


def _closing(toks: list[tuple[str, str]], start: int) -> int:
    """Index of the bracket closing the one at ``start``."""
    opening = toks[start][1]
    depth = 0
    for i in range(start, len(toks)):
        if toks[i][1] == opening:
            depth += 1
        elif toks[i][1] == _PAIRS[opening]:
            depth -= 1
            if depth == 0:
                return i
    raise PromqlLexError(f"unbalanced {opening!r}")


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def _matchers(toks: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    out = []
    for i in range(0, len(toks), 4):            # label op "value" [,]
        label, op, value = toks[i:i + 3]
        if label[0] not in ("ident", "string") or op[0] != "op" or value[0] != "string":
            raise PromqlLexError(f"not a label matcher: {toks[i:i + 3]}")
        out.append((label[1], op[1], _unquote(value[1])))
    return out


def selectors(expr: str) -> list[Selector]:
    """Every vector selector of ``expr``, in order."""
    toks = tokens(expr)
    found: list[Selector] = []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else None
        if text == "[":                                         # a range or subquery: durations only
            i = _closing(toks, i) + 1
        elif kind == "ident" and text.lower() in _GROUPING and following == "(":
            i = _closing(toks, i + 1) + 1                       # by (le, stage): label names
        elif kind == "ident" and text.lower() == "offset":
            i += 3 if following == "-" else 2                   # offset [-]5m
        elif kind == "ident" and text.lower() in _KEYWORDS:
            i += 1
        elif kind == "ident" and (following == "(" or (following or "").lower() in ("by", "without")):
            i += 1                                              # a function, an aggregation (sum by (x) (...))
        elif kind == "ident" or text == "{":
            name = text if kind == "ident" else None
            start = i + 1 if kind == "ident" else i
            matchers: list[tuple[str, str, str]] = []
            if start < len(toks) and toks[start][1] == "{":
                end = _closing(toks, start)
                matchers = _matchers(toks[start + 1:end])
                i = end + 1
            else:
                i = start
            if name is None:
                name = next((v for label, op, v in matchers if label == "__name__" and op == "="), None)
            found.append(Selector(name, matchers))
        else:
            i += 1
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` reads (a selector with no name of its own adds nothing)."""
    return {s.metric for s in selectors(expr) if s.metric is not None}
