"""How money is shown: cents for real runs, more digits for the fractions of a cent of a tiny local run."""


def usd(x: float) -> str:
    if 0 < abs(x) < 0.01:
        return f"${x:.4f}"
    return f"${x:,.2f}"
