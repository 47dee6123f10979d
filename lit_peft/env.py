"""What this process knows about where it runs: the host, whether a process lives, and `LIT_PEFT_DEBUG`."""

from __future__ import annotations

import os
import re
import socket


def host() -> str:
    """This machine's name, as the records of runs, sweeps and locks give it."""
    return socket.gethostname()


def host_for_file_names() -> str:
    """This machine's name as a file name may hold it (staging folders name their owner)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", host())[:40] or "host"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


DEBUG_OFF = ("", "0", "false", "False", "no")


def debug_enabled() -> bool:
    """`LIT_PEFT_DEBUG` set to anything but empty, 0, false or no: tracebacks instead of one-line errors, and every
    library message on the console. The one reading of the variable."""
    return os.environ.get("LIT_PEFT_DEBUG", "") not in DEBUG_OFF
