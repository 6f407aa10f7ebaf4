"""The web chat page at "/" in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
load it, send a message, watch the reply stream in, stop a long one.

The embedded SmolLM2 model serves here: a real instruct model, slow enough on a CPU that a reply visibly
grows token by token. Without a browser the test skips, except in CI (MISTRAL7B_REQUIRE_BROWSER=1), where
the setup script installs one and a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from mistral7b import LLM, SamplingParams
from tests.conftest import smollm2_path
from tests.server.conftest import start_server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
KEY = "page-key"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or DRIVER is None:
        if os.environ.get("MISTRAL7B_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromedriver are required here: apt-get install chromium chromium-driver")
        pytest.skip("no chromium/chromedriver on this machine")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    s = start_server(smollm2_path(), str(tmp_path_factory.mktemp("page")), "--api-key", KEY)
    yield s
    s.stop()


def wait_for(predicate, timeout: float = 60.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def last_reply(driver):
    replies = driver.find_elements("css selector", ".msg.assistant, .msg.error")
    return replies[-1] if replies else None


def test_page_streams_a_reply_with_system_prompt_and_safe_prompt(browser, smollm2_server):
    browser.get(smollm2_server.url + "/")
    assert "mistral7b" in browser.title
    browser.find_element("id", "api-key").send_keys(KEY)
    browser.find_element("id", "system").send_keys("Answer in one short sentence.")
    browser.find_element("id", "safe").click()
    temperature = browser.find_element("id", "temperature")
    temperature.clear()
    temperature.send_keys("0")
    tokens = browser.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("48")
    browser.find_element("id", "input").send_keys("What is the capital of France?")
    browser.find_element("id", "send").click()
    lengths = set()

    def done():
        reply = last_reply(browser)
        if reply is None:
            return False
        lengths.add(len(reply.text))
        return reply.get_attribute("data-state") == "done"

    wait_for(done)
    reply = last_reply(browser)
    assert len(lengths) > 2, "the reply should appear piece by piece"
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "What is the capital of France?"}]
    offline = LLM(progress=False)
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=48), safe_prompt=True).outputs[0].text
    assert reply.text == want and "Paris" in want
    assert browser.find_element("id", "model").text == "SmolLM2-135M-Instruct.Q4_1"


def test_stop_button_ends_the_stream_and_frees_the_server(browser, smollm2_server):
    browser.get(smollm2_server.url + "/")
    browser.find_element("id", "api-key").send_keys(KEY)
    tokens = browser.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("2000")
    browser.find_element("id", "input").send_keys("Write a very long story about a dragon, in many chapters.")
    browser.find_element("id", "send").click()
    wait_for(lambda: last_reply(browser) is not None and len(last_reply(browser).text) > 20)
    browser.find_element("id", "stop").click()
    wait_for(lambda: last_reply(browser).get_attribute("data-state") == "stopped", timeout=10)
    assert "(stopped)" in last_reply(browser).text

    def idle():
        m = smollm2_server.metrics()
        return m["mistral7b:num_requests_running"] == 0 and m["mistral7b:kv_cache_usage_perc"] == 0

    wait_for(idle, timeout=20, every=0.2)
    assert browser.find_element("id", "send").is_enabled()


def test_wrong_key_shows_the_error(browser, smollm2_server):
    browser.get(smollm2_server.url + "/")
    browser.find_element("id", "api-key").send_keys("wrong")
    browser.find_element("id", "input").send_keys("Hello")
    browser.find_element("id", "send").click()
    wait_for(lambda: browser.find_elements("css selector", ".msg.error"))
    assert "API key" in browser.find_element("css selector", ".msg.error").text


def test_pasted_schema_shapes_the_answer(browser, smollm2_server):
    """A JSON schema pasted on the page goes out as response_format: the reply validates against it."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    browser.get(smollm2_server.url + "/")
    browser.find_element("id", "api-key").send_keys(KEY)
    browser.find_element("id", "schema").send_keys(json.dumps(schema))
    temperature = browser.find_element("id", "temperature")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element("id", "input").send_keys("Name the capital of France.")
    browser.find_element("id", "send").click()
    wait_for(lambda: last_reply(browser) is not None and last_reply(browser).get_attribute("data-state") in (
        "done", "error"))
    jsonschema.validate(json.loads(last_reply(browser).text), schema)
    browser.find_element("id", "schema").clear()
    browser.find_element("id", "schema").send_keys("{not json")
    browser.find_element("id", "input").send_keys("Again")
    browser.find_element("id", "send").click()
    wait_for(lambda: "not valid JSON" in (last_reply(browser).text or ""))


def test_tool_call_is_shown(browser, v3_server):
    """Tools pasted on the page with tool choice "required": the reply shows the call, name and arguments."""
    import json

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}}}]
    browser.get(v3_server.url + "/")
    browser.find_element("id", "tools").send_keys(json.dumps(tools))
    browser.find_element("id", "tool-choice").send_keys("required")
    browser.find_element("id", "input").send_keys("Weather in Oslo?")
    browser.find_element("id", "send").click()
    wait_for(lambda: last_reply(browser) is not None and last_reply(browser).get_attribute("data-state") == "done")
    calls = last_reply(browser).find_elements("css selector", ".tool-call")  # parallel calls allowed: one or more
    assert calls and last_reply(browser).get_attribute("data-finish") == "tool_calls"
    for call in calls:
        assert call.text.startswith("tool call: get_weather(")
        assert set(json.loads(call.text[len("tool call: get_weather("):-1])) == {"city"}


def test_replies_render_markdown_as_text_never_as_html(browser, smollm2_server):
    """Code blocks, inline code, bold and italic become elements; any HTML in a reply stays text (no element,
    no script); the favicon is inline (no request leaves the page)."""
    browser.get(smollm2_server.url + "/")
    reply = ("Use `a<b>` here.\n```python\nprint('<b>hi</b>')\n```\n**bold** and *it*"
             "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>")
    html = browser.execute_script(
        "const d = document.createElement('div'); renderMarkdown(d, arguments[0]); document.body.appendChild(d);"
        "return d.innerHTML;", reply)
    assert "<code>a&lt;b&gt;</code>" in html
    assert "<pre><code>print('&lt;b&gt;hi&lt;/b&gt;')</code></pre>" in html
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html
    assert "<img" not in html and "<script" not in html and "&lt;img" in html
    time.sleep(0.2)
    assert browser.title != "pwned"
    icon = browser.find_element("css selector", "link[rel=icon]").get_attribute("href")
    assert icon.startswith("data:image/svg+xml")
