"""export_hf.py: our GPT -> Hugging Face GPT-2 -> the same logits, and back; pipeline() runs on the export,
quietly; a user's folder is never replaced unasked; a failed export leaves the previous one as it was."""
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import export_hf
from train_gpt2 import GPT, GPTConfig, get_tokenizer

def tiny_gpt():
    torch.manual_seed(0)
    # vocab 50257 pads to 50304 rows: the export must drop the 47 padded ones
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def test_ours_to_hugging_face_same_logits_and_greedy_tokens(tmp_path):
    from transformers import GPT2LMHeadModel
    model = tiny_gpt()
    export_hf.export_hf(model, tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
        prompt = idx[:1, :8]
        ours = model.generate(prompt, 12, temperature=0)
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False,
                             attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs)


def test_hugging_face_to_ours_to_hugging_face(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    original = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).eval()
    original.save_pretrained(tmp_path / "hf")
    # the CLI path: --model=DIR loads it into our GPT and writes it back out
    assert export_hf.main([f"--model={tmp_path / 'hf'}", f"--out={tmp_path / 'back'}"]) == 0
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    theirs, again = original.state_dict(), back.state_dict()
    assert theirs.keys() == again.keys()
    for key in theirs:
        assert torch.equal(theirs[key], again[key]), key
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, original(idx).logits, atol=1e-5, rtol=0)


def test_checkpoint_cli_and_bad_checkpoint(tmp_path, capsys):
    from transformers import GPT2LMHeadModel
    model = tiny_gpt()
    ckpt = str(tmp_path / "ckpt_000004.pt")
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, ckpt)
    assert export_hf.main([f"--checkpoint={ckpt}", f"--out={tmp_path / 'hf'}"]) == 0
    captured = capsys.readouterr()
    assert "tokenizer.json" in captured.out and "max |logit difference|" in captured.out
    assert "Writing model shards" not in captured.err  # no progress bars for a few MB
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    assert export_hf.main([f"--checkpoint={tmp_path / 'missing.pt'}", f"--out={tmp_path / 'x'}"]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err


def test_pipeline_runs_on_the_export(tmp_path):
    from transformers import AutoTokenizer, pipeline
    export_hf.export_hf(tiny_gpt(), tmp_path)  # the tokenizer comes from gpt2_tokenizer/, no flag, no network
    prompt = "Hello, I'm a language model,"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert tokenizer.encode(prompt) == get_tokenizer().encode(prompt) == ids
    generate = pipeline("text-generation", model=str(tmp_path), device="cpu")  # tokenizer read from the dir
    text = generate(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)
    # greedy: the pipeline's continuation is our model's greedy continuation
    ours = tiny_gpt().generate(torch.tensor([tokenizer.encode(prompt)]), 8, temperature=0)
    assert text == tokenizer.decode(ours[0].tolist())


def test_pipeline_defaults_stay_within_the_context(tmp_path):
    """pipeline()'s default is 256 new tokens: on a 128-token model that indexed past wpe (IndexError)."""
    from transformers import pipeline
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    export_hf.export_hf(model, tmp_path)
    generate = pipeline("text-generation", model=str(tmp_path), device="cpu")
    torch.manual_seed(0)
    out = generate("Hello, I'm a language model,", return_tensors=True)[0]["generated_token_ids"]
    # the export's default of half the context: the 8 prompt tokens + 64 (a random model rarely emits
    # <|endoftext|>, so it runs to the limit)
    assert len(out) == 8 + 64 <= 128


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_pipeline_with_max_new_tokens_is_quiet(tmp_path):
    """An export whose generation config set max_length logged "Both `max_new_tokens` and `max_length`"
    on every call that passed max_new_tokens."""
    from transformers import pipeline
    export_hf.export_hf(tiny_gpt(), tmp_path)
    generate = pipeline("text-generation", model=str(tmp_path), device="cpu")
    records = Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for n in (4, 6):
                out = generate("Hello, I'm a language model,", max_new_tokens=n, do_sample=False,
                               return_tensors=True)[0]["generated_token_ids"]
                assert len(out) == 8 + n
    finally:
        logger.removeHandler(records)
    said = records.messages + [str(w.message) for w in caught]
    assert not [m for m in said if "max_length" in m or "max_new_tokens" in m], said


def tree(folder):
    """{relative path: (size, mtime_ns, sha256)} of every file and folder under folder: "untouched"."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st_ = os.lstat(path)
            digest = None
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, folder)] = (st_.st_size if digest else 0, st_.st_mtime_ns, digest)
    return out


def users_hf_folder(folder):
    """What a user's own Hugging Face folder looks like: sharded weights, an index, a config, notes."""
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("my run, do not lose\n")
    (folder / "config.json").write_text('{"model_type": "gpt2", "n_layer": 48}\n')
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\x01" * 1000)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\x02" * 1000)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}\n')
    return folder


def one_line_error(capsys, rc, *names):
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (rc, err)
    assert "Traceback" not in err
    for name in names:
        assert name in err, err
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt_000004.pt"
    model = tiny_gpt()
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, path)
    return str(path)


def test_users_folder_is_refused_then_replaced_only_with_overwrite(tmp_path, capsys, checkpoint):
    """A folder of the user's was exported into with exit 0: HF's shard clean-up deleted the user's shards and
    config.json was overwritten without a word."""
    out = users_hf_folder(tmp_path / "hf")
    before = tree(out)
    err = one_line_error(capsys, export_hf.main([f"--checkpoint={checkpoint}", f"--out={out}"]),
                         f"--out={out}", "--overwrite=true", "config.json")
    assert tree(out) == before and sorted(os.listdir(tmp_path)) == ["hf"], err  # untouched, no temp left
    assert export_hf.main([f"--checkpoint={checkpoint}", f"--out={out}", "--overwrite=true"]) == 0
    assert export_hf.is_our_export(out) and "notes.txt" not in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_our_export_is_replaced_but_not_once_a_user_file_is_in_it(tmp_path, capsys, checkpoint):
    out = tmp_path / "hf"
    assert export_hf.main([f"--checkpoint={checkpoint}", f"--out={out}"]) == 0
    first = tree(out)
    assert export_hf.main([f"--checkpoint={checkpoint}", f"--out={out}"]) == 0  # ours: replaced, no question
    assert tree(out).keys() == first.keys() and sorted(os.listdir(tmp_path)) == ["hf"]
    (out / "my_eval_results.json").write_text("{}")
    before = tree(out)
    one_line_error(capsys, export_hf.main([f"--checkpoint={checkpoint}", f"--out={out}"]),
                   "my_eval_results.json")
    assert tree(out) == before


def test_overwrite_never_deletes_the_current_folder_or_the_checkpoint(tmp_path, capsys, monkeypatch):
    home = users_hf_folder(tmp_path / "home")
    ckpt = home / "ckpt_000004.pt"
    model = tiny_gpt()
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, ckpt)
    before = tree(tmp_path)
    one_line_error(capsys, export_hf.main([f"--checkpoint={ckpt}", f"--out={home}", "--overwrite=true"]),
                   "--checkpoint", "would delete it")
    monkeypatch.chdir(home / "..")
    one_line_error(capsys, export_hf.main([f"--checkpoint={ckpt}", "--out=.", "--overwrite=true"]),
                   "--out=.", "would delete it")
    assert tree(tmp_path) == before


def previous_export(tmp_path, checkpoint):
    out = tmp_path / "hf"
    assert export_hf.main([f"--checkpoint={checkpoint}", f"--out={out}"]) == 0
    return out, tree(tmp_path)


@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])
def test_disk_full_is_one_line_and_leaves_the_previous_export(tmp_path, capsys, monkeypatch, checkpoint,
                                                              error):
    """A full disk was a SafetensorError traceback that left config files without weights."""
    import transformers.modeling_utils
    from safetensors import SafetensorError
    out, before = previous_export(tmp_path, checkpoint)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)  # the first blocks made it, the rest did not
        if error == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    capsys.readouterr()
    one_line_error(capsys, export_hf.main([f"--checkpoint={checkpoint}", f"--out={out}"]),
                   f"--out={out}", "disk is full", str(tmp_path))
    assert tree(tmp_path) == before  # the previous export byte for byte, and no partial one next to it


def test_failed_rename_puts_the_previous_export_back(tmp_path, capsys, monkeypatch, checkpoint):
    """Between moving the old export aside and renaming the new one in, a failure must not lose either."""
    out, before = previous_export(tmp_path, checkpoint)
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), src)
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    capsys.readouterr()
    one_line_error(capsys, export_hf.main([f"--checkpoint={checkpoint}", f"--out={out}"]),
                   f"--out={out}", "cannot write there")
    assert tree(tmp_path) == before


def test_disk_full_on_a_real_small_file_system(tmp_path, capsys, checkpoint):
    """A tmpfs with room for one export and a little more: the second export runs out of space for real."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)]
    if not shutil.which("mount") or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        out, _ = previous_export(mnt, checkpoint)
        before = tree(mnt)
        used = sum(size for size, _, _ in before.values())
        # room left for config.json and the like, not for a second model.safetensors (6.5 MB)
        subprocess.run(["mount", "-o", f"remount,size={used + (2 << 20)}", str(mnt)], check=True)
        capsys.readouterr()
        one_line_error(capsys, export_hf.main([f"--checkpoint={checkpoint}", f"--out={out}"]),
                       f"--out={out}", "disk is full")
        assert tree(mnt) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_checkpoint_is_refused(tmp_path, capsys, bad):
    model = tiny_gpt()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = bad
    ckpt = tmp_path / "ckpt_000004.pt"
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, ckpt)
    one_line_error(capsys, export_hf.main([f"--checkpoint={ckpt}", f"--out={tmp_path / 'hf'}"]),
                   str(ckpt), "transformer.h.1.mlp.c_fc.weight", "NaN or inf")
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000004.pt"]


def test_round_trip_keeps_the_dropout_probabilities(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, resid_pdrop=0.05, embd_pdrop=0.2,
                        attn_pdrop=0.3)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    assert export_hf.main([f"--model={tmp_path / 'hf'}", f"--out={tmp_path / 'back'}"]) == 0
    c = GPT2Config.from_pretrained(tmp_path / "back")
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.05, 0.2, 0.3)


@pytest.mark.parametrize("argv", [
    [], ["--out=x"], ["--checkpoint=a", "--model=b", "--out=x"], ["--checkpoint=a"],
    ["--checkpoint=a", "--out=x", "--overwrite=maybe"], ["--checkpoint=", "--out=x"],
    ["--checkpoint=a", "--out="],
    ["--checkpoint=a", "--out=x", "--bogus=1"]])
def test_bad_flags_are_one_line(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, export_hf.main(argv))
    assert os.listdir(tmp_path) == []


def test_dropout_maps_to_hugging_face_pdrop(tmp_path):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.15)).eval()
    export_hf.export_hf(model, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    c = hf.config
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.15, 0.15, 0.15)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # in eval mode neither drops: the same network
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    assert export_hf.hf_config(GPTConfig()).resid_pdrop == 0.0  # the 124M run: no dropout, as before


# ----------------------------------------------------------------------------------------------
# Property: any mix of flags exports, or is one line and touches nothing


@pytest.fixture(scope="module")
def fuzz_inputs(tmp_path_factory):
    """The sources the flags can name: a good and a NaN checkpoint, a text file, a Hugging Face folder."""
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    state = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}
    torch.save(state, folder / "good.pt")
    state["model"]["transformer.wpe.weight"][2, 3] = float("nan")
    torch.save(state, folder / "nan.pt")
    (folder / "text.pt").write_text("not a checkpoint\n")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16)).save_pretrained(folder / "hf")
    return folder


SOURCES = {"good": ["--checkpoint={in}/good.pt"], "nan": ["--checkpoint={in}/nan.pt"],
           "text": ["--checkpoint={in}/text.pt"], "missing": ["--checkpoint={in}/missing.pt"],
           "empty": ["--checkpoint="], "hf": ["--model={in}/hf"], "hf_missing": ["--model={in}/nope/"],
           "both": ["--checkpoint={in}/good.pt", "--model={in}/hf"], "none": []}
OUTS = ["new", "nested", "empty", "ours", "ours_plus_user", "user", "file", "link_to_user", "link_to_new",
        "blank", "none"]
OVERWRITES = {None: [], "true": ["--overwrite=true"], "TRUE": ["--overwrite=TRUE"], "1": ["--overwrite=1"],
              "false": ["--overwrite=false"], "0": ["--overwrite=0"], "maybe": ["--overwrite=maybe"],
              "": ["--overwrite="], "bare": ["--overwrite"]}


def make_out(root, kind):
    """The --out flag of kind, with what it names set up under root."""
    if kind in ("ours", "ours_plus_user"):
        (root / "hf").mkdir()
        (root / "hf" / "config.json").write_text("{}\n")
        (root / "hf" / export_hf.MARKER).write_text(json.dumps({"written_by": "export_hf.py",
                                                                 "files": ["config.json"]}))
        if kind == "ours_plus_user":
            (root / "hf" / "notes.txt").write_text("mine\n")
    elif kind in ("user", "link_to_user"):
        users_hf_folder(root / "hf")
    elif kind == "empty":
        (root / "hf").mkdir()
    elif kind == "file":
        (root / "hf").write_text("a file\n")
    if kind.startswith("link"):
        (root / "link").symlink_to(root / "hf")
        return ["--out=" + str(root / "link")]
    return {"blank": ["--out="], "none": [], "nested": ["--out=" + str(root / "a" / "b" / "hf")]}.get(
        kind, ["--out=" + str(root / "hf")])


def outside(files, inside):
    """The entries of a tree() that are not inside the folder inside (a path relative to the same root)."""
    return {k: v for k, v in files.items() if k != inside and not k.startswith(inside + os.sep)}


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# good values drawn more often: 0.59 * 0.8 * 0.77 * 0.59 = about 1 run in 5 exports (5 of 25 expected)
@given(source=st.sampled_from(list(SOURCES) + ["good", "hf"] * 4), out=st.sampled_from(OUTS),
       overwrite=st.sampled_from(list(OVERWRITES) + [None, None, "true", "true"]),
       extra=st.sampled_from([None] * 8 + ["--bogus=1", "stray"]), order=st.randoms(use_true_random=False))
def test_any_flags_export_or_are_one_line_and_touch_nothing(tmp_path, capsys, fuzz_inputs, source, out,
                                                           overwrite, extra, order):
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        argv = [f.replace("{in}", str(fuzz_inputs)) for f in SOURCES[source]] + make_out(root, out) + \
            OVERWRITES[overwrite] + ([extra] if extra else [])
        order.shuffle(argv)
        inputs, before = tree(fuzz_inputs), tree(root)
        capsys.readouterr()
        rc = export_hf.main(argv)
        stdout, err = capsys.readouterr()
        flags_ok = extra is None and overwrite not in ("maybe", "", "bare") \
            and out not in ("blank", "none") and source not in ("both", "none", "empty")
        replace = overwrite in ("true", "TRUE", "1")
        out_ok = out in ("new", "nested", "empty", "ours", "link_to_new") or \
            (out in ("ours_plus_user", "user", "link_to_user") and replace)
        assert "Traceback" not in err
        assert tree(fuzz_inputs) == inputs
        if flags_ok and source in ("good", "hf") and out_ok:
            assert rc == 0, (argv, err)
            target = os.path.realpath(next(a for a in argv if a.startswith("--out="))[len("--out="):])
            assert export_hf.is_our_export(target)
            assert float(stdout.split("max |logit difference| ours vs exported = ")[1]) < 1e-4
            inside = os.path.relpath(target, root)
            made = {"a", os.path.join("a", "b")} if out == "nested" else set()  # the parents of --out
            after = outside(tree(root), inside)
            assert after.keys() - made == outside(before, inside).keys()
            assert all(after[k] == v for k, v in outside(before, inside).items())  # byte for byte
        else:
            assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, rc, err)
            assert tree(root) == before, argv
    finally:
        shutil.rmtree(root)

