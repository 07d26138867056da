"""A real ComfyUI server in a child process, with this checkout as its `privdiff` node pack, driven
over HTTP the way the frontend and users' scripts drive it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


class ComfyServer:
    def __init__(self, *, comfyui_root: Path, base: Path, port: int):
        self.root, self.base, self.port = comfyui_root, base, port
        self.url = f"http://127.0.0.1:{port}"
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / "privdiff"  # ComfyUI names a pack after its folder
        if not link.exists():
            link.symlink_to(REPOSITORY, target_is_directory=True)
        self.log_path = base / "comfyui.log"
        self.process = None

    def start(self, *, timeout: float = 180.0) -> "ComfyServer":
        # PRIVDIFF_COMFYUI_PYTHON: a ComfyUI environment of its own (e.g. a fresh one with only the pack's
        # requirements.txt, without privdiff installed), while the tests run in theirs.
        python = os.environ.get("PRIVDIFF_COMFYUI_PYTHON") or sys.executable
        command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
                   "--base-directory", str(self.base)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, cwd=self.root, stdout=open(self.log_path, "w"),
                                        stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # ---- HTTP --------------------------------------------------------------------------------

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
                return response.status, (json.loads(text) if text.strip() else {})
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def queue(self, prompt: dict, *, client_id: str | None = None) -> str:
        body = {"prompt": prompt, **({"client_id": client_id} if client_id else {})}
        status, reply = self.post("/prompt", body)
        if status != 200:
            raise AssertionError(f"/prompt refused the graph ({status}): {json.dumps(reply)[:3000]}")
        return reply["prompt_id"]

    def wait(self, prompt_id: str, *, timeout: float = 900.0) -> dict:
        """The prompt's history entry once it has finished (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry["status"].get("status_str") in ("success", "error"):
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, *, timeout: float = 900.0) -> dict:
        entry = self.wait(self.queue(prompt), timeout=timeout)
        if entry["status"]["status_str"] != "success":
            raise AssertionError(f"the graph failed: {execution_error(entry)}")
        return entry


class Listener:
    """ComfyUI's websocket as the frontend hears it, in a background thread: every message with its
    arrival time. JSON messages are (time, type, data); binary ones (progress text, previews) are
    (time, "text", (node, text)) or (time, "preview", node or None)."""

    def __init__(self, server: ComfyServer):
        import asyncio
        import threading
        import uuid

        self.client_id = uuid.uuid4().hex
        self.messages: list[tuple[float, str, object]] = []
        self._url = server.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._listen(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the websocket did not open")

    async def _listen(self) -> None:
        import struct

        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self._url) as ws:
            self._ws = ws
            self._ready.set()
            async for message in ws:
                now = time.monotonic()
                if message.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(message.data)
                    self.messages.append((now, data["type"], data.get("data")))
                elif message.type == aiohttp.WSMsgType.BINARY:
                    kind = struct.unpack(">I", message.data[:4])[0]
                    if kind == 3:  # progress text: node id length, node id, text
                        size = struct.unpack(">I", message.data[4:8])[0]
                        node, text = message.data[8:8 + size].decode(), message.data[8 + size:].decode()
                        self.messages.append((now, "text", (node, text)))
                    else:
                        self.messages.append((now, "preview", None))

    def wait_for(self, predicate, *, timeout: float = 300.0):
        """The first message (time, type, data) for which predicate holds, waiting for it."""
        deadline, seen = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            for message in self.messages[seen:]:
                seen += 1
                if predicate(message):
                    return message
            time.sleep(0.1)
        raise TimeoutError("the awaited websocket message did not come")

    def texts(self, node: str) -> list[str]:
        return [data[1] for _, kind, data in self.messages if kind == "text" and data[0] == node]

    def close(self) -> None:
        import asyncio

        if getattr(self, "_ws", None) is not None:
            asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop).result(10)
        self._thread.join(10)


def execution_error(entry: dict) -> str:
    for kind, message in entry["status"].get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return json.dumps({k: message.get(k) for k in ("node_type", "exception_type", "exception_message")}
                              if kind == "execution_error" else {"interrupted": message.get("node_type")})
    return "no error message"


def status_messages(entry: dict) -> list[str]:
    return [kind for kind, _ in entry["status"].get("messages", [])]
