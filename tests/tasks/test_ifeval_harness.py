"""IFEval scores against lm-evaluation-harness's own IFEval code (tasks/ifeval/utils.py).

Prompts: every instruction type the harness registers, with the arguments its own classes
draw at random (build_description() without arguments), one to three per prompt. Responses:
fragments that follow or break those instructions (case, commas, quotes, JSON, bullets,
highlights, sections, paragraphs, placeholders, titles, postscripts, keywords, lengths, end
phrases, the repeated prompt), with the markdown and first/last lines the loose variants strip.
Instructions the harness cannot check here (NLTK data missing offline) are compared on the
side that can: ours counts them as not followed and reports their number.
"""

import json
import random

import pytest

from budgetlab.tasks import get_task

N_PROMPTS = 800


@pytest.fixture(scope="module")
def harness():
    import nltk
    download, nltk.download = nltk.download, (lambda *a, **k: False)  # tests never go online
    try:
        from lm_eval.tasks.ifeval import utils
        from lm_eval.tasks.ifeval import instructions_registry
    finally:
        nltk.download = download
    return utils, instructions_registry.INSTRUCTION_DICT


def _doc(rng: random.Random, i: int, registry) -> dict:
    # language:response_language runs langdetect (~30 ms a call, 16 calls per check with the
    # loose variants on both sides): in few prompts, to keep this test at seconds.
    pool = [k for k in sorted(registry) if k != "language:response_language"]
    ids = rng.sample(pool, rng.choice([1, 1, 2, 3]))
    if i % 50 == 0:
        ids.append("language:response_language")
    prompt = rng.choice(["Write a short note about the sea.", "Describe a city at night.",
                         "Explain why the sky is blue."])
    kwargs = []
    for inst_id in ids:
        random.seed(rng.random())     # the harness's classes draw their arguments from `random`
        checker = registry[inst_id](inst_id)
        checker.build_description(**({"prompt_to_repeat": prompt}
                                     if inst_id == "combination:repeat_prompt" else {}))
        args = dict(checker.get_instruction_args() or {})
        if "prompt_to_repeat" in args:
            args["prompt_to_repeat"] = prompt
        kwargs.append(args)
    return {"key": i, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


def _response(rng: random.Random, doc: dict) -> str:
    words = [w for k in doc["kwargs"] for key in ("keywords", "forbidden_words")
             for w in (k.get(key) or [])]
    words += [k["keyword"] for k in doc["kwargs"] if k.get("keyword")]
    body = []
    for _ in range(rng.randint(1, 6)):
        sent = rng.choice(["the sea is calm and blue", "Lights glow over the old town, softly",
                           "LOUD WAVES CRASH ON THE ROCKS", "a [name] walks past [place]",
                           "*a highlighted part* of it", "Rain, wind, and sun"])
        if words and rng.random() < 0.6:
            sent += " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        body.append(sent + rng.choice([".", "!", "", "?"]))
    text = rng.choice([" ", "\n", "\n\n", "\n***\n", "\n* ", "\n- "]).join(body)
    if rng.random() < 0.2:
        text = "\n".join(f"SECTION {j + 1}\n{t}" for j, t in enumerate(body))
    if rng.random() < 0.15:
        text = "* " + text.replace("\n", "\n* ")
    if rng.random() < 0.2:
        text = text.lower()
    elif rng.random() < 0.1:
        text = text.upper()
    if rng.random() < 0.2:
        text = text.replace(",", "")
    if rng.random() < 0.15:
        text = "<<A Title>>\n" + text
    ends = [k["end_phrase"] for k in doc["kwargs"] if k.get("end_phrase")]
    if ends and rng.random() < 0.5:
        text += " " + ends[0]
    markers = [k["postscript_marker"] for k in doc["kwargs"] if k.get("postscript_marker")]
    if markers and rng.random() < 0.5:
        text += f"\n{markers[0]} see you"
    if rng.random() < 0.15:
        text = doc["prompt"] + " " + text
    if rng.random() < 0.1:
        text = json.dumps({"answer": text})
    if rng.random() < 0.1:
        text = f'"{text}"'
    if rng.random() < 0.1:
        text = text + "\n******\n" + text.upper()
    if rng.random() < 0.25:      # the chatty first / last lines that the loose variants drop
        text = rng.choice(["Sure! Here it is:\n", "**Answer**\n"]) + text
    if rng.random() < 0.2:
        text += rng.choice(["\nHope this helps!", "\n**"])
    return "" if rng.random() < 0.02 else text


def _harness_lists(utils, doc, response):
    """(strict, loose) follow lists from the harness, None for an instruction it cannot check."""
    strict, loose = [], []
    for inst_id, kw in zip(doc["instruction_id_list"], doc["kwargs"]):
        one = utils.InputExample(key=doc["key"], instruction_id_list=[inst_id],
                                 prompt=doc["prompt"], kwargs=[kw])
        try:
            strict.append(utils.test_instruction_following_strict(one, response)
                          .follow_instruction_list[0])
            loose.append(utils.test_instruction_following_loose(one, response)
                         .follow_instruction_list[0])
        except LookupError:
            strict.append(None)
            loose.append(None)
    return strict, loose


def test_ifeval_agrees_with_the_harness(harness):
    utils, registry = harness
    task = get_task("ifeval")
    rng = random.Random(12)
    docs = [_doc(rng, i, registry) for i in range(N_PROMPTS)]
    inst = agree_inst = prompts = agree_prompts = uncheckable = 0
    mismatches, outcomes = [], set()
    for doc in docs:
        response = _response(rng, doc)
        ours = task.score(response, task.parse_eval(doc))
        strict, loose = _harness_lists(utils, doc, response)
        checkable = [s for s in strict if s is not None]
        n_unc = len(strict) - len(checkable)
        uncheckable += n_unc
        assert ours["instructions"] == len(strict)
        assert ours["instructions_uncheckable"] == n_unc
        # Instruction level: the harness's followed count on what it can check is ours.
        inst += len(checkable)
        ok = (ours["instructions_followed_strict"] == sum(checkable)
              and ours["instructions_followed_loose"] == sum(s for s in loose if s is not None))
        agree_inst += len(checkable) if ok else 0
        if n_unc == 0:
            # Prompt level, exactly the harness's process_results.
            theirs = utils.process_results(doc, [response])
            prompts += 1
            same = (ours["prompt_level_strict_acc"] == theirs["prompt_level_strict_acc"]
                    and ours["prompt_level_loose_acc"] == theirs["prompt_level_loose_acc"])
            agree_prompts += same
            outcomes.add((theirs["prompt_level_strict_acc"], theirs["prompt_level_loose_acc"]))
        else:
            assert ours["prompt_level_strict_acc"] == ours["prompt_level_loose_acc"] == 0.0
        if not ok:
            mismatches.append((doc, response, ours, strict, loose))
    print(f"IFEval agreement: instructions {agree_inst}/{inst}, prompts {agree_prompts}/"
          f"{prompts}, uncheckable here {uncheckable}")
    assert not mismatches, mismatches[:3]
    assert agree_prompts == prompts > N_PROMPTS // 2
    # Varied enough to mean something: followed and not, strict and loose apart.
    assert {(True, True), (False, False), (False, True)} <= outcomes
