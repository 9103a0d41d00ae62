"""llama.cpp's `llama-server` and `rpc-server`, built once from the sources llama-cpp-python vendors.

The tests and benches that run glimp against real serving engines use these binaries; glimp itself
never needs them. They are built from the llama.cpp that the installed llama-cpp-python sdist vendors
(MIT), so the server runs the same llama.cpp as glimp's in-process backend, and cached under the glimp
cache keyed by that version and the build flags: a second run finds them and builds nothing.

    python tools/engines.py            # build if needed, print the bin directory
    python tools/engines.py --check    # print the bin directory, or why there is none (no build)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glimp_cli.sources import cache_dir  # noqa: E402

PACKAGE = "llama-cpp-python"
BINARIES = {"llama-server": "llama-server", "rpc-server": "rpc-server"}  # name -> the CMake target's file
TARGETS = ("llama-server", "ggml-rpc-server")
# Static binaries with the RPC backend and no web UI (its assets would be fetched from a hub).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_RPC=ON",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
READY_SECONDS = 120  # a server loading its model on a shared 2-core machine
ENV_DIR = "GLIMP_ENGINES_DIR"  # a directory that already holds both binaries (skips the build)


class BuildImpossible(RuntimeError):
    """This machine cannot build the engines (no compiler, no CMake, no sources): a reason, one line."""


def version() -> str:
    """The installed llama-cpp-python's version: the vendored llama.cpp the engines are built from."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise BuildImpossible(f"{PACKAGE} is not installed: pip install -e '.[test]'") from None


def engine_dir(v: str | None = None) -> Path:
    """Where the binaries of this llama.cpp version and these flags are cached."""
    key = hashlib.sha256(" ".join(CMAKE_FLAGS).encode()).hexdigest()[:10]
    return cache_dir() / "engines" / f"llama.cpp-{v or version()}-{key}"


def _complete(bin_dir: Path) -> dict[str, Path] | None:
    paths = {name: bin_dir / name for name in BINARIES}
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()):
        return paths
    return None


def find() -> dict[str, Path] | None:
    """The cached (or $GLIMP_ENGINES_DIR) binaries by name, or None when they are not built."""
    given = os.environ.get(ENV_DIR)
    if given:
        return _complete(Path(given))
    return _complete(engine_dir() / "bin")


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("ab") as out:
        out.write(("\n$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` failed (exit {done.returncode}); last line: {tail[0]}; "
                           f"whole log: {log}")


def _sdist(v: str, into: Path, log: Path) -> Path:
    """The llama-cpp-python sdist of version `v`, downloaded from the package index once."""
    cached = sorted(into.glob(f"llama_cpp_python-{v}.tar.gz"))
    if cached:
        return cached[0]
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        _run([sys.executable, "-m", "pip", "download", f"{PACKAGE}=={v}", "--no-binary", ":all:", "--no-deps",
              "-d", tmp, "-q"], log)
        found = sorted(Path(tmp).glob("*.tar.gz"))
        if not found:
            raise RuntimeError(f"pip download of the {PACKAGE} {v} sdist gave no .tar.gz; log: {log}")
        target = into / f"llama_cpp_python-{v}.tar.gz"
        os.replace(found[0], target)
    return target


def _vendored(sdist: Path, into: Path) -> Path:
    """Unpack the sdist's vendor/llama.cpp into `into` and return it."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        if not members:
            raise RuntimeError(f"{sdist} holds no vendor/llama.cpp")
        tar.extractall(into, members=members, filter="data")
    return next(into.glob("*/vendor/llama.cpp"))


def build(jobs: int | None = None, log=print) -> dict[str, Path]:
    """Build both binaries into the cache (atomically: a half-built directory is never found)."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildImpossible(f"{tool} is not on PATH: the engines cannot be built on this machine")
    v = version()
    final = engine_dir(v)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{final.name}.build-", dir=final.parent))
    build_log = work / "build.log"
    try:
        log(f"building llama-server and rpc-server from {PACKAGE} {v}'s vendored llama.cpp (log: {build_log})")
        source = _vendored(_sdist(v, final.parent / "sdists", build_log), work / "src")
        build_dir = work / "build"
        _run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS], build_log)
        _run(["cmake", "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs or os.cpu_count() or 1)],
             build_log)
        bin_dir = work / "out" / "bin"
        bin_dir.mkdir(parents=True)
        for name, target in zip(BINARIES, TARGETS):
            built = build_dir / "bin" / target
            if not built.is_file():
                raise RuntimeError(f"the build produced no {built}; log: {build_log}")
            shutil.copy2(built, bin_dir / name)
        shutil.copy2(build_log, work / "out" / "build.log")
        if final.exists():
            shutil.rmtree(final)
        os.replace(work / "out", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    paths = _complete(final / "bin")
    assert paths is not None
    return paths


def ensure(jobs: int | None = None, log=print) -> dict[str, Path]:
    """The binaries, built first if they are not cached."""
    return find() or build(jobs, log)


# --- running them -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """One engine process on 127.0.0.1: started, waited for until it answers, stopped; output to `log`."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, ready):
        self.name, self.cmd, self.port, self.log, self._ready = name, cmd, port, log, ready
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = READY_SECONDS) -> "Process":
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {' | '.join(tail)}")
            if self._ready(self.port):
                return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"{self.name} not ready within {timeout:g} s; log: {self.log}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would go (tests); `stop` is the polite form."""
        if self.running:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _healthy(port: int) -> bool:
    """llama-server's /health answers 200 once the model is loaded (503 while loading)."""
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
            return response.status == 200
    return False


def llama_server(bins: dict[str, Path], gguf: Path, alias: str, log: Path, *, parallel: int = 1,
                 slot_ctx: int = 2048, threads: int = 1, rpc: tuple[str, ...] = (), port: int | None = None,
                 extra: tuple[str, ...] = ()) -> Process:
    """`llama-server` for one model: `parallel` slots of `slot_ctx` tokens each, on 127.0.0.1.

    With `rpc` (host:port of rpc-server workers) every layer goes to the workers, split evenly.
    Flash attention off and the full-size sliding-window cache, as glimp's in-process backend runs
    llama.cpp: the same numerics, so a greedy remote pair writes the in-process steps.
    """
    port = port or free_port()
    cmd = [str(bins["llama-server"]), "-m", str(gguf), "--alias", alias, "--host", "127.0.0.1",
           "--port", str(port), "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel),
           "-c", str(slot_ctx * parallel), "--flash-attn", "off", "--swa-full", "--no-webui", "--no-warmup",
           *extra]
    if rpc:
        cmd += ["--rpc", ",".join(rpc), "-ngl", "999", "--tensor-split", ",".join("1" for _ in rpc)]
    return Process(f"llama-server {alias} :{port}", cmd, port, log, _healthy)


def rpc_server(bins: dict[str, Path], log: Path, *, threads: int = 1, port: int | None = None) -> Process:
    """One `rpc-server` worker (its CPU backend) on 127.0.0.1."""
    port = port or free_port()
    cmd = [str(bins["rpc-server"]), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)]
    return Process(f"rpc-server :{port}", cmd, port, log, _listening)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only say where the binaries are; never build")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    args = p.parse_args(argv)
    try:
        paths = find() if args.check else ensure(args.jobs, lambda line: print(line, file=sys.stderr))
    except BuildImpossible as exc:
        # Not this machine's fault to fix here: the tests that need the engines skip, saying why.
        print(f"warning: {exc}; the llama-server tests will be skipped", file=sys.stderr)
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if paths is None:
        print(f"not built: run `python tools/engines.py` (cache: {engine_dir()})", file=sys.stderr)
        return 1
    print(paths["llama-server"].parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
