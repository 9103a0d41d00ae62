"""Prompt rendering: chat templates through llama-cpp-python's sandboxed formatter, plus glimp's fold."""

from __future__ import annotations

import pytest

from glimp_cli.config import PromptFormat
from glimp_cli.errors import ConfigError
from glimp_cli.prompts import render_prompt

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = PromptFormat(style="chat", system="Be brief.", user="Q: {question}", prefill="Step 1:",
                    answer_marker="The answer is")


def test_a_chatml_template_with_a_system_turn_and_the_prefill():
    text = render_prompt(CHAT, "2+2?", CHATML, "<s>", "</s>", "m")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\nStep 1:")


def test_a_template_that_refuses_a_system_turn_gets_it_folded_into_the_user_turn():
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<model>")
    assert render_prompt(CHAT, "2+2?", template, "<bos>", "", "m") == "<bos><user>Be brief.\n\nQ: 2+2?<model>Step 1:"
    no_system = PromptFormat(style="chat", user="{question}")
    with pytest.raises(ConfigError) as info:  # nothing left to fold: the template's own message, in one line
        render_prompt(no_system, "x", "{{ raise_exception('only\nuser turns') }}", "", "", "gemma")
    assert "'gemma'" in str(info.value) and "only user turns" in str(info.value) and "\n" not in str(info.value)


def test_what_hugging_face_templates_use_renders():
    # tojson as Transformers renders it (non-ASCII kept), loop controls, strftime_now, and the {% generation %} tag.
    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] | tojson }}"
                "{% endfor %}|{{ strftime_now('%Y') | length }}|{% generation %}gen{% endgeneration %}")
    fmt = PromptFormat(style="chat", user="{question}")
    assert render_prompt(fmt, "café", template, "", "", "m") == '"café"|4|gen'


def test_the_sandbox_refuses_a_template_reaching_python_internals():
    fmt = PromptFormat(style="chat", user="{question}")
    with pytest.raises(ConfigError, match="failed to render"):
        render_prompt(fmt, "x", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "", "", "m")
    with pytest.raises(ConfigError, match="failed to render"):
        render_prompt(fmt, "x", "{% for %}", "", "", "m")  # a syntax error


def test_a_chat_prompt_needs_a_template():
    with pytest.raises(ConfigError, match="needs a chat template"):
        render_prompt(CHAT, "x", None, model="m")
    plain = PromptFormat(style="plain", template="Question: {question}\nAnswer:", answer_marker="The answer is")
    assert render_prompt(plain, "2+2?", None) == "Question: 2+2?\nAnswer:"
