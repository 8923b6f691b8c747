"""Fixtures for the CLI tests: the installed `ragmesh` console script run the way a person
runs it, through pipes or on a pseudo-terminal, against the real mesh (tests/live_mesh.py)."""

import asyncio
import fcntl
import json
import os
import pty
import re
import struct
import sys
import termios
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from live_mesh import API_KEY, API_KEYS, CREDENTIALS

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.cli.mesh import PORTS
from services.llm.app import start as start_llm
from services.llm.settings import LlmSettings

# What `make setup` installs next to the interpreter.
RAGMESH = Path(sys.executable).with_name("ragmesh")
# A guard against a hung command, never a measure: every command ends long before.
HANG_SECONDS = 300

LIGHTHOUSE = """# The Skerry Light

Ada Lund keeps the lighthouse on Skerry Rock. Every evening she climbs the hundred and
twelve steps of the tower, trims the wick and winds the clockwork that turns the lens.

The lens is a first-order Fresnel lens, ground in Paris in 1871. Its beam reaches
twenty-two nautical miles on a clear night, and ships count its flashes: two short, one
long, every fifteen seconds.

## Storms

In the winter storms the keeper logs the wind every hour. Spray reaches the gallery and
salt crusts the windows, so the glass is washed at dawn. Supplies come by boat from the
harbour at Vik once a fortnight, weather permitting.
"""


@pytest.fixture(scope="session")
async def lighthouse(mesh) -> str:
    """A READY document about a lighthouse, uploaded over gRPC; its id."""
    async with grpc.aio.insecure_channel(mesh["ingest"]) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)

        def requests():
            yield ingest_pb2.UploadDocumentRequest(
                metadata=ingest_pb2.DocumentMetadata(filename="skerry-light.md")
            )
            yield ingest_pb2.UploadDocumentRequest(data=LIGHTHOUSE.encode())

        uploaded = await stub.UploadDocument(requests(), metadata=CREDENTIALS)
        watch = stub.WatchDocument(
            ingest_pb2.WatchDocumentRequest(document_id=uploaded.document.id),
            metadata=CREDENTIALS,
        )
        last = [reply.document async for reply in watch][-1]
        assert last.status == ingest_pb2.DOCUMENT_STATUS_READY, last.error
        return last.id


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


class Cli:
    """Runs `ragmesh --target ... <args>` with the test's API key in RAGMESH_API_KEY."""

    patience = HANG_SECONDS

    def __init__(self, targets: dict[str, str]) -> None:
        self.targets = dict(targets)
        base = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("RAGMESH_")
            and key not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TERM")
        }
        self.env = {**base, "RAGMESH_API_KEY": API_KEY}
        self._terminals: list[Terminal] = []

    def argv(self, args, targets=None) -> list[str]:
        targets = self.targets if targets is None else targets
        return [str(RAGMESH), *(f"--target={name}={t}" for name, t in targets.items()), *args]

    async def __call__(self, *args: str, env=None, targets=None, stdin: str = "") -> Run:
        """The command's exit status and output through pipes, as a script sees them;
        env entries set to None are removed."""
        environment = _merged({**self.env, "COLUMNS": "200"}, env or {})
        process = await asyncio.create_subprocess_exec(
            *self.argv(args, targets),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
        )
        out, err = await asyncio.wait_for(process.communicate(stdin.encode()), HANG_SECONDS)
        return Run(process.returncode, out.decode(), err.decode())

    async def terminal(self, *args: str, env=None) -> "Terminal":
        environment = _merged({**self.env, "TERM": "xterm-256color"}, env or {})
        terminal = await Terminal.start(self.argv(args), environment)
        self._terminals.append(terminal)
        return terminal

    async def close(self) -> None:
        for terminal in self._terminals:
            await terminal.close()


def _merged(env: dict, changes: dict) -> dict:
    merged = {**env, **changes}
    return {key: value for key, value in merged.items() if value is not None}


@pytest.fixture
async def cli(mesh):
    runner = Cli({name: target for name, target in mesh.items() if name in PORTS})
    yield runner
    await runner.close()


# Escape sequences (colours, cursor moves, modes), also one still arriving at the end.
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]?|\][^\x07\x1b]*(\x07|\x1b\\)?|.)?|\r")
# Makes the pseudo-terminal the command's controlling terminal, so Ctrl-C is SIGINT.
_CONTROLLING_TTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """The command on a pseudo-terminal of 160 x 50: what a person sees (escape
    sequences left out) and what they type."""

    def __init__(self, process, fd: int) -> None:
        self._process = process
        self._fd = fd
        self._raw = b""
        self._seen = 0
        self._closed = False
        self._changed = asyncio.Event()
        self.screen = ""
        asyncio.get_running_loop().add_reader(fd, self._read)

    @classmethod
    async def start(cls, argv: list[str], env: dict) -> "Terminal":
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CONTROLLING_TTY,
            *argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        return cls(process, master)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except OSError:  # EIO: the command closed the terminal
            data = b""
        if data:
            self._raw += data
            self.screen = _ESCAPES.sub("", self._raw.decode(errors="replace"))
        else:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._closed = True
        self._changed.set()

    async def expect(self, pattern: str) -> re.Match:
        """Waits for pattern to appear after what the last expect matched."""
        regex = re.compile(pattern)
        try:
            async with asyncio.timeout(HANG_SECONDS):
                while not (match := regex.search(self.screen, self._seen)) and not self._closed:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            match = None
        if match is None:
            raise AssertionError(f"{pattern!r} never appeared; the screen:\n{self.screen}")
        self._seen = match.end()
        return match

    async def prompt(self) -> None:
        """Waits for the chat's "> " prompt and for its line editor to hold the terminal.

        Keys typed earlier, while the terminal is still in canonical mode, go through
        the kernel's line discipline: Ctrl-D there is an end of file that readline,
        switching the terminal to raw mode, reads as a NUL and ignores."""
        await self.expect("> ")
        async with asyncio.timeout(HANG_SECONDS):
            # On a pty's master, tcgetattr reads the command's side (the slave). A mode
            # change sends no event to wait for, so this polls.
            while termios.tcgetattr(self._fd)[3] & termios.ICANON:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    def type(self, keys: str) -> None:
        os.write(self._fd, keys.encode())

    async def exit_code(self) -> int:
        code = await asyncio.wait_for(self._process.wait(), HANG_SECONDS)
        async with asyncio.timeout(HANG_SECONDS):
            while not self._closed:
                self._changed.clear()
                await self._changed.wait()
        return code

    async def close(self) -> None:
        """Ends the command if a failed test left it running, and frees the terminal."""
        if self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        if not self._closed:
            asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)


@pytest.fixture(scope="session")
async def spare_llm(tmp_path_factory) -> str:
    """A second llm service, with no model loaded and a tiny random Llama in its models
    folder, for loading and unloading without disturbing the mesh's model; its target."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    models_dir = tmp_path_factory.mktemp("spare-models")
    words = ["<unk>", "<s>", "</s>", *"the keeper lights the lamp at dusk".split()]
    vocabulary = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    vocabulary.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=vocabulary, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(models_dir / "tiny")
    tokenizer.save_pretrained(models_dir / "tiny")
    settings = LlmSettings(
        port=0,
        data_dir=tmp_path_factory.mktemp("spare-llm"),
        models_dir=models_dir,
        default_model="",
        api_keys=API_KEYS,
        shutdown_grace_seconds=0.5,
    )
    app = await start_llm(settings)
    yield f"127.0.0.1:{app.server.port}"
    await app.server.stop(0)
    await app.close()
