import pytest
import torch

from budgetlab import models
from budgetlab.train import data, losses
from budgetlab.train.losses import IGNORE


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return models.load_tokenizer(tiny_llama)


def test_sft_masks_prompt_and_ends_with_eos(tok):
    ex, st = data.encode_sft(tok, [{"prompt": "Q: 1+1=", "response": "2"}], max_length=64)
    (e,) = ex
    n_prompt = len(data.encode_prompt(tok, "Q: 1+1="))
    assert e["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:]
    assert e["input_ids"][-1] == tok.eos_token_id
    assert st.as_dict() == {"kept": 1, "truncated": 0, "dropped": 0}


def test_long_examples_are_truncated_or_dropped_and_counted(tok):
    rows = [{"prompt": "Q:", "response": "x" * 50}, {"prompt": "Q:", "response": "y"},
            {"prompt": "P" * 40, "response": "z"}]
    ex, st = data.encode_sft(tok, rows, max_length=20, truncation="truncate")
    assert (st.kept, st.truncated, st.dropped) == (2, 1, 1)  # prompt alone too long: dropped
    assert all(len(e["input_ids"]) <= 20 for e in ex)
    ex, st = data.encode_sft(tok, rows, max_length=20, truncation="drop")
    assert (st.kept, st.truncated, st.dropped) == (1, 0, 2)


def test_pairs_drop_when_either_side_does_not_fit(tok):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b" * 30}]
    _, st = data.encode_pairs(tok, rows, max_length=10, truncation="drop")
    assert st.dropped == 1
    ex, st = data.encode_pairs(tok, rows, max_length=10, truncation="truncate")
    assert st.truncated == 1 and len(ex[0]["prompt"]) + len(ex[0]["rejected"]) == 10


def test_kto_examples_get_mismatched_completions(tok):
    rows = [{"prompt": f"Q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(5)]
    pairs, _ = data.encode_pairs(tok, rows, max_length=64)
    ex = data.kto_examples(pairs, max_length=64, seed=0)
    assert len(ex) == 10 and sum(e["desirable"] for e in ex) == 5
    completions = {tuple(e["completion"]): e["prompt"] for e in ex}
    for e in ex:  # the KL completion belongs to another prompt
        assert completions[tuple(e["kl_completion"])] != e["prompt"]


def test_plan_steps_is_seeded_and_covers_each_epoch():
    steps = data.plan_steps(10, 4, 2, seed=3)
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(steps[:3], [])) == list(range(10))
    assert steps == data.plan_steps(10, 4, 2, seed=3) and steps != data.plan_steps(10, 4, 2, seed=4)


@pytest.mark.parametrize("balance", [True, False])
def test_split_step_keeps_every_example_once(balance):
    lengths = [5, 50, 7, 30, 1, 9, 12]
    slots = data.split_step(list(range(7)), lengths, 4, balance)
    assert len(slots) == 4 and sorted(sum(slots, [])) == list(range(7))
    assert max(map(len, slots)) - min(map(len, slots)) <= 2


def test_packing_pads_less_than_padding():
    seqs = [([1] * n, [1] * n) for n in (100, 10, 12, 8, 90, 5)]
    packed = data.collate(seqs, 0, pack=True, capacity=128)
    padded = data.collate(seqs, 0, pack=False, capacity=128)
    real = sum(n for n in (100, 10, 12, 8, 90, 5))
    assert packed["input_ids"].numel() < 1.1 * real < padded["input_ids"].numel()
    assert packed["input_ids"].shape[1] <= 128


def test_packed_forward_equals_separate_forwards(tiny_llama, tok):
    """Position ids restarting per sequence make transformers mask attention per sequence."""
    model = models.load_model(tiny_llama, dtype="fp32").eval()
    rows = [{"prompt": "Q: 12+7=", "response": "19 apples"}, {"prompt": "Hi", "response": "there"},
            {"prompt": "Tom has 3", "response": "and 4 more"}]
    ex, _ = data.encode_sft(tok, rows, max_length=64)
    seqs = data.sft_sequences(ex)
    with torch.no_grad():
        b = data.collate(seqs, tok.pad_token_id, pack=True, capacity=64)
        assert b["input_ids"].shape[0] == 1  # all three in one row
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
        packed = losses.sequence_logps(out.logits, b["labels"], b["segment_ids"], 3)
        for i, (x, y) in enumerate(seqs):
            alone = model(input_ids=torch.tensor([x]), use_cache=False).logits
            want = losses.sequence_logps(alone, torch.tensor([y]))
            assert packed[i].item() == pytest.approx(want.item(), abs=1e-4)
        padded = data.collate(seqs, tok.pad_token_id, pack=False, capacity=64)
        out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                    use_cache=False)
        got = losses.sequence_logps(out.logits, padded["labels"], padded["segment_ids"], 3)
        assert torch.allclose(got, packed, atol=1e-4)
