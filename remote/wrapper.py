"""The task wrapper: the one small POSIX sh script every transport launches tasks under.

It makes a task independent of the engine and of any SSH channel (as Ansible's async wrapper and GNU parallel's
remote wrapper do): the caller starts it in a new session (setsid), so it leads its own process group; stdin is
/dev/null; output goes to a file; the exit code is written to a temporary file and renamed into place, so a reader
sees either no rc file or a complete one. It traps TERM/INT/HUP only to outlive its child long enough to record the
child's exit code; the child keeps default signal dispositions (a handler, unlike an ignore, is reset by exec).

Files in a task directory (all written by the wrapper, except `env`, written 0600 by the transport beforehand):
  pid  the wrapper's pid (= the process group id)     out  stdout and stderr of the task
  rc   exit code (126: the working directory is missing; 127: program not found; 128+N: killed by signal N)
  env  optional `export K='v'` lines: the task's environment, secrets included, never on a command line
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

WRAPPER_NAME = "bf-wrap.sh"

WRAPPER_SCRIPT = """#!/bin/sh
# benchfleet task wrapper: bf-wrap.sh TASK_DIR WORKDIR PROGRAM [ARG...]  (see remote/wrapper.py)
d=$1; w=$2; shift 2
trap 'bf_signalled=1' TERM INT HUP
echo $$ > "$d/pid.tmp" && mv -f "$d/pid.tmp" "$d/pid"
if [ -f "$d/env" ]; then . "$d/env"; fi
if cd "$w" 2>>"$d/out"; then
  "$@" </dev/null >>"$d/out" 2>&1
  rc=$?
else
  rc=126
fi
echo "$rc" > "$d/rc.tmp" && mv -f "$d/rc.tmp" "$d/rc"
"""

PID_FILE = "pid"
RC_FILE = "rc"
OUT_FILE = "out"
ENV_FILE = "env"


def env_file_text(env: Mapping[str, str]) -> str:
    """The `env` file: one quoted export per variable, so values never need escaping by the caller."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def wrapper_argv(wrapper_path: str, task_dir: str, workdir: str, argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` under the wrapper (the caller adds setsid and the redirections it needs)."""
    return ["sh", wrapper_path, task_dir, workdir, *argv]


def parse_rc(text: str) -> int | None:
    """The exit code from an rc file's text, or None when it is not a complete number."""
    stripped = text.strip()
    if stripped.lstrip("-").isdigit():
        return int(stripped)
    return None
