"""Retry backoff.

The rule is the product's promise (ARCHITECTURE §1.5): a failed job with
retries left is due again after ``min(delay * 2 ** retry_count, cap)``
seconds, where ``retry_count`` is the count *before* this failure is added
and ``cap`` is one hour. There is no jitter: users rely on the exact figure,
and the FIFO ordering of the queue already spreads retries of a burst.
"""

from __future__ import annotations

from typing import Final

__all__ = ["BACKOFF_CAP", "retry_delay"]

#: Upper bound of any retry delay, in seconds.
BACKOFF_CAP: Final = 3600


def retry_delay(delay: int, retry_count: int, cap: int = BACKOFF_CAP) -> int:
    """Seconds to wait before the next attempt.

    Args:
        delay: the job's backoff base in seconds (``>= 0``).
        retry_count: retries already made, before this failure (``>= 0``).
        cap: the ceiling in seconds.

    Returns:
        ``min(delay * 2 ** retry_count, cap)``, computed without building huge
        integers for large ``retry_count``.
    """
    if delay <= 0:
        return 0
    # delay >= 1 and 2**12 > 3600: past 12 doublings the cap always wins, so
    # clamp the exponent instead of computing 2**retry_count for big counts.
    exponent = min(retry_count, cap.bit_length())
    return min(delay << exponent, cap)
