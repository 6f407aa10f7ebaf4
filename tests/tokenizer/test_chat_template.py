"""Jinja chat templates: same text as transformers renders, and safe against hostile templates and content."""

from __future__ import annotations

import time

import pytest

from mistral7b.errors import RequestError
from mistral7b.tokenizer.chat_template import ChatTemplate, split_at_specials

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  Hi {{ 7*7 }} </s>  "},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]

# Uses what real templates use: loop controls, namespace, tojson, trim, raise_exception, strftime_now.
RICH = """{%- set ns = namespace(n=0) -%}
{{ bos_token }}{% for m in messages %}
  {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}
  {% set ns.n = ns.n + 1 %}
  <{{ m.role }} n={{ ns.n }} meta={{ {'r': m.role} | tojson }}>{{ m.content | trim }}</{{ m.role }}>{{ eos_token }}
  {% if loop.last %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant date={{ strftime_now('%Y') | length }}>{% endif %}"""


def render(source, messages=MESSAGES, add_generation_prompt=True):
    return ChatTemplate(source).render(messages, add_generation_prompt, bos_token="<s>", eos_token="</s>")


def test_text_equals_transformers(smollm2_oracle):
    ours = render(RICH).text
    theirs = smollm2_oracle.apply_chat_template(MESSAGES, chat_template=RICH, add_generation_prompt=True,
                                                tokenize=False, bos_token="<s>", eos_token="</s>")
    assert ours == theirs


def test_content_spans_cover_exactly_the_content():
    rendered = render(RICH)
    shown = [rendered.text[a:b] for a, b in rendered.content_spans]
    assert shown == [m["content"].strip() for m in MESSAGES]  # `trim` is allowed
    assert "{{ 7*7 }}" in rendered.text  # content is data, never template code


def test_split_at_specials_ignores_content():
    rendered = render(RICH)
    pieces = split_at_specials(rendered.text, rendered.content_spans, {"<s>": 1, "</s>": 2})
    assert pieces.count(1) == 1 and pieces.count(2) == len(MESSAGES)
    assert any(isinstance(p, str) and "</s>" in p for p in pieces)  # the user's "</s>" stayed text


def test_content_changed_by_template_is_refused():
    with pytest.raises(RequestError, match="content"):
        render("{% for m in messages %}{{ m.content | upper }}{% endfor %}")


def test_dropped_content_is_refused():
    with pytest.raises(RequestError, match=r"messages\[0\]"):
        render("{% for m in messages %}{% if m.role != 'system' %}{{ m.content }}{% endif %}{% endfor %}")


def test_unsafe_attribute_is_a_clear_error():
    with pytest.raises(RequestError, match="unsafe.*__class__"):
        render("{{ ''.__class__.__mro__ }}")
    with pytest.raises(RequestError, match="unsafe"):
        render("{{ messages.__class__.__init__.__globals__ }}")


def test_raise_exception_message_reaches_the_user():
    with pytest.raises(RequestError, match="Conversation roles must alternate"):
        render("{{ raise_exception('Conversation roles must alternate user/assistant') }}")


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 1000000000 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for i in range(10000000) %}{% endfor %}",
    "{{ 10 ** 10 ** 10 }}",
])
def test_runaway_templates_are_stopped(source):
    start = time.monotonic()
    with pytest.raises(RequestError):
        render(source)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("source", ["{% for %}", "{{ undefined_function() }}", "{{ messages[99].content }}x"])
def test_broken_templates_are_request_errors(source):
    with pytest.raises(RequestError):
        render(source)
