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
import glob
import json
import math
import os
import random
import re
import socket
import uuid

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

CKPT_RE = re.compile(r"ckpt_(\d{6})(?:_(b\d+))?\.pt")
_held = {}  # log_dir -> its open lock file, for this process


class ConfigError(ValueError):
    """Bad user input: the message names the flag or file and says what to do."""


class RunDirError(ConfigError):
    """A --log_dir that this run must not use as it is: the message says what to do instead."""


class UnreadableCheckpoint(ConfigError):
    """A checkpoint file that torch.load cannot read (truncated, say)."""


def checkpoints(log_dir, tag=None):
    """Our checkpoints in log_dir as [(step, tag, path)] by step; tag None: of every line."""
    names = os.listdir(log_dir) if os.path.isdir(log_dir) else []
    found = [(int(m[1]), m[2] or "", os.path.join(log_dir, n)) for n in names if (m := CKPT_RE.fullmatch(n))]
    return sorted(c for c in found if tag is None or c[1] == tag)


def read_record(log_dir):
    try:
        with open(os.path.join(log_dir, "run.json")) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


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
    with open(log_path, "rb+") as f:
        f.seek(pos)
        tail = f.read()
        with open(log_path + ".superseded", "ab") as side:
            side.write(tail)
        f.truncate(pos)


def lock(log_dir):
    """An exclusive flock on log_dir/lock, held for the run: the OS releases it even after kill -9."""
    key = os.path.realpath(log_dir)
    if key in _held:  # one process runs one trainer at a time: a lock it still holds is stale
        _held.pop(key).close()
    try:
        os.makedirs(log_dir, exist_ok=True)
        f = open(os.path.join(log_dir, "lock"), "a+")
    except OSError as e:
        raise RunDirError(f"--log_dir={log_dir}: cannot write there ({e.strerror}); pass another --log_dir") from None
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
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[key] = f
    return f


class RunDir:
    """
    This run's line in log_dir: a fresh run, the continuation of the resumed checkpoint's line, or (when
    resumed from an older checkpoint than that line's newest) a new branch. A fresh run in a folder
    that holds checkpoints is refused unless start_over, which moves them (and run.json, log.txt) into
    log_dir/old_N/. __init__ locks and checks, changing nothing; begin() sets the folder up.
    """

    def __init__(self, log_dir, ckpt=None, ckpt_path=None, start_over=False):
        self.dir, self.lock, self.ckpt, self.latest = log_dir, lock(log_dir), ckpt, ckpt_path
        for pattern in ("ckpt_*.pt*.tmp", "run.json*.tmp"):  # left by a trainer that died mid-write:
            for tmp in glob.glob(os.path.join(log_dir, pattern)):  # the lock says none is writing now
                os.remove(tmp)
        self.found = checkpoints(log_dir)
        inside = ckpt is not None and os.path.samefile(os.path.dirname(os.path.abspath(ckpt_path)), log_dir)
        self.old = None
        if self.found and not inside:
            n = next(i for i in range(1, 10**6) if not os.path.exists(os.path.join(log_dir, f"old_{i}")))
            self.old = os.path.join(log_dir, f"old_{n}")
            if not start_over:
                self.close()
                raise RunDirError(f"--log_dir={log_dir} holds the checkpoints of another run (newest: "
                                  f"{self.found[-1][2]}); continue it with --resume, pass another --log_dir, or "
                                  f"add --start_over=true to move its files into {self.old}/ and start there")

    def begin(self):
        """Moves an earlier run aside (start_over), lines up log.txt with the checkpoint, writes run.json."""
        rec, log = read_record(self.dir), os.path.join(self.dir, "log.txt")
        if self.old:
            os.makedirs(self.old)
            for path in [p for _, _, p in self.found] + [os.path.join(self.dir, f) for f in
                                                          ("run.json", "log.txt", "log.txt.superseded")]:
                if os.path.exists(path):
                    os.replace(path, os.path.join(self.old, os.path.basename(path)))
            print(f"--start_over: moved the earlier run's files into {self.old}/")
            rec, self.found = None, []
        self.run, self.tag, ckpt = uuid.uuid4().hex[:12], "", self.ckpt
        if ckpt is None:  # a fresh log; lines of a run that died before its first checkpoint move aside
            truncate_log_to(log, 0)
            self.log_runs = [[self.run, 0]]
            return self._write_record()
        run, tag, step = ckpt.get("run", ""), ckpt.get("tag", ""), ckpt["step"]
        # log.txt holds the steps of run log_runs[i][0] from step log_runs[i][1] up to the next entry's
        log_runs = rec["log"] if rec else [[run, 0]]
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
            used = [int(t[1:]) for _, t, _ in self.found if t] + [int(rec["tag"][1:]) if rec and rec.get("tag") else 0]
            self.tag = f"b{max(used) + 1}"
            log_runs.append([self.run, step])
            print(f"{newer[-1]} is newer than the checkpoint resumed: this run is branch {self.tag}, writing "
                  f"ckpt_NNNNNN_{self.tag}.pt and leaving that line's files as they are")
        else:
            self.run, self.tag = run, tag
        self.log_runs = log_runs
        self._write_record()

    def save(self, state, keep):
        """Writes state (model, optimizer, step, ...) as this line's checkpoint, with the RNG state, the run's id
        and the log position added, then keeps the line's newest keep. Returns its path."""
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
        with open(tmp, "w") as f:
            json.dump({"run": self.run, "tag": self.tag, "latest": latest, "log": self.log_runs}, f)
        os.replace(tmp, os.path.join(self.dir, "run.json"))

    def close(self):
        _held.pop(os.path.realpath(self.dir), None)
        self.lock.close()  # closing the file releases the flock


def check_writable(folder, flag):
    """Makes folder and writes a probe file in it (root passes os.access, not a read-only mount or chattr +i)."""
    try:
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f".probe.{os.getpid()}"), "w").close()
        os.remove(os.path.join(folder, f".probe.{os.getpid()}"))
    except OSError as e:
        why = "it is a file" if os.path.isfile(folder) else e.strerror
        raise ConfigError(f"{flag}={folder}: cannot write there ({why}); choose a writable folder") from None


def append_log(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


# ----------------------------------------------------------------------------------------------
# Checkpoint files


def save_checkpoint(path, state):
    """torch.save to this process's temp name, then an atomic rename: a crash never leaves half a checkpoint."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed (disk full, Ctrl-C): no 500 MB leftover
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
        raise ConfigError(f"{e}; " + (f"the newest intact one before it is {intact}: resume with --resume={intact}"
                                      if intact else "no older intact checkpoint is there")) from None
    if first_nonfinite(ckpt["model"]):  # only an older version wrote such files
        raise ConfigError(f"--resume={path}: weight {first_nonfinite(ckpt['model'])} is NaN or inf; "
                          f"resume from an older checkpoint with --resume=PATH")
    return path, ckpt


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
                          f"{saved['total_batch_size']}: the LR schedule and data position are counted in its "
                          f"steps; keep it (--batch_size and GPU count may change)")
    if saved.get("optimizer", "adamw") != config["optimizer"]:
        raise ConfigError(f"--optimizer={config['optimizer']} differs from the checkpoint's; resume with its own")
    if model_config is not None:
        check_model_config(ckpt["model_config"], model_config, source)


def check_model_config(saved, current, source):
    for key, value in saved.items():
        if current.get(key) != value:
            raise ConfigError(f"{source} was trained with {key}={value}, this run has {key}={current.get(key)}; "
                              f"drop --{key} or pass --{key}={value}")


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
