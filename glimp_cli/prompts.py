"""Turn a question into each model's prompt text, per the model's prompt format."""

from __future__ import annotations

import jinja2

from glimp_cli.config import PromptFormat
from glimp_cli.errors import ConfigError


def render_prompt(fmt: PromptFormat, question: str, chat_template: str | None,
                  bos_token: str = "", eos_token: str = "", model: str = "model") -> str:
    """The text a model continues: everything before the first reasoning step."""
    if fmt.style == "plain":
        return fmt.template.replace("{question}", question) + fmt.prefill
    if not chat_template:
        raise ConfigError(
            f"model {model!r}: prompt style 'chat' needs a chat template in the GGUF, and it has none; "
            "use style 'plain' with a template"
        )
    messages = []
    if fmt.system:
        messages.append({"role": "system", "content": fmt.system})
    messages.append({"role": "user", "content": fmt.user.replace("{question}", question)})
    return _render_chat(chat_template, messages, bos_token, eos_token, model) + fmt.prefill


def _render_chat(template: str, messages: list[dict], bos: str, eos: str, model: str) -> str:
    # The rendering is llama-cpp-python's (imported only when a chat prompt is made, so `glimp --help`
    # stays light); what glimp adds is the fold below and one-line errors.
    from glimp_cli.backends.llama_cpp import render_chat

    try:
        try:
            return render_chat(template, messages, bos, eos)
        except (jinja2.exceptions.TemplateError, ValueError):
            if messages[0]["role"] != "system":
                raise
            # Some templates refuse a system turn (raise_exception): fold it into the user turn instead.
            folded = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return render_chat(template, folded, bos, eos)
    except (jinja2.exceptions.TemplateError, ValueError) as exc:
        raise ConfigError(f"model {model!r}: its chat template failed to render: {' '.join(str(exc).split())}") from None
