"""
What train_gpt2.py keeps in a --log_dir, and the rules that keep runs from clobbering each other.

- ckpt_{step:06d}.pt: checkpoints of the run started there. ckpt_{step:06d}_b{N}.pt: checkpoints of
  branch N, a run resumed from an older checkpoint than its line's newest, so the newer files it
  leaves behind are never overwritten or deleted. Only names of this pattern are listed, loaded by a
  bare --resume or deleted; clean-up (--keep_checkpoints) deletes only the current line's own files.
- run.json: the current line: its id, its branch tag, its newest checkpoint (what a bare --resume
  loads) and which runs' steps log.txt holds.
- lock: held (flock) by the trainer working here; the OS lets go of it when that process dies.

And the checkpoint files themselves: saving (temp name, then rename), loading (weights_only) with the keys a
caller needs, the finite checks, the RNG state, which file a --resume means, and the checks that a run may
continue from one. This module knows nothing of the model or of TrainConfig: callers pass plain values.
"""
import json
import math
import os
import random
import re
import shutil
import socket
import uuid

import numpy as np
import torch

from flags import ConfigError  # re-exported: train_gpt2 and the sidecars raise it

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

CKPT_RE = re.compile(r"ckpt_(\d{6})(?:_(b\d+))?\.pt")
# the temp names save_checkpoint and _write_record write: <name>.<pid>.tmp
TMP_RE = re.compile(r"(?:ckpt_\d{6}(?:_b\d+)?\.pt|run\.json)\.(\d+)\.tmp")
LOCK_RE = re.compile(r"(pid \d+ on [^\n]*\n)?")  # what lock() writes
OURS = ("lock", "run.json", "log.txt", "log.txt.superseded")  # the fixed names this module writes
_held = {}  # log_dir -> its open lock file, for this process


class RunDirError(ConfigError):
    """A --log_dir that this run must not use as it is: the message says what to do instead."""


class CheckpointWriteError(RunDirError):
    """A checkpoint that could not be written (the disk is full, say): the ones before it are intact."""


class UnreadableCheckpoint(ConfigError):
    """A checkpoint file that torch.load cannot read (truncated, say)."""


def checkpoints(log_dir, tag=None):
    """Our checkpoints in log_dir as [(step, tag, path)] by step; tag None: of every line."""
    names = os.listdir(log_dir) if os.path.isdir(log_dir) else []
    found = [(int(m[1]), m[2] or "", os.path.join(log_dir, n)) for n in names if (m := CKPT_RE.fullmatch(n))]
    return sorted(c for c in found if tag is None or c[1] == tag)


_MODES = {"r": os.O_RDONLY, "r+": os.O_RDWR, "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT}


def open_own(path, mode="a"):
    """open() that never follows a symlink at path (O_NOFOLLOW): a link planted where this module writes is
    an OSError (ELOOP), and whatever it points at stays untouched. New files are made with open(.., "x")."""
    fd = os.open(path, _MODES[mode.replace("b", "")] | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, mode)


def _is_int(v, low=0):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _record_problem(rec):
    """What makes rec not a run.json this module wrote, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not isinstance(rec.get("run"), str) or not isinstance(rec.get("tag"), str):
        return "run and tag must be strings"
    if not re.fullmatch(r"(b\d+)?", rec["tag"]):
        return f"tag {rec['tag']!r} is not empty or bN"
    if rec.get("latest") is not None and not (isinstance(rec["latest"], str) and rec["latest"]):
        return "latest must be a file name or null"
    log = rec.get("log")
    if not (isinstance(log, list) and all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                          and _is_int(e[1]) for e in log)):
        return "log must be a list of [run, step] pairs"
    if not (isinstance(rec.get("runs", []), list) and all(isinstance(r, str) for r in rec.get("runs", []))):
        return "runs must be a list of strings"
    return None


def read_record(log_dir):
    """log_dir/run.json, or None where there is none. One that this module did not write (not JSON, wrong
    fields, a folder, a link) is a RunDirError: it may be a user's file, so it is not used nor replaced."""
    path = os.path.join(log_dir, "run.json")
    if not os.path.lexists(path):
        return None
    try:
        with open_own(path, "r") as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or f"{e}".split("\n")[0]
        why = "it is a folder" if os.path.isdir(path) else why
        raise RunDirError(f"{path} could not be read as a run record ({why}); this script writes its own "
                          f"there: move that file away, or pass another --log_dir") from None
    problem = _record_problem(rec)
    if problem:
        raise RunDirError(f"{path} is not a run record this script wrote ({problem}); move that file away, "
                          f"or pass another --log_dir")
    return rec


def latest_checkpoint(log_dir):
    """The checkpoint a bare --resume loads: the newest of the line run.json names, else of any line."""
    rec = read_record(log_dir)
    if rec and rec.get("latest") and os.path.isfile(os.path.join(log_dir, rec["latest"])):
        return os.path.join(log_dir, rec["latest"])
    found = checkpoints(log_dir, rec.get("tag", "") if rec else None)
    return found[-1][2] if found else None


def truncate_log_to(log_path, pos):
    """Log lines past pos are run again (or belong to another run): move them aside, never lose them."""
    if not os.path.exists(log_path) or os.path.getsize(log_path) <= pos:
        return
    with open_own(log_path, "rb+") as f:
        f.seek(pos)
        tail = f.read()
        with open_own(log_path + ".superseded", "ab") as side:
            side.write(tail)
        f.truncate(pos)


def lock(log_dir):
    """An exclusive flock on log_dir/lock, held for the run: the OS releases it even after kill -9."""
    key = os.path.realpath(log_dir)
    if key in _held:  # one process runs one trainer at a time: a lock it still holds is stale
        _held.pop(key).close()
    path = os.path.join(log_dir, "lock")
    try:
        os.makedirs(log_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        f = os.fdopen(fd, "r+")
    except OSError as e:
        raise RunDirError(f"--log_dir={log_dir}: cannot write {path} ({e.strerror}); move it away or pass "
                          f"another --log_dir") from None
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # a file system without flock: run unlocked
                return f
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"--log_dir={log_dir} is in use by another training run ({holder}); "
                              f"wait for it to end or pass another --log_dir") from None
    f.seek(0)
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[key] = f
    return f


def _head(path):
    """The first 200 characters of a file, "" if there is none (or it is not a regular file we can read)."""
    try:
        with open_own(path, "r") as f:
            return f.read(200)
    except (OSError, ValueError):
        return "" if not os.path.lexists(path) else "?"


def _dead(pid):
    """Whether no process has this pid (then its temp files are leftovers). Ours: a former process's."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False
    return False


def _run_id(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run")
    except Exception:  # not a checkpoint we can read: not evidence of anything
        return None


def check_folder(log_dir, ckpt=None, ckpt_path=None, start_over=False):
    """RunDir's refusals, only reading (every rank runs them before anything is built): a run.json, lock or
    link that is not ours, a foreign checkpoint, a used folder. Returns (our checkpoints, old_N or None)."""
    rec = read_record(log_dir)
    links = [n for n in OURS if os.path.islink(os.path.join(log_dir, n))]
    if links or not LOCK_RE.fullmatch(_head(os.path.join(log_dir, "lock"))):
        raise RunDirError(f"--log_dir={log_dir}: {(links or ['lock'])[0]} there is "
                          f"{'a symlink' if links else 'not a lock file this script wrote'}; this script "
                          f"writes its own file of that name: move it away, or pass another --log_dir")
    found = checkpoints(log_dir)
    inside = ckpt is not None and os.path.isdir(log_dir) and os.path.samefile(
        os.path.dirname(os.path.abspath(ckpt_path)), log_dir)
    if inside and not _of_this_folder(rec, ckpt, ckpt_path, found):
        raise RunDirError(f"--resume={ckpt_path} is a checkpoint of another run than the ones of "
                          f"--log_dir={log_dir}; continuing it here would take over this folder's files: "
                          f"move it into an empty folder and pass that as --log_dir")
    if not found or inside:
        return found, None
    n = next(i for i in range(1, 10**6) if not os.path.exists(os.path.join(log_dir, f"old_{i}")))
    old = os.path.join(log_dir, f"old_{n}")
    if not start_over:
        raise RunDirError(f"--log_dir={log_dir} holds the checkpoints of another run (newest: "
                          f"{found[-1][2]}); continue it with --resume, pass another --log_dir, or "
                          f"add --start_over=true to move its files into {old}/ and start there")
    return found, old


def _of_this_folder(rec, ckpt, path, found):
    """Whether a checkpoint in log_dir is of a run that wrote there: run.json's runs; for a run.json without
    them (an older version's) or none, the run ids of the other checkpoints there (read with mmap: no weights
    are loaded). The only checkpoint in a folder with no run.json is."""
    run = ckpt.get("run", "")
    if rec and "runs" in rec:
        return run in rec["runs"]
    if rec and run in {rec["run"], *(r for r, _ in rec["log"])}:
        return True
    others = [p for _, _, p in found if not os.path.samefile(p, path)]
    return (not others and not rec) or any(_run_id(p) == run for p in others)


class RunDir:
    """
    This run's line in log_dir: a fresh run, the continuation of the resumed checkpoint's line, or (when
    resumed from an older checkpoint than that line's newest) a new branch. A fresh run in a folder
    that holds checkpoints is refused unless start_over, which moves them (and run.json, log.txt) into
    log_dir/old_N/. A checkpoint of another run that sits in log_dir is refused: continuing it would
    take over this folder's line. __init__ checks (before and again under the lock, so a refusal changes
    nothing and creates nothing) and locks; begin() sets the folder up.
    """

    def __init__(self, log_dir, ckpt=None, ckpt_path=None, start_over=False):
        self.dir, self.ckpt, self.latest = log_dir, ckpt, ckpt_path
        check_folder(log_dir, ckpt, ckpt_path, start_over)
        self.lock = lock(log_dir)
        try:  # again: another trainer may have written here since the first look
            self.found, self.old = check_folder(log_dir, ckpt, ckpt_path, start_over)
        except RunDirError:
            self.close()
            raise

    def begin(self):
        """Moves an earlier run aside (start_over), lines up log.txt with the checkpoint, writes run.json."""
        rec, log = read_record(self.dir), os.path.join(self.dir, "log.txt")
        for name in os.listdir(self.dir):  # left by a trainer that died mid-write (the lock: none writes now)
            m = TMP_RE.fullmatch(name)
            if m and _dead(int(m[1])):
                os.remove(os.path.join(self.dir, name))
        if self.old:
            os.makedirs(self.old)
            for path in [p for _, _, p in self.found] + [os.path.join(self.dir, f) for f in
                                                          ("run.json", "log.txt", "log.txt.superseded")]:
                if os.path.exists(path):
                    os.replace(path, os.path.join(self.old, os.path.basename(path)))
            print(f"--start_over: moved the earlier run's files into {self.old}/")
            rec, self.found = None, []
        # every run that wrote here, so that a checkpoint of another run is told apart (_ours)
        self.runs = {rec["run"], *rec.get("runs", []), *(r for r, _ in rec["log"])} if rec else set()
        self.run, self.tag, ckpt = uuid.uuid4().hex[:12], "", self.ckpt
        if ckpt is None:  # a fresh log; lines of a run that died before its first checkpoint move aside
            truncate_log_to(log, 0)
            self.log_runs = [[self.run, 0]]
            return self._write_record()
        run, tag, step = ckpt.get("run", ""), ckpt.get("tag", ""), ckpt["step"]
        # log.txt holds the steps of run log_runs[i][0] from step log_runs[i][1] up to the next entry's;
        # with no run.json nothing says whose lines log.txt holds: they are moved aside, as a fresh run does
        log_runs = rec["log"] if rec else []
        on_log = [i for i, (r, s) in enumerate(log_runs)
                  if r == run and s <= step and (i + 1 == len(log_runs) or step <= log_runs[i + 1][1])]
        if on_log:  # the lines logged after this checkpoint are run again
            truncate_log_to(log, ckpt["log_pos"])
            log_runs = log_runs[:on_log[0] + 1]
        else:  # log.txt describes another line: this one starts it afresh
            truncate_log_to(log, 0)
            log_runs = [[run, step]]
        newer = [p for s, t, p in self.found if t == tag and s > step]
        if newer:  # the line went on past this checkpoint: branch off, leaving those files as they are
            used = [int(t[1:]) for _, t, _ in self.found if t] + [int(rec["tag"][1:] or 0) if rec else 0]
            self.tag = f"b{max(used) + 1}"
            log_runs.append([self.run, step])
            print(f"{newer[-1]} is newer than the checkpoint resumed: this run is branch {self.tag}, writing "
                  f"ckpt_NNNNNN_{self.tag}.pt and leaving that line's files as they are")
        else:
            self.run, self.tag = run, tag
        self.log_runs = log_runs
        self._write_record()

    def save(self, state, keep):
        """Writes state (model, optimizer, step, ...) as this line's checkpoint, with the RNG state, the run's
        id and the log position added, then keeps the line's newest keep. Returns its path."""
        log = os.path.join(self.dir, "log.txt")
        state = {**state, "rng": rng_state(), "run": self.run, "tag": self.tag,
                 "log_pos": os.path.getsize(log) if os.path.exists(log) else 0}
        bad = first_nonfinite(state["optimizer"])  # AdamW's dict, or Muon's and AdamW's in a list
        if bad:
            raise nonfinite_error(state["step"], f"optimizer state {bad} is NaN or inf, so no checkpoint is "
                                                 f"written", self.latest or "none")
        path = self.path(state["step"])
        save_checkpoint(path, state)
        self.saved(path, keep)
        return path

    def path(self, step):
        return os.path.join(self.dir, f"ckpt_{step:06d}{'_' + self.tag if self.tag else ''}.pt")

    def saved(self, path, keep):
        """Records path as the line's newest checkpoint, then deletes all but the line's newest keep."""
        self.latest = path
        self._write_record()
        if keep > 0:
            for _, _, old in checkpoints(self.dir, self.tag)[:-keep]:
                os.remove(old)

    def _write_record(self):
        latest = self.latest and (os.path.basename(self.latest) if os.path.samefile(
            os.path.dirname(os.path.abspath(self.latest)), self.dir) else os.path.abspath(self.latest))
        tmp = os.path.join(self.dir, f"run.json.{os.getpid()}.tmp")
        runs = sorted({*self.runs, *(r for r, _ in self.log_runs), self.run})
        with open(tmp, "x") as f:  # "x" (O_EXCL) never follows a link
            json.dump({"run": self.run, "tag": self.tag, "latest": latest, "log": self.log_runs,
                       "runs": runs}, f)
        os.replace(tmp, os.path.join(self.dir, "run.json"))

    def close(self):
        _held.pop(os.path.realpath(self.dir), None)
        self.lock.close()  # closing the file releases the flock


def agree(error, world_size, device):
    """Raises error (rank 0's; None: go on) on every rank, so that a refusal only rank 0 sees stops each rank
    with one line instead of leaving the others to fail in their next collective."""
    if world_size > 1:
        import torch.distributed as dist
        flag = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.broadcast(flag, 0)
        error = error or (RunDirError("rank 0 refused the run: see its error line") if flag.item() else None)
    if error is not None:
        raise error


def open_run_dir(master, world_size, device, log_dir, ckpt=None, ckpt_path=None, start_over=False):
    """A begun RunDir on rank 0 (it locks log_dir, names this run's checkpoints, lines the log up with
    them), None on the other ranks; a refusal there (the lock) stops every rank."""
    folder, error = None, None
    if master:
        try:
            folder = RunDir(log_dir, ckpt, ckpt_path, start_over)
            folder.begin()
        except ConfigError as e:
            error = e
    agree(error, world_size, device)
    return folder


def check_writable(folder, flag):
    """Whether folder could be made and written, creating nothing: a probe file is written and removed in
    folder or its nearest existing parent (root passes os.access, not a read-only mount or chattr +i)."""
    try:
        probe = os.path.abspath(folder)
        while not os.path.lexists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            is_it = probe == os.path.abspath(folder)
            raise NotADirectoryError(0, "it is a file" if is_it else f"{probe} is a file")
        with open(os.path.join(probe, f".probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"), "x") as f:
            os.remove(f.name)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        why = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"{flag}={folder}: cannot write there ({why}); choose a writable folder") from None


def append_log(path, line):
    with open_own(path, "a") as f:
        f.write(line + "\n")


# ----------------------------------------------------------------------------------------------
# Checkpoint files


def save_checkpoint(path, state):
    """torch.save to this process's temp name, then an atomic rename: a crash never leaves half a file. A
    failed write (a full disk) is one line; the checkpoints before it are untouched."""
    tmp, made = f"{path}.{os.getpid()}.tmp", False
    try:
        with open(tmp, "xb") as f:  # "x" (O_EXCL): never through a link planted at that name
            made = True
            torch.save(state, f)
        os.replace(tmp, path)
        made = False
    except (OSError, RuntimeError) as e:  # torch reports a full disk as "RuntimeError: ... unexpected pos"
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        first = str(e).strip().split("\n")[0]
        raise CheckpointWriteError(f"writing {path} failed ({first}); {free / 2**30:.1f} GiB free there: "
                                   f"is the disk full? The checkpoints written before are intact: free space "
                                   f"(or pass another --log_dir) and continue with --resume") from None
    finally:
        if made:  # the write failed: no 500 MB leftover
            os.remove(tmp)


def load_checkpoint(path, keys=("model", "model_config")):
    """One of our checkpoints, with at least keys in it; anything else is a one-line ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().split("\n")[0]  # torch's messages run to many lines
        raise UnreadableCheckpoint(f"checkpoint {path} could not be read ({first}); "
                                   f"pass a ckpt_*.pt from a --log_dir") from None
    missing = sorted(set(keys) - (set(ckpt) if isinstance(ckpt, dict) else set()))
    if missing:
        raise ConfigError(f"{path} is not a train_gpt2.py checkpoint (no {', '.join(missing)} in it); "
                          f"pass a ckpt_*.pt from a --log_dir")
    return ckpt


def list_checkpoints(log_dir):
    """The checkpoints of log_dir's current line, oldest first: [-1] is what --resume takes."""
    rec = read_record(log_dir)
    return [path for _, _, path in checkpoints(log_dir, rec.get("tag", "") if rec else None)]


def nonfinite_error(step, what, latest):
    return FloatingPointError(f"step {step}: {what}; last good checkpoint: {latest} -- resume from it with "
                              f"--resume and a lower --max_lr, or start again with one")


def first_nonfinite(state, name=""):
    """The name of the first tensor or float in a nested state dict that is NaN or inf, else None."""
    if isinstance(state, dict):
        state = state.items()
    elif isinstance(state, (list, tuple)):
        state = enumerate(state)
    elif isinstance(state, (torch.Tensor, float)):
        return None if torch.isfinite(torch.as_tensor(state)).all() else name
    else:
        return None
    return next((bad for k, v in state if (bad := first_nonfinite(v, f"{name}.{k}".lstrip(".")))), None)


RESUME_KEYS = ("model", "optimizer", "step", "config", "model_config", "loader", "rng", "log_pos")


def load_resume_checkpoint(log_dir, resume):
    """(path, checkpoint) for --resume: "latest" is the newest of log_dir's line. A damaged file names the
    newest intact older checkpoint of its line; one with NaN or inf weights is refused."""
    path = latest_checkpoint(log_dir) if resume == "latest" else resume
    if path is None:
        raise ConfigError(f"--resume: no checkpoint (ckpt_*.pt) in --log_dir={log_dir}; "
                          f"start without --resume or pass --resume=PATH")
    try:
        ckpt = load_checkpoint(path, RESUME_KEYS)
    except UnreadableCheckpoint as e:
        m = CKPT_RE.fullmatch(os.path.basename(path))
        step, tag = (int(m[1]), m[2] or "") if m else (math.inf, None)
        older = [p for s, _, p in reversed(checkpoints(os.path.dirname(path) or ".", tag)) if s < step]
        intact = next((p for p in older if _loads(p)), None)
        advice = (f"the newest intact one before it is {intact}: resume with --resume={intact}" if intact
                  else "no older intact checkpoint is there")
        raise ConfigError(f"{e}; {advice}") from None
    problem = resume_problem(ckpt)
    if problem:
        raise ConfigError(f"checkpoint {path}: {problem}; it is damaged or not written by train_gpt2.py: "
                          f"resume from another ckpt_*.pt with --resume=PATH")
    if first_nonfinite(ckpt["model"]):  # only an older version wrote such files
        raise ConfigError(f"--resume={path}: weight {first_nonfinite(ckpt['model'])} is NaN or inf; "
                          f"resume from an older checkpoint with --resume=PATH")
    return path, ckpt


MODEL_KEYS = {"block_size": int, "vocab_size": int, "n_layer": int, "n_head": int, "n_embd": int,
              "vocab_multiple": int, "flash": bool, "dropout": float}
OPTIONAL = ("vocab_multiple", "flash")  # model_config keys an older version did not write
LOADER_KEYS = {"epoch": int, "source": int, "offset": int, "shuffle": bool, "seed": int, "sources": int}


def _typed(v, typ):
    return (isinstance(v, bool) if typ is bool else _is_int(v, -2**63) if typ is int
            else isinstance(v, (int, float)) and not isinstance(v, bool))


def resume_problem(ckpt):
    """What is wrong with the keys a resume reads (types, ranges, shapes), or None: checked when loaded, so a
    damaged file is one line and never a negative LR or a shape error later."""
    if not _is_int(ckpt["step"]) or not _is_int(ckpt["log_pos"]):
        return f"step {ckpt['step']!r} / log_pos {ckpt['log_pos']!r} must be whole numbers >= 0"
    if not isinstance(ckpt.get("run", ""), str) or not re.fullmatch(r"(b\d+)?", str(ckpt.get("tag", ""))):
        return "its run id or branch tag is not ours"
    if not (ckpt.get("val_loss") is None or _typed(ckpt["val_loss"], float)):
        return f"val_loss {ckpt['val_loss']!r} is not a number"
    config, mc, loader = ckpt["config"], ckpt["model_config"], ckpt["loader"]
    if not (isinstance(config, dict) and all(isinstance(k, str) for k in config)):
        return "config is not a dict of flags"
    for key in ("total_batch_size", "max_steps"):
        if not _is_int(config.get(key), 1):
            return f"config {key} {config.get(key)!r} is not a whole number > 0"
    if not isinstance(config.get("optimizer", "adamw"), str):
        return "config optimizer is not a name"
    for what, d, keys in (("model_config", mc, MODEL_KEYS), ("loader", loader, LOADER_KEYS)):
        if not (isinstance(d, dict) and set(d) <= set(keys)
                and all(k in d and _typed(d[k], t) for k, t in keys.items() if k not in OPTIONAL)):
            return f"{what} {d!r:.200} lacks one of {', '.join(keys)} or has a value of the wrong type"
    sizes = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
    if not (all(mc[k] > 0 for k in sizes) and _is_int(mc.get("vocab_multiple", 1), 1)
            and mc["n_embd"] % mc["n_head"] == 0 and 0 <= mc["dropout"] < 1):
        return f"model_config {mc} is out of range"
    if not all(loader[k] >= 0 for k in ("epoch", "source", "offset", "sources")):
        return f"loader position {loader} is negative"
    model = ckpt["model"] if isinstance(ckpt["model"], dict) else {}
    wte, wpe = model.get("transformer.wte.weight"), model.get("transformer.wpe.weight")
    layers = {k.split(".")[2] for k in model if isinstance(k, str) and k.startswith("transformer.h.")}
    if not (isinstance(wte, torch.Tensor) and isinstance(wpe, torch.Tensor) and wte.dim() == wpe.dim() == 2
            and wte.shape[1] == mc["n_embd"] and wte.shape[0] >= mc["vocab_size"]
            and tuple(wpe.shape) == (mc["block_size"], mc["n_embd"]) and len(layers) == mc["n_layer"]):
        return f"its weights do not have the shape its model_config {mc} says"
    rng = ckpt["rng"]
    if not (isinstance(rng, dict) and isinstance(rng.get("numpy"), dict)
            and isinstance(rng.get("torch"), torch.Tensor)
            and isinstance(rng["numpy"].get("key"), torch.Tensor)
            and isinstance(rng.get("cuda"), list) and isinstance(rng.get("python"), (tuple, list))):
        return "its RNG state is not ours"
    return None


def _loads(path):
    try:
        return load_checkpoint(path) is not None
    except ConfigError:
        return False


def check_compatible(ckpt, config, model_config=None, source=None):
    """A run may continue from ckpt only with the same tokens per step, optimizer and model shape."""
    saved = ckpt["config"]
    if saved["total_batch_size"] != config["total_batch_size"]:
        raise ConfigError(f"--total_batch_size={config['total_batch_size']} differs from the checkpoint's "
                          f"{saved['total_batch_size']}: the LR schedule and data position are counted in "
                          f"its steps; keep it (--batch_size and GPU count may change)")
    if saved.get("optimizer", "adamw") != config["optimizer"]:
        raise ConfigError(f"--optimizer={config['optimizer']} differs from the checkpoint's; "
                          f"resume with its own")
    if model_config is not None:
        check_model_config(ckpt["model_config"], model_config, source)


def check_model_config(saved, current, source):
    for key, value in saved.items():
        if current.get(key) != value:
            raise ConfigError(f"{source} was trained with {key}={value}, this run has "
                              f"{key}={current.get(key)}; drop --{key} or pass --{key}={value}")


def rng_state():
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "gauss": np_state[4]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate(state["python"])
    s = state["numpy"]
    np.random.set_state(("MT19937", s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# The run's log: log.txt, metrics.jsonl, config.json, and Weights & Biases when asked for


class Log:
    """
    What a run reports, written by rank 0 (master) only, appended, never truncated:
    - log.txt: build-nanogpt's "{step} {kind} {value}" lines (train, val, hella), which play.ipynb reads;
    - metrics.jsonl: the same points as JSON objects with more fields: step, kind, tokens (seen before that
      step), value, and for train lr, norm, dt_ms, tok_s; for hella n, the items scored;
    - config.json: the run's resolved config, rewritten (temp + rename) when a run starts or resumes;
    - with wandb_project, every point also goes to Weights & Biases (wandb is imported only then).
    start: a training run, whose metrics.jsonl is lined up with the log.txt RunDir.begin() left (rows of
    steps run again, or of another line, move to metrics.jsonl.superseded); False: an --eval_only run.
    """

    def __init__(self, log_dir, config, tokens_per_step, master=True, wandb_project="", wandb_run_name="",
                 start=True):
        self.dir, self.tokens_per_step, self.master, self.wandb = log_dir, tokens_per_step, master, None
        if not master:
            return
        if start:
            self._line_up()
            tmp = os.path.join(log_dir, f"config.json.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump(config, f, indent=1)
            os.replace(tmp, os.path.join(log_dir, "config.json"))
        if wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)

    def train(self, step, loss, **metrics):
        """One optimizer step: its loss and what else the console line shows (lr, norm, dt_ms, tok_s)."""
        self._add(step, "train", loss, f"{loss:.6f}", metrics)

    def eval(self, step, kind, value, **extra):
        """An eval at step (the weights after step steps): kind val or hella."""
        self._add(step, kind, value, f"{value:.4f}", extra)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()

    def _add(self, step, kind, value, text, extra):
        if not self.master:
            return
        append_log(os.path.join(self.dir, "log.txt"), f"{step} {kind} {text}")
        row = {"step": step, "kind": kind, "tokens": step * self.tokens_per_step, "value": value, **extra}
        append_log(os.path.join(self.dir, "metrics.jsonl"), json.dumps(row))
        if self.wandb is not None:
            name = {"train": "train/loss", "val": "val/loss", "hella": "hellaswag/acc_norm"}[kind]
            self.wandb.log({name: value, "tokens": row["tokens"],
                            **{f"{kind}/{k}": v for k, v in extra.items()}}, step=step)

    def _line_up(self):
        """Keeps the metrics.jsonl rows whose (step, kind) log.txt still holds; the others move aside."""
        path, log = os.path.join(self.dir, "metrics.jsonl"), os.path.join(self.dir, "log.txt")
        if not os.path.exists(path):
            return
        held = set()
        if os.path.exists(log):
            with open(log) as f:
                held = {tuple(line.split()[:2]) for line in f if line.strip()}
        with open(path) as f:
            rows = [line for line in f if line.strip()]
        keep = [line for line in rows if _point(line) in held]
        if len(keep) == len(rows):
            return
        with open(path + ".superseded", "a") as side:
            side.writelines(line for line in rows if _point(line) not in held)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def _point(line):
    """(step, kind) of a metrics.jsonl row, as log.txt spells them; None for a line that is not one."""
    try:
        row = json.loads(line)
        return str(row["step"]), row["kind"]
    except (ValueError, KeyError, TypeError):
        return None
