"""Scalars of a TensorBoard folder, as TensorBoard itself shows them.

TensorBoard's own reader is used, with no sampling (every point kept), so points a killed run wrote after its
last checkpoint are dropped exactly as TensorBoard drops them (the resumed writer marks them with ``purge_step``).
"""

from __future__ import annotations

from pathlib import Path


def read_scalars(folder: Path, tags: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """``tag -> (steps, values)`` for those of ``tags`` the folder holds (nothing for a missing folder)."""
    if not Path(folder).is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    events.Reload()
    present = set(events.Tags().get(SCALARS, []))
    out = {}
    for tag in tags:
        if tag in present:
            points = sorted({event.step: event.value for event in events.Scalars(tag)}.items())
            out[tag] = ([step for step, _ in points], [float(value) for _, value in points])
    return out
