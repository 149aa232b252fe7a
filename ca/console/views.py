"""What each page shows, from the admin API's answers: pure functions, tested alone.

The admin API answers in its own JSON (timestamps in Unix seconds); these turn it into
what a template lays out — an authority's bar on the timeline, an agent's state, the
rule that decided an explained request — so the templates only place things.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

QUIET_AFTER_SECONDS = 300
"""An agent not heard from for this long is shown as quiet (agents sync every few
seconds by default)."""

_SOURCE = re.compile(r"^(?P<text>.*?)\s{2}\[(?P<source>(?:[^\[\]]|\[[^\[\]]*\])*)\]$")


@dataclass(frozen=True)
class Bar:
    """One authority on the timeline, its span in percent of the timeline's width."""

    authority: Mapping[str, Any]
    left: float
    width: float
    row: int


@dataclass(frozen=True)
class Mark:
    label: str
    at: int
    left: float


@dataclass(frozen=True)
class Timeline:
    start: int
    end: int
    bars: tuple[Bar, ...]
    marks: tuple[Mark, ...]
    ticks: tuple[Mark, ...]


def timeline(
    authorities: Iterable[Mapping[str, Any]],
    next_rotation: Mapping[str, Any] | None,
    now: float,
) -> Timeline:
    """Authorities of one kind (prepared, active, old) on one time axis, with now and
    the next rotation's steps marked."""
    found = sorted(authorities, key=lambda a: (int(a["not_before"]), str(a["authority_id"])))
    times = [int(now)]
    for authority in found:
        times += [int(authority["not_before"]), int(authority["expires_at"])]
    steps = [("prepare", (next_rotation or {}).get("prepare_at")),
             ("activate", (next_rotation or {}).get("activate_at"))]
    times += [int(at) for _, at in steps if at is not None]
    start, end = min(times), max(times)
    span = max(end - start, 1)

    def at(t: float) -> float:
        return round(100 * (t - start) / span, 2)

    bars = tuple(
        Bar(a, at(int(a["not_before"])),
            max(at(int(a["expires_at"])) - at(int(a["not_before"])), 0.5), row)
        for row, a in enumerate(found)
    )
    marks = [Mark("now", int(now), at(now))]
    marks += [Mark(f"next {label}", int(t), at(int(t))) for label, t in steps if t is not None]
    ticks = tuple(Mark("", int(start + span * i / 4), 25.0 * i) for i in range(5))
    return Timeline(start, end, bars, tuple(marks), ticks)


def agent_state(agent: Mapping[str, Any], now: float,
                quiet_after: float = QUIET_AFTER_SECONDS) -> str:
    """``banned``, ``expired`` (its SVID ran out), ``quiet`` (not heard from lately, or
    never by this server) or ``active``."""
    if agent.get("banned"):
        return "banned"
    if int(agent.get("expires_at", 0)) <= now:
        return "expired"
    last_seen = agent.get("last_seen")
    if last_seen is None or now - int(last_seen) > quiet_after:
        return "quiet"
    return "active"


def filter_agents(agents: Iterable[Mapping[str, Any]], text: str,
                  state: str, now: float) -> list[dict[str, Any]]:
    """Agents whose SPIFFE ID or attestation type contains ``text`` and whose state is
    ``state`` (any when empty), by SPIFFE ID, each with its ``state``."""
    text = text.strip()
    chosen = []
    for agent in agents:
        current = agent_state(agent, now)
        if state and current != state:
            continue
        if text and text not in agent["spiffe_id"] and text not in agent["attestation_type"]:
            continue
        chosen.append({**agent, "state": current})
    chosen.sort(key=lambda a: a["spiffe_id"])
    return chosen


def split_source(line: str) -> tuple[str, str]:
    """``describe``/``explain`` lines end with the resource they came from in brackets."""
    match = _SOURCE.match(line)
    if match is None:
        return line, ""
    return match["text"], match["source"]


def deciding_rule(explanation: Mapping[str, Any]) -> dict[str, Any] | None:
    """The authorization decision that decided an explained request (a refusal if any
    refused, else the first), with ``rule`` as ``Kind name``; None without one."""
    decisions = []
    gateway = explanation.get("gateway_decision")
    if isinstance(gateway, dict):
        decisions.append(gateway)
    for share in explanation.get("destinations") or []:
        weight = (share.get("destination") or {}).get("weight", 0)
        decision = share.get("decision")
        if isinstance(decision, dict) and weight:
            decisions.append(decision)
    refused = [d for d in decisions if not d.get("allowed")]
    if not decisions:
        return None
    chosen = (refused or decisions)[0]
    rule = chosen.get("rule") or {}
    kind, name = str(rule.get("kind", "")), str(rule.get("name", ""))
    named = f"{kind} {name}".strip() if kind not in ("default", "") else f"default ({name})"
    return {"allowed": bool(chosen.get("allowed")), "rule": named,
            "path": rule.get("path", ""), "reason": chosen.get("reason", "")}


def parse_headers(text: str, *, limit: int = 64) -> dict[str, str]:
    """``Name: value`` lines (the explain form's headers); ValueError naming a bad line."""
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or " " in name.strip():
            raise ValueError(f"header line {number} is not 'Name: value': {line.strip()!r}")
        headers[name.strip().lower()] = value.strip()
        if len(headers) > limit:
            raise ValueError(f"at most {limit} headers")
    return headers
