"""Shared by the Python policies: resources, amounts and reasons as the Rust kit writes them
(policies/kit), so a task's reason reads the same whichever language placed it."""

RESOURCES = ("cpu", "memory", "storage", "gpu")


def fmt_amount(x: float) -> str:
    """An amount with at most two decimals and no trailing zeros: `2.5`, `4`, `0.13`."""
    if x != x or x in (float("inf"), float("-inf")) or x < 0:
        return "?"
    # Amounts are multiples of 1/1024: rounding to hundredths in integers is exact enough.
    hundredths = int(x * 100 + 0.5)
    whole, frac = divmod(hundredths, 100)
    if frac == 0:
        return f"{whole}"
    if frac % 10 == 0:
        return f"{whole}.{frac // 10}"
    return f"{whole}.{frac:02}"


def describe(r: int, amount: float) -> str:
    """`4 CPU`, `2.5 GB memory`, `1 GPU`."""
    n = fmt_amount(amount)
    name = RESOURCES[r]
    if name in ("cpu", "gpu"):
        return f"{n} {name.upper()}"
    return f"{n} GB {name}"


def describe_short(r: int, amount: float) -> str:
    """`4 CPU`, `2.5 GB`, `1 GPU`."""
    n = fmt_amount(amount)
    name = RESOURCES[r]
    if name in ("cpu", "gpu"):
        return f"{n} {name.upper()}"
    return f"{n} GB"


def describe_request(req) -> str:
    """"2 CPU, 4 GB memory": the non-zero parts of a request."""
    parts = [describe(r, a) for r, a in enumerate(req) if a > 0]
    return ", ".join(parts) if parts else "nothing"
