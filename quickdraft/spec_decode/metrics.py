"""Speculative-decoding counters: drafts, drafted and accepted tokens, acceptance by position."""

from __future__ import annotations

from dataclasses import dataclass, field


def acceptance_rate(num_accepted_tokens: int, num_draft_tokens: int) -> float | None:
    """Accepted / drafted tokens; None when nothing was drafted."""
    return num_accepted_tokens / num_draft_tokens if num_draft_tokens else None


def mean_acceptance_length(num_accepted_tokens: int, num_drafts: int) -> float | None:
    """Tokens emitted per drafting step, the bonus token included: 1 + accepted / drafts."""
    return 1.0 + num_accepted_tokens / num_drafts if num_drafts else None


class AcceptanceFigures:
    """The two figures users tune with, for any class counting ``num_drafts``,
    ``num_draft_tokens`` and ``num_accepted_tokens`` (a request, an engine, a batch job)."""

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens; None when nothing was drafted."""
        return acceptance_rate(self.num_accepted_tokens, self.num_draft_tokens)

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens emitted per drafting step: 1 + accepted / drafts; None without drafts."""
        return mean_acceptance_length(self.num_accepted_tokens, self.num_drafts)


@dataclass
class SpecDecodeStats(AcceptanceFigures):
    num_speculative_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [k]: drafts accepted at position i
    # Suffix decoding: per trie that supplied the draft ("request", "global"): [drafts, draft
    # tokens, accepted tokens].
    by_source: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.accepted_per_pos:
            self.accepted_per_pos = [0] * self.num_speculative_tokens

    def observe(self, num_draft_tokens: int, num_accepted: int, source: str | None = None) -> None:
        """One sequence's verification: ``num_accepted`` of ``num_draft_tokens`` drafts accepted
        (always a prefix, so positions 0..num_accepted-1 count as accepted)."""
        if num_draft_tokens == 0:
            return
        if source is not None:
            counts = self.by_source.setdefault(source, [0, 0, 0])
            counts[0] += 1
            counts[1] += num_draft_tokens
            counts[2] += num_accepted
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    def per_position_rates(self) -> list[float]:
        return [a / self.num_drafts if self.num_drafts else 0.0 for a in self.accepted_per_pos]

    def log_line(self) -> str:
        rate = self.acceptance_rate
        mean = self.mean_acceptance_length
        per_pos = ", ".join(f"{r:.3f}" for r in self.per_position_rates())
        sources = "".join(f", {name} trie: {d} drafts, {100 * a / t:.1f}% accepted"
                          for name, (d, t, a) in sorted(self.by_source.items()))
        return (f"SpecDecoding metrics: Draft acceptance rate: {100 * (rate or 0):.1f}%, "
                f"Mean acceptance length: {mean or 0:.2f}, Accepted: {self.num_accepted_tokens} tokens, "
                f"Drafted: {self.num_draft_tokens} tokens, Per-position acceptance rate: {per_pos}{sources}")
