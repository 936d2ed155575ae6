"""Names for what a number was measured with, shared by the printed summary and the plots."""
from __future__ import annotations


def workload_label(description: dict) -> str:
    """'agents workload, max_tokens 128' or 'synthetic workload, 96-128 output tokens'."""
    name = description.get("name", "?")
    if "max_tokens" in description:
        return f"{name} workload, max_tokens {description['max_tokens']}"
    low, high = description.get("output_tokens", ("?", "?"))
    return f"{name} workload, {low}-{high} output tokens"


def agents_meet(count: str | int) -> str:
    """'1 concurrent agent meets', '4 concurrent agents meet', '3 (range 2-4) concurrent agents meet'."""
    return "1 concurrent agent meets" if str(count) == "1" else f"{count} concurrent agents meet"
