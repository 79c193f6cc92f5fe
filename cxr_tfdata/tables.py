"""CSV files that are safe to open in a spreadsheet.

Text that reaches a CSV from outside (file names, patient ids, error messages naming a path) can
start with a character a spreadsheet reads as the start of a formula (`=HYPERLINK(...)`). As OWASP
advises for CSV injection, such a cell is prefixed with a single quote, which spreadsheets show as
text; numbers written by the package are left as they are.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

# OWASP's list: formula starters, and tab and carriage return, which some spreadsheets strip first
# (a line feed too: it is whitespace to them as well).
FORMULA_STARTERS = ("=", "+", "-", "@", "\t", "\r", "\n")


def safe_cell(value) -> str | int | float:
    """`value` as a CSV cell: text starting like a formula gets a leading single quote."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTERS):
        return "'" + value
    return value


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A whole CSV document, every text cell passed through `safe_cell`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([safe_cell(value) for value in row])
    return buf.getvalue()
