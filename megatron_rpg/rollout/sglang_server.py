"""SGLang servers for the SGLang rollout engine: launched and supervised by us, or given by URL, and
the HTTP client that talks to them (JSON over urllib: the trainer's environment needs no SGLang).

    server = launch_server(config, model_path, port, log_path)  # python -m sglang.launch_server, own group
    client = SGLangClient(server.url, api_key, timeout_s=60, retries=2)
    client.wait_healthy(timeout_s=300, server=server)
    client.post("/generate", {...})       # SGLangUnreachable: no answer (connection refused, reset, timeout)
    server.restart()                      # SIGKILL of the group, the same command again (log appended)
    server.stop()                         # kills the whole process group

A launched server listens on 127.0.0.1 unless --sglang-host says otherwise; any other address needs an
API key (--sglang-api-key or SGLANG_API_KEY), because the weight-update routes let whoever reaches the
port replace the policy. The key is passed to SGLang's --api-key and sent by the client as a bearer token.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class SGLangServerError(RuntimeError):
    """A server that did not start, died, or answered with an error."""


class SGLangUnreachable(SGLangServerError):
    """No answer: connection refused or reset, or no reply within the timeout (a dead or hung server).
    The request may be retried after the server is back; an HTTP error status is not this."""


def check_bind_address(host: str, api_key: str | None) -> None:
    """ValueError before launching when a server would listen beyond loopback without an API key."""
    if host not in LOOPBACK_HOSTS and not api_key:
        raise ValueError(f"--sglang-host {host} listens beyond loopback: anyone reaching it could replace the "
                         f"policy through the weight-update routes; give --sglang-api-key KEY (or set "
                         f"SGLANG_API_KEY), or keep the default --sglang-host 127.0.0.1")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(config, model_path: str, port: int) -> list[str]:
    """The sglang.launch_server command line of one server (config: SGLangConfig)."""
    command = [config.python, "-m", "sglang.launch_server", "--model-path", model_path, "--host", config.host,
               "--port", str(port), "--skip-tokenizer-init", "--tp-size", str(config.num_gpus_per_engine),
               "--mem-fraction-static", str(config.mem_fraction_static)]
    if config.max_total_tokens is not None:
        command += ["--max-total-tokens", str(config.max_total_tokens)]
    if config.device == "cpu":  # SGLang's CPU path (SGLANG_USE_CPU_ENGINE=1 is set in its environment)
        command += ["--device", "cpu", "--attention-backend", "torch_native"]
    if config.api_key:
        command += ["--api-key", config.api_key]
    return command + shlex.split(config.extra_args)


@dataclasses.dataclass
class LaunchedServer:
    url: str
    process: subprocess.Popen
    log_path: str
    command: list[str] = dataclasses.field(default_factory=list)
    env: dict = dataclasses.field(default_factory=dict)
    restarts: int = 0

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole process group (a stopped or hung server too); waits for the parent."""
        try:
            os.killpg(os.getpgid(self.process.pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def restart(self) -> None:
        """The same command (model path, port, flags) in a fresh process group, after killing this one;
        the log gets the new server's output appended after a marker line. Not yet healthy."""
        self.kill()
        self.restarts += 1
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n===== megatron_rpg: restart {self.restarts} of this server "
                      f"(exit status {self.process.returncode}) =====\n")
            log.flush()
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the server's process group (its scheduler and detokenizer children too), then SIGKILL."""
        if self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGCONT)  # a stopped (SIGSTOP) group would never act on the SIGTERM
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(group, signal.SIGKILL)  # children that outlived the parent
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""


def launch_server(config, model_path: str, port: int, log_path: str) -> LaunchedServer:
    """Starts one server in its own process group (so stop() reaches every child); not yet healthy."""
    check_bind_address(config.host, config.api_key)
    if shutil.which(config.python) is None:
        raise ValueError(f"--sglang-python {config.python}: no such interpreter; run tools/setup_sglang_cpu.sh "
                         f"(CPU) or point it at a Python with sglang installed")
    env = dict(os.environ)
    if config.device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    command = server_command(config, model_path, port)
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.close()  # the child holds its own descriptor
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return LaunchedServer(url=f"http://{host}:{port}", process=process, log_path=log_path, command=command, env=env)


class SGLangClient:
    """JSON POST/GET to one server with a timeout and `retries` further immediate tries on connection
    errors and timeouts, then SGLangUnreachable (an HTTP error status is the server's answer, not
    retried). The SGLang engine uses retries=0 and retries itself, after checking or restarting the
    server (rollout/sglang_recovery.py)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout_s: float = 600.0, retries: int = 2):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retries = retries

    def _request(self, path: str, payload: dict | None, timeout_s: float):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="GET" if payload is None else "POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
        try:
            return json.loads(body) if body else None
        except json.JSONDecodeError:
            return body.decode(errors="replace")

    def post(self, path: str, payload: dict | None = None, *, timeout_s: float | None = None):
        return self._with_retries(path, {} if payload is None else payload, timeout_s)

    def get(self, path: str, *, timeout_s: float | None = None):
        return self._with_retries(path, None, timeout_s)

    def _with_retries(self, path, payload, timeout_s):
        last = None
        for _ in range(self.retries + 1):
            try:
                return self._request(path, payload, timeout_s or self.timeout_s)
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:2000]
                raise SGLangServerError(f"{self.url}{path}: HTTP {error.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
                last = error
        raise SGLangUnreachable(f"{self.url}{path}: no answer after {self.retries + 1} "
                                f"{'try' if self.retries == 0 else 'tries'} ({type(last).__name__}: {last})")

    def healthy(self, path: str = "/health", timeout_s: float = 5.0) -> bool:
        """/health answers (the HTTP front end is up); /health_generate: a 1-token generation went
        through the scheduler (a hung scheduler fails it)."""
        try:
            self._request(path, None, timeout_s)
            return True
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException):
            return False

    def wait_healthy(self, timeout_s: float, server: LaunchedServer | None = None, path: str = "/health") -> float:
        """Seconds until `path` answers; SGLangServerError (with the log's tail) on a dead server or timeout."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if server is not None and not server.alive():
                raise SGLangServerError(f"the SGLang server at {self.url} exited with status "
                                        f"{server.process.returncode} while starting; its log ends:\n"
                                        f"{server.log_tail()}")
            if self.healthy(path):
                return time.perf_counter() - start
            time.sleep(1.0)
        tail = server.log_tail() if server is not None else ""
        raise SGLangServerError(f"the SGLang server at {self.url} was not healthy after {timeout_s:.0f} s "
                                f"(--sglang-start-timeout); its log ends:\n{tail}")
