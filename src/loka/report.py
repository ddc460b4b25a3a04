"""Before/after probes of an edit: what the CLI's ``edit`` and the demo print (defined in
:mod:`loka.result`, the layer of ``loka.edit(..., report=True)``)."""

from __future__ import annotations

from .result import format_table, probe_rows

__all__ = ["format_table", "probe_rows"]
