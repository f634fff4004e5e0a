"""Find the best split per budget while measuring only a fraction of the grid.

    from budgetlab.search import Strategy, run_search, spaces_of
    results, obs, rounds = run_search(spaces_of(plan), measure, Strategy())
    # measure(list[Request]) -> {Request: score}; search() below drives it on a ledger

The answer at each budget is the best split found and its epsilon-band (band(): the measured
splits within (1 - epsilon) of it); a budget is "separated" (separated()) when no measured
split could, within the seed noise, beat the leader by more than epsilon. transfer() is the
driver of `search --transfer-from`: a small model's bands as the prior, confirmation points,
the ladder where the prior fails.

The candidates of a (task, model) are the grid's (method, SFT share) pairs; share 1.0 is SFT
only, one candidate whatever the method (the same point). The strategy, "ladder":

1. Successive halving per budget, with seeds as the fidelity. Rung 0 measures every candidate
   in the pool with one seed; the best ceil(n / eta) by mean go on to eta times as many seeds
   (capped at the grid's seeds), and so on until one is left or every seed is measured. The
   answer at a budget is the best mean among the candidates measured with the most seeds.
2. Borrowing across budgets: budgets are searched smallest first (the cheapest), and from the
   second budget on the pool is not every candidate but the best ceil(n / eta) of the budget
   below (its rung-0 ranking), plus the SFT-share neighbours (same method, next share up and
   down) of its winner: the best share moves smoothly with the budget, and a candidate that
   lost clearly one budget down is not measured again unless it is next to the winner.
   The seed noise is borrowed too: once a budget has candidates measured with several
   seeds, their pooled seed standard deviation is known, and at a later budget a candidate
   is promoted only if it could push the leader out of its epsilon-band: its mean + z*sd,
   less epsilon of itself, reaches the leader's mean - z*sd (each with its own seed sd, or
   the pooled one while it has one seed; z = 0.5 by default, chosen on the toy replay of
   bench/search_replay.py; epsilon 0 and z = 1 are `budgetlab recommend`'s contenders), so
   a clear loser is not measured with more seeds; and when
   no other candidate of the pool is that close, the budget is decided and the leader is
   not measured with more seeds either (`all_seeds=True`, `--all-seeds`: it always is,
   so that the answer's mean and spread use every seed).
   `borrow=False` is plain successive halving, every budget on its own.

Every request is an ordinary grid cell (task, model, budget, share, method, seed): the stages
it runs are the stages of that cell's point, with the same ids as a full submit, so a later
`budgetlab submit` or `report` of the same grid reuses and shows them. Stages shared between
cells (an SFT stage serves every point with the same n_sft and seed, across budgets) run once.

The searches of different (task, model) pairs run side by side: each round sends one batch
with the next requests of every pair (`measure` gets a whole round at once).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

from budgetlab.errors import BadInput

SFT_ONLY = "sft"


@dataclass(frozen=True)
class Request:
    """One cell to measure: candidate (method, sft_fraction) at a budget, with one seed."""
    task: str
    model: str
    budget: float
    method: str
    sft_fraction: float
    seed: int


@dataclass
class Strategy:
    eta: int = 3               # keep the best 1/eta of a rung; eta times the seeds next rung
    borrow: bool = True        # the budget below prunes a budget's pool (False: plain halving)
    seed: int | None = None    # shuffles the order of the grid's seeds (None: grid order)
    z: float = 0.5             # seed-noise half-width in seed sds (chosen on the toy replay)
    all_seeds: bool = False    # measure the winner with every seed even when it is clear
    epsilon: float = 0.05      # the near-optimal band: within (1 - epsilon) of the best

    def check(self) -> None:
        if not isinstance(self.eta, int) or isinstance(self.eta, bool) or self.eta < 2:
            raise BadInput(f"--eta: must be an integer >= 2, got {self.eta!r}")
        if not (isinstance(self.z, (int, float)) and not isinstance(self.z, bool)
                and math.isfinite(self.z) and self.z >= 0):
            raise BadInput(f"--z: must be a number >= 0, got {self.z!r}")
        if not (isinstance(self.epsilon, (int, float)) and not isinstance(self.epsilon, bool)
                and math.isfinite(self.epsilon) and 0 <= self.epsilon < 1):
            raise BadInput(f"--epsilon: must be a number in [0, 1), got {self.epsilon!r}")

    def describe(self) -> dict:
        return {"name": "ladder" if self.borrow else "successive-halving", "eta": self.eta,
                "borrow": self.borrow, "z": self.z if self.borrow else None,
                "all_seeds": self.all_seeds or not self.borrow, "seed": self.seed,
                "epsilon": self.epsilon, "fidelity": "seeds", "budgets": "ascending"}


def band_floor(best: float, epsilon: float) -> float:
    """The lowest score within (1 - epsilon) of `best`; for a negative best (a reward
    score) epsilon * |best| below it."""
    return best - epsilon * abs(best)


@dataclass
class Space:
    """What one (task, model) search ranges over."""
    task: str
    model: str
    budgets: list[float]
    candidates: list[tuple[str, float]]      # (method, share); ("sft", 1.0) for SFT only
    seeds: list[int]
    methods: list[str]                        # the grid's methods (SFT only uses the first)

    def request(self, budget, cand, seed) -> Request:
        method, share = cand
        return Request(self.task, self.model, budget,
                       self.methods[0] if method == SFT_ONLY else method, share, seed)


@dataclass
class Observations:
    """Scores measured so far: (task, model, budget, candidate) -> {seed: score or None}."""
    scores: dict = field(default_factory=dict)

    def add(self, space: Space, req: Request, score) -> None:
        cand = (SFT_ONLY, 1.0) if req.sft_fraction == 1.0 else (req.method, req.sft_fraction)
        self.scores.setdefault((space.task, space.model, req.budget, cand), {})[req.seed] = score

    def of(self, space: Space, budget, cand) -> dict:
        return self.scores.get((space.task, space.model, budget, cand), {})

    def mean(self, space, budget, cand) -> float | None:
        vals = [v for v in self.of(space, budget, cand).values() if v is not None]
        return statistics.fmean(vals) if vals else None


def spaces_of(plan) -> list[Space]:
    """One Space per (task, model) of a budgetlab.graph.Plan."""
    spec = plan.spec
    cands: list[tuple[str, float]] = []
    for f in sorted(spec.sft_fractions, reverse=True):
        if f == 1.0:
            cands.append((SFT_ONLY, 1.0))
        else:
            cands += [(m, f) for m in spec.methods]
    return [Space(t, m, sorted(spec.budgets), list(dict.fromkeys(cands)), list(spec.seeds),
                  list(spec.methods)) for t in spec.tasks for m in spec.models]


def _rank(space: Space, obs: Observations, budget, cands, rng) -> list:
    """Best first: mean over the seeds measured (unmeasured or all-failed last); ties broken
    by the larger SFT share, then at random when rng is given."""
    def key(c):
        m = obs.mean(space, budget, c)
        return (m is None, -(m if m is not None else 0.0), -c[1], tiebreak[c])
    tiebreak = {c: (rng.random() if rng else i) for i, c in enumerate(cands)}
    return sorted(cands, key=key)


def pooled_sd(obs: Observations, space: Space) -> float | None:
    """The seed standard deviation pooled over every (budget, candidate) of this space
    measured with two seeds or more; None before there is any."""
    ss, dof = 0.0, 0
    for (task, model, _b, _c), by in obs.scores.items():
        vals = [v for v in by.values() if v is not None]
        if (task, model) == (space.task, space.model) and len(vals) > 1:
            m = statistics.fmean(vals)
            ss += sum((v - m) ** 2 for v in vals)
            dof += len(vals) - 1
    return math.sqrt(ss / dof) if dof else None


def _sd(obs, space, budget, cand, pooled) -> float | None:
    vals = [v for v in obs.of(space, budget, cand).values() if v is not None]
    return statistics.stdev(vals) if len(vals) > 1 else pooled


def _close_to_leader(space, obs, budget, ranked, z, epsilon=0.0) -> list:
    """`ranked` (best first) cut to the leader and the candidates that the seed noise says
    could push the leader out of their epsilon-band: (mean + z*sd) less epsilon of itself
    reaches the leader's mean - z*sd, each with its own seed sd, or the pooled one
    (pooled_sd) while it has a single seed. With epsilon 0 and z = 1 this is `recommend`'s
    "contenders". All of them while no seed spread is known yet."""
    pooled = pooled_sd(obs, space)
    if pooled is None or not ranked:
        return ranked
    lead = obs.mean(space, budget, ranked[0])
    if lead is None:
        return ranked
    lo = lead - z * _sd(obs, space, budget, ranked[0], pooled)
    out = [ranked[0]]
    for c in ranked[1:]:
        m = obs.mean(space, budget, c)
        if m is not None and band_floor(m + z * _sd(obs, space, budget, c, pooled),
                                        epsilon) >= lo:
            out.append(c)
    return out


def separated(space, obs, budget, leader, z, epsilon) -> bool:
    """The budget is decided: a seed spread is known and no candidate measured at this
    budget could, within z seed sds, score more than epsilon above the leader."""
    if pooled_sd(obs, space) is None or obs.mean(space, budget, leader) is None:
        return False
    rest = [c for c in space.candidates if c != leader and obs.mean(space, budget, c) is not None]
    return _close_to_leader(space, obs, budget, [leader] + rest, z, epsilon) == [leader]


def band(space, obs, budget, leader, epsilon) -> list:
    """The measured candidates within (1 - epsilon) of the leader's mean, best first."""
    lead = obs.mean(space, budget, leader)
    if lead is None:
        return []
    floor = band_floor(lead, epsilon)
    got = [c for c in space.candidates if obs.mean(space, budget, c) is not None
           and obs.mean(space, budget, c) >= floor]
    return sorted(got, key=lambda c: (c != leader, -obs.mean(space, budget, c), -c[1]))


def _neighbours(space: Space, cand) -> list:
    """The candidates next to `cand` in SFT share: same method, one share up and one down
    (SFT only neighbours every method's highest share below 1)."""
    shares = sorted({c[1] for c in space.candidates}, reverse=True)
    i = shares.index(cand[1])
    out = []
    for j in (i - 1, i + 1):
        if 0 <= j < len(shares):
            s = shares[j]
            out += [c for c in space.candidates if c[1] == s and
                    (cand[0] == SFT_ONLY or c[0] == SFT_ONLY or c[0] == cand[0])]
    return out


def ladder(space: Space, obs: Observations, strategy: Strategy):
    """The search of one (task, model): a generator of rounds (lists of Requests); between
    two rounds the caller records the scores in `obs`. Returns {budget: answer dict}."""
    rng = random.Random(strategy.seed) if strategy.seed is not None else None
    seeds = list(space.seeds)
    if rng is not None:
        rng.shuffle(seeds)
    eta = strategy.eta
    answers, prev = {}, None
    for budget in space.budgets:
        if prev is None or not strategy.borrow:
            pool = list(space.candidates)
        else:
            keep = prev["rung0"][:math.ceil(len(space.candidates) / eta)]
            near = _neighbours(space, prev["rung0"][0])
            pool = [c for c in space.candidates if c in keep or c in near]
        alive, fid, rungs = pool, 1, []
        yield [space.request(budget, c, s) for c in alive for s in seeds[:fid]]
        rung0 = _rank(space, obs, budget, pool, rng)
        rungs.append({"seeds": fid, "candidates": alive})
        while len(alive) > 1 and fid < len(seeds):
            ranked = _rank(space, obs, budget, alive, rng)
            if not strategy.borrow:
                alive = ranked[:math.ceil(len(alive) / eta)]
            else:
                close = _close_to_leader(space, obs, budget, ranked, strategy.z,
                                         strategy.epsilon)
                if len(close) == 1 and pooled_sd(obs, space) is not None \
                        and not strategy.all_seeds:
                    alive = close
                    break                    # decided: nothing is within the seed noise
                # the leader and the ones the noise cannot tell from it (at least two)
                alive = close[:max(2, math.ceil(len(alive) / eta))]
            fid = min(len(seeds), fid * eta)
            yield [space.request(budget, c, s) for c in alive for s in seeds[:fid]
                   if s not in obs.of(space, budget, c)]
            rungs.append({"seeds": fid, "candidates": alive})
        alive = _rank(space, obs, budget, alive, rng)
        answers[budget] = {"pool": pool, "rungs": rungs, "finalists": alive, "best": alive[0],
                           "separated": separated(space, obs, budget, alive[0], strategy.z,
                                                  strategy.epsilon)}
        # What the next budget borrows: the finalists in order, then the rest by rung 0.
        prev = {"rung0": alive + [c for c in rung0 if c not in alive]}
    return answers


def confirmation_points(candidates: list, prior: dict) -> list:
    """What tests a prior band at one budget: its best, and the strongest candidate outside it
    (the next in the prior's ranking; the band's second where the band holds everything)."""
    ranking = [c for c in prior["ranking"] if c in candidates]
    if not ranking:
        return []
    outside = [c for c in ranking if c not in prior["band"]]
    # a prior that measured one candidate there (a searched small grid): any other is a test
    rest = [c for c in candidates if c not in ranking]
    return [ranking[0]] + (outside[:1] or ranking[1:2] or rest[:1])


def transfer(priors: dict):
    """A driver for run_search: the search of a large model that a small model's bands guide.
    priors: {(task, budget): {"band": [candidates], "ranking": [candidates, best first]}}.

    "sd" (optional): the small model's seed sd, the noise the confirmation allows for.
    Round 1 measures, with one seed, the confirmation points (confirmation_points) of the
    first and last budget the prior covers, and of every budget where the prior's best or
    its challenger differs from a neighbouring budget's; a budget in between whose prior is
    the same as both neighbours' gets only the prior's best. A budget is confirmed when the
    prior's best scores within (1 - epsilon) of the best of its confirmation points; one
    with the prior's best alone is confirmed by the nearest budgets with both points, below
    and above it, when both are. Where a
    neighbour is not, round 2 measures its challenger too. Its answer is the best measured
    point. "Within" allows for the seed noise: the prior's best stands while its score + z*sd
    reaches the band floor of the lead's score - z*sd. A budget not
    confirmed, or not covered by the prior, is searched by the ladder from what is measured."""
    import dataclasses

    def driver(space: Space, obs: Observations, strategy: Strategy):
        seed0 = list(space.seeds)
        if strategy.seed is not None:
            random.Random(strategy.seed).shuffle(seed0)
        full = {b: confirmation_points(space.candidates, priors[(space.task, b)])
                for b in space.budgets if (space.task, b) in priors}
        full = {b: p for b, p in full.items() if p}
        covered = [b for b in space.budgets if b in full]
        points = dict(full)
        for i in range(1, len(covered) - 1):   # the same prior on both sides: its best only
            b = covered[i]
            if full[covered[i - 1]] == full[b] == full[covered[i + 1]]:
                points[b] = full[b][:1]
        yield [space.request(b, c, seed0[0]) for b, p in points.items() for c in p]

        def confirmed(b) -> bool:
            # The prior's best stands unless the lead beats it by more than epsilon beyond
            # the seed noise (the small model's pooled seed sd: one seed each gives none).
            ranked = _rank(space, obs, b, points[b], None)
            lead, mine = obs.mean(space, b, ranked[0]), obs.mean(space, b, points[b][0])
            if lead is None or mine is None:
                return False
            sd = priors[(space.task, b)].get("sd") or 0.0
            return mine + strategy.z * sd >= band_floor(lead - strategy.z * sd, strategy.epsilon)
        ok = {b: confirmed(b) for b in covered if len(points[b]) > 1}
        lone = [b for b in covered if len(points[b]) == 1]
        how = {b: "points" for b in ok}
        more = []
        for b in lone:   # the nearest budgets with both points, below and above
            i = covered.index(b)
            sides = [next((n for n in reversed(covered[:i]) if n in ok), None),
                     next((n for n in covered[i + 1:] if n in ok), None)]
            if None not in sides and all(ok[n] for n in sides):
                ok[b], how[b] = confirmed(b), "neighbours"
            else:
                more.append(b)
        if more:               # a neighbour failed: test this budget's prior on its own
            points.update({b: full[b] for b in more})
            yield [space.request(b, full[b][1], seed0[0]) for b in more if len(full[b]) > 1]
            ok.update({b: confirmed(b) for b in more})
            how.update({b: "points" for b in more})
        answers, search = {}, [b for b in space.budgets if not ok.get(b)]
        for b in covered:
            if ok[b]:
                ranked = _rank(space, obs, b, points[b], None)
                answers[b] = {"pool": points[b], "finalists": ranked, "best": ranked[0],
                              "separated": separated(space, obs, b, ranked[0], strategy.z,
                                                     strategy.epsilon),
                              "prior": full[b][0], "confirmed": True, "confirmed_by": how[b],
                              "confirmation_points": len(points[b])}
        if search:
            rest = yield from ladder(dataclasses.replace(space, budgets=search), obs, strategy)
            for b, a in rest.items():
                answers[b] = {**a, "prior": full[b][0] if b in full else None,
                              "confirmed": False if b in full else None,
                              "confirmed_by": None,
                              "confirmation_points": len(points.get(b, []))}
        return {b: answers[b] for b in space.budgets}
    return driver


def priors_from(rows: list[dict], epsilon: float) -> dict:
    """Bands of a measured grid as transfer priors: rows are report groups (task, budget,
    method, sft_fraction, score_mean), SFT only merged into one candidate."""
    by: dict = {}
    for g in rows:
        if g["score_mean"] is None:
            continue
        cand = (SFT_ONLY, 1.0) if g["sft_fraction"] == 1.0 else (g["method"], g["sft_fraction"])
        by.setdefault((g["task"], float(g["budget"])), {})[cand] = g["score_mean"]
    ss, dof = 0.0, 0     # the seed sd pooled over the groups with two seeds or more
    for g in rows:
        if g["score_std"] is not None and g["n_seeds"] > 1:
            ss += g["score_std"] ** 2 * (g["n_seeds"] - 1)
            dof += g["n_seeds"] - 1
    sd = math.sqrt(ss / dof) if dof else None
    out = {}
    for key, means in by.items():
        ranking = sorted(means, key=lambda c: (-means[c], -c[1]))
        floor = band_floor(means[ranking[0]], epsilon)
        out[key] = {"ranking": ranking, "band": [c for c in ranking if means[c] >= floor],
                    "means": means, "sd": sd}
    return out


def breadth_first(space: Space, obs: Observations, strategy: Strategy):
    """Plain successive halving with the rungs of every budget in one round (no borrowing):
    rung 0 of every budget, then rung 1 of every budget, ... The baseline of
    bench/search_replay.py; the same answers as ladder(borrow=False), in fewer rounds."""
    rng = random.Random(strategy.seed) if strategy.seed is not None else None
    seeds = list(space.seeds)
    if rng is not None:
        rng.shuffle(seeds)
    eta = strategy.eta
    alive = {b: list(space.candidates) for b in space.budgets}
    fid = 1
    yield [space.request(b, c, s) for b in space.budgets for c in alive[b] for s in seeds[:1]]
    while fid < len(seeds) and any(len(a) > 1 for a in alive.values()):
        for b in space.budgets:
            if len(alive[b]) > 1:
                alive[b] = _rank(space, obs, b, alive[b], rng)[:math.ceil(len(alive[b]) / eta)]
        fid = min(len(seeds), fid * eta)
        yield [space.request(b, c, s) for b in space.budgets for c in alive[b]
               for s in seeds[:fid] if s not in obs.of(space, b, c)]
    out = {}
    for b in space.budgets:
        best = _rank(space, obs, b, alive[b], rng)[0]
        out[b] = {"pool": list(space.candidates), "finalists": alive[b], "best": best,
                  "separated": separated(space, obs, b, best, strategy.z, strategy.epsilon)}
    return out


def run_search(spaces: list[Space], measure, strategy: Strategy, driver=ladder,
               on_round=None) -> tuple[dict, Observations, int]:
    """Drive one search per space side by side. measure(list[Request]) -> {Request: score or
    None}; a request it leaves out (a compute cap reached) stays unmeasured. Returns
    ({(task, model): {budget: answer}}, Observations, rounds)."""
    strategy.check()
    obs = Observations()
    gens = {(s.task, s.model): (s, driver(s, obs, strategy)) for s in spaces}
    pending = {k: next(g, None) for k, (s, g) in gens.items()}
    results: dict = {}
    rounds = 0

    def advance(k):
        try:
            return gens[k][1].send(None)
        except StopIteration as stop:
            results[k] = stop.value
            return None
    batch_of = {k: b for k, b in pending.items() if b is not None}  # at their first round
    while batch_of:
        reqs = [r for b in batch_of.values() for r in b]
        got = measure(list(dict.fromkeys(reqs))) if reqs else {}
        rounds += 1 if reqs else 0
        for k, b in batch_of.items():
            for r in b:
                if r in got:
                    obs.add(gens[k][0], r, got[r])
        if on_round is not None:
            on_round(rounds, reqs, got)
        nxt = {}
        for k in batch_of:
            b = advance(k)
            if b is not None:
                nxt[k] = b
        batch_of = nxt
    return results, obs, rounds


def _entry(sp: Space, obs: Observations, b, cand, costs) -> dict:
    from budgetlab.alloc import allocate

    method, share = cand
    vals = [v for v in obs.of(sp, b, cand).values() if v is not None]
    n_sft, n_pft = (allocate(b, share, costs["sft_example"], costs["preference_pair"])
                    if costs else (None, None))
    return {"method": method, "sft_fraction": share, "n_sft": n_sft, "n_pft": n_pft,
            "score_mean": statistics.fmean(vals) if vals else None,
            "score_std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n_seeds": len(vals)}


def answer_rows(spaces: list[Space], results: dict, obs: Observations, strategy: Strategy,
                plan=None, capped: bool = False) -> list[dict]:
    """One answer per (task, model, budget): the best split found and its epsilon-band (the
    measured candidates within (1 - epsilon) of it), each with mean, spread and seeds
    measured; whether the band is separated from the rest given the seed spread."""
    costs = plan.spec.costs if plan is not None else {}
    rows = []
    for sp in spaces:
        for b in sp.budgets:
            a = results[(sp.task, sp.model)][b]
            best = _entry(sp, obs, b, a["best"], costs)
            row = {"task": sp.task, "model": sp.model, "budget": b,
                   "band": [_entry(sp, obs, b, c, costs)
                            for c in band(sp, obs, b, a["best"], strategy.epsilon)],
                   "best": best,
                   "stopped": ("separated" if a["separated"] else
                               "prior confirmed" if a.get("confirmed") else
                               "compute cap" if capped and best["n_seeds"] < len(sp.seeds)
                               else "seeds exhausted"),
                   "candidates_measured": len([c for c in sp.candidates if obs.of(sp, b, c)]),
                   "candidates": len(sp.candidates),
                   "finalists": [_entry(sp, obs, b, c, costs) for c in a["finalists"]]}
            if "confirmed" in a:
                row["transfer"] = {"prior": (None if a["prior"] is None else
                                             {"method": a["prior"][0],
                                              "sft_fraction": a["prior"][1]}),
                                   "confirmation_points": a["confirmation_points"],
                                   "confirmed": a["confirmed"],
                                   "confirmed_by": a.get("confirmed_by")}
            rows.append(row)
    return rows


def stopped_because(rows: list[dict], capped: bool, cap: float | None, unit: str) -> str:
    """The search's reason to stop, in one line."""
    open_ = [r for r in rows if r["stopped"] not in ("separated", "prior confirmed")]
    held = sum(r["stopped"] == "prior confirmed" for r in rows)
    if capped:
        return (f"compute cap: {cap:g} {unit.replace('_', '-')} reached; "
                f"{len(open_)} of {len(rows)} budget(s) not separated")
    if not open_:
        return (f"separated: every budget's band is separated from the rest ({len(rows)})"
                if not held else f"prior confirmed at {held} of {len(rows)} budget(s), the "
                f"others separated")
    return (f"seeds exhausted: {len(open_)} of {len(rows)} budget(s) not separated after "
            f"every seed of their finalists (the seed spread is wider than the band)")


def full_grid_compute(plan, measured: dict) -> tuple[float, str]:
    """The whole grid's compute: measured where a stage ran, else estimated from the rate
    of the measured stages of the same kind and model (per example for training, per stage
    for evals). Returns (hours, how)."""
    rates: dict = {}
    for sid, hours in measured.items():
        st = plan.stages.get(sid)
        if st is None or hours is None:
            continue
        work = 1.0 if st.kind == "eval" else float(st.n or 1)
        r = rates.setdefault((st.kind, st.model), [0.0, 0.0])
        r[0] += hours
        r[1] += work
    grid = {s for c in plan.cells for s in plan.points[c.point_id].chain if s}
    total, guessed, unknown = 0.0, 0, 0
    for sid in grid:
        if measured.get(sid) is not None:
            total += measured[sid]
            continue
        st = plan.stages[sid]
        r = rates.get((st.kind, st.model))
        if not r or not r[1]:
            unknown += 1
            continue
        total += r[0] / r[1] * (1.0 if st.kind == "eval" else float(st.n or 1))
        guessed += 1
    how = (f"{len(grid) - guessed - unknown} stage(s) measured, {guessed} estimated from the "
           f"measured rate of their kind and model" +
           (f", {unknown} of a kind not measured yet left out" if unknown else ""))
    return total, how


# -- on a ledger: each round submits its cells' stages and waits for them --------------------
def search(led, plan, workdir, strategy: Strategy, executor: str = "local", poll: float = 1.0,
           timeout: float | None = None, on_round=None, max_hours: float | None = None,
           priors: dict | None = None, transfer_from: str | None = None) -> dict:
    """Register the plan's grid, then search it: every round submits the stages of its cells'
    points (budgetlab.orchestrate.submit_stages; complete ones are reused), waits for them,
    and reads the scores from the ledger (budgetlab.report). Before each round the compute
    used so far is checked against `max_hours` (GPU-hours, or CPU-hours where no GPU was
    used): once reached, nothing more is submitted. `priors` (priors_from) make it a transfer
    search. The dict of `search --json`."""
    import time
    from pathlib import Path

    from budgetlab.backends import get_backend
    from budgetlab.errors import RuntimeFailure
    from budgetlab.orchestrate import submit_stages, wait
    from budgetlab.report import COMPLETED, build_report

    strategy.check()
    settings = dict(getattr(plan.spec, executor, {}) or {})
    backend = get_backend(executor, Path(workdir), settings)   # unknown: nothing written
    led.register(plan)
    cell_of = {(c.task, c.model, c.budget, c.sft_fraction, c.method, c.seed): c
               for c in plan.cells}
    before = {s.stage_id for s in led.stages(stage_ids=list(plan.stages))
              if s.state == COMPLETED}
    used: dict[str, None] = {}
    start = time.time()
    log = []
    capped = []

    def hours(ids):
        comp = led.compute(list(ids))
        gpu = {s: (comp.get(s) or {}).get("gpu_hours") or 0.0 for s in ids}
        cpu = {s: (comp.get(s) or {}).get("cpu_hours") for s in ids}
        return gpu, cpu

    def used_compute():
        gpu, cpu = hours(used)
        return sum(gpu.values()) if any(gpu.values()) else sum(v or 0.0 for v in cpu.values())

    def measure(reqs):
        if max_hours is not None and used and used_compute() >= max_hours:
            capped.append(True)
            return {}
        ids = []
        for r in reqs:
            p = plan.points[cell_of[(r.task, r.model, r.budget, r.sft_fraction, r.method,
                                     r.seed)].point_id]
            ids += [s for s in (p.sft_stage_id, p.pft_stage_id, p.eval_stage_id) if s]
        ids = list(dict.fromkeys(ids))
        used.update(dict.fromkeys(ids))
        res = submit_stages(led, ids, workdir, executor, settings, grid=plan.name,
                            backend=backend)
        left = None if timeout is None else max(0.0, timeout - (time.time() - start))
        st = wait(led, workdir, plan.name, poll_s=poll, timeout_s=left)
        if st["active"]:
            raise RuntimeFailure(f"{plan.name}: search stopped after {timeout:g} s with "
                                 f"{st['active']} stage(s) still running (they keep running; "
                                 f"`budgetlab search` again resumes from what finished)")
        rep = build_report(led, plan.name)
        scores = {(c["task"], c["model"], c["budget"], c["sft_fraction"], c["method"],
                   c["seed"]): c["score"] for c in rep.cells}
        got = {r: scores.get((r.task, r.model, r.budget, r.sft_fraction, r.method, r.seed))
               for r in reqs}
        log.append({"round": len(log) + 1, "cells": len(reqs), "stages": len(ids),
                    "submitted": sum(len(u.stages) for u in res.units),
                    "failed": sum(v is None for v in got.values())})
        if on_round is not None:
            on_round(log[-1])
        return got

    spaces = spaces_of(plan)
    driver = ladder if priors is None else transfer(priors)
    results, obs, rounds = run_search(spaces, measure, strategy, driver=driver)
    rep = build_report(led, plan.name)
    grid_stages = {s for c in plan.cells for s in plan.points[c.point_id].chain if s}
    gpu, cpu = hours(grid_stages)
    unit = "gpu_hours" if any(gpu[s] for s in used) else "cpu_hours"
    measured = gpu if unit == "gpu_hours" else cpu
    full, how = full_grid_compute(plan, {s: v for s, v in measured.items() if s in used or v})
    answers = answer_rows(spaces, results, obs, strategy, plan, capped=bool(capped))
    out = {
        "grid": plan.name, "epsilon": strategy.epsilon, "metric": rep.metric,
        "compute_unit": unit, "compute_used": sum(measured[s] or 0.0 for s in used),
        "compute_full_grid": full, "compute_full_grid_how": how,
        "stopped": stopped_because(answers, bool(capped), max_hours, unit),
        "answers": answers, "strategy": strategy.describe(),
        "cells_measured": sum(1 for v in obs.scores.values() for _ in v),
        "cells_grid": len(plan.cells),
        "stages_used": len(used), "stages_grid": len(grid_stages),
        "stage_fraction": len(used) / len(grid_stages) if grid_stages else 0.0,
        "stages_reused": len(set(used) & before),
        "gpu_hours": sum(gpu[s] for s in used),
        "cpu_hours": sum(cpu[s] or 0.0 for s in used),
        "rounds": log,
    }
    if priors is not None:
        tr = [a["transfer"] for a in answers if "transfer" in a]
        out["transfer"] = {
            "from": transfer_from, "budgets": len(tr),
            "confirmation_points": sum(t["confirmation_points"] for t in tr),
            "confirmed": sum(t["confirmed"] is True for t in tr),
            "not_confirmed": sum(t["confirmed"] is False for t in tr),
            "without_prior": sum(t["confirmed"] is None for t in tr),
            "cells_measured": out["cells_measured"]}
    return out
