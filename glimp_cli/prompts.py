"""Turn a question into each model's prompt text, per the model's prompt format."""

from __future__ import annotations

from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    try:
        compiled = env.from_string(template)
        render = lambda msgs: compiled.render(  # noqa: E731
            messages=msgs, add_generation_prompt=True, bos_token=bos, eos_token=eos,
            raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
        )
        try:
            return render(messages)
        except jinja2.exceptions.TemplateError:
            if messages[0]["role"] != "system":
                raise
            # Some templates refuse a system turn: fold it into the user turn instead.
            folded = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return render(folded)
    except jinja2.exceptions.TemplateError as exc:
        raise ConfigError(f"model {model!r}: its chat template failed to render: {exc}") from None
