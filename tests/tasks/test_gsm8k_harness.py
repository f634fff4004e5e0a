"""GSM8k scores against lm-evaluation-harness's own gsm8k filters and exact_match.

The harness (lm-eval, a dev dependency; its filters and metrics import without its heavy
dependencies) scores several thousand completions in varied and adversarial formats; budgetlab's
strict_match and flexible_extract must agree on every one.
"""

import random


from budgetlab.tasks import get_task
from budgetlab.tasks.gsm8k import FLEXIBLE_PATTERN, REGEXES_TO_IGNORE, STRICT_PATTERN

# The reference is a dev dependency (make env installs it): a missing harness is a failure,
# never a skip that would hide a disagreement.
from lm_eval.api import metrics  # noqa: E402
from lm_eval.filters import extraction, selection  # noqa: E402

N = 3000


def _number(rng: random.Random) -> str:
    v = rng.choice([rng.randint(0, 9), rng.randint(10, 999), rng.randint(1000, 2_000_000)])
    text = str(v)
    if rng.random() < 0.3 and v >= 1000:
        text = f"{v:,}"
    if rng.random() < 0.15:
        text += rng.choice([".0", ".00", ".5", ".25", "."])
    if rng.random() < 0.15:
        text = "-" + text
    return text


def _completion(rng: random.Random, answer: str) -> str:
    """A completion whose final answer is `answer`, a near miss, or missing, in one of many
    formats the harness treats differently."""
    final = answer if rng.random() < 0.6 else rng.choice([_number(rng), answer + "0",
                                                          answer.replace(",", ""),
                                                          answer + ".00", "-" + answer])
    work = " ".join(rng.choice([f"{_number(rng)} + {_number(rng)} = {_number(rng)}.",
                                "Let's think step by step.", f"So we get ${_number(rng)}.",
                                f"that is {_number(rng)}%", "Step 1: add.", "3/4 of it"])
                    for _ in range(rng.randint(0, 4)))
    tail = rng.choice([
        f"#### {final}", f"####{final}", f"#### ${final}", f"#### {final} apples",
        f"####  {final}", f"#### {final}.", f"####\n{final}", f"#### {final}\n#### {_number(rng)}",
        f"#### {final}\nwait, {_number(rng)}", f"The answer is {final}.",
        f"The answer is ${final}", f"**{final}**", f"\\boxed{{{final}}}", f"{final} dollars",
        f"#### {final}\nQuestion: next", f"#### -{final}", f"#### {final}%", f"#### {final},",
        f"#### {final.replace(',', '.')}", f"#### {final} ", f"#### \t{final}", "#### ",
        "I don't know.", "", f"#### {final}#### {final}", f"# {final}", f"### {final}",
        f"#### {final}/2", f"#### 1,2,3,{final}", f"#### ..{final}", f"#### ,{final}",
        f"#### $ {final}", f"-{final}", f"#### {final}e3", f"ANSWER: {final}", f"#### {final}\n",
    ])
    return (work + "\n" + tail) if work and rng.random() < 0.8 else tail


def _harness_config() -> dict:
    """The installed harness's gsm8k task definition (filters, exact_match arguments)."""
    from pathlib import Path

    import lm_eval
    import yaml

    path = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    return yaml.safe_load(path.read_text())


def _harness(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-item exact_match of each of the harness's gsm8k filters, by the harness's code and
    the harness's settings (read from its yaml, not from budgetlab)."""
    cfg = _harness_config()
    (metric,) = [m for m in cfg["metric_list"] if m["metric"] == "exact_match"]
    kwargs = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}
    names = {"strict-match": "strict_match", "flexible-extract": "flexible_extract"}
    out = {}
    for flist in cfg["filter_list"]:
        regex, first = flist["filter"]
        assert regex["function"] == "regex" and first["function"] == "take_first"
        filt = extraction.RegexFilter(regex["regex_pattern"], regex.get("group_select", 0))
        filtered = selection.TakeFirstFilter().apply(
            filt.apply([[p] for p in predictions], [{}] * len(predictions)), None)
        out[names[flist["name"]]] = [
            metrics.exact_match_hf_evaluate([f], [ref], **kwargs)["exact_match"]
            for f, ref in zip(filtered, references)]
    assert set(out) == {"strict_match", "flexible_extract"}
    return out


def test_harness_gsm8k_config_is_ours():
    cfg = _harness_config()
    patterns = {f["name"]: f["filter"][0]["regex_pattern"] for f in cfg["filter_list"]}
    assert patterns == {"strict-match": STRICT_PATTERN, "flexible-extract": FLEXIBLE_PATTERN}
    (metric,) = [m for m in cfg["metric_list"] if m["metric"] == "exact_match"]
    assert tuple(metric["regexes_to_ignore"]) == REGEXES_TO_IGNORE
    assert metric["ignore_case"] is True and metric["ignore_punctuation"] is False


def test_gsm8k_agrees_with_the_harness_on_every_item():
    rng = random.Random(12)
    task = get_task("gsm8k")
    answers = [_number(rng).lstrip("-").rstrip(".") or "0" for _ in range(N)]
    preds = [_completion(rng, a) for a in answers]
    # The harness's reference is the dataset's whole answer ("... #### 72"); ours the number.
    refs = [f"So it is {a} in all.\n#### {a}" for a in answers]
    theirs = _harness(preds, refs)
    ours = [task.score(p, {"answer": a}) for p, a in zip(preds, answers)]
    for name in ("strict_match", "flexible_extract"):
        agree = sum(o[name] == t for o, t in zip(ours, theirs[name]))
        bad = [(p, a) for p, a, o, t in zip(preds, answers, ours, theirs[name]) if o[name] != t]
        assert agree == N, (name, agree, bad[:5])
    # The sample is varied enough to mean something: both outcomes, and the metrics differ.
    for name in ("strict_match", "flexible_extract", "numeric_match"):
        rate = sum(o[name] for o in ours) / N
        assert 0.1 < rate < 0.9, (name, rate)
    assert sum(o["strict_match"] != o["flexible_extract"] for o in ours) > N // 20
    assert sum(o["strict_match"] != o["numeric_match"] for o in ours) > N // 20
