"""Turn a question, or a conversation, into each model's prompt text, per the model's prompt format."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import jinja2

from glimp_cli.config import PromptFormat
from glimp_cli.errors import ConfigError, ConversationError


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: "user" or "assistant", and its text."""

    role: str
    content: str


class Conversation(str):
    """A chat conversation, passed where a question goes (the router takes a question string).

    `system` is the client's system text ("" for none); `turns` alternate user and assistant turns
    and end with the user turn to answer. The string itself is a transcript of the whole conversation:
    what a trace record shows as its question, and what seeds its random draws.
    """

    system: str
    turns: tuple[Turn, ...]

    def __new__(cls, system: str, turns: Sequence[Turn]) -> "Conversation":
        turns = tuple(turns)
        if not turns or turns[-1].role != "user":
            raise ValueError("a conversation ends with the user turn to answer")
        lines = ([f"system: {system}"] if system else []) + [f"{t.role}: {t.content}" for t in turns]
        self = super().__new__(cls, "\n\n".join(lines))
        self.system, self.turns = system, turns
        return self

    def __getnewargs__(self):
        return self.system, self.turns


def asking(question: str, text: str) -> str:
    """`question` with the question itself (a conversation's last user turn) replaced by `text`."""
    if isinstance(question, Conversation):
        return Conversation(question.system, question.turns[:-1] + (Turn("user", text),))
    return text


def render_prompt(fmt: PromptFormat, question: str, chat_template: str | None,
                  bos_token: str = "", eos_token: str = "", model: str = "model") -> str:
    """The text a model continues: everything before the first reasoning step.

    `question` is a question, or a `Conversation` whose last user turn is the question.
    """
    if fmt.style == "plain":
        if isinstance(question, Conversation):
            return _plain_conversation(fmt, question, model) + fmt.prefill
        return fmt.template.replace("{question}", question) + fmt.prefill
    if not chat_template:
        raise ConfigError(
            f"model {model!r}: prompt style 'chat' needs a chat template in the GGUF, and it has none; "
            "use style 'plain' with a template"
        )
    if isinstance(question, Conversation):
        return _render_chat(chat_template, chat_messages(fmt, question), bos_token, eos_token, model,
                            conversation=True) + fmt.prefill
    messages = []
    if fmt.system:
        messages.append({"role": "system", "content": fmt.system})
    messages.append({"role": "user", "content": fmt.user.replace("{question}", question)})
    return _render_chat(chat_template, messages, bos_token, eos_token, model) + fmt.prefill


def chat_messages(fmt: PromptFormat, conversation: Conversation) -> list[dict]:
    """A conversation as a chat template's messages: one system turn (the format's own system text,
    then the client's, a blank line between), then every turn, each user turn in the format's `user`."""
    system = "\n\n".join(text for text in (fmt.system, conversation.system) if text)
    messages = [{"role": "system", "content": system}] if system else []
    for turn in conversation.turns:
        text = fmt.user.replace("{question}", turn.content) if turn.role == "user" else turn.content
        messages.append({"role": turn.role, "content": text})
    return messages


def conversation_refusal(fmt: PromptFormat, conversation: Conversation) -> str | None:
    """Why a plain format cannot hold `conversation`, or None (a chat template decides when it renders)."""
    if fmt.style != "plain":
        return None
    if conversation.system and fmt.system_turn is None:
        return "its plain prompt format has no system_turn, so it has no place for a system message"
    if len(conversation.turns) > 1 and fmt.turn is None:
        return "its plain prompt format has no turn, so it holds one question and no earlier turns"
    if conversation.turns[0].role != "user":
        return "its plain prompt format writes exchanges that each start with a user message"
    return None


def _plain_conversation(fmt: PromptFormat, conversation: Conversation, model: str) -> str:
    why = conversation_refusal(fmt, conversation)
    if why:
        raise ConversationError(f"model {model!r}: {why}")
    turns = conversation.turns
    history = "".join(_fill(fmt.turn, question=turns[i].content, answer=turns[i + 1].content)
                      for i in range(0, len(turns) - 1, 2))
    system = _fill(fmt.system_turn, system=conversation.system) if conversation.system else ""
    return system + fmt.template.replace("{question}", history + turns[-1].content)


def _fill(pattern: str, **values: str) -> str:
    """`pattern` with each {name} of `values` replaced in one pass (a value's own braces stay as they are)."""
    return re.sub(r"\{(" + "|".join(values) + r")\}", lambda m: values[m[1]], pattern)


def _render_chat(template: str, messages: list[dict], bos: str, eos: str, model: str,
                 conversation: bool = False) -> str:
    # The rendering is llama-cpp-python's (imported only when a chat prompt is made, so `glimp --help`
    # stays light); what glimp adds is the fold below and one-line errors.
    from glimp_cli.backends.llama_cpp import render_chat

    try:
        try:
            return render_chat(template, messages, bos, eos)
        except (jinja2.exceptions.TemplateError, ValueError):
            if messages[0]["role"] != "system":
                raise
            # Some templates refuse a system turn (raise_exception): fold it into the first user turn instead.
            system, rest = messages[0]["content"], messages[1:]
            if rest and rest[0]["role"] == "user":
                folded = [{"role": "user", "content": system + "\n\n" + rest[0]["content"]}] + rest[1:]
            else:
                folded = [{"role": "user", "content": system}] + rest
            return render_chat(template, folded, bos, eos)
    except (jinja2.exceptions.TemplateError, ValueError) as exc:
        why = " ".join(str(exc).split())
        if conversation and not isinstance(exc, jinja2.exceptions.TemplateSyntaxError):
            raise ConversationError(f"model {model!r}: its chat template refuses this conversation: {why}") from None
        raise ConfigError(f"model {model!r}: its chat template failed to render: {why}") from None
