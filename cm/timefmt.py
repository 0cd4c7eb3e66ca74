"""Slurm's time formats, both ways."""

from __future__ import annotations


class TimeFormatError(ValueError):
    pass


def parse_time(text: str) -> float:
    """Seconds from Slurm's forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    raw = text.strip()
    try:
        days = 0
        if "-" in raw:
            d, raw = raw.split("-", 1)
            days = int(d)
            parts = [int(p) for p in raw.split(":")]
            if not 1 <= len(parts) <= 3:
                raise ValueError
            h, m, s = (parts + [0, 0])[:3]
        else:
            parts = [int(p) for p in raw.split(":")]
            if len(parts) == 1:
                h, m, s = 0, parts[0], 0
            elif len(parts) == 2:
                h, m, s = 0, parts[0], parts[1]
            elif len(parts) == 3:
                h, m, s = parts
            else:
                raise ValueError
    except ValueError:
        raise TimeFormatError(
            f"invalid time {text!r}: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        ) from None
    if min(days, h, m, s) < 0:
        raise TimeFormatError(f"invalid time {text!r}: negative")
    total = ((days * 24 + h) * 60 + m) * 60 + s
    if total <= 0:
        raise TimeFormatError(f"invalid time {text!r}: must be positive")
    return float(total)


def format_duration(seconds: float | None) -> str:
    """Slurm's elapsed format: M:SS, H:MM:SS or D-HH:MM:SS."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}-{h:02d}:{m:02d}:{s:02d}"
    if h:
        return f"{h}:{m:02d}:{s:02d}"
    return f"{m}:{s:02d}"
