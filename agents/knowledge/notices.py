"""Change notices: a subscribed agent's next turn starts with a short note of what changed in the
shared knowledge since the version it last saw, within the token budget its role gives it."""
from __future__ import annotations

from agents.knowledge.service import KnowledgeService, visible_scopes
from agents.knowledge.types import Change

MAX_CHANGES = 50
CHARS_PER_TOKEN = 4
# How stale the version a turn's notice starts from may be, for another process's commits (this
# process's own are seen at once): one check per turn would cost a query on every chat request.
VERSION_FRESH_S = 0.25


def change_line(change: Change) -> str:
    return f"- v{change.version} {change.summary} by {change.author} ({change.role})"


def notice_text(changes: list[Change], seen: int, now: int, max_tokens: int) -> str:
    """The notice, cut to `max_tokens` (about 4 characters each): the newest changes first."""
    budget = max_tokens * CHARS_PER_TOKEN
    head = f"Shared knowledge changed since version {seen} (now {now}); kb.search finds the new text:"
    lines: list[str] = []
    used = len(head)
    for change in reversed(changes):
        line = change_line(change)
        if used + len(line) + 1 > budget - 24:
            break
        lines.append(line)
        used += len(line) + 1
    left = len(changes) - len(lines)
    tail = [f"- and {left} more"] if left else []
    return "\n".join([head, *lines, *tail])[:budget]


def change_notice(service: KnowledgeService, agent: str, role: str, max_tokens: int) -> str | None:
    """The notice for `agent`'s next turn, or None; the agent then counts as having seen `now`.
    An agent's first turn only records where it starts."""
    now = service.version(VERSION_FRESH_S)
    if service.noticed.get(agent) == now:
        return None
    seen = service.store.seen(agent)
    service.noticed[agent] = now
    if seen is not None and now <= seen:
        return None
    service.store.mark_seen(agent, now)
    if seen is None:
        return None
    scopes = visible_scopes(role)
    changes = [c for c in service.store.changes_since(max(seen, now - MAX_CHANGES), MAX_CHANGES)
               if c.scope in scopes]
    return notice_text(changes, seen, now, max_tokens) if changes else None


def notice_messages(service: KnowledgeService | None, agent: str, role: str, max_tokens: int) -> list[dict]:
    if service is None or max_tokens <= 0:
        return []
    text = change_notice(service, agent, role, max_tokens)
    return [{"role": "system", "content": text}] if text else []
