"""Resumable state of a training loop, in one atomic file: the commands that train without :class:`Trainer`
(``fewshot``, ``recommend``, ``selfsup``, ``text``) checkpoint and resume through this.

A loop saves everything its next step depends on — weights, optimiser and scheduler states, random generator
states and its own counters — as one checksummed ``last.safetensors`` (written to a temporary file, fsynced and
renamed), so a kill at any moment leaves the previous checkpoint or the new one, never a mix. The settings the
run was started with are stored beside it (``settings.json``), so ``--resume RUN`` continues with exactly them
and ends with the weights an uninterrupted run has.

Example
-------
>>> ckpt = LoopCheckpoint("runs/protonet/checkpoints", every=100)        # doctest: +SKIP
>>> ckpt.save(200, {"model": net.state_dict(), "opt": opt.state_dict()})   # doctest: +SKIP
>>> done, state, meta = ckpt.load()                                         # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from metrix import distributed
from metrix.runs import new_run_dir
from metrix.io import (CorruptFileError, flatten_state, load_json, load_tagged, reading, remove_orphan_temps,
                       save_json, save_tagged, unflatten_state)

CHECKPOINTS, LAST_FILE, SETTINGS_FILE, TAG = "checkpoints", "last.safetensors", "settings.json", "metrix_loop_checkpoint"


def check_every(every) -> int:
    """``every`` as an int if it is at least 1, else the error naming ``--checkpoint-every``."""
    if int(every) < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {every}")
    return int(every)


class LoopCheckpoint:
    """The ``last.safetensors`` of a loop in ``folder``, written every ``every`` units of progress.

    Parameters
    ----------
    folder : the run's ``checkpoints/`` folder
    every : units (episodes, epochs or steps: the loop's own) between checkpoints; the final one is always saved
    """

    def __init__(self, folder, every: int = 1):
        self.folder, self.every = Path(folder), check_every(every)
        self.path = self.folder / LAST_FILE
        self.saved: int | None = None  # progress of the last checkpoint written or resumed from

    def due(self, done: int, total: int) -> bool:
        """Whether to save after ``done`` of ``total`` units."""
        return done % self.every == 0 or done == total

    def save(self, done: int, state: dict, meta: dict | None = None) -> None:
        """Save ``state`` (nested dicts, lists and tensors: state_dicts, generator states) after ``done`` units.
        In a process group rank 0 writes, and every rank goes on once the file is on disk."""
        if distributed.get_rank() == 0:
            tensors, tree = flatten_state(state, "s")
            save_tagged(self.path, tensors, TAG, {"tree": tree, "done": int(done), "meta": meta or {}})
        distributed.barrier()
        self.saved = int(done)

    def load(self) -> tuple[int, dict, dict] | None:
        """``(done, state, meta)`` of the last checkpoint, or None when there is none yet."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if distributed.get_rank() == 0:
            remove_orphan_temps(self.folder)
        if not self.path.exists():
            return None
        tensors, info = load_tagged(self.path, TAG, "training checkpoint")
        with reading(self.path, "training checkpoint"):
            done = int(info["done"])
            state = unflatten_state(info["tree"], tensors)
            if done < 0 or not isinstance(state, dict) or not isinstance(info["meta"], dict):
                raise CorruptFileError(f"{self.path}: invalid checkpoint contents")
        self.saved = done
        return done, state, info["meta"]


def restore(ckpt: LoopCheckpoint | None, objects: dict) -> tuple[int, dict, dict] | None:
    """Load ``ckpt``'s last checkpoint into ``objects`` (name → anything with ``load_state_dict``; None entries
    are skipped) and the global torch generator (this rank's, in a process group of as many ranks as wrote
    it); returns ``(done, state, meta)``, or None without one."""
    saved = None if ckpt is None else ckpt.load()
    if saved is not None:
        _, state, _ = saved
        with reading(ckpt.path, "training checkpoint"):
            distributed.set_rng_state(state["rng"], ckpt.path)  # refuses another number of processes first
        for name, obj in objects.items():
            if obj is not None:
                obj.load_state_dict(state[name])
    return saved


def capture(ckpt: LoopCheckpoint, done: int, objects: dict, meta: dict, **more) -> None:
    """Save ``objects``' state_dicts, the global torch generator (every rank's) and ``more`` (tensors,
    generator states)."""
    state = {name: None if obj is None else obj.state_dict() for name, obj in objects.items()}
    ckpt.save(done, {**state, "rng": distributed.rng_states(), **more}, meta)


def numpy_rng_state(rng: np.random.Generator) -> dict:
    """A NumPy generator's state as JSON-safe data (its 128-bit integers as decimal strings)."""
    return _stringify(rng.bit_generator.state)


def set_numpy_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = _numbers(state)


def _stringify(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _stringify(v) for k, v in obj.items()}
    return {"int": str(obj)} if isinstance(obj, int) and not isinstance(obj, bool) else obj


def _numbers(obj: Any) -> Any:
    if isinstance(obj, dict):
        return int(obj["int"]) if set(obj) == {"int"} else {k: _numbers(v) for k, v in obj.items()}
    return obj


def save_settings(run_dir, settings: dict) -> None:
    """The settings a run was started with, for ``--resume`` (written before the first step)."""
    save_json(Path(run_dir) / CHECKPOINTS / SETTINGS_FILE, settings)


def load_settings(run_dir, command: str) -> dict:
    """The settings of an interrupted run of ``command`` (e.g. ``metrix fewshot train``), for ``--resume``."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINTS / SETTINGS_FILE
    if (run_dir / "model.safetensors").is_file():  # written last: the run ran to its end
        raise ValueError(f"{run_dir} is a finished run; there is nothing to resume")
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoints to resume from ({path} is missing): give a run "
                                f"folder that '{command}' started")
    settings = load_json(path)
    with reading(path, "training settings"):
        if not isinstance(settings, dict) or settings.get("command") != command:
            raise ValueError(f"{run_dir} was started by {settings.get('command') if isinstance(settings, dict) else '?'!r}, "
                             f"not '{command}': resume it with that command")
    return settings


def start_or_resume(command: str, out, default_name: str, settings: dict, resume=None) -> tuple[Path, dict, bool]:
    """``(run_dir, settings, resuming)``: a new run folder (``out``, or ``runs/<default_name>``) with ``settings``
    stored for a later ``--resume``, or the interrupted run ``resume`` with the settings it was started with.
    Settings are checked (``checkpoint_every``) before any folder is made."""
    check_every(settings.get("checkpoint_every", 1))
    if resume is not None:
        run_dir = Path(resume)
        stored = load_settings(run_dir, command)
        return run_dir, {k: v for k, v in stored.items() if k != "command"}, True
    run_dir = None
    if distributed.get_rank() == 0:  # in a process group rank 0 makes the folder, and every rank uses it
        run_dir = new_run_dir(out, default_name)
        save_settings(run_dir, {"command": command, **settings})
    return Path(distributed.broadcast_object(str(run_dir))), settings, False


def interrupted(run_dir, ckpt: LoopCheckpoint | None, unit: str, total: int | None, command: str) -> KeyboardInterrupt:
    """The ``KeyboardInterrupt`` a job raises on Ctrl-C: where the last checkpoint is and how to resume."""
    if ckpt is not None and ckpt.saved is None and ckpt.path.is_file():
        # Ctrl-C landed between a checkpoint's rename and the loop noting it: the file on disk is the truth
        try:
            ckpt.saved = int(load_tagged(ckpt.path, TAG, "training checkpoint")[1]["done"])
        except (OSError, ValueError, KeyError):
            pass
    if ckpt is None or ckpt.saved is None:
        return KeyboardInterrupt("interrupted before the first checkpoint: nothing to resume")
    of = "" if total is None else f" of {total}"
    world = distributed.get_world_size()
    return KeyboardInterrupt(f"interrupted; {run_dir} holds a checkpoint after {unit} {ckpt.saved}{of}: "
                             f"resume with '{command} --resume {run_dir}{f' --nproc {world}' if world > 1 else ''}'")

