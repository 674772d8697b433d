"""
Runs this checkout's console commands (`minigpt4-chat`, ...) for tests/test_docs.py without paying for the imports of
torch, transformers and datasets at every command.

`python tests/command_server.py SOCKET ENTRY_POINTS_JSON` imports the `minigpt4_hf` package and the entry points,
prints `ready`, then serves requests on the Unix socket SOCKET: for each one it forks a child that takes over the
caller's stdin, stdout and stderr (passed as file descriptors), working folder, environment and arguments, runs the
entry point and sends back its exit status. Each command thus starts from the same freshly imported state, as a new
process would. `client_source` is the launcher that a command's name on PATH runs.
"""

import importlib
import json
import os
import pkgutil
import signal
import socket
import sys
import threading
import traceback


SOCKET_VARIABLE = "MINIGPT4_TEST_COMMAND_SERVER"


def client_source(command: str) -> str:
    """A Python launcher for `command` that has the server run it with this process's files, folder and env."""
    return f"""#!{sys.executable}
import json, os, socket, sys
with socket.socket(socket.AF_UNIX) as connection:
    connection.connect(os.environ[{SOCKET_VARIABLE!r}])
    socket.send_fds(connection, [b"f"], [0, 1, 2])
    request = {{"command": {command!r}, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}
    connection.sendall(json.dumps(request).encode())
    connection.shutdown(socket.SHUT_WR)
    status = connection.recv(16)
sys.exit(int(status) if status else 1)
"""


def exit_status(entry_point) -> int:
    """Runs a console entry point as the interpreter would, returning the process's exit status."""
    try:
        entry_point()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:  # noqa: BLE001 (an uncaught exception ends a process with status 1 and its traceback)
        traceback.print_exc()
        return 1
    return 0


def run_request(connection: socket.socket, entry_points: dict) -> None:
    """In a forked child: becomes the calling process (files, folder, environment, argv), runs the command, exits."""
    _, fds, _, _ = socket.recv_fds(connection, 1, 3)
    data = b""
    while chunk := connection.recv(1 << 16):
        data += chunk
    request = json.loads(data)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["command"], *request["argv"]]
    status = exit_status(entry_points[request["command"]])
    sys.stdout.flush()
    sys.stderr.flush()
    connection.sendall(str(status).encode())
    os._exit(0)


def import_the_package() -> None:
    """Imports every module of `minigpt4_hf` (and so torch, transformers, datasets ...), which the tools defer."""
    import minigpt4_hf

    for module in pkgutil.walk_packages(minigpt4_hf.__path__, prefix="minigpt4_hf."):
        importlib.import_module(module.name)


def serve(socket_path: str, targets: dict[str, str]) -> None:
    import_the_package()
    entry_points = {}
    for command, target in targets.items():
        module, function = target.split(":")
        entry_points[command] = getattr(importlib.import_module(module), function)
    if threading.active_count() > 1:  # a thread holding a lock at fork time would leave it held in every child
        raise RuntimeError(f"Importing the commands started threads: {threading.enumerate()}; cannot fork safely.")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished children are reaped by the kernel
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(socket_path)
        listener.listen()
        print("ready", flush=True)
        while True:
            connection, _ = listener.accept()
            if os.fork() == 0:
                try:
                    listener.close()
                    run_request(connection, entry_points)
                finally:
                    os._exit(1)  # a child never returns to the server's loop
            connection.close()


if __name__ == "__main__":
    serve(sys.argv[1], json.loads(sys.argv[2]))
