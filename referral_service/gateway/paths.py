"""``google.api.http`` path templates (see ``google/api/http.proto``)::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;

A template compiles to a regular expression matched against the raw (still percent-encoded)
request path, so that ``%2F`` inside a single-segment variable is data, not a separator.
Single-segment values are fully percent-decoded; multi-segment (``**``) values are decoded
segment by segment and keep their ``/``, as the spec's "reserved expansion" asks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_LITERAL = re.compile(r"^[A-Za-z0-9._~!$&'()+,;=@%-]+$")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    source: str
    regex: re.Pattern[str]
    #: Variable field paths in order, with whether the variable spans several segments.
    variables: tuple[tuple[str, bool], ...]
    #: Number of literal segments: more literals win when several templates match.
    literals: int

    def match(self, raw_path: str) -> dict[str, str] | None:
        found = self.regex.fullmatch(raw_path)
        if found is None:
            return None
        values: dict[str, str] = {}
        for index, (field_path, multi) in enumerate(self.variables):
            raw = found.group(index + 1)
            values[field_path] = "/".join(unquote(part) for part in raw.split("/")) if multi else unquote(raw)
        return values

    @property
    def openapi_path(self) -> str:
        """The template as an OpenAPI path: ``/v1/users/{referrer_id}/referrals``."""
        text = re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", self.source)
        return text


def _segments(text: str, in_variable: bool) -> tuple[str, int, bool]:
    """Regex for ``Segments`` (without variables when ``in_variable``); returns the regex, the
    number of literal segments and whether it can span several segments."""
    parts: list[str] = []
    literals = 0
    multi = False
    for segment in text.split("/"):
        if segment == "*":
            parts.append(r"[^/]+")
        elif segment == "**":
            parts.append(r"[^/]+(?:/[^/]+)*")
            multi = True
        elif _LITERAL.fullmatch(segment):
            parts.append(re.escape(segment))
            literals += 1
        else:
            where = "variable" if in_variable else "template"
            raise TemplateError(f"bad segment {segment!r} in {where} {text!r}")
    return "/".join(parts), literals, multi


def compile_template(source: str) -> Template:
    if not source.startswith("/"):
        raise TemplateError(f"path template must start with '/': {source!r}")
    body, verb = source, ""
    # The verb is the ':LITERAL' after the last segment (outside braces).
    last = source.rsplit("/", 1)[-1]
    if ":" in last and "}" not in last.split(":")[-1]:
        body, _, verb = source.rpartition(":")
    pattern: list[str] = []
    variables: list[tuple[str, bool]] = []
    literals = 0
    position = 1
    for token in re.finditer(r"\{([^}]*)\}|([^/{}]+)|(/)", body[1:]):
        variable, plain, slash = token.groups()
        position += len(token.group(0))
        if slash:
            pattern.append("/")
        elif plain is not None:
            regex, count, _ = _segments(plain, in_variable=False)
            pattern.append(regex)
            literals += count
        else:
            field_path, _, sub = variable.partition("=")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", field_path):
                raise TemplateError(f"bad variable {variable!r} in {source!r}")
            regex, count, multi = _segments(sub or "*", in_variable=True)
            literals += count
            pattern.append(f"({regex})")
            variables.append((field_path, multi))
    if position != len(body):
        raise TemplateError(f"cannot parse path template {source!r}")
    if verb:
        if not _LITERAL.fullmatch(verb):
            raise TemplateError(f"bad verb {verb!r} in {source!r}")
        pattern.append(":" + re.escape(verb))
    return Template(source, re.compile("/" + "".join(pattern)), tuple(variables), literals)
