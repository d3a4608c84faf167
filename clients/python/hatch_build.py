"""Wheel build hook: the committed stubs (../../generated/referral: the _pb2 modules, their .pyi
type stubs, py.typed and api_descriptor.binpb) go into the wheel as the top-level ``referral``
package, the import path the generated code itself uses. An editable install (``make install``)
leaves them out and puts ../../generated on the path instead (dev-mode-dirs), so the server and
the tests import what ``make generate`` just wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

GENERATED = Path(__file__).resolve().parent.parent.parent / "generated" / "referral"


class GeneratedStubs(BuildHookInterface):  # type: ignore[misc]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        if not (GENERATED / "v1" / "__init__.py").is_file():
            raise FileNotFoundError(f"{GENERATED}: run `make generate` at the repository root first")
        build_data["force_include"][str(GENERATED)] = "referral"
