"""HellaSwag scoring: our GPT and Hugging Face agree, batching and ranks change nothing; bad input, any
line of JSON or not, is one line naming the file and line."""
import dataclasses
import hashlib
import json
import os
import re

import pytest
import requests
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import hellaswag
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import HELLASWAG
from chunked_loss import token_losses
from train_gpt2 import GPT, GPTConfig, get_tokenizer

HAND_MADE = [
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon, singing loudly to the stars.", "dog", "a"],
     "label": 0},
    {"ctx": "She opened the fridge and", "endings": ["took out the milk.", "flew", "the the the", "sang."],
     "label": 0},
    {"ctx": "A man is seen kneeling on the floor. He",
     "endings": ["scrubs the tiles.", "jumps", "is", "eats a cloud."], "label": 1},
    # longer than the tiny model's 128 positions: the context is cut from the left, the endings kept
    {"ctx": "Once upon a time, " * 40 + "there was a",
     "endings": ["king.", "queen who ruled", "dragon", "frog."], "label": 3},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny GPT-2 saved as a Hugging Face dir (the real vocab: real items need it)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # initializer_range 0.2, not 0.02: a model with opinions, so the argmin does not hinge on float noise
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=50257,
                        initializer_range=0.2)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ours(hf_dir):
    return GPT.from_pretrained(hf_dir)


@pytest.fixture(params=["hand_made", "real"])
def items(request):
    if request.param == "hand_made":
        return HAND_MADE
    return hellaswag.load_items(HELLASWAG)[:6]  # like --limit=6: seconds on a CPU


def test_real_items_load():
    items = hellaswag.load_items(HELLASWAG)
    with open(HELLASWAG) as f:
        assert len(items) == sum(1 for line in f if line.strip()) >= 40  # every line an item
    assert all(len(item["endings"]) == 4 and item["label"] in range(4) for item in items)


def test_score_is_cross_entropy_of_the_ending(hf_dir):
    """The summed loss is -log p(" " + ending | ctx), computed here the plain way, one ending at a time."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    enc = get_tokenizer()
    sum_loss, mean_loss = hellaswag.score(hf, HAND_MADE[:3], "cpu")
    for i, item in enumerate(HAND_MADE[:3]):
        ctx = enc.encode(item["ctx"])
        for j, ending in enumerate(item["endings"]):
            end = enc.encode(" " + ending)
            idx = torch.tensor([ctx + end])
            with torch.no_grad():
                logp = F.log_softmax(hf(idx).logits[0, :-1].float(), dim=-1)
            nll = -logp[len(ctx) - 1:].gather(1, idx[0, len(ctx):, None]).sum()
            torch.testing.assert_close(sum_loss[i, j], nll, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(mean_loss[i, j], nll / len(end), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_losses_in_chunks_are_cross_entropy(ours, dtype):
    """Chunks of 3 rows (a ragged last one) and the in-place logsumexp give F.cross_entropy over the
    real vocab: the padded ids of our 50304-wide head never enter the softmax."""
    torch.manual_seed(0)
    h, targets = torch.randn(10, ours.config.n_embd), torch.randint(0, ours.config.vocab_size, (10,))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = token_losses(h, ours.lm_head.weight, targets, ours.config.vocab_size, chunk_rows=3)
        logits = ours.lm_head(h)
    assert ours.lm_head.out_features > ours.config.vocab_size
    expected = F.cross_entropy(logits[:, :ours.config.vocab_size].float(), targets, reduction="none")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def assert_same_scores(got, expected, atol, rtol):
    """(sum, mean) losses close, and the same predicted ending for acc and acc_norm."""
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=atol, rtol=rtol)
        assert torch.equal(g.argmin(1), e.argmin(1))


def test_ours_and_hugging_face_agree(hf_dir, ours, items):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(hf_dir)
    hf_sum, hf_mean = hellaswag.score(hf, items, "cpu", batch_size=4)
    our_sum, our_mean = hellaswag.score(ours, items, "cpu", batch_size=4)
    assert_same_scores((our_sum, our_mean), (hf_sum, hf_mean), atol=1e-4, rtol=1e-5)


def test_batched_equals_one_at_a_time(ours, items):
    one_sum, one_mean = hellaswag.score(ours, items, "cpu", batch_size=1)
    # 3 does not divide the item count: a ragged last batch, and batches mixing long and short items
    many_sum, many_mean = hellaswag.score(ours, items, "cpu", batch_size=3)
    assert_same_scores((many_sum, many_mean), (one_sum, one_mean), atol=1e-5, rtol=1e-6)


def test_benchmark_compares_like_with_like():
    speeds, same = hellaswag.benchmark(HAND_MADE, "cpu", batch_size=3, n_layer=1, n_embd=32)
    assert same and set(speeds) == {1, 3} and all(s > 0 for s in speeds.values())


def _counts_on_rank(rank, world_size, model, items, init_file, out_dir):
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    counts = hellaswag.evaluate_counts(model, items, "cpu", rank, world_size, batch_size=4)
    dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(counts, f)


def test_two_ranks_count_like_one(ours, tmp_path):
    # one run over both item sets: starting two processes costs more than the scoring
    items = HAND_MADE + hellaswag.load_items(HELLASWAG)[:4]
    single = hellaswag.evaluate_counts(ours, items, "cpu", 0, 1)
    assert single["total"] == len(items)
    mp.spawn(_counts_on_rank, args=(2, ours, items, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            assert json.load(f) == single  # every rank returns the global counts


def test_bad_line_names_its_number(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(HAND_MADE[0])
    path.write_text(good + "\n" + good + "\n" + '{"ctx": "x", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(hellaswag.HellaSwagError, match=r"bad.jsonl:3: .*4 strings"):
        hellaswag.load_items(str(path))
    path.write_text(good + "\n{not json\n")
    assert hellaswag.main([f"--model={tmp_path}", f"--data_path={path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:2: not valid JSON" in err and "Traceback" not in err


def test_download_failure_gives_url_and_hint(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")
    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(hellaswag.HellaSwagError) as e:
        hellaswag.load_items(None, cache_dir=str(tmp_path))
    assert hellaswag.DATA_URL in str(e.value) and "--data_path" in str(e.value)


def test_download_is_checked_then_renamed(tmp_path, monkeypatch):
    class Response:
        content = (json.dumps(HAND_MADE[0]) + "\n").encode()

        def raise_for_status(self):
            pass
    monkeypatch.setattr(requests, "get", lambda *args, **kwargs: Response())
    with pytest.raises(hellaswag.HellaSwagError, match="sha256"):
        hellaswag.load_items(None, cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left to be trusted later
    import hashlib
    monkeypatch.setattr(hellaswag, "DATA_SHA256", hashlib.sha256(Response.content).hexdigest())
    assert hellaswag.load_items(None, cache_dir=str(tmp_path)) == HAND_MADE[:1]
    assert [p.name for p in tmp_path.iterdir()] == ["hellaswag_val.jsonl"]


# ----------------------------------------------------------------------------------------------
# Bad files and flags: one line, exit 2, no traceback


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path_factory.mktemp("ckpt") / "ckpt_000001.pt"
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, path)
    return str(path)


def one_line_error(capsys, rc, *names):
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (rc, err)
    assert "Traceback" not in err
    for name in names:
        assert name in err, err
    return err


GOOD = json.dumps(HAND_MADE[0])
ITEM = HAND_MADE[0]


@pytest.mark.parametrize("line, says", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # a RecursionError traceback
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    (GOOD[:-1] + ', "extra": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested too deeply"),
    (json.dumps({**ITEM, "ctx": ""}), "ctx and every ending"),  # was scored and counted as answered
    (json.dumps({**ITEM, "ctx": " \n\t"}), "ctx and every ending"),
    (json.dumps({**ITEM, "endings": ["a", "", "b", "c"]}), "ctx and every ending"),
    (json.dumps({**ITEM, "endings": ["a", "b", "c", "   "]}), "ctx and every ending"),
    (json.dumps({**ITEM, "endings": ["a", "b", "c"]}), "4 strings"),
    (json.dumps({**ITEM, "endings": ["a", "b", "c", "d", "e"]}), "4 strings"),
    (json.dumps({**ITEM, "endings": ["a", "b", "c", 4]}), "4 strings"),
    (json.dumps({**ITEM, "endings": "abcd"}), "4 strings"),
    (json.dumps({**ITEM, "ctx": None}), "ctx must be a string"),
    (json.dumps({**ITEM, "label": 4}), "label must be an integer 0-3, got 4"),
    (json.dumps({**ITEM, "label": -1}), "label must be an integer 0-3"),
    (json.dumps({**ITEM, "label": True}), "got True"),
    (json.dumps({**ITEM, "label": 1.0}), "got 1.0"),
    (json.dumps({**ITEM, "label": "1"}), "got '1'"),
    (json.dumps({**ITEM, "label": "x" * 10_000}), "label must be an integer 0-3"),
    (json.dumps(ITEM)[:-1] + ', "label": ' + "9" * 5000 + "}", "not valid JSON"),  # past int's 4300 digits
    (json.dumps({"ctx": "a", "endings": ["a", "b", "c", "d"]}), "keys ctx, endings, label"),
    ("[1, 2, 3]", "keys ctx, endings, label"),
    ("null", "keys ctx, endings, label"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe" + GOOD.encode("utf-16-le"), "not UTF-8"),
    (json.dumps({**ITEM, "ctx": "caf\xe9"}, ensure_ascii=False).encode("latin-1"), "not UTF-8"),
])
def test_bad_line_is_one_line(tmp_path, capsys, tiny_checkpoint, line, says):
    path = tmp_path / "hs.jsonl"
    path.write_bytes(GOOD.encode() + b"\n\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(hellaswag.HellaSwagError, match=re.escape(f"hs.jsonl:3: ")):
        hellaswag.load_items(str(path))
    err = one_line_error(capsys, hellaswag.main([f"--checkpoint={tiny_checkpoint}", f"--data_path={path}",
                                                 "--device=cpu"]), f"{path}:3: ", says)
    assert len(err) < 400  # a 10k-character label is cut, not echoed


def test_byte_order_mark_and_blank_lines_are_fine(tmp_path, capsys, tiny_checkpoint):
    path = tmp_path / "hs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n  \n" + json.dumps(HAND_MADE[1]).encode())
    assert hellaswag.load_items(str(path)) == HAND_MADE[:2]
    assert hellaswag.main([f"--checkpoint={tiny_checkpoint}", f"--data_path={path}", "--device=cpu"]) == 0
    assert "count 2 " in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "blank"])
def test_bad_file_is_one_line(tmp_path, capsys, tiny_checkpoint, kind):
    path = tmp_path / "hs.jsonl"
    if kind == "folder":
        path.mkdir()
    elif kind != "missing":
        path.write_text("" if kind == "empty" else "\n  \n")
    says = {"missing": "no such file", "folder": "is a folder", "empty": "no items", "blank": "no items"}
    one_line_error(capsys, hellaswag.main([f"--checkpoint={tiny_checkpoint}", f"--data_path={path}"]),
                   str(path), says[kind])


def test_checkpoint_of_another_shape_is_one_line(tmp_path, capsys, tiny_checkpoint):
    """A checkpoint whose weights do not fit its own model_config was a RuntimeError traceback."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["model_config"]["n_embd"] = 32
    path = tmp_path / "ckpt_000002.pt"
    torch.save(ckpt, path)
    items = tmp_path / "hs.jsonl"
    items.write_text(GOOD + "\n")
    one_line_error(capsys, hellaswag.main([f"--checkpoint={path}", f"--data_path={items}", "--device=cpu"]),
                   f"--checkpoint={path}", "do not fit")


def test_one_position_model_is_refused():
    """A context of 1 scores no token: every loss 0, every item 'answered' with ending 0."""
    model = GPT(GPTConfig(block_size=1, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(hellaswag.HellaSwagError, match="context of 2"):
        hellaswag.score(model, HAND_MADE[:1], "cpu")


@pytest.mark.parametrize("flags, names", [
    ([], ["--model", "--checkpoint", "--benchmark"]),
    (["--model=gpt2", "--checkpoint=x.pt"], ["--checkpoint", "--model"]),
    (["--checkpoint=CKPT", "--limit=-1"], ["--limit=-1"]),
    (["--checkpoint=CKPT", "--limit=ten"], ["--limit", "ten"]),
    (["--checkpoint=CKPT", "--batch_size=0"], ["--batch_size=0"]),
    (["--benchmark", "--repeats=0"], ["--repeats=0"]),
    (["--checkpoint=CKPT", "--dtype=float16"], ["--dtype", "float16"]),
    (["--checkpoint=CKPT", "--device=gpu"], ["--device=gpu"]),
    (["--checkpoint=CKPT", "--device=cuda:x"], ["--device=cuda:x"]),
    (["--checkpoint=CKPT", "--data_path="], ["--data_path is empty"]),
    (["--checkpoint="], ["--checkpoint is empty"]),
    (["--model="], ["--model is empty"]),
    (["--checkpoint=CKPT", "--bogus"], ["--bogus"]),
    (["--checkpoint=CKPT", "stray"], ["stray"]),
    (["--checkpoint=CKPT", "--data_path=DATA\nnext line"], ["no such file"]),
])
def test_bad_flag_is_one_line(tmp_path, capsys, tiny_checkpoint, flags, names):
    data = tmp_path / "hs.jsonl"
    data.write_text(GOOD + "\n")
    flags = [f.replace("CKPT", tiny_checkpoint).replace("DATA", str(data)) for f in flags]
    if not any(f.startswith("--data_path") for f in flags):
        flags.append(f"--data_path={data}")
    one_line_error(capsys, hellaswag.main(flags), *names)


# ----------------------------------------------------------------------------------------------
# Property: any file of lines ends with a score or one line that names the first bad line


def expected_item(line):
    """The spec of a good line, written out apart from parse_item: the item, or None."""
    try:
        raw = json.loads(line.decode("utf-8").lstrip("\ufeff"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    ok = isinstance(raw, dict) and isinstance(raw.get("ctx"), str) and raw["ctx"].strip() != "" \
        and isinstance(raw.get("endings"), list) and len(raw["endings"]) == 4 \
        and all(isinstance(e, str) and e.strip() != "" for e in raw["endings"]) \
        and type(raw.get("label")) is int and 0 <= raw["label"] < 4
    return raw if ok else None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)
texts = st.text(max_size=30)
good_items = st.fixed_dictionaries({"ctx": texts.filter(str.strip), "label": st.integers(0, 3),
                                    "endings": st.lists(texts.filter(str.strip), min_size=4, max_size=4)})
# each key missing, of the wrong type, or of a right type with a wrong value
item_like = st.fixed_dictionaries({}, optional={"ctx": texts | json_values,
                                               "endings": st.lists(texts, max_size=6) | json_values,
                                               "label": st.integers(-2, 5) | json_values})
deep = st.tuples(st.integers(500, 150_000), st.sampled_from(["list", "dict", "in_item"])).map(
    lambda t: {"list": "[" * t[0] + "]" * t[0], "dict": '{"a":' * t[0] + "0" + "}" * t[0],
               "in_item": GOOD[:-1] + ', "label": ' + "[" * t[0] + "]" * t[0] + "}"}[t[1]])
huge = st.tuples(st.integers(100_000, 2_000_000), st.sampled_from(["ctx", "ending"])).map(
    lambda t: json.dumps({"ctx": "x " * t[0] if t[1] == "ctx" else "a", "label": 0,
                          "endings": ["b", "c", "d", "long " * t[0] if t[1] == "ending" else "e"]}))


def encoded(value, ascii_only):
    # lone surrogates (which st.text makes) pass through as invalid UTF-8 bytes: a "not UTF-8" line
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


lines = st.one_of(
    st.tuples(good_items, st.booleans()).map(lambda t: encoded(*t)),
    st.tuples(item_like, st.booleans()).map(lambda t: encoded(*t)),
    st.tuples(json_values, st.booleans()).map(lambda t: encoded(*t)),
    deep.map(str.encode), huge.map(str.encode), st.binary(max_size=40), st.just(b""), st.just(b"  "))


@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(st.lists(lines, max_size=5))
def test_any_jsonl_scores_or_names_its_first_bad_line(tmp_path, capsys, tiny_checkpoint, file_lines):
    path = tmp_path / "fuzz.jsonl"
    data = b"\n".join(file_lines)
    path.write_bytes(data)
    before = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (path, tiny_checkpoint)}
    capsys.readouterr()
    rc = hellaswag.main([f"--checkpoint={tiny_checkpoint}", f"--data_path={path}", "--device=cpu",
                         "--batch_size=2"])
    out, err = capsys.readouterr()
    numbered = [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    bad = [n for n, line in numbered if expected_item(line) is None]
    if bad:
        assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}:{bad[0]}: "), (rc, err)
    elif not numbered:
        assert rc == 2 and err.count("\n") == 1 and "no items" in err, (rc, err)
    else:
        assert rc == 0 and f"count {len(numbered)} " in out, (rc, out, err)
    assert "Traceback" not in err
    assert {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in before} == before
    assert os.listdir(tmp_path) == ["fuzz.jsonl"]  # nothing written next to the data
