"""The progress callback every long step takes, and the CLI draws as a bar.

    >>> def progress(done: int, total: int, **postfix) -> None: ...
    >>> run_prune(model, settings, out, progress=progress)   # progress(3, 8, stage="select 1/8", loss=2.41)

`done` of `total` units of the current stage; keywords are shown beside the bar (`stage` names it).
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[..., None]


def announcer(progress: Progress | None, stage: str) -> Callable[[], None] | None:
    """A callback that shows `stage` on the progress bar before a step starts (None without a bar)."""
    return (lambda: progress(0, 1, stage=stage)) if progress else None
