"""What a client may ask of the multiplexer beyond its messages: answers no longer than its role
allows, one choice per request, no field that only the multiplexer sets, and only the
client-declared tools its role allows, in the request and in the model's answer."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Literal

from agents.asgi import ApiError

# Every field an OpenAI-compatible backend reads as the answer's length: OpenAI's old and new
# names, and llama-server's own (which it prefers over both).
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")
# Fields that ask for several answers to one prompt: OpenAI's and vLLM's `n`, vLLM's `best_of`,
# llama-server's `n_cmpl`.
CHOICE_FIELDS = ("n", "best_of", "n_cmpl")
# Set by the multiplexer alone (model, stream, priority, cache_salt, the length) or not the
# backend's business (session); a client's value never reaches the backend.
MUX_FIELDS = frozenset({"messages", "session", "model", "stream", "stream_options", "priority",
                        "cache_salt", *LENGTH_FIELDS})
LEGACY_TOOL_FIELDS = ("functions", "function_call")
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
# The fields a screen reads besides the length: a request with none of them (most) skips those checks.
SCREENED_FIELDS = frozenset({*CHOICE_FIELDS, "min_tokens", *LEGACY_TOOL_FIELDS, *TOOL_FIELDS})
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
ClientToolsPolicy = Literal["drop", "refuse"]


def invalid(message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error")


def asked_length(data: dict, name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"{name} must be a positive integer")
    return value


def capped_max_tokens(data: dict, cap: int) -> int:
    """The shortest length the client asked for under any name, never above the role's cap."""
    if "max_completion_tokens" not in data and "n_predict" not in data:
        asked = asked_length(data, "max_tokens")
        return cap if asked is None or asked > cap else asked
    shortest = cap
    for name in LENGTH_FIELDS:
        if name in data:
            asked = asked_length(data, name)
            if asked is not None and asked < shortest:
                shortest = asked
    return shortest


def check_single_choice(data: dict) -> None:
    for name in CHOICE_FIELDS:
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or value != 1):
            raise invalid(f"{name} must be 1: the multiplexer asks for one answer per request "
                          "(several, under vLLM's priority scheduling, crash the engine)")


def clamped_min_tokens(data: dict, max_tokens: int) -> int | None:
    value = data.get("min_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid("min_tokens must be a non-negative integer")
    return min(value, max_tokens)


@dataclass(frozen=True)
class ToolScope:
    """The client-declared tools (fnmatch patterns of function names) one role may use."""
    role: str
    patterns: tuple[str, ...]

    def allows(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def denial(self, name: str) -> str:
        allowed = ", ".join(self.patterns) or "none"
        return f"tool {name!r} is not allowed for role {self.role} (client_tools: {allowed})"


def declared_name(tool: object, i: int) -> str:
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(name, str):
        raise invalid(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
    if not TOOL_NAME_RE.match(name):
        raise invalid(f"tools[{i}].function.name must match {TOOL_NAME_RE.pattern}")
    return name


@dataclass(frozen=True)
class ScreenedTools:
    kept: list[dict]
    denied: list[str]


def screen_tools(data: dict, scope: ToolScope) -> ScreenedTools:
    for name in LEGACY_TOOL_FIELDS:
        if name in data:
            raise invalid(f"{name} is the legacy form of function calling: declare tools instead")
    tools = data.get("tools")
    if tools is None:
        return ScreenedTools([], [])
    if not isinstance(tools, list):
        raise invalid("tools must be a list")
    named = [(declared_name(tool, i), tool) for i, tool in enumerate(tools)]
    return ScreenedTools([tool for name, tool in named if scope.allows(name)],
                         [name for name, _ in named if not scope.allows(name)])


def chosen_tool(data: dict) -> str | None:
    choice = data.get("tool_choice")
    function = choice.get("function") if isinstance(choice, dict) else None
    return function.get("name") if isinstance(function, dict) else None


def with_tools(forward: dict, data: dict, screened: ScreenedTools) -> None:
    """Put the kept tools in the forwarded request; a tool_choice naming a dropped tool, and every
    tool field once no tool is left, go."""
    for name in TOOL_FIELDS:
        forward.pop(name, None)
    if not screened.kept:
        return
    forward["tools"] = screened.kept
    for name in ("tool_choice", "parallel_tool_calls"):
        if name in data:
            forward[name] = data[name]
    if chosen_tool(data) in screened.denied:
        del forward["tool_choice"]


@dataclass(slots=True)
class ScreenedRequest:
    """The client's fields that go to the backend as they are, and what the screen took out."""
    forward: dict
    max_tokens: int
    denied_tools: list[str]


def screen_request(data: dict, cap: int, scope: ToolScope) -> ScreenedRequest:
    max_tokens = capped_max_tokens(data, cap)
    forward = data.copy()
    for name in MUX_FIELDS.intersection(data):
        del forward[name]
    if SCREENED_FIELDS.isdisjoint(data):
        return ScreenedRequest(forward, max_tokens, [])
    check_single_choice(data)
    min_tokens = clamped_min_tokens(data, max_tokens)
    if min_tokens is not None:
        forward["min_tokens"] = min_tokens
    screened = screen_tools(data, scope)
    with_tools(forward, data, screened)
    return ScreenedRequest(forward, max_tokens, screened.denied)


def blocked_note(scope: ToolScope, names: list[str]) -> str:
    return "\n\n[dgxready] blocked: " + "; ".join(scope.denial(n[:64]) for n in names) + "."


def with_note(content: object, note: str) -> str:
    return (content if isinstance(content, str) else "") + note


def call_name(call: object) -> str:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else ""


def screen_message(choice: dict, scope: ToolScope) -> list[str]:
    """Takes the tool calls the role may not make out of one choice of a whole answer, says so in
    its content, and ends it with `stop` when no call is left. Returns the blocked names."""
    message = choice.get("message")
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not isinstance(calls, list):
        return []
    blocked = [call_name(c) for c in calls if not scope.allows(call_name(c))]
    if not blocked:
        return []
    kept = [c for c in calls if scope.allows(call_name(c))]
    if kept:
        message["tool_calls"] = kept
    else:
        message.pop("tool_calls")
        if choice.get("finish_reason") == "tool_calls":
            choice["finish_reason"] = "stop"
    message["content"] = with_note(message.get("content"), blocked_note(scope, blocked))
    return blocked


def screen_answer(answer: dict, scope: ToolScope) -> list[str]:
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return []
    return [name for c in choices if isinstance(c, dict) for name in screen_message(c, scope)]


@dataclass
class StreamedCalls:
    """One choice's tool calls in a stream: the backend's index of each call, mapped to the index
    the client sees (None: blocked), so that the calls left are numbered 0, 1, ... as the
    openai SDK's accumulator expects."""
    index: dict[int, int | None] = field(default_factory=dict)
    kept: int = 0
    blocked: list[str] = field(default_factory=list)
    noted: bool = False

    def client_index(self, call: dict, scope: ToolScope) -> int | None:
        backend = call.get("index", 0)
        if backend not in self.index:
            # A call's name comes in its first delta; the rest carry only argument pieces.
            name = call_name(call)
            if scope.allows(name):
                self.index[backend], self.kept = self.kept, self.kept + 1
            else:
                self.index[backend] = None
                self.blocked.append(name)
        return self.index[backend]


@dataclass(slots=True)
class StreamGuard:
    """Screens the tool calls of a streamed answer, one parsed SSE chunk at a time."""
    scope: ToolScope
    choices: dict[int, StreamedCalls] = field(default_factory=dict)

    @property
    def blocked(self) -> list[str]:
        if not self.choices:
            return []
        return [name for calls in self.choices.values() for name in calls.blocked]

    @property
    def note_pending(self) -> bool:
        """A call was blocked and the choice's finish, which carries the note, is still to come."""
        if not self.choices:
            return False
        return any(calls.blocked and not calls.noted for calls in self.choices.values())

    def screen(self, chunk: dict) -> bool:
        """Rewrites the chunk in place; True when it changed."""
        changed = False
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict):
                changed = self.screen_choice(choice) or changed
        return changed

    def screen_choice(self, choice: dict) -> bool:
        calls = self.choices.setdefault(choice.get("index", 0), StreamedCalls())
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return False
        changed = self.screen_calls(delta, calls)
        if choice.get("finish_reason") and calls.blocked and not calls.noted:
            calls.noted = changed = True
            delta["content"] = with_note(delta.get("content"), blocked_note(self.scope, calls.blocked))
            if choice["finish_reason"] == "tool_calls" and not calls.kept:
                choice["finish_reason"] = "stop"
        return changed

    def screen_calls(self, delta: dict, calls: StreamedCalls) -> bool:
        pieces = delta.get("tool_calls")
        if not isinstance(pieces, list):
            return False
        kept = []
        for piece in pieces:
            if not isinstance(piece, dict):
                continue
            index = calls.client_index(piece, self.scope)
            if index is not None:
                kept.append(piece | {"index": index})
        if kept == pieces:
            return False
        if kept:
            delta["tool_calls"] = kept
        else:
            del delta["tool_calls"]
        return True
