"""`arith`: the CPU toy task. One-step word problems with a worked equation.

    Q: Tom has 12 apples and gets 7 more. How many? A: 12+7=19. #### 19

The pools are generated from fixed seeds (no download). Preference pairs are a correct
solution against one with wrong arithmetic (an off-by-a-little result, or the wrong operation).
The same generator writes the toy model's pre-training corpus (budgetlab/builtin/build.py),
which never contains the `Q: ... A: ... ####` format: the base model knows arithmetic and the
story language but not how to answer, so it scores 0 before fine-tuning.
"""

from __future__ import annotations

import random

from budgetlab.tasks.base import Task
from budgetlab.tasks.gsm8k import score_numeric

NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lucy", "Max", "Emma", "Leo", "Zoe", "Jack",
         "Lily", "Noah", "Ella", "Finn", "Ruby")
THINGS = ("apples", "pears", "coins", "books", "stamps", "marbles", "cards", "shells",
          "cookies", "pens", "rocks", "flowers")
# (verb phrase with {b}, operator)
ACTIONS = (("gets {b} more", "+"), ("buys {b} more", "+"), ("finds {b} more", "+"),
           ("gives away {b}", "-"), ("loses {b}", "-"), ("sells {b}", "-"))

POOL_SIZE = 4000        # generated SFT problems and preference pairs (each)
EVAL_SIZE = 200
_SEEDS = {"sft": 101, "preferences": 202, "eval": 303}


def make_problem(rng: random.Random) -> dict:
    """One random problem: story sentence, operands, operator and answer."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    action, op = rng.choice(ACTIONS)
    # Small numbers: the tiny base model can learn every equation in a short pre-training.
    a = rng.randint(3, 20)
    b = rng.randint(2, 9) if op == "+" else rng.randint(2, min(9, a - 1))
    answer = a + b if op == "+" else a - b
    story = f"{name} has {a} {thing} and {action.format(b=b)}."
    return {"name": name, "thing": thing, "a": a, "b": b, "op": op, "answer": answer,
            "story": story}


def question(p: dict) -> str:
    return f"{p['story']} How many?"


def solution(p: dict) -> str:
    return f"{p['a']}{p['op']}{p['b']}={p['answer']}. #### {p['answer']}"


def wrong_solution(p: dict, rng: random.Random) -> str:
    """Wrong arithmetic: the result is off by 1-3, or the other operation is used."""
    if rng.random() < 0.5 or (p["op"] == "+" and p["b"] >= p["a"]):
        wrong = p["answer"] + rng.choice((-3, -2, -1, 1, 2, 3))
        return f"{p['a']}{p['op']}{p['b']}={wrong}. #### {wrong}"
    op = "-" if p["op"] == "+" else "+"
    wrong = p["a"] - p["b"] if op == "-" else p["a"] + p["b"]
    return f"{p['a']}{op}{p['b']}={wrong}. #### {wrong}"


def generate(kind: str, n: int) -> list[dict]:
    rng = random.Random(_SEEDS[kind])
    rows = []
    for _ in range(n):
        p = make_problem(rng)
        if kind == "sft":
            rows.append({"prompt": question(p), "response": solution(p)})
        elif kind == "preferences":
            rows.append({"prompt": question(p), "chosen": solution(p),
                         "rejected": wrong_solution(p, rng)})
        else:
            rows.append({"prompt": question(p), "answer": str(p["answer"])})
    return rows


class Arith(Task):
    name = "arith"
    primary_metric = "accuracy"
    max_new_tokens = 24
    stop_strings = ("\n", "Q:")
    sources = {"sft": "builtin:arith/sft", "preferences": "builtin:arith/preferences",
               "eval": "builtin:arith/eval"}

    def format_prompt(self, tokenizer, prompt: str) -> str:
        # The toy model has no chat template; its own compact format keeps sequences short.
        return f"Q: {prompt} A: "

    def _load_builtin(self, key: str) -> list[dict]:
        return generate(key, EVAL_SIZE if key == "eval" else POOL_SIZE)

    def parse_sft(self, row):
        return {"prompt": row["prompt"], "response": row["response"]}

    def parse_preference(self, row):
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}

    def parse_eval(self, row):
        return {"prompt": row["prompt"], "answer": str(row["answer"])}

    def score(self, prediction: str, example: dict) -> dict[str, float]:
        s = score_numeric(prediction, example["answer"])
        # The toy's own metric: the number after '####', compared as a number (gsm8k's
        # numeric_match); the harness's flexible extraction as a second view.
        return {"accuracy": s["numeric_match"], "accuracy_flexible": s["flexible_extract"]}
