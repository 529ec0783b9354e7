"""Property tests at the boundaries where a value enters training: flags, run.json, a checkpoint's metadata.
Each ends correctly or with one ConfigError line, never another exception, and touches no file."""
import copy
import dataclasses
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import run_dir
import train_gpt2
from run_dir import ConfigError

FIELDS = {f.name: f.type for f in dataclasses.fields(train_gpt2.TrainConfig)}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 1, 2**31, 2**63, 1e308, -0.0]))
values = st.one_of(st.text(max_size=20), numbers.map(str), st.sampled_from(
    ["true", "false", "auto", "", "nan", "-inf", "1e400", "gloo", "nccl", "mpi", "muon", "wsd", "float32"]))


def snapshot(root):
    return {os.path.join(d, n): open(os.path.join(d, n), "rb").read() if os.path.isfile(os.path.join(d, n))
            else "dir" for d, dirs, names in os.walk(root) for n in dirs + names}


def one_line(e):
    assert "\n" not in str(e) and str(e), repr(e)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder to work in (relative --log_dir values land here) with a finished tiny run in run/."""
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "input.txt"
    data.write_text(open(os.path.join(os.path.dirname(train_gpt2.__file__), "input.txt")).read()[:20000])
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
            "--total_batch_size=32", "--dtype=float32", "--num_samples=0", "--max_steps=2",
            "--warmup_steps=0", "--eval_interval=0", "--compile=false", "--device=cpu"]
    assert train_gpt2.main([f"--data={data}", f"--log_dir={root / 'run'}", *tiny]) == 0
    cwd = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(cwd)


# ----------------------------------------------------------------------------------------------
# Flags through parse_args and validate_config


@SETTINGS
@given(flags=st.dictionaries(st.sampled_from(sorted(FIELDS)), values, max_size=4))
@example(flags={"backend": "mpi"})
@example(flags={"log_dir": "a\x00b"})
@example(flags={"seed": "-1"})
@example(flags={"n_embd": "1e400"})
def test_flags_pass_or_are_one_config_error(folder, flags):
    if "log_dir" in flags:  # relative and inside the folder: a probe never lands elsewhere
        flags["log_dir"] = "logs/" + flags["log_dir"].replace("..", "").lstrip("/")
    flags.pop("resume", None)  # --resume reads a checkpoint: the checkpoint tests below
    before = snapshot(folder)
    try:
        train_gpt2.validate_config(train_gpt2.parse_args([f"--{k}={v}" for k, v in flags.items()]))
    except ConfigError as e:
        one_line(e)
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------------------------
# run.json contents

json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
RECORD = {"run": "abc", "tag": "", "latest": "ckpt_000002.pt", "log": [["abc", 0]], "runs": ["abc"]}


@SETTINGS
@given(field=st.sampled_from(sorted(RECORD) + ["whole"]), value=json_values, drop=st.booleans())
@example(field="log", value=5, drop=False)
@example(field="log", value=None, drop=True)
@example(field="tag", value=5, drop=False)
@example(field="tag", value="b", drop=False)
@example(field="log", value=[["abc", -1]], drop=False)
def test_run_json_is_ours_or_one_config_error(folder, field, value, drop):
    rec = copy.deepcopy(RECORD)
    if field == "whole":
        rec = value
    elif drop:
        del rec[field]
    else:
        rec[field] = value
    log_dir = folder / "records"
    log_dir.mkdir(exist_ok=True)
    (log_dir / "run.json").write_text(json.dumps(rec))
    before = snapshot(folder)
    try:
        assert run_dir.read_record(str(log_dir)) == rec
        run_dir.latest_checkpoint(str(log_dir))
        run_dir.check_folder(str(log_dir))
    except ConfigError as e:
        one_line(e)
        assert "run.json" in str(e)
    assert snapshot(folder) == before


def test_a_folder_named_run_json_is_one_config_error(folder):
    (folder / "dir_record" / "run.json").mkdir(parents=True)
    with pytest.raises(ConfigError, match="run.json could not be read as a run record .it is a folder"):
        run_dir.read_record(str(folder / "dir_record"))

# ----------------------------------------------------------------------------------------------
# A checkpoint's metadata: the keys a resume reads


def resume_with(ckpt, folder):
    """What resume does with ckpt's metadata, short of training: the checks, then every value put to use."""
    problem = run_dir.resume_problem(ckpt)
    if problem:
        raise ConfigError(problem)
    config = train_gpt2.GPTConfig(**ckpt["model_config"])
    assert config.n_embd % config.n_head == 0
    known = {f.name for f in dataclasses.fields(train_gpt2.TrainConfig)}
    cfg = train_gpt2.TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    cfg = dataclasses.replace(cfg, log_dir=str(folder / "resumed"), resume="x.pt")
    train_gpt2.validate_config(cfg)
    run_dir.check_compatible(ckpt, dataclasses.asdict(cfg))
    source = train_gpt2.Source(lambda: torch.zeros(1000, dtype=torch.int64).numpy())
    loader = train_gpt2.DataLoaderLite([source], 2, 16, shuffle=cfg.shuffle, seed=cfg.seed)
    loader.load_state_dict(ckpt["loader"])
    assert train_gpt2.get_lr(ckpt["step"], cfg) >= 0


@pytest.fixture(scope="module")
def saved(folder):
    return torch.load(folder / "run" / "ckpt_000002.pt", weights_only=True)


PLACES = ["step", "log_pos", "val_loss", "run", "tag", "config", "model_config", "loader", "rng"]
SUB = {"config": ["total_batch_size", "max_steps", "optimizer", "max_lr", "n_layer", "seed", "log_dir"],
       "model_config": ["block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout"],
       "loader": ["epoch", "source", "offset", "shuffle", "seed", "sources"],
       "rng": ["numpy", "torch", "cuda"]}
py_values = st.one_of(numbers, st.booleans(), st.none(), st.text(max_size=6),
                      st.lists(st.integers(), max_size=2), st.just({}))


@SETTINGS
@given(place=st.sampled_from(PLACES), sub=st.integers(0, 10), value=py_values, drop=st.booleans())
@example(place="step", sub=0, value=-5, drop=False)
@example(place="model_config", sub=4, value=64, drop=False)
@example(place="loader", sub=2, value=10**6, drop=False)
@example(place="config", sub=1, value=0, drop=False)
@example(place="config", sub=4, value="x", drop=False)
def test_checkpoint_metadata_resumes_or_is_one_config_error(folder, saved, place, sub, value, drop):
    ckpt = {**saved, "config": dict(saved["config"]), "model_config": dict(saved["model_config"]),
            "loader": dict(saved["loader"]), "rng": dict(saved["rng"])}
    if place in SUB:
        key = SUB[place][sub % len(SUB[place])]
        if drop:
            ckpt[place].pop(key, None)
        else:
            ckpt[place][key] = value
    else:
        ckpt[place] = value
    before = snapshot(folder)
    try:
        resume_with(ckpt, folder)
    except ConfigError as e:
        one_line(e)
    assert snapshot(folder) == before


def test_the_saved_checkpoint_itself_resumes(folder, saved):
    resume_with(saved, folder)
