"""`ilc serve` on the embedded SmolLM2 with the committed default plan (full + streaming heads) answers an OpenAI
chat request (vLLM's server, started as a user would; about a minute on 2 cores)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAN = ROOT / "plans" / "smollm2-135m.yaml"
STARTUP_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_ilc_serve_answers_a_chat_request_with_the_plan_applied(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    ilc = Path(sys.executable).with_name("ilc")
    with open(log, "w") as out:
        server = subprocess.Popen([str(ilc), "serve", str(PLAN), "--port", str(port), "--max-model-len", "4096",
                                   "--dtype", "float32", "--enforce-eager"], stdout=out, stderr=subprocess.STDOUT,
                                  env=env)
    try:
        deadline = time.time() + STARTUP_S
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "server did not start:\n" + log.read_text()[-3000:]
                time.sleep(2)
        reply = post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": "smollm2-135m", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        text = reply["choices"][0]["message"]["content"]
        assert "Paris" in text, text
        startup = log.read_text()
        assert "ilc plan smollm2-135m: 47 full + 43 streaming KV heads" in startup
        assert "IlcLlamaForCausalLM" in startup
    finally:
        server.terminate()
        server.wait(timeout=60)
