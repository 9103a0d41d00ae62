"""Conversations and system prompts in `glimp serve`: parsing, each model's rendering, and real clients.

The fast tests render conversations with hand-written templates and run the app in process on the
scripted fakes (a chat-template small model beside a plain-template large one). The client tests start
a real `glimp serve` on 127.0.0.1 over a scripted OpenAI-compatible upstream (no model to load) and
drive it with two clients nobody here wrote: the `openai` package and the `llm` CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from glimp_cli.backends.fake import FakeBackend
from glimp_cli.backends.fake import ScriptedStep as S
from glimp_cli.config import ModelSpec, PairSpec, PromptFormat, Registry, load_registry
from glimp_cli.errors import ConfigError, ConversationError
from glimp_cli.prompts import Conversation, Turn, conversation_refusal, render_prompt
from glimp_cli.serve.protocol import ApiError, ServedPair, parse_request

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The fakes find their trace after the first "A:\n": both formats end their prompt with it, and neither
# writes it into the history.
CHAT_FMT = PromptFormat(style="chat", system="Write one step per paragraph.", user="{question}", prefill="A:\n",
                        answer_marker="The answer is")
PLAIN_FMT = PromptFormat(style="plain", template="Question: {question}\nA:\n", answer_marker="The answer is",
                         turn="{question}\nAnswer: {answer}\n\nQuestion: ", system_turn="[{system}]\n\n")
BARE_PLAIN = PromptFormat(style="plain", template="Question: {question}\nA:\n", answer_marker="The answer is")

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 = 4.\n\nThe answer is 4."},
    {"role": "developer", "content": "Use digits."},
    {"role": "user", "content": "And 3+3?"},
]
CONVERSATION = Conversation("Be brief.\n\nUse digits.", [
    Turn("user", "What is 2+2?"), Turn("assistant", "2+2 = 4.\n\nThe answer is 4."), Turn("user", "And 3+3?")])
# What each format makes of MESSAGES: glimp's own system text first, then the client's.
CHAT_PROMPT = ("<|im_start|>system\nWrite one step per paragraph.\n\nBe brief.\n\nUse digits.<|im_end|>\n"
               "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
               "<|im_start|>assistant\n2+2 = 4.\n\nThe answer is 4.<|im_end|>\n"
               "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
               "<|im_start|>assistant\nA:\n")
PLAIN_PROMPT = ("[Be brief.\n\nUse digits.]\n\n"
                "Question: What is 2+2?\nAnswer: 2+2 = 4.\n\nThe answer is 4.\n\n"
                "Question: And 3+3?\nA:\n")

PAIRS = {"p": ServedPair(PairSpec("p", "s", "l", tau=1.0), {"s": CHAT_FMT, "l": PLAIN_FMT})}


def chat_body(messages, **fields) -> dict:
    return {"model": "glimp/p", "messages": messages, **fields}


# --- parsing --------------------------------------------------------------------------------

def test_a_chat_becomes_a_conversation_with_its_roles_in_order():
    question = parse_request("chat", chat_body(MESSAGES), PAIRS).question
    assert isinstance(question, Conversation)
    assert (question.system, question.turns) == (CONVERSATION.system, CONVERSATION.turns)
    assert question == CONVERSATION  # the transcript: what seeds the trace and what a record shows


def test_one_user_message_stays_a_plain_question_and_consecutive_turns_of_a_role_join():
    question = parse_request("chat", chat_body([{"role": "user", "content": "2+2?"}]), PAIRS).question
    assert type(question) is str and question == "2+2?"
    joined = parse_request("chat", chat_body([
        {"role": "user", "content": "Hi."}, {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
        {"role": "system", "content": ""}]), PAIRS).question
    assert type(joined) is str and joined == "Hi.\n\n2+2?"  # an empty system message adds nothing


@pytest.mark.parametrize("messages, param, words", [
    ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": None,
                                             "tool_calls": [{"id": "c", "type": "function"}]},
      {"role": "tool", "tool_call_id": "c", "content": "4"}], "messages[1]", "a tool call cannot be rendered"),
    ([{"role": "user", "content": "2+2?"}, {"role": "tool", "tool_call_id": "c", "content": "4"}],
     "messages[1]", "a tool message cannot be rendered"),
    ([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}],
     "messages[0].content", "'image_url' part cannot be rendered: the pair's models read text only"),
    ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "messages[1]", "the last message must be a user message"),
    ([{"role": "system", "content": "Be brief."}], "messages[0]", "the last message must be a user message"),
    ([{"role": "critic", "content": "x"}, {"role": "user", "content": "2+2?"}], "messages[0].role", "one of system"),
    ([{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
     "messages", "each start with a user message"),  # the plain format cannot open with an answer
])
def test_what_cannot_be_rendered_is_a_400_that_says_why(messages, param, words):
    with pytest.raises(ApiError) as caught:
        parse_request("chat", chat_body(messages), PAIRS)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert words in caught.value.message


def test_only_the_models_the_mode_uses_must_hold_the_conversation():
    pairs = {"p": ServedPair(PairSpec("p", "s", "l"), {"s": CHAT_FMT, "l": BARE_PLAIN})}
    with pytest.raises(ApiError) as caught:
        parse_request("chat", chat_body(MESSAGES), pairs)
    assert "the large model 'l'" in caught.value.message and "no system_turn" in caught.value.message
    assert parse_request("chat", chat_body(MESSAGES, model="glimp/p:small"), pairs).question == CONVERSATION


# --- rendering ------------------------------------------------------------------------------

def test_each_format_writes_the_same_conversation_in_its_own_way():
    assert render_prompt(CHAT_FMT, CONVERSATION, CHATML, "", "", "s") == CHAT_PROMPT
    assert render_prompt(PLAIN_FMT, CONVERSATION, None) == PLAIN_PROMPT
    # A single question renders as it always did: no history, no system place filled.
    assert render_prompt(PLAIN_FMT, "2+2?", None) == "Question: 2+2?\nA:\n"


def test_braces_in_the_messages_are_text_not_places():
    conversation = Conversation("{answer}", [Turn("user", "{question}?"), Turn("assistant", "{system}"),
                                             Turn("user", "{answer}")])
    assert render_prompt(PLAIN_FMT, conversation, None) == \
        "[{answer}]\n\nQuestion: {question}?\nAnswer: {system}\n\nQuestion: {answer}\nA:\n"


def test_a_template_that_refuses_a_system_turn_gets_it_folded_and_keeps_every_turn():
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<model>")
    assert render_prompt(CHAT_FMT, CONVERSATION, template, "", "", "g") == (
        "<user>Write one step per paragraph.\n\nBe brief.\n\nUse digits.\n\nWhat is 2+2?"
        "<assistant>2+2 = 4.\n\nThe answer is 4.<user>And 3+3?<model>A:\n")


def test_a_template_that_refuses_the_conversation_says_why_and_a_broken_template_stays_a_config_error():
    alternate = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                 "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                 "{% endif %}{{ m['content'] }}{% endfor %}")
    fmt = PromptFormat(style="chat", user="{question}")
    with pytest.raises(ConversationError, match="'g': its chat template refuses this conversation: Conversation roles"):
        render_prompt(fmt, Conversation("", [Turn("assistant", "Hi."), Turn("user", "2+2?")]), alternate, "", "", "g")
    with pytest.raises(ConfigError, match="failed to render"):
        render_prompt(fmt, CONVERSATION, "{% for %}", "", "", "g")


def test_a_plain_format_says_what_it_lacks_for_a_conversation():
    assert "no system_turn" in conversation_refusal(BARE_PLAIN, CONVERSATION)
    history = Conversation("", CONVERSATION.turns)
    assert "no turn" in conversation_refusal(BARE_PLAIN, history)
    assert conversation_refusal(BARE_PLAIN, Conversation("", [Turn("user", "2+2?")])) is None  # fits any template
    assert conversation_refusal(CHAT_FMT, CONVERSATION) is None  # a chat template decides when it renders


def test_turn_and_system_turn_are_checked_in_models_yaml(tmp_path):
    base = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    config = {"models": {
        "ok": {**base, "prompt": {"style": "plain", "template": "Q: {question}\nA:", "turn": "{question}\nA: {answer}\nQ: ",
                                  "system_turn": "{system}\n"}},
        "no-answer": {**base, "prompt": {"style": "plain", "template": "Q: {question}", "turn": "{question}"}},
        "chat-turn": {"source": {"path": "x.gguf"}, "prompt": {"style": "chat", "system_turn": "{system}"}}}}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    registry = load_registry(path)
    assert registry.model("ok").prompt.turn == "{question}\nA: {answer}\nQ: "
    with pytest.raises(ConfigError, match=r"models.no-answer.prompt.turn: needs \{answer\}"):
        registry.model("no-answer")
    with pytest.raises(ConfigError, match="only a plain prompt has system_turn"):
        registry.model("chat-turn")


def test_a_batch_records_no_conversation_keys_so_old_results_still_resume(tmp_path):
    from glimp_cli.batch import model_details

    spec = ModelSpec("m", backend="openai", base_url="http://127.0.0.1:9/v1", model="m", prompt=PLAIN_FMT)
    details = model_details(Registry({"m": spec}, {}, "p", [], {}, {}), "m")
    assert "turn" not in details["prompt"] and "system_turn" not in details["prompt"]
    assert details["prompt"]["template"] == PLAIN_FMT.template


def test_the_packaged_tiny_large_model_holds_a_conversation_as_its_own_few_shot_turns():
    gemma = load_registry().model("gemma3-270m").prompt
    text = render_prompt(gemma, CONVERSATION, None)
    assert text.startswith("Be brief.\n\nUse digits.\n\nQuestion: Natalia sold clips")
    assert text.endswith("The answer is 72.\n\nQuestion: What is 2+2?\nAnswer:\n2+2 = 4.\n\nThe answer is 4.\n\n"
                         "Question: And 3+3?\nAnswer:\n")


# --- the app in process, on the fakes -------------------------------------------------------

SCRIPT = [S(0.5, "small one", "LARGE ONE"), S(2.0, "small two", "LARGE TWO"), S(0.1, "The answer is 6.", "The answer is 6.")]


class ChatFake(FakeBackend):
    """The scripted fake with a chat template, as a GGUF carries one."""

    def __init__(self, *args, chat_template: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.chat_template = chat_template


@contextlib.contextmanager
def mixed_app(small_fmt=CHAT_FMT, large_fmt=PLAIN_FMT, small_template=CHATML, **settings):
    """The real app, one worker: a chat-template small fake beside a plain-template large fake."""
    from starlette.testclient import TestClient

    from glimp_cli.engine import Engine
    from glimp_cli.serve.app import ServerState, build_app
    from glimp_cli.serve.workers import WorkerPool

    registry = Registry({"s": ModelSpec("s", prompt=small_fmt), "l": ModelSpec("l", prompt=large_fmt)},
                        {}, "p", [], {}, {})
    pair = PairSpec("p", "s", "l", **settings)
    backends = {"small": ChatFake("s", "small", SCRIPT, chat_template=small_template),
                "large": FakeBackend("l", "large", SCRIPT)}
    pool = WorkerPool("p", [Engine(registry, pair, backends)], 2)
    state = ServerState({"p": ServedPair(pair, {"s": small_fmt, "l": large_fmt})}, {"p": pool}, None, 1_000_000)
    try:
        with TestClient(build_app(state)) as client:
            yield client, backends, pool
    finally:
        assert pool.stop(time.monotonic() + 30) == [], "a worker did not stop"


def context_text(backend: FakeBackend) -> str:
    return b"".join(backend.token_bytes(t) for t in backend.tokens).decode()


def test_both_models_see_the_whole_conversation_and_only_the_new_turn_is_routed():
    with mixed_app(tau=1.0) as (client, backends, _):
        response = client.post("/v1/chat/completions", json=chat_body(MESSAGES))
        assert response.status_code == 200, response.text
        reply = response.json()
        assert [s["model"] for s in reply["glimp"]["steps"]][:2] == ["small", "large"]  # both models wrote
        assert reply["choices"][0]["message"]["content"] == "small one\n\nLARGE TWO\n\nThe answer is 6."
        small, large = context_text(backends["small"]), context_text(backends["large"])
        assert small.startswith(CHAT_PROMPT) and large.startswith(PLAIN_PROMPT)
        # After the prompt each context holds the new turn's steps alone.
        assert small[len(CHAT_PROMPT):].startswith("small one\n\nLARGE TWO\n\n")
        assert large[len(PLAIN_PROMPT):].startswith("small one\n\nLARGE TWO\n\n")
        assert reply["usage"]["prompt_tokens"] > 0
        streamed = client.post("/v1/chat/completions", json=chat_body(MESSAGES, stream=True))
        chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == \
            reply["choices"][0]["message"]["content"]


def test_a_chat_template_that_refuses_the_conversation_is_a_400_before_the_queue():
    no_history = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
                  "{{ raise_exception('This model answers single questions only') }}{% endif %}"
                  "{{ m['content'] }}{% endfor %}")
    with mixed_app(small_template=no_history, tau=1.0) as (client, _, pool):
        body = chat_body(MESSAGES, model="glimp/p:small")
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "messages"
        assert "model 's': its chat template refuses this conversation: This model answers single questions only" \
            in error["message"]
        assert pool.load()["done"] == pool.load()["error"] == 0  # it never took a place in the queue


# --- real clients against a real `glimp serve` over a scripted upstream ---------------------

def _upstream_answer(body):
    from test_http_backend import event

    # Each answer names how many questions its prompt holds, so a turn shows the history it was sent.
    return 200, [event(f"The answer is {body['prompt'].count('Q: ')}."), event("", "stop")]


@pytest.fixture(scope="module")
def upstream():
    from test_http_backend import FakeServer

    fake = FakeServer()
    fake.on("/v1/models", (200, {"object": "list", "data": [{"id": "m"}]}))
    fake.on("/v1/completions", _upstream_answer)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def chat_server(upstream, tmp_path_factory):
    """`glimp serve` on 127.0.0.1 at a free port: pair `up`, a plain prompt that holds conversations."""
    from test_serve import Server

    prompt = {"style": "plain", "template": "Q: {question}\nA:\n", "answer_marker": "The answer is",
              "turn": "{question}\nA:\n{answer}\n\nQ: ", "system_turn": "System: {system}\n\n"}
    model = {"backend": "openai", "base_url": upstream.url, "model": "m", "n_ctx": 4096, "prompt": prompt}
    config = {"models": {"up-small": dict(model), "up-large": dict(model)},
              "pairs": {"up": {"small": "up-small", "large": "up-large", "estimator": "topk:20", "mode": "large"}}}
    path = tmp_path_factory.mktemp("chat-up") / "models.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    srv = Server(path.parent / "serve.log", path, "--workers", "1", pair="up")
    yield srv
    assert srv.stop() == 0


def prompts_with(upstream, words: str) -> list[str]:
    return [b["prompt"] for b in upstream.posted("/v1/completions") if words in b["prompt"]]


def test_the_openai_package_gets_an_answer_to_a_chat_with_a_system_prompt(upstream, chat_server):
    client = chat_server.client()
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 6 * 7 (openai)?"}]
    whole = client.chat.completions.create(model="glimp/up", messages=messages)
    assert whole.choices[0].message.content == "The answer is 1."
    stream = client.chat.completions.create(model="glimp/up", messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "The answer is 1."
    sent = prompts_with(upstream, "(openai)")
    assert sent and set(sent) == {"System: You are terse.\n\nQ: What is 6 * 7 (openai)?\nA:\n"}


def test_the_llm_cli_holds_a_three_turn_conversation_with_continue(upstream, chat_server, tmp_path):
    llm = shutil.which("llm", path=os.path.dirname(sys.executable)) or shutil.which("llm")
    assert llm, "the llm CLI is part of the test extra"
    home = tmp_path / "llm"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(yaml.safe_dump([
        {"model_id": "glimp-up", "model_name": "glimp/up", "api_base": chat_server.url + "/v1"}]), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_"))}
    env["LLM_USER_PATH"] = str(home)

    def say(*args: str) -> str:
        result = subprocess.run([llm, *args], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert say("-m", "glimp-up", "-s", "Answer in numbers.", "First (llm): 1 + 1?") == "The answer is 1."
    assert say("-c", "Second (llm): 2 + 2?") == "The answer is 2."
    assert say("-c", "Third (llm): 3 + 3?") == "The answer is 3."
    third = prompts_with(upstream, "Third (llm)")
    assert third == ["System: Answer in numbers.\n\n"
                     "Q: First (llm): 1 + 1?\nA:\nThe answer is 1.\n\n"
                     "Q: Second (llm): 2 + 2?\nA:\nThe answer is 2.\n\n"
                     "Q: Third (llm): 3 + 3?\nA:\n"]
    logged = json.loads(say("logs", "list", "--json", "-n", "3"))
    assert len({entry["conversation_id"] for entry in logged}) == 1


# --- the real tiny pair -------------------------------------------------------------------

@pytest.mark.real
def test_the_tiny_pair_answers_a_conversation_each_model_in_its_own_format(real_engine):
    from glimp_cli.serve.workers import fit_context
    from glimp_cli.serve.protocol import CompletionRequest

    pair = dataclasses.replace(real_engine.pair, max_tokens=48, max_step_tokens=24)
    request = fit_context(real_engine, CompletionRequest("chat", "glimp/tiny", pair, CONVERSATION))
    assert set(request.prompt_tokens) == {"small", "large"}
    single = fit_context(real_engine, CompletionRequest("chat", "glimp/tiny", request.pair, "And 3+3?"))
    assert all(request.prompt_tokens[r] > single.prompt_tokens[r] for r in ("small", "large"))
    from glimp_cli.engine import pair_policy

    trace = real_engine.router(pair_policy(request.pair), request.pair).run(request.question)
    steps = list(trace)
    assert steps and all(s.model in ("small", "large") for s in steps)
    small = real_engine.backends["small"]
    prompt = b"".join(small.token_bytes(t) for t in small.tokens).decode("utf-8", "replace")
    assert "Be brief.\n\nUse digits.<|im_end|>" in prompt and "And 3+3?<|im_end|>\n<|im_start|>assistant\n" in prompt
