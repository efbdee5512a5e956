"""The official `openai` Python SDK against chatq's OpenAI facade.

Run by tests/tests/openai.rs with CHATQ_BASE_URL (…/v1), CHATQ_KEY and
CHATQ_MODEL set; exits non-zero (with a traceback) on the first failed check.
"""

import asyncio
import os
import threading

try:
    import httpx2 as httpx  # what openai 3.x is built on
except ImportError:
    import httpx
import openai

BASE_URL = os.environ["CHATQ_BASE_URL"]
KEY = os.environ["CHATQ_KEY"]
MODEL = os.environ["CHATQ_MODEL"]


def client(**kwargs):
    return openai.OpenAI(base_url=BASE_URL, api_key=KEY, timeout=60, **kwargs)


def check_plain():
    c = client()
    r = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello from the sdk"}]
    )
    assert r.object == "chat.completion", r
    assert r.id.startswith("chatcmpl-"), r.id
    assert r.model == MODEL, r.model
    assert r.choices[0].message.role == "assistant"
    assert "hello from the sdk" in r.choices[0].message.content, r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    # The completion is an ordinary chatq job.
    job = httpx.get(
        BASE_URL + "/jobs/" + r.id, headers={"Authorization": "Bearer " + KEY}
    ).json()
    assert job["status"] == "succeeded", job
    assert job["result"]["content"] == r.choices[0].message.content


def check_options():
    c = client()
    r = c.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": [{"type": "text", "text": "three"}]},
        ],
        temperature=0.2,
        top_p=0.9,
        max_tokens=3,
        stop=["zzz"],
        seed=42,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        user="sdk-test",
    )
    # The mock cuts its reply at max_tokens words.
    assert r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == 3, r.usage


def check_stream(include_usage):
    c = client()
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream me [mock:words=30]"}],
        stream=True,
        **kwargs,
    )
    text, finish, usage, chunks = "", None, None, 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert chunks >= 3, chunks
    assert finish == "stop", finish
    assert len(text.split()) == 30, text
    if include_usage:
        assert usage is not None and usage.completion_tokens == 30, usage
    else:
        assert usage is None, usage


def check_stream_plain():
    check_stream(include_usage=False)


def check_stream_usage():
    check_stream(include_usage=True)


def check_async():
    async def run():
        c = openai.AsyncOpenAI(base_url=BASE_URL, api_key=KEY, timeout=60)
        rs = await asyncio.gather(
            *[
                c.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"async {i}"}]
                )
                for i in range(5)
            ]
        )
        for i, r in enumerate(rs):
            assert f"async {i}" in r.choices[0].message.content
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "async stream"}],
            stream=True,
        )
        text = ""
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
        assert "async stream" in text, text

    asyncio.run(run())


def check_errors():
    bad = openai.OpenAI(base_url=BASE_URL, api_key="cq_not_a_key", max_retries=0)
    try:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a bad key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    c = client(max_retries=0)
    for kwargs, param in [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ]:
        try:
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], **kwargs
            )
            raise AssertionError(f"{param} was accepted")
        except openai.BadRequestError as e:
            assert e.status_code == 400
            assert e.body["param"] == param, e.body


def check_retries_through_429():
    # The queue holds 2 jobs per tenant here and one slow worker call runs at
    # a time: of 6 concurrent requests some get 429 queue_full + Retry-After,
    # which the SDK waits out and retries until every one is answered.
    statuses = []
    lock = threading.Lock()

    def hook(response):
        with lock:
            statuses.append(response.status_code)

    c = client(
        max_retries=8,
        http_client=httpx.Client(event_hooks={"response": [hook]}, timeout=120),
    )
    answers, errors = [], []

    def one(i):
        try:
            r = c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"burst {i} [mock:latency_ms=700]"}],
            )
            answers.append(r.choices[0].message.content)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(answers) == 6, answers
    assert 429 in statuses, statuses


def check_models():
    ids = [m.id for m in client().models.list()]
    assert MODEL in ids, ids
    assert client().models.retrieve(MODEL).id == MODEL
    try:
        client(max_retries=0).models.retrieve("no-such-model")
        raise AssertionError("an unknown model was found")
    except openai.NotFoundError:
        pass


if __name__ == "__main__":
    for check in os.environ.get("CHATQ_CHECKS", "").split(","):
        if check:
            globals()["check_" + check]()
            print("ok", check, flush=True)
