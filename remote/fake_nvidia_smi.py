"""A stand-in `nvidia-smi` for testbed hosts: reports N H100s the way the real tool prints them.

`remote.testbed` copies this file into each test host's bin folder as `nvidia-smi` (with a shebang naming the
engine's interpreter); the GPU count comes from `nvidia-smi.gpus` next to it. Standard library only, because it runs
with `-I` outside any virtual environment's site-packages.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

GPU_NAME = "NVIDIA H100 80GB HBM3"
MEMORY_TOTAL_MIB = 81559
MEMORY_USED_MIB = 0
DRIVER_VERSION = "550.54.15"
INVALID_ARGS = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help."
NO_DEVICES = "No devices were found"


def _uuid(index: int) -> str:
    """A stable UUID per host folder and index, shaped like the real `GPU-xxxxxxxx-...` ones."""
    return "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"{Path(__file__).resolve()}#{index}"))


# Each field: (unit shown in the header and after the value unless `nounits`, value for a GPU index and count).
FIELDS: dict[str, tuple[str, Callable[[int, int], str]]] = {
    "index": ("", lambda i, n: str(i)),
    "count": ("", lambda i, n: str(n)),
    "name": ("", lambda i, n: GPU_NAME),
    "gpu_name": ("", lambda i, n: GPU_NAME),
    "uuid": ("", lambda i, n: _uuid(i)),
    "gpu_uuid": ("", lambda i, n: _uuid(i)),
    "pci.bus_id": ("", lambda i, n: f"00000000:{0x18 + 0x10 * i:02X}:00.0"),
    "driver_version": ("", lambda i, n: DRIVER_VERSION),
    "memory.total": ("MiB", lambda i, n: str(MEMORY_TOTAL_MIB)),
    "memory.used": ("MiB", lambda i, n: str(MEMORY_USED_MIB)),
    "memory.free": ("MiB", lambda i, n: str(MEMORY_TOTAL_MIB - MEMORY_USED_MIB)),
    "utilization.gpu": ("%", lambda i, n: "0"),
    "utilization.memory": ("%", lambda i, n: "0"),
    "temperature.gpu": ("", lambda i, n: str(31 + i)),
    "power.draw": ("W", lambda i, n: "69.84"),
    "power.limit": ("W", lambda i, n: "700.00"),
}


def _gpu_count() -> int:
    """The number of GPUs this host pretends to have, from the file the testbed wrote next to this script."""
    try:
        return int((Path(__file__).resolve().parent / "nvidia-smi.gpus").read_text().strip())
    except (OSError, ValueError):
        return 0


def _option_values(argv: Sequence[str]) -> dict[str, str] | None:
    """Parse `--opt=value`, `--opt value`, `-i value` and bare flags; None on an option the fake does not know."""
    known_valued = {"--query-gpu", "--format", "-i", "--id"}
    known_flags = {"-L", "--list-gpus"}
    options: dict[str, str] = {}
    index = 0
    while index < len(argv):
        arg = argv[index]
        name, eq, value = arg.partition("=")
        if name in known_valued:
            if not eq:
                if index + 1 >= len(argv):
                    return None
                index += 1
                value = argv[index]
            options["--id" if name == "-i" else name] = value
        elif arg in known_flags:
            options["-L"] = ""
        else:
            return None
        index += 1
    return options


def _selected(options: dict[str, str], count: int) -> list[int] | None:
    """The GPU indices `-i/--id` selects (all by default); None when one does not exist."""
    if "--id" not in options:
        return list(range(count))
    chosen: list[int] = []
    for part in options["--id"].split(","):
        if not part.strip().isdigit() or int(part) >= count:
            return None
        chosen.append(int(part))
    return chosen


def _query(fields_text: str, format_text: str, gpus: list[int], count: int) -> tuple[int, list[str]]:
    """Answer `--query-gpu=... --format=csv[,noheader][,nounits]` as the real tool does."""
    fields = [field.strip() for field in fields_text.split(",") if field.strip()]
    for field in fields:
        if field not in FIELDS:
            return 2, [f'Field "{field}" is not a valid field to query.', ""]
    formats = {part.strip() for part in format_text.split(",")}
    if "csv" not in formats or not formats <= {"csv", "noheader", "nounits"}:
        return 2, [f'"{format_text}" is not a valid format.', ""]
    lines: list[str] = []
    if "noheader" not in formats:
        lines.append(", ".join(f"{f} [{FIELDS[f][0]}]" if FIELDS[f][0] else f for f in fields))
    for index in gpus:
        values = []
        for field in fields:
            unit, value = FIELDS[field]
            text = value(index, count)
            values.append(text if not unit or "nounits" in formats else f"{text} {unit}")
        lines.append(", ".join(values))
    return 0, lines


def _summary(gpus: list[int]) -> list[str]:
    """A short version of the table plain `nvidia-smi` prints, enough for a human glance."""
    lines = [f"NVIDIA-SMI {DRIVER_VERSION}    Driver Version: {DRIVER_VERSION}    CUDA Version: 12.4 (testbed fake)"]
    lines += [
        f"GPU {i}  {GPU_NAME}  {MEMORY_USED_MIB}MiB / {MEMORY_TOTAL_MIB}MiB  0%  (no processes)" for i in gpus
    ]
    return lines


def run(argv: Sequence[str]) -> tuple[int, list[str]]:
    """The exit code and output lines for one invocation."""
    count = _gpu_count()
    options = _option_values(argv)
    if options is None:
        return 2, [INVALID_ARGS]
    if count == 0:
        return 6, [NO_DEVICES]
    gpus = _selected(options, count)
    if gpus is None:
        return 6, [NO_DEVICES]
    if "--query-gpu" in options:
        if "--format" not in options or "-L" in options:
            return 2, [INVALID_ARGS]
        return _query(options["--query-gpu"], options["--format"], gpus, count)
    if "--format" in options:
        return 2, [INVALID_ARGS]
    if "-L" in options:
        return 0, [f"GPU {i}: {GPU_NAME} (UUID: {_uuid(i)})" for i in gpus]
    return 0, _summary(gpus)


def main() -> int:
    """Print what the real `nvidia-smi` would and return its exit code."""
    code, lines = run(sys.argv[1:])
    for line in lines:
        print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
