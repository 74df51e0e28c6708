"""The decision's answer, computed from the replicated comparison and the target hardware only.

The basis is the largest pilot budget, or the target budget where the comparison extrapolated to it
(report.extrapolate, power law per method over the pilot budgets). Against full fine-tuning, each
LoRA-family method that fits the target is:
  - "about as good" when its learning is non-inferior (its paired difference's lower 95% bound above
    -ABOUT_AS_MUCH x full's learning) and it is not shown to forget more (the forgetting difference's
    lower bound not above 0): then the cheapest such method is the answer;
  - "worse" when full is shown to learn more (the upper bound below 0, or below the margin);
  - "cannot tell" otherwise: the answer is then the one that learned more by point estimate, marked
    as not established, with the time that would settle it left to the user.
Without full fine-tuning on the target (it does not fit), the LoRA-family method that learned most.

    python -c "from adaptlab.decide.answer import render; help(render)"
"""

from __future__ import annotations

from typing import Any

from adaptlab.decide.design import Design, fmt_s
from adaptlab.decide.search import Search
from adaptlab.decide.spec import DecideSpec
from adaptlab.decide.target import Target
from adaptlab.findings.claims import ABOUT_AS_MUCH, CLAIMED_LR_RATIO


def _arms_at(results: dict[str, Any], tokens: int) -> dict[str, dict[str, Any]]:
    return {
        a["method"]: a
        for a in results.get("arms", [])
        if a.get("status") == "ok" and (a.get("config") or {}).get("tokens") == tokens
    }


def _ci(d: dict[str, Any] | None) -> tuple[float, float] | None:
    if not d or d.get("ci95") is None:
        return None
    lo, hi = d["ci95"]
    return float(lo), float(hi)


def _extrapolated(results: dict[str, Any], method: str) -> dict[str, Any] | None:
    ex = results.get("extrapolation") or {}
    for row in ex.get("differences", []):
        if row["family"].split("-lr")[0] == method and row["reference"].split("-lr")[0] == "full":
            return row
    return None


def _judge(learn: dict[str, Any] | None, forget: dict[str, Any] | None, margin: float) -> str:
    """A LoRA-family method against full: "about as good" (non-inferior in learning within the margin
    and not shown to forget more), "learns less" (full shown to learn more), "forgets more" (shown to
    forget more, learning non-inferior or unclear), or "cannot tell"."""
    from adaptlab.findings import decide

    lci, fci = _ci(learn), _ci(forget)
    if lci is None:
        return "cannot tell"
    forgets_more = fci is not None and decide("superiority", fci) == "agrees"
    if decide("non-inferiority", lci, margin) == "agrees" and not forgets_more:
        return "about as good"
    if decide("superiority", (-lci[1], -lci[0])) == "agrees":  # full - LoRA > 0: full shown to learn more
        return "learns less"
    if forgets_more:
        return "forgets more"
    return "cannot tell"


def answer(
    spec: DecideSpec, design: Design, target: Target, searches: dict[str, Search], results: dict[str, Any]
) -> dict[str, Any]:
    """decision.json: the pick and why, each option's differences and costs, the search, the priors."""
    from adaptlab.findings.paired import difference

    fm = results.get("forgetting_metric", "drift_kl")
    top = max((b for b in design.budgets if _arms_at(results, b)), default=None)
    at_top = _arms_at(results, top) if top is not None else {}
    full = at_top.get("full")
    options: dict[str, dict[str, Any]] = {}
    for m in design.methods:
        arm = at_top.get(m)
        t = target.methods.get(m, {})
        opt: dict[str, Any] = {
            "method": m,
            "lr": searches[m].best if m in searches else None,
            "rank": None if m == "full" else spec.rank,
            "targets": None if m == "full" else spec.targets,
            "fits_target": target.fits(m),
            "target_peak_mem_bytes": t.get("peak_mem_bytes"),
            "target_time_s": t.get("time_s"),
            "strategy": t.get("strategy"),
            "pilot": None,
        }
        if arm is not None:
            opt["pilot"] = {
                "arm": arm["name"],
                "learning": arm["learning"],
                "forgetting": arm["forgetting"],
                "peak_mem_bytes": arm["cost"]["peak_mem_bytes"],
                "tokens_per_s": arm["cost"]["tokens_per_s"],
                "seeds": len(arm.get("runs") or []),
            }
        if full is not None and arm is not None and m != "full":
            opt["vs_full"] = {
                "tokens": top,
                "learning": difference(arm, full, "learning", fm),
                "forgetting": difference(arm, full, "forgetting", fm),
            }
            ex = _extrapolated(results, m) if spec.target_tokens else None
            if ex is not None:
                opt["vs_full_at_target"] = ex
        options[m] = opt
    pick, reason, basis = _pick(spec, options, full, results)
    return {
        "pick": pick,
        "reason": reason,
        "basis": basis,
        "forgetting_metric": fm,
        "options": options,
        "target": target.as_dict(),
        "design": design.as_dict(),
        "search": {m: s.as_dict() for m, s in searches.items()},
        "lr_ratio": _lr_ratio(searches),
        "extrapolation": results.get("extrapolation"),
        "priors": [
            f for f in (results.get("recommendation") or {}).get("findings", []) if f["verdict"] != "not run"
        ],
        "comparison": "compare/results.json",
        "report": "compare/report.md",
    }


def _pick(
    spec: DecideSpec, options: dict[str, dict[str, Any]], full: dict[str, Any] | None, results: dict[str, Any]
) -> tuple[str | None, str, str]:
    fitting = [m for m, o in options.items() if o["fits_target"] and o["pilot"] is not None]
    if not fitting:
        return None, "no method both fits the target and finished its pilot runs", ""
    if "full" not in fitting or full is None:
        best = max(fitting, key=lambda m: options[m]["pilot"]["learning"]["value"])
        why = (
            "full fine-tuning does not fit the target"
            if "full" in options
            else "full fine-tuning was not run"
        )
        return best, f"{why}; {best} learned the most of the rest", "pilot"
    margin = ABOUT_AS_MUCH * max(full["learning"]["value"], 0.0)
    verdicts = {}
    basis = "pilot"
    for m in fitting:
        if m == "full":
            continue
        o = options[m]
        ex = o.get("vs_full_at_target")
        learn, forget = (ex.get("learning"), ex.get("forgetting")) if ex else (None, None)
        if learn is not None:
            basis = "target"
        else:
            learn, forget = o["vs_full"]["learning"], o["vs_full"]["forgetting"]
        o["verdict"] = verdicts[m] = _judge(learn, forget, margin)
        o["margin"] = margin
    where = (
        f"at {spec.target_tokens:,} tokens (extrapolated)"
        if basis == "target"
        else "at the largest pilot budget"
    )
    good = [m for m, v in verdicts.items() if v == "about as good"]
    if good:
        cheapest = min(good, key=lambda m: options[m]["target_peak_mem_bytes"] or 0)
        return (
            cheapest,
            f"{cheapest} learns about as much as full fine-tuning {where} (non-inferior within "
            f"{100 * ABOUT_AS_MUCH:g}% of full's learning) and is not shown to forget more, for less memory",
            basis,
        )
    shown = {m: v for m, v in verdicts.items() if v in ("learns less", "forgets more")}
    if verdicts and len(shown) == len(verdicts):
        why = "; ".join(f"{m} {_shown(v, options[m], basis, where)}" for m, v in shown.items())
        return "full", why, basis
    best = max(fitting, key=lambda m: options[m]["pilot"]["learning"]["value"])
    unclear = [m for m, v in verdicts.items() if v == "cannot tell"]
    return (
        best,
        f"not established: the pilot cannot tell whether {', '.join(unclear)} learns about as much as full "
        f"fine-tuning {where}; {best} learned more by point estimate. More --time (longer budgets, more "
        "seeds) narrows the intervals",
        basis,
    )


def _shown(verdict: str, option: dict[str, Any], basis: str, where: str) -> str:
    """'is shown to learn less than full fine-tuning ... (difference [interval])' and the like."""
    vs = option.get("vs_full_at_target") if basis == "target" else None
    vs = vs or option.get("vs_full") or {}
    if verdict == "learns less":
        return (
            f"is shown to learn less than full fine-tuning {where} (difference {_fmt_ci(vs.get('learning'))})"
        )
    return (
        f"is shown to forget more than full fine-tuning {where} (difference {_fmt_ci(vs.get('forgetting'))}; "
        f"in learning {_fmt_ci(vs.get('learning'))}, not shown to be less)"
    )


def _lr_ratio(searches: dict[str, Search]) -> dict[str, Any] | None:
    full = searches.get("full")
    lora = searches.get("lora")
    if full is None or lora is None or full.best is None or lora.best is None:
        return None
    ratio = lora.best / full.best
    return {
        "ratio": ratio,
        "prior": CLAIMED_LR_RATIO,
        "note": "the search's winners on a sqrt(10)-spaced grid (no interval): a grid step either way is "
        "a factor of 3.2",
    }


def _fmt_ci(d: dict[str, Any] | None) -> str:
    if not d or d.get("value") is None:
        return "n/a"
    ci = _ci(d)
    return f"{d['value']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def render(d: dict[str, Any]) -> str:
    """decision.md: the answer first, then the evidence."""
    design = d["design"]
    lines = ["# Decision", ""]
    pick = d["pick"]
    opt = d["options"].get(pick) if pick else None
    if opt:
        shape = "" if pick == "full" else f" (rank {opt['rank']}, targets {opt['targets']})"
        lines.append(f"**Use {pick}{shape} at LR {opt['lr']:.2g}.** Why: {d['reason']}.")
    else:
        lines.append(f"**No answer.** {d['reason']}.")
    lines += ["", f"Target: {d['target']['where']}.", ""]
    unit = {"general_nll": "general NLL increase", "drift_kl": "drift KL", "mc_acc_drop": "MC accuracy drop"}
    lines += [
        f"| method | LR | learning (nats/token) | forgetting ({unit.get(d['forgetting_metric'], '')}) | "
        "vs full: learning | vs full: forgetting | fits target | peak memory there | time there | "
        "pilot tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, o in d["options"].items():
        p = o["pilot"] or {}
        vs = o.get("vs_full_at_target") or o.get("vs_full") or {}
        lines.append(
            f"| {m} | {o['lr']:.2g} | {_fmt_ci(p.get('learning'))} | {_fmt_ci(p.get('forgetting'))} | "
            f"{_fmt_ci(vs.get('learning'))} | {_fmt_ci(vs.get('forgetting'))} | "
            f"{'yes' if o['fits_target'] else 'no'} | {_gib(o['target_peak_mem_bytes'])} | "
            f"{fmt_s(o['target_time_s']) if o['target_time_s'] else 'n/a'} | "
            f"{p['tokens_per_s']:.0f} |"
            if o["lr"] is not None and p
            else f"| {m} | n/a | | | | | {'yes' if o['fits_target'] else 'no'} | | | |"
        )
    basis = "the target budget (extrapolated)" if d["basis"] == "target" else "the largest pilot budget"
    lines += [
        "",
        f"Learning and forgetting: at the largest pilot budget ({design['budgets'][-1]:,} tokens), mean over "
        f"{design['seeds']} seed(s), 95% intervals; differences are paired over documents and seeds, at {basis}.",
    ]
    ex = d.get("extrapolation")
    if ex and d["basis"] == "target":
        lines += ["", "## Extrapolation", ""] + [f"- {s}" for s in ex.get("summary", [])]
    lines += ["", "## LR search (successive halving)", ""]
    for m, s in d["search"].items():
        rungs = "; ".join(
            f"{design['budgets'][i]:,} tokens: "
            + ", ".join(
                f"{x['value']:.2g}" + (f" {x['loss']:.4f}" if x["loss"] is not None else " failed")
                for x in r["losses"]
            )
            for i, r in enumerate(s["rungs"])
        )
        lines.append(
            f"- {m}: best {s['best']:.2g}" + f" ({rungs})"
            if s["best"] is not None
            else f"- {m}: every run failed"
        )
    if d.get("lr_ratio"):
        r = d["lr_ratio"]
        lines.append(
            f"- LoRA's best LR / full's: {r['ratio']:.2g} (prior: about {r['prior']:g}x; {r['note']})"
        )
    if d["priors"]:
        lines += ["", "## Published findings on these runs", ""]
        lines += [f"- {f['claim']} ({f['source']}): {f['verdict_text']}" for f in d["priors"]]
    lines += [
        "",
        "## The experiment",
        "",
        f"{len(design['methods'])} methods x {len(design['lrs'][design['methods'][0]])} LR candidates, pilot budgets "
        f"{', '.join(f'{b:,}' for b in design['budgets'])} tokens, {design['seeds']} seed(s); "
        f"estimated {fmt_s(design['estimate_s'])}; this invocation took {fmt_s(d.get('wall_s') or 0)}.",
        *[f"- {n}" for n in design["notes"] + d["target"]["notes"]],
        "",
        f"Every run, the comparison's report and its results: {d['report']}, {d['comparison']}.",
    ]
    return "\n".join(lines) + "\n"
