"""`tqdm`: tqdm.auto's progress bar, whose notebook widget leaves plain text behind when it closes.

In a terminal this is `tqdm.auto.tqdm` itself. In a notebook, tqdm.auto draws an ipywidgets bar; a
finished bar's output would keep pointing at a widget model that dies with the kernel, so a saved
and reopened notebook shows "Error displaying widget: model not found" where the bar was. Here the
bar is displayed with a display id, and on closing its output is replaced by text: the final bar
when `leave=True` (or when the loop stopped early, so the learner sees where), nothing otherwise.
The bar's widget models are closed too, so nothing is left for the front end to look up.
"""

from __future__ import annotations

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.notebook import tqdm as _notebook_tqdm

__all__ = ["tqdm"]


class _NotebookBar(_notebook_tqdm):
    """tqdm's notebook bar, displayed with a display id and replaced by text when it closes."""

    def __init__(self, *args, **kwargs):
        kwargs["display"] = False  # we display it ourselves, with a display id
        super().__init__(*args, **kwargs)
        self._handle = None
        if not self.disable:
            from IPython.display import display

            self._handle = display(self.container, display_id=True)
            self.displayed = True  # stops tqdm displaying it a second time (its `delay` path)

    def close(self) -> None:
        stopped_early = bool(self.total) and self.n < self.total
        super().close()
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is None:
            return
        text = str(self) if self.leave or stopped_early else ""
        handle.update({"text/plain": text}, raw=True)
        for widget in (*self.container.children, self.container):
            widget.close()


# tqdm.auto picks its notebook bar only inside a Jupyter kernel with ipywidgets: follow its choice.
tqdm = _NotebookBar if issubclass(_auto_tqdm, _notebook_tqdm) else _auto_tqdm
