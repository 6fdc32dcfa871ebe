"""How reports write numbers and names: the words shared by the records (``report``) and the
renderings (``render``), so that neither imports the other to write a cosine.

>>> number(0.98765, 3), number(float("nan"), 2), shortened("conv1+bn1+relu1", 10), plural(2, "layer")
('0.988', 'nan', 'conv1+b...', '2 layers')
"""

from __future__ import annotations

import math


def number(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals; "nan", "inf" and "-inf" as words."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def shortened(text: str, width: int = 40) -> str:
    """``text`` cut to ``width`` characters, "..." marking the cut."""
    return text if len(text) <= width else text[: width - 3] + "..."


def plural(number: int, noun: str) -> str:
    """"1 sample", "2 samples"."""
    return f"{number} {noun}{'s' if number != 1 else ''}"
