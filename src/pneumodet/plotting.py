"""Plotting conventions shared by every figure a user reads (reports, evaluate's PNGs): width, fonts, epoch axes,
annotated heatmaps. A foundation: matplotlib, numpy and pandas only, so that any layer may draw with it.

A report shows a figure at most :data:`CONTENT_WIDTH_PX` CSS pixels wide (the main column of
:mod:`pneumodet.reports.html`); a figure drawn :data:`FIGURE_WIDTH_IN` inches wide at the reports' 110 dpi
is 1100 px, so the browser shrinks it by at most ~8 % and a 9 pt label stays above 12 px on screen. Wider
figures, or smaller fonts, become unreadable at the size the page shows them (the browser test checks it).

Epochs are stored from 0 (``metrics.csv``'s ``epoch``, as Lightning counts them) and shown from 1
everywhere a user reads them (as ``train`` prints them): :func:`display_epochs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, MaxNLocator

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

__all__ = ["CONTENT_WIDTH_PX", "FIGURE_WIDTH_IN", "annotate_cells", "display_epochs", "epoch_axis",
           "text_color_on"]

#: The widest a report shows a figure, in CSS pixels (``.layout`` 1320 px less the contents column and padding).
CONTENT_WIDTH_PX = 1010
#: The width of a full-width report figure, in inches (1100 px at 110 dpi).
FIGURE_WIDTH_IN = 10.0


def display_epochs(epochs: pd.Series | Sequence[int] | np.ndarray) -> np.ndarray:
    """Stored epochs (from 0) as users read them (from 1)."""
    return np.asarray(epochs, dtype=np.int64) + 1


def epoch_axis(ax: Axes, epochs: Sequence[int] | np.ndarray, *, image: bool = False) -> None:
    """Whole-number epoch ticks numbered from 1 on ``ax``'s x axis.

    ``epochs`` are the displayed (1-based) epochs plotted. For a line plot the axis spans them with half
    an epoch of margin (one epoch is one tick, never a fractional range around it); for a heatmap
    (``image``) column ``i`` is labelled epoch ``epochs[i]``.
    """
    values = np.asarray(epochs, dtype=np.int64)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if image:
        ax.xaxis.set_major_formatter(FuncFormatter(
            lambda x, _pos: str(values[int(round(x))]) if 0 <= round(x) < len(values) else ""))
    elif len(values):
        ax.set_xlim(values.min() - 0.5, values.max() + 0.5)
    ax.set_xlabel("epoch")


def text_color_on(rgba: Sequence[float]) -> str:
    """``"white"`` or ``"black"``, whichever contrasts more with the colour ``rgba`` (WCAG relative luminance:
    black text from a luminance of 0.179 up, where the two contrasts are equal)."""
    channels = np.asarray(rgba[:3], dtype=np.float64)
    linear = np.where(channels <= 0.04045, channels / 12.92, ((channels + 0.055) / 1.055) ** 2.4)
    luminance = float(linear @ np.array([0.2126, 0.7152, 0.0722]))
    return "black" if luminance >= 0.179 else "white"


def annotate_cells(ax: Axes, image: AxesImage, values: np.ndarray, fmt: str = "{}", *,
                   fontsize: float = 11) -> None:
    """Write each cell's value on a heatmap drawn by ``ax.imshow`` (``image``), in the text colour that reads
    on that cell's colour (:func:`text_color_on`): counts stay readable on the darkest cells too."""
    values = np.asarray(values)
    for (i, j), value in np.ndenumerate(values):
        colour = text_color_on(image.cmap(image.norm(value)))
        ax.text(j, i, fmt.format(value), ha="center", va="center", color=colour, fontsize=fontsize)
