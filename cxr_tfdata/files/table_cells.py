"""CSV files and Markdown table cells that are safe whatever text reaches them.

Text that reaches a CSV from outside (file names, patient ids, error messages naming a path) can
start with a character a spreadsheet reads as the start of a formula (`=HYPERLINK(...)`). As OWASP
advises for CSV injection, such a cell is prefixed with a single quote, which spreadsheets show as
text; numbers written by the package are left as they are. A cell holding a line break (CR or LF),
a comma or a double quote is quoted (RFC 4180), so no file name can split a row or start a new one;
other cells, numbers included, are written bare, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# OWASP's list: formula starters, and tab and carriage return, which some spreadsheets strip first
# (a line feed too: it is whitespace to them as well).
FORMULA_STARTERS = ("=", "+", "-", "@", "\t", "\r", "\n")


def safe_cell(value) -> str | int | float:
    """`value` as a CSV cell: text starting like a formula gets a leading single quote."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTERS):
        return "'" + value
    return value


# Characters that make a CSV cell quoted. Python's csv.writer with lineterminator "\n" leaves a lone
# "\r" bare, which every reader takes for the end of the row: cells are quoted here instead.
_NEEDS_QUOTES = (",", '"', "\r", "\n")


def csv_cell(value) -> str:
    """One CSV cell as written: quoted (RFC 4180) when it holds a line break, a comma or a quote."""
    text = "" if value is None else str(value)
    if any(ch in text for ch in _NEEDS_QUOTES):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A whole CSV document, every text cell passed through `safe_cell`, one "\n"-ended line per row."""
    lines = [_csv_line([csv_cell(name) for name in header])]
    lines += [_csv_line([csv_cell(safe_cell(value)) for value in row]) for row in rows]
    return "".join(lines)


def _csv_line(cells: list[str]) -> str:
    # A row of one empty cell is written '""' (as csv.writer writes it): a bare empty line is no row.
    return ('""' if cells == [""] else ",".join(cells)) + "\n"


def markdown_cell(text) -> str:
    """A file name or reason as a Markdown table cell: no formula start, no column break, one line."""
    cell = str(safe_cell(text))
    return cell.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")
