"""The official `openai` Python client, unchanged, against a live `lexlora serve` app (uvicorn
in-process, tiny adapters): completions (a prompt, a list, a JSON record), chat, streaming (the
chunks add up to the greedy answer), seeded sampling, an unknown model (NotFoundError), a refused
parameter (BadRequestError naming it), and models.list()."""

import json
import time

import openai
import pytest

from tests.serving import served
from tests.serving.served import DESC_INPUTS, FILES_INPUTS, call

adapters, server = served.adapters, served.server


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def greedy(adapters):
    """What the registry alone answers (the adapters' own decoding)."""
    registry = adapters[2]
    return {"desc": registry.generate(DESC_INPUTS, adapter="desc"),
            "files": registry.generate(FILES_INPUTS, adapter="files")}


def test_completions(client, greedy):
    response = client.completions.create(model="desc", prompt=DESC_INPUTS[0])
    assert response.object == "text_completion" and response.id.startswith("cmpl-") and response.model == "desc"
    (choice,) = response.choices
    assert choice.text == greedy["desc"][0] and choice.index == 0 and choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    listed = client.completions.create(model="desc", prompt=DESC_INPUTS)
    assert [c.index for c in listed.choices] == [0, 1]
    assert [c.text for c in listed.choices] == greedy["desc"]
    record = client.completions.create(model="files", prompt=json.dumps(FILES_INPUTS[0]))
    assert record.choices[0].text == greedy["files"][0]


def test_max_tokens_and_seeded_sampling(client):
    short = client.completions.create(model="desc", prompt=DESC_INPUTS[0], max_tokens=2, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    sampled = [client.completions.create(model="plain", prompt="notes.txt", temperature=1.5, seed=11).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same sample


def test_chat(client, greedy):
    response = client.chat.completions.create(model="desc", messages=[
        {"role": "system", "content": "ignored"}, {"role": "user", "content": "ignored too"},
        {"role": "assistant", "content": "..."}, {"role": "user", "content": DESC_INPUTS[1]},
    ])
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == greedy["desc"][1]
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    parts = client.chat.completions.create(
        model="files", messages=[{"role": "user", "content": [{"type": "text", "text": json.dumps(FILES_INPUTS[1])}]}])
    assert parts.choices[0].message.content == greedy["files"][1]


def test_streaming_adds_up_to_the_greedy_answer(client, greedy):
    chunks = list(client.completions.create(model="desc", prompt=DESC_INPUTS, stream=True,
                                            stream_options={"include_usage": True}))
    texts = ["", ""]
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == greedy["desc"]
    finishes = {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}
    assert set(finishes) == {0, 1} and set(finishes.values()) <= {"stop", "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    whole = client.completions.create(model="desc", prompt=DESC_INPUTS)
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()

    chat = list(client.chat.completions.create(model="desc", messages=[{"role": "user", "content": DESC_INPUTS[0]}],
                                               stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == greedy["desc"][0]
    assert chat[-1].choices[0].finish_reason in ("stop", "length")


def test_a_dropped_stream_leaves_the_server_serving(client, server, greedy):
    url, _ = server
    stream = client.completions.create(model="desc", prompt=DESC_INPUTS[0], stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while call(f"{url}/health")[1]["active_rows"]:
        assert time.monotonic() < deadline, "the dropped stream's row was never freed"
        time.sleep(0.05)
    assert client.completions.create(model="desc", prompt=DESC_INPUTS[0]).choices[0].text == greedy["desc"][0]


def test_errors(client):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model="no-such-adapter", prompt="x", stream=stream)
        assert caught.value.code == "model_not_found" and "no-such-adapter" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="desc", prompt="x", n=2)
    assert caught.value.param == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="desc", prompt="x", logprobs=2)
    assert caught.value.param == "logprobs"
    with pytest.raises(openai.APIStatusError) as caught:  # the server's --max-inputs (4 here)
        client.completions.create(model="desc", prompt=["a.py"] * 5)
    assert caught.value.status_code == 413 and caught.value.param == "prompt"
    with pytest.raises(openai.UnprocessableEntityError) as caught:  # desc has one input field
        client.completions.create(model="desc", prompt='{"nope": "x"}')
    assert caught.value.param == "prompt"


def test_models(client, adapters):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == adapters[2].base_config.name_or_path
    assert {"desc", "plain", "files"} <= set(ids)
    assert client.models.retrieve("desc").owned_by == "lexlora"
