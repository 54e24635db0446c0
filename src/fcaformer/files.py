"""Writing files so that nothing is lost: atomic writes (a crash or a kill leaves the old file or the new one, never
half of one) with the permissions a normal write gives, JSON and Markdown reports, PNG figures, and the portable
names under which the project records paths. Knows nothing about models or checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def path_label(path: str | os.PathLike) -> str:
    """A path as the project records it in the files it writes: its last two components (``val/img.jpg``,
    ``digits/model.pt``), enough to say what it is and nothing about the machine it was made on."""
    return "/".join(Path(path).resolve().parts[-2:])


def relative_path(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """``path`` relative to ``root`` (the dataset or run root it was found under), as recorded in written files;
    :func:`path_label` when it is not under ``root``."""
    if root is not None:
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return path_label(path)


def portable_path(text: str) -> str:
    """A path the user gave, as the project records it: relative paths as given, an absolute path relative to the
    working directory when it lies below it, else its :func:`path_label`. A ``local-dir:`` prefix is kept; names
    that are not paths (``hf-hub:ORG/NAME``, model names) are returned as they are."""
    prefix = "local-dir:" if text.startswith("local-dir:") else ""
    path = Path(text.removeprefix(prefix))
    if not path.is_absolute():
        return text
    try:
        return prefix + path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return prefix + path_label(path)


def umask() -> int:
    """The process's file-creation mask (read without changing it where ``/proc`` tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (what every portable reader of the umask does)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Write a file all-or-nothing: ``write(fileobj)`` into a temp file beside ``path``, fsync, rename.

    A crash or kill at any point leaves either the old file or the new one, never a partial one. The file gets the
    mode an ordinary ``open(path, "w")`` would give it (``0o666`` less the umask), not the temp file's private
    ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        sync_folder_entry(path.parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def sync_folder_entry(folder: str | os.PathLike) -> None:
    """fsync a folder, so that a rename into it survives a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_json_dump(obj: Any, path: str | os.PathLike) -> Path:
    """``json.dump`` (indented) through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: json.dump(obj, handle, indent=2), binary=False)


def atomic_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: handle.write(text), binary=False)


def atomic_report(results: Any, markdown: str, stem: str | os.PathLike) -> tuple[Path, Path]:
    """A benchmark's report: ``results`` as ``<stem>.json`` and ``markdown`` as ``<stem>.md``, each atomically."""
    stem = Path(stem)
    return atomic_json_dump(results, stem.with_suffix(".json")), atomic_text(markdown, stem.with_suffix(".md"))


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend (servers have no display). Imported on first use:
    matplotlib takes about half a second to import, which commands that draw nothing should not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as a PNG atomically (tight bounding box) and close it."""
    out = atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110, bbox_inches="tight"))
    pyplot().close(fig)
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
