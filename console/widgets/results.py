"""The results table: one row per finished task, with the recipe's columns, filling as tasks finish.

Sorted as the recipe says until the person sorts by a column (s on a column, or a click on its header; again
to reverse). Numbers sort numerically and missing values last, as in results.csv.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, RowDoesNotExist

from console.rundata import format_value
from remote.results import sort_rows

STATE_STYLE = {"done": "green", "failed": "bold red", "cancelled": "magenta"}


class ResultsTable(DataTable[Text]):
    """Sortable results (a cell cursor: left/right picks the column s sorts by); Enter posts TaskChosen."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "sort_column", "Sort", tooltip="Sort by the column under the cursor (again: reverse)"),
    ]

    class TaskChosen(Message):
        """Enter on a row: show that task's log."""

        def __init__(self, task_id: str, label: str, log: str) -> None:
            super().__init__()
            self.task_id = task_id
            self.label = label
            self.log = log

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="cell", zebra_stripes=True)
        self.columns_shown: tuple[str, ...] = ()
        self.rows_data: tuple[Mapping[str, object], ...] = ()
        self.sort_key: str | None = None
        """Column chosen by the person ("-col" descending); None keeps the recipe's order."""

    def show(self, columns: Sequence[str], rows: Sequence[Mapping[str, object]], *,
             force: bool = False) -> None:
        """Redraw when the rows or columns changed, keeping the cursor on its task (and column)."""
        if not force and tuple(columns) == self.columns_shown and tuple(rows) == self.rows_data:
            return
        cursor_task = self._cursor_task()
        cursor_column = self.cursor_column
        if tuple(columns) != self.columns_shown:
            self.clear(columns=True)
            for col in columns:
                self.add_column(self._header(col), key=col)
            self.columns_shown = tuple(columns)
        else:
            self.clear()
        self.rows_data = tuple(rows)
        ordered = sort_rows([dict(r) for r in rows], [self.sort_key]) if self.sort_key else list(rows)
        for row in ordered:
            state = str(row.get("state", ""))
            cells = []
            for col in columns:
                value = row.get(col)
                style = STATE_STYLE.get(state, "") if col == "state" else ("red" if state == "failed" else "")
                text = Text(format_value(value), style=style,
                            justify="right" if isinstance(value, int | float) and not isinstance(value, bool)
                            else "left")
                cells.append(text)
            self.add_row(*cells, key=str(row.get("task", len(self.rows))))
        if cursor_task is not None:
            # The task may have left the table; the cursor then stays where it is.
            with contextlib.suppress(RowDoesNotExist):
                self.move_cursor(row=self.get_row_index(cursor_task), column=cursor_column)

    def _header(self, col: str) -> Text:
        key = self.sort_key or ""
        arrow = " ▲" if key == col else (" ▼" if key == f"-{col}" else "")
        return Text(col + arrow, style="bold")

    def _cursor_task(self) -> str | None:
        if not self.rows or self.cursor_row < 0:
            return None
        try:
            return str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)
        except CellDoesNotExist:
            return None

    def sort_by(self, col: str) -> None:
        """Sort by `col`; the same column again reverses."""
        self.sort_key = f"-{col}" if self.sort_key == col else col
        for key, column in self.columns.items():
            column.label = self._header(str(key.value))
        self.show(self.columns_shown, self.rows_data, force=True)

    def action_sort_column(self) -> None:
        if self.columns_shown and 0 <= self.cursor_column < len(self.columns_shown):
            self.sort_by(self.columns_shown[self.cursor_column])

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        if event.column_key.value is not None:
            self.sort_by(str(event.column_key.value))

    def on_data_table_cell_selected(self, event: DataTable.CellSelected) -> None:
        event.stop()
        task = event.cell_key.row_key.value
        row = next((r for r in self.rows_data if r.get("task") == task), None)
        if row is not None and task is not None:
            self.post_message(self.TaskChosen(task, str(row.get("label", "")), str(row.get("log", ""))))
