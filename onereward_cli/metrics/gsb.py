"""Good-Same-Bad comparison of policy P against a baseline Q (paper A.3, Fig. 7).

Judged by the OneReward scorer: for each benchmark sample and each of its task's dimensions we ask
both orders, p_pq = P(yes | P first, Q second) and p_qp = P(yes | Q first, P second).
    Good  when P wins both orders: p_pq > 0.5 and p_qp < 0.5
    Bad   when Q wins both orders: p_pq < 0.5 and p_qp > 0.5
    Same  otherwise (the orders disagree, or a tie at exactly 0.5)
Asking both orders cancels the reward model's position bias: an order-dependent answer is "Same".
From human ratings (the `--human` file), a (sample, dimension) is Good when P's mean rating is higher
than Q's, Bad when lower, Same when equal. Proportions are per task, pooled over dimensions, and per
task x dimension. Net = (G - B) / (G + S + B) is common usage (the paper reports only proportions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

GOOD, SAME, BAD = "good", "same", "bad"
LABELS = (GOOD, SAME, BAD)
# Fig. 7's colours: Good orange, Same green, Bad blue.
COLORS = {GOOD: "#f28e2b", SAME: "#59a14f", BAD: "#4e79a7"}
ALL = "all"


def judge(p_pq: float, p_qp: float) -> str:
    """Good/Same/Bad for P from P(yes | P, Q) and P(yes | Q, P)."""
    if p_pq > 0.5 and p_qp < 0.5:
        return GOOD
    if p_pq < 0.5 and p_qp > 0.5:
        return BAD
    return SAME


def judge_ratings(p_value: float, q_value: float) -> str:
    if p_value > q_value:
        return GOOD
    if p_value < q_value:
        return BAD
    return SAME


@dataclass
class GSB:
    good: int = 0
    same: int = 0
    bad: int = 0

    def add(self, label: str):
        setattr(self, label, getattr(self, label) + 1)

    @property
    def total(self) -> int:
        return self.good + self.same + self.bad

    def proportions(self) -> dict[str, float]:
        n = self.total
        return {k: (getattr(self, k) / n if n else float("nan")) for k in LABELS}

    @property
    def net(self) -> float:
        return (self.good - self.bad) / self.total if self.total else float("nan")

    def to_dict(self) -> dict:
        p = self.proportions()
        return {"good": self.good, "same": self.same, "bad": self.bad, "n": self.total,
                "good_frac": p[GOOD], "same_frac": p[SAME], "bad_frac": p[BAD], "net": self.net}


def tally(judgements: Iterable[dict]) -> dict[str, dict[str, GSB]]:
    """{task: {"all": GSB, <dimension>: GSB}} from records {"task", "dimension", "label"}."""
    out: dict[str, dict[str, GSB]] = {}
    for j in judgements:
        per = out.setdefault(j["task"], {ALL: GSB()})
        per[ALL].add(j["label"])
        per.setdefault(j["dimension"], GSB()).add(j["label"])
    return out


# ----------------------------------------------------------------------------------------------
# Judgements
# ----------------------------------------------------------------------------------------------
def reward_judgements(scorer, task_cfgs: dict, pairs: Sequence[tuple], *, query_mode: str = "full",
                      bold: bool = False, batch_size: int = 4, progress=None) -> list[dict]:
    """Judge P against Q with the OneReward scorer, both orders, every dimension of each sample's task.

    `pairs`: (sample id, task, user prompt or None, P image (3,H,W) in [0,1], Q image). Returns one
    record per (sample, dimension): {"id","task","dimension","p_pq","p_qp","label"}.
    """
    import torch

    from ..reward import build_query

    out = []
    task_id = progress.add_task("GSB (reward model)", total=len(pairs)) if progress is not None else None
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        dims = [task_cfgs[task].dimensions for _, task, _, _, _ in chunk]
        queries = [[build_query(task_cfgs[task], d, prompt, query_mode, bold) for d in ds]
                   for (_, task, prompt, _, _), ds in zip(chunk, dims)]
        p_imgs = [p for *_, p, _ in chunk]
        q_imgs = [q for *_, q in chunk]
        with torch.no_grad():
            pq = scorer.p_yes(p_imgs, q_imgs, queries)
            qp = scorer.p_yes(q_imgs, p_imgs, queries)
        for (sid, task, _, _, _), ds, a, b in zip(chunk, dims, pq, qp):
            for d, x, y in zip(ds, a.tolist(), b.tolist()):
                out.append({"id": sid, "task": task, "dimension": d, "p_pq": float(x), "p_qp": float(y),
                            "label": judge(float(x), float(y))})
        if progress is not None:
            progress.advance(task_id, len(chunk))
    if progress is not None:
        progress.remove_task(task_id)
    return out


def rating_judgements(means: dict, p_model: str, q_model: str) -> list[dict]:
    """GSB from human ratings: `means` is {(task, sample, model, dimension): mean value}."""
    out = []
    for (task, sample, model, dim), v in sorted(means.items()):
        if model != p_model:
            continue
        q = means.get((task, sample, q_model, dim))
        if q is None:
            continue
        out.append({"id": sample, "task": task, "dimension": dim, "p": v, "q": q, "label": judge_ratings(v, q)})
    return out


# ----------------------------------------------------------------------------------------------
# Tables and Fig. 7
# ----------------------------------------------------------------------------------------------
def gsb_rows(results: dict[str, dict[str, dict[str, GSB]]], task_title) -> list[list]:
    """Rows "comparison | task | dimension | Good | Same | Bad | n | net" (percentages)."""
    rows = []
    for comp, per_task in results.items():
        for task, per_dim in per_task.items():
            for dim, g in sorted(per_dim.items(), key=lambda kv: (kv[0] != ALL, kv[0])):
                p = g.proportions()
                rows.append([comp, task_title(task), "all dimensions" if dim == ALL else dim,
                             100 * p[GOOD], 100 * p[SAME], 100 * p[BAD], g.total, g.net])
    return rows


def plot_gsb(results: dict[str, dict[str, dict[str, GSB]]], path, task_title, title: str = "Good / Same / Bad"):
    """Fig. 7 layout: one group per task, one stacked bar (Good, Same, Bad) per comparison."""
    from ..report import pyplot, save_figure

    plt = pyplot()
    comps = list(results)
    tasks = list(dict.fromkeys(t for per in results.values() for t in per))
    width = 0.8 / max(1, len(comps))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.9 * len(tasks) * max(1, len(comps)) ** 0.5 + 1.5), 3.8))
    for ci, comp in enumerate(comps):
        for ti, task in enumerate(tasks):
            g = results[comp].get(task, {}).get(ALL)
            if g is None or not g.total:
                continue
            x = ti + (ci - (len(comps) - 1) / 2) * width
            bottom = 0.0
            for lab in LABELS:
                frac = g.proportions()[lab]
                ax.bar(x, frac, width * 0.92, bottom=bottom, color=COLORS[lab],
                       label=lab.capitalize() if (ci == 0 and ti == 0) else None, edgecolor="white", linewidth=0.5)
                if frac >= 0.08:
                    ax.text(x, bottom + frac / 2, f"{100 * frac:.0f}%", ha="center", va="center", fontsize=7.5,
                            color="white")
                bottom += frac
            if len(comps) > 1:
                ax.text(x, 1.02, comp, ha="center", va="bottom", fontsize=6.5, rotation=90)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([task_title(t) for t in tasks], fontsize=8.5)
    ax.set_ylim(0, 1.0 if len(comps) == 1 else 1.35)
    ax.set_ylabel("proportion")
    ax.set_title(title if len(comps) != 1 else f"{title}: {comps[0]}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return save_figure(fig, path)
