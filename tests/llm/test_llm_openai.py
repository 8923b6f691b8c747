"""The OpenAI-compatible backend against a protocol double: a small streaming HTTP server."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from conftest import collect, gen_overrides
from grpc_status import rpc_status
from rpc_errors import error_info

from ragmesh.llm.v1 import llm_pb2

ANSWER = ["Paris", " is", " the", " capital", "."]
# What the double answers, with HTTP 500, to the prompt "fail".
SECRET_REPLY = "internal error at db.internal:5432, password hunter2"


class OpenAIProtocolDouble:
    """Speaks the streaming OpenAI completions API; records what it was sent."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        # The Authorization header of every request, "" when absent.
        self.authorizations: list[str] = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                double.authorizations.append(self.headers.get("Authorization", ""))
                if self.path != "/v1/models":
                    self.send_error(404)
                    return
                self._json({"object": "list", "data": [{"id": "double-model"}]})

            def do_POST(self) -> None:
                double.authorizations.append(self.headers.get("Authorization", ""))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                double.bodies.append(body)
                if body.get("prompt") == "fail":
                    data = SECRET_REPLY.encode()
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if body.get("model") != "double-model":
                    self._json({"error": {"message": "unknown model"}}, status=404)
                    return
                chat = self.path == "/v1/chat/completions"
                # A long request streams slowly and forever-ish, for cancellation.
                pieces = ANSWER if body["max_tokens"] < 100 else ["word "] * 1000
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for piece in pieces:
                        choice = {"delta": {"content": piece}} if chat else {"text": piece}
                        self._event({"choices": [dict(choice, index=0, finish_reason=None)]})
                        time.sleep(0.01 if len(pieces) < 100 else 0.05)
                    self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    self._event(
                        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5}}
                    )
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _event(self, payload) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

            def _json(self, payload, status=200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def double():
    server = OpenAIProtocolDouble()
    yield server
    server.close()


async def _load_remote(client, url, model="double-model"):
    return await client.load(
        model, backend=llm_pb2.BACKEND_OPENAI_COMPATIBLE, base_url=url, wait_seconds=30
    )


async def test_chat_and_generate_are_relayed_to_an_openai_compatible_server(make_client, double):
    client = await make_client(remote_base_urls=[double.url])
    status = await _load_remote(client, double.url)
    assert status.state == llm_pb2.MODEL_STATE_READY, status.error
    assert status.serving_model == "double-model"

    request = llm_pb2.ChatRequest(
        system_prompt="Answer briefly.",
        messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content="Capital of France?")],
        context=[llm_pb2.ContextPassage(id="doc-1#0", text="Paris is in France.", source="a.txt")],
        overrides=gen_overrides(temperature=0.0, max_new_tokens=20, seed=3),
    )
    deltas, completion = await collect(client.llm.Chat(request))
    assert deltas == ANSWER
    assert completion.text == "Paris is the capital."
    assert completion.finish_reason == llm_pb2.FINISH_REASON_EOS
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 5)
    sent = double.bodies[-1]
    assert sent["stream"] is True
    assert (sent["temperature"], sent["max_tokens"], sent["seed"]) == (0.0, 20, 3)
    assert sent["messages"][0]["role"] == "system"
    assert "Answer briefly." in sent["messages"][0]["content"]
    assert "[doc-1#0]" in sent["messages"][0]["content"]
    assert sent["messages"][1] == {"role": "user", "content": "Capital of France?"}

    deltas, completion = await collect(
        client.llm.Generate(
            llm_pb2.GenerateRequest(prompt="The capital", overrides=gen_overrides(max_new_tokens=5))
        )
    )
    assert completion.text == "Paris is the capital."
    assert completion.finish_reason == llm_pb2.FINISH_REASON_EOS
    assert double.bodies[-1]["prompt"] == "The capital"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.llm.CountTokens(llm_pb2.CountTokensRequest(prompt="x"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_remote_generation_is_cancellable(make_client, double):
    client = await make_client(remote_base_urls=[double.url])
    await _load_remote(client, double.url)
    call = client.llm.Generate(
        llm_pb2.GenerateRequest(
            prompt="go on", request_id="r1", overrides=gen_overrides(max_new_tokens=500)
        )
    )
    await call.read()
    await client.llm.Cancel(llm_pb2.CancelRequest(request_id="r1"))
    _, completion = await collect(call)
    assert completion.finish_reason == llm_pb2.FINISH_REASON_CANCELLED
    assert len(completion.text) < 1000 * len("word ")


async def test_an_unreachable_or_wrong_server_fails_the_load_with_a_reason(make_client, double):
    client = await make_client(
        remote_timeout_seconds=2, remote_base_urls=["http://127.0.0.1:9/v1", double.url]
    )
    status = await _load_remote(client, "http://127.0.0.1:9/v1")
    assert status.state == llm_pb2.MODEL_STATE_FAILED
    assert "127.0.0.1:9" in status.error
    status = await _load_remote(client, double.url, model="other-model")
    assert status.state == llm_pb2.MODEL_STATE_FAILED
    assert "double-model" in status.error


@pytest.fixture
def other_double():
    server = OpenAIProtocolDouble()
    yield server
    server.close()


async def test_only_configured_openai_servers_are_used_and_only_they_get_the_key(
    make_client, double, other_double
):
    for allowed in ([], [double.url]):
        client = await make_client(remote_base_urls=allowed, remote_api_key="server-secret")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.llm.LoadModel(
                llm_pb2.LoadModelRequest(
                    options=llm_pb2.LoadOptions(
                        model="double-model",
                        backend=llm_pb2.BACKEND_OPENAI_COMPATIBLE,
                        base_url=other_double.url,
                    )
                )
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        info = error_info(caught.value)
        assert info.reason == "BASE_URL_NOT_ALLOWED"
        assert info.metadata["setting"] == "RAGMESH_LLM_REMOTE_BASE_URLS"
        assert "RAGMESH_LLM_REMOTE_BASE_URLS" in caught.value.details()
    assert other_double.authorizations == []

    status = await _load_remote(client, double.url + "/")
    assert status.state == llm_pb2.MODEL_STATE_READY, status.error
    await collect(
        client.llm.Generate(
            llm_pb2.GenerateRequest(prompt="Hi", overrides=gen_overrides(max_new_tokens=5))
        )
    )
    assert double.authorizations == ["Bearer server-secret"] * 2


async def test_a_failing_openai_server_is_reported_without_its_reply(make_client, double):
    client = await make_client(remote_base_urls=[double.url])
    assert (await _load_remote(client, double.url)).state == llm_pb2.MODEL_STATE_READY
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(
            client.llm.Generate(
                llm_pb2.GenerateRequest(prompt="fail", overrides=gen_overrides(max_new_tokens=5))
            )
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "BACKEND_ERROR"
    assert "500" in caught.value.details()
    assert "hunter2" not in caught.value.details()
    assert "hunter2" not in str(rpc_status.from_call(caught.value))
