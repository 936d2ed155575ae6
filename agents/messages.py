"""Chat messages as OpenAI clients send them (the openai SDK, LangChain, CrewAI, AutoGen): string
content or content parts, `developer` as a system role, and tool-call turns whose content is null."""
from __future__ import annotations

from agents.asgi import ApiError

ROLES = ("system", "developer", "user", "assistant", "tool")
INSTRUCTION_ROLES = ("system", "developer")


def valid_content(message: dict) -> bool:
    content = message.get("content")
    if isinstance(content, str):
        return True
    if isinstance(content, list):
        return all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content)
    return content is None and message["role"] == "assistant" and bool(message.get("tool_calls"))


def valid_messages(data: dict) -> list[dict]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "invalid_request_error")
    for m in messages:
        # Most messages: a dict with a known role and string content (orjson makes plain dicts).
        if type(m) is not dict or type(m.get("content")) is not str or m.get("role") not in ROLES:
            check_messages(messages)
            break
    return messages


def check_messages(messages: list) -> None:
    """Raises for the first message that is not valid, naming it."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}",
                           "invalid_request_error")
        if not isinstance(m.get("content"), str) and not valid_content(m):
            raise ApiError(400, f"messages[{i}].content must be a string, a list of content parts, or null "
                                "beside tool_calls", "invalid_request_error")


def message_text(message: dict) -> str:
    """The text a message puts in front of the model: content, text parts and tool-call arguments."""
    content = message.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "".join(p.get("text", "") for p in content if isinstance(p.get("text"), str))
    else:
        text = ""
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            text += str(function.get("name", "")) + str(function.get("arguments", ""))
    return text


def message_chars(message: dict) -> int:
    """len(message_text(message)), without building the text for a plain one."""
    content = message.get("content")
    if isinstance(content, str) and "tool_calls" not in message:
        return len(content)
    return len(message_text(message))


def estimate_tokens(prompt: list[dict], max_tokens: int, counted_chars: int = 0) -> float:
    """About 4 characters a token, over `prompt` and `counted_chars` already counted elsewhere."""
    chars = counted_chars
    for message in prompt:
        content = message.get("content")
        # message_chars inlined for a plain message: this runs on every turn.
        plain = isinstance(content, str) and "tool_calls" not in message
        chars += len(content) if plain else message_chars(message)
    return chars / 4.0 + max_tokens
