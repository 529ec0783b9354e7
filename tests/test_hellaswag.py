"""HellaSwag scoring: our GPT and Hugging Face agree, batching and ranks change nothing, bad input is named."""
import json

import pytest
import requests
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import hellaswag
from conftest import HELLASWAG
from train_gpt2 import GPT, get_tokenizer, token_losses

HAND_MADE = [
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon, singing loudly to the stars.", "dog", "a"], "label": 0},
    {"ctx": "She opened the fridge and", "endings": ["took out the milk.", "flew", "the the the", "sang."], "label": 0},
    {"ctx": "A man is seen kneeling on the floor. He", "endings": ["scrubs the tiles.", "jumps", "is", "eats a cloud."],
     "label": 1},
    # longer than the tiny model's 128 positions: the context is cut from the left, the endings kept
    {"ctx": "Once upon a time, " * 40 + "there was a", "endings": ["king.", "queen who ruled", "dragon", "frog."],
     "label": 3},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny GPT-2 saved as a Hugging Face dir (the real vocab: real items need it)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # initializer_range 0.2, not 0.02: a model with opinions, so the argmin does not hinge on float noise
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.2)
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
